"""Build the Moshi model: from a local checkpoint, or random weights for benchmarks.

Nothing is ever downloaded: ``model_path`` is a directory written by ``save_pretrained``
(config.json + safetensors, optionally the tokenizer). ``random_init`` builds the
architecture of ``model_path``'s config.json (or the full-size Moshi when no path is
given) with random weights, directly on the target device in the target dtype, which
takes seconds even at 7.8 B parameters.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from duplexd.actors.engines.moshi.options import MoshiOptions
from duplexd.bus.log import get_logger, log

_log = get_logger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} asked for, but CUDA is not available")
    return dev


def resolve_dtype(name: str, device: torch.device, fallback: torch.dtype | None = None) -> torch.dtype:
    if name != "auto":
        return _DTYPES[name]
    if fallback is not None:
        return fallback
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def full_size_config() -> Any:
    """The full Moshi architecture (7.8 B parameters with the Mimi codec)."""
    from transformers import MimiConfig, MoshiConfig

    return MoshiConfig(audio_encoder_config=MimiConfig().to_dict(), depth_decoder_config={})


def _gib(model: torch.nn.Module) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30


def load_model(opts: MoshiOptions, progress: Callable[[str], None] | None = None) -> tuple[Any, Any | None]:
    """(MoshiForConditionalGeneration in eval mode on its device, tokenizer or None)."""
    from transformers import MoshiConfig, MoshiForConditionalGeneration

    say = progress or (lambda msg: log(_log, logging.INFO, msg))
    if opts.cpu_threads > 0:
        torch.set_num_threads(opts.cpu_threads)
    device = resolve_device(opts.device)
    dtype = resolve_dtype(opts.dtype, device)
    mimi_dtype = resolve_dtype(opts.mimi_dtype, device, dtype)
    path = Path(opts.model_path) if opts.model_path else None
    if path is not None and not (path / "config.json").is_file():
        raise FileNotFoundError(f"model_path {str(path)!r} has no config.json (a save_pretrained directory)")
    t0 = time.perf_counter()
    if opts.random_init:
        config = MoshiConfig.from_pretrained(str(path)) if path is not None else full_size_config()
        say(f"moshi: random weights ({config.num_hidden_layers} layers, hidden {config.hidden_size}) on {device}")
        with torch.device(device):
            model = MoshiForConditionalGeneration._from_config(config, dtype=dtype)
    else:
        if path is None:
            raise ValueError("engines.moshi: set model_path (a local checkpoint directory) or random_init = true")
        say(f"moshi: loading weights from {path} as {str(dtype).removeprefix('torch.')} onto {device}")
        model = _from_pretrained(MoshiForConditionalGeneration, path, dtype, device)
    # Parameters only: a blanket .to() would also round the codec's RoPE frequencies.
    for p in model.audio_encoder.parameters():
        p.data = p.data.to(mimi_dtype)
    model.eval().requires_grad_(False)
    say(f"moshi: model ready ({_gib(model):.2f} GiB) in {time.perf_counter() - t0:.1f} s")
    tokenizer = load_tokenizer(opts.tokenizer_path or opts.model_path)
    return model, tokenizer


def _from_pretrained(cls: Any, path: Path, dtype: torch.dtype, device: torch.device) -> Any:
    if device.type == "cpu":
        return cls.from_pretrained(str(path), dtype=dtype)
    try:
        # Straight onto the GPU, shard by shard (needs accelerate on some versions).
        return cls.from_pretrained(str(path), dtype=dtype, device_map=str(device))
    except (ImportError, ValueError) as exc:
        log(_log, logging.INFO, "device_map unavailable; loading on the CPU first", error=str(exc))
        return cls.from_pretrained(str(path), dtype=dtype).to(device)


def load_tokenizer(path: str) -> Any | None:
    """The text tokenizer saved beside the weights, or None (text then shows as ids)."""
    if not path:
        return None
    p = Path(path)
    if not any((p / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        log(_log, logging.WARNING, "no tokenizer in model_path; text deltas will be token ids", path=path)
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
