"""``[engines.qwen_omni.vllm]``: settings of the vLLM thinker backend. Torch- and vllm-free
(the config loader imports it)."""

from __future__ import annotations

import msgspec

COMPILE_MODES = ("graphs", "compile", "eager")


class VllmOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """vLLM engine settings (``configs/default.toml`` documents each key)."""

    kv_cache_gb: float = 8.0  # vLLM's KV cache, every session's prefix (the leases) together
    # "graphs": no torch.compile, full CUDA graphs of the decode step (starts in seconds);
    # "compile": vLLM's default (torch.compile + piecewise/full graphs; ~140 s the first time);
    # "eager": neither (the CPU always runs eager)
    compile_mode: str = "graphs"
    gpu_memory_utilization: float = 0.5  # vLLM's start-up check: this share of the GPU must be free
    async_scheduling: bool = False  # overlap scheduling with the forward (outputs lag one step)
    cuda_graph_sizes: list[int] = msgspec.field(default_factory=list)  # decode batch sizes captured ([]: vLLM's)
    max_num_batched_tokens: int = 0  # tokens per engine step, prefill chunks included (0: max_prefill_tokens)
    prefill_while_listening: bool = True  # prefill each 2 s of user audio as it completes
    skip_mm_profiling: bool = False  # skip the audio encoder's memory profile at start (CPU tests)
    model_dir: str = ""  # random_init: where the synthetic model directory is written ("": a cache dir)

    def __post_init__(self) -> None:
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"vllm.compile_mode {self.compile_mode!r} is not one of {', '.join(COMPILE_MODES)}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("vllm.gpu_memory_utilization must be in (0, 1]")
        if self.kv_cache_gb <= 0:
            raise ValueError("vllm.kv_cache_gb must be > 0")
        if self.max_num_batched_tokens < 0:
            raise ValueError("vllm.max_num_batched_tokens must be >= 0")
        if any(n < 1 for n in self.cuda_graph_sizes):
            raise ValueError("vllm.cuda_graph_sizes must be positive batch sizes")
