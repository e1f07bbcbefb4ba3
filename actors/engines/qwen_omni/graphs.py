"""CUDA graphs of fixed-shape steps, keyed by bucket, replayed instead of launching kernels.

A decode step of a 28-layer model is ~1000 small kernels; launched one by one from
Python they cost more than the math at small batch sizes. A captured graph replays
them in one call. Step functions read only static input buffers and write only static
outputs and the KV cache, so replay is exact. Off CUDA (or with graphs disabled) the
same function simply runs eagerly: the CPU tests exercise every line but the capture.

Every bucket is captured before READY (a bucket captured lazily would stall the first
step of its size by the capture time); a bucket whose capture fails runs eagerly and
the others are still captured. ``times`` keeps each capture's duration.
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

    def __init__(self, device: torch.device, enabled: bool, name: str, warmups: int = 1) -> None:
        self.enabled = enabled and device.type == "cuda"
        self.device = device
        self.name = name
        self.warmups = warmups  # eager runs before a capture (lazy initialisation, allocator warm-up)
        self._graphs: dict[Hashable, tuple[Any, Any]] = {}
        self._pool: Any = torch.cuda.graph_pool_handle() if self.enabled else None
        self.capture_s = 0.0
        self.times: dict[Hashable, float] = {}  # capture seconds by key (warm-up runs included)
        self.failures: dict[Hashable, str] = {}  # key -> capture error: that key runs eagerly

    def __len__(self) -> int:
        return len(self._graphs)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._graphs

    @property
    def failed(self) -> str:
        """The first capture error ("" when every capture worked)."""
        return next(iter(self.failures.values()), "")

    def capture(self, key: Hashable, fn: Callable[[], Any], stream: Any = None) -> None:
        """Warm ``fn`` up on a side stream, then capture it (CUDA only)."""
        if not self.enabled or key in self._graphs or key in self.failures:
            return
        t0 = time.perf_counter()
        try:
            side = torch.cuda.Stream(device=self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(self.warmups):
                    fn()
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool, stream=stream):
                out = fn()
            torch.cuda.synchronize(self.device)
        except Exception as exc:  # a step that cannot be captured still works eagerly
            self.failures[key] = f"{type(exc).__name__}: {exc}"
            log(_log, logging.ERROR, "CUDA graph capture failed; this bucket runs eagerly", graph=self.name,
                key=str(key), error=self.failures[key])
            torch.cuda.synchronize(self.device)
            return
        self._graphs[key] = (graph, out)
        took = time.perf_counter() - t0
        self.times[key] = took
        self.capture_s += took

    def run(self, key: Hashable, fn: Callable[[], Any]) -> Any:
        """Replay the graph of ``key`` (its outputs are static tensors), or run ``fn``."""
        entry = self._graphs.get(key)
        if entry is None:
            return fn()
        entry[0].replay()
        return entry[1]
