"""CUDA graphs of fixed-shape steps, keyed by bucket, replayed instead of launching kernels.

A decode step of a 28-layer model is ~1000 small kernels; launched one by one from
Python they cost more than the math at small batch sizes. A captured graph replays
them in one call. Step functions read only static input buffers and write only static
outputs and the KV cache, so replay is exact. Off CUDA (or with graphs disabled) the
same function simply runs eagerly: the CPU tests exercise every line but the capture.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable
from typing import Any

import torch

from duplexd.bus.log import get_logger, log

_log = get_logger(__name__)


class GraphCache:
    """Captured graphs of one or more step functions, by key."""

    def __init__(self, device: torch.device, enabled: bool, name: str) -> None:
        self.enabled = enabled and device.type == "cuda"
        self.device = device
        self.name = name
        self._graphs: dict[Hashable, tuple[Any, Any]] = {}
        self._pool: Any = torch.cuda.graph_pool_handle() if self.enabled else None
        self.capture_s = 0.0
        self.failed: str = ""  # first capture error: the step then runs eagerly

    def __len__(self) -> int:
        return len(self._graphs)

    def capture(self, key: Hashable, fn: Callable[[], Any], stream: Any = None) -> None:
        """Warm ``fn`` up on a side stream, then capture it (CUDA only)."""
        if not self.enabled or key in self._graphs or self.failed:
            return
        t0 = time.perf_counter()
        try:
            side = torch.cuda.Stream(device=self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    fn()
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool, stream=stream):
                out = fn()
            torch.cuda.synchronize(self.device)
        except Exception as exc:  # a step that cannot be captured still works eagerly
            self.failed = f"{type(exc).__name__}: {exc}"
            log(_log, logging.ERROR, "CUDA graph capture failed; running eagerly", graph=self.name, key=str(key),
                error=self.failed)
            torch.cuda.synchronize(self.device)
            return
        self._graphs[key] = (graph, out)
        self.capture_s += time.perf_counter() - t0

    def run(self, key: Hashable, fn: Callable[[], Any]) -> Any:
        """Replay the graph of ``key`` (its outputs are static tensors), or run ``fn``."""
        entry = self._graphs.get(key)
        if entry is None:
            return fn()
        entry[0].replay()
        return entry[1]
