"""Loading Qwen2.5-Omni from a local directory, or building it with random weights.

A model directory is what the release ships: ``config.json``, ``*.safetensors`` (with
``model.safetensors.index.json`` when sharded), the tokenizer files and ``spk_dict.pt``
(the speakers: a text start token, a conditioning vector and a reference mel each).
Nothing is ever downloaded: a missing file is an error naming it.

* stage0 loads the thinker with ``Qwen2_5OmniForConditionalGeneration.from_pretrained``
  (audio output disabled, so the talker's weights are not read) and drops the vision
  encoder, which duplexd never feeds;
* stage1 builds talker + token2wav from the config on its device and reads only their
  tensors from the safetensors files, so it never holds the 7B thinker.

``random_init`` builds the same modules from :mod:`configs` instead, directly on the
device in the requested dtype, with a synthetic speaker map (random init has none).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from duplexd.actors.engines.qwen_omni.configs import fix_config, omni_config
from duplexd.actors.engines.qwen_omni.options import QwenOmniOptions
from duplexd.actors.engines.qwen_omni.tokens import ChatTokens, word_tokenizer
from duplexd.bus.log import get_logger, log

# Weights come from local directories only: never let transformers reach for the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

_log = get_logger(__name__)
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
SYNTHETIC_SPEAKERS = ("Chelsie", "Ethan")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {name!r} requested but CUDA is not available (torch {torch.__version__})")
        index = dev.index or 0
        if index >= torch.cuda.device_count():
            raise RuntimeError(f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
        dev = torch.device("cuda", index)
    return dev


def set_threads(opts: QwenOmniOptions, device: torch.device) -> None:
    if device.type == "cpu" and opts.cpu_threads:
        torch.set_num_threads(opts.cpu_threads)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The CPU runs float32: its bfloat16 matmuls are slow and tests compare exactly."""
    return torch.float32 if device.type == "cpu" else _DTYPES[name]


@dataclass(slots=True)
class Speaker:
    name: str
    bos_token: int  # thinker id that starts the talker's text stream in this voice
    cond: torch.Tensor  # [1, enc_emb_dim] conditioning vector of the DiT
    ref_mel: torch.Tensor  # [1, frames, mel_dim] reference mel of the voice


def load_config(opts: QwenOmniOptions) -> Any:
    if opts.random_init:
        return fix_config(omni_config(opts.random_size))
    from transformers import Qwen2_5OmniConfig

    path = _model_dir(opts)
    return fix_config(Qwen2_5OmniConfig.from_pretrained(str(path), local_files_only=True))


def _model_dir(opts: QwenOmniOptions) -> Path:
    if not opts.model_path:
        raise ValueError("engines.qwen-omni: set model_path to a local Qwen2.5-Omni directory, or random_init = true")
    path = Path(opts.model_path).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json (a Qwen2.5-Omni model directory is needed)")
    return path


def load_speakers(opts: QwenOmniOptions, config: Any, device: torch.device) -> dict[str, Speaker]:
    """The speaker map of ``spk_dict.pt``, or a synthetic one (pitfall: random init has none)."""
    if opts.random_init:
        return synthetic_speakers(config, opts.seed, device)
    path = _model_dir(opts) / "spk_dict.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the speaker map is missing")
    raw = torch.load(str(path), weights_only=True, map_location="cpu")
    mel_dim = int(config.token2wav_config.dit_config.mel_dim)
    out = {}
    for name, v in raw.items():
        out[name] = Speaker(
            name,
            int(v["bos_token"]),
            torch.as_tensor(v["cond"]).float().reshape(1, -1).to(device),
            torch.as_tensor(v["ref_mel"]).float().reshape(1, -1, mel_dim).to(device),
        )
    if not out:
        raise ValueError(f"{path}: no speakers in the speaker map")
    return out


def synthetic_speakers(config: Any, seed: int, device: torch.device) -> dict[str, Speaker]:
    dit = config.token2wav_config.dit_config
    g = torch.Generator().manual_seed(seed + 7)
    bos = int(config.talker_config.tts_text_start_token_id)
    out = {}
    for name in SYNTHETIC_SPEAKERS:
        cond = 0.1 * torch.randn(1, int(dit.enc_emb_dim), generator=g)
        ref_mel = -5.0 + 2.0 * torch.randn(1, 300, int(dit.mel_dim), generator=g)  # log-mel range of speech
        out[name] = Speaker(name, bos, cond.to(device), ref_mel.to(device))
    return out


def speaker_raw(speakers: dict[str, Speaker]) -> dict[str, dict[str, Any]]:
    """``spk_dict.pt`` content for ``speakers`` (tests write model directories with it)."""
    return {
        s.name: {"bos_token": s.bos_token, "cond": s.cond.cpu()[0], "ref_mel": s.ref_mel.cpu()[0]}
        for s in speakers.values()
    }


def load_tokens(opts: QwenOmniOptions, config: Any) -> ChatTokens:
    if opts.random_init:
        return ChatTokens(word_tokenizer(opts.random_size), config.thinker_config)
    from transformers import AutoTokenizer

    path = _model_dir(opts)
    return ChatTokens(AutoTokenizer.from_pretrained(str(path), local_files_only=True), config.thinker_config)


@dataclass(slots=True)
class ThinkerParts:
    thinker: Any
    text: Any  # the Qwen2 language model: embed_tokens, layers, norm
    audio: Any  # the audio encoder
    lm_head: Any
    config: Any


def load_thinker(opts: QwenOmniOptions, config: Any, device: torch.device, dtype: torch.dtype) -> ThinkerParts:
    t0 = time.perf_counter()
    if opts.random_init:
        from transformers import Qwen2_5OmniThinkerForConditionalGeneration

        log(_log, logging.INFO, "qwen-omni: building the thinker with random weights", size=opts.random_size,
            device=str(device), dtype=str(dtype).removeprefix("torch."))
        torch.manual_seed(opts.seed)
        with torch.device(device):
            thinker = Qwen2_5OmniThinkerForConditionalGeneration._from_config(config.thinker_config, dtype=dtype)
    else:
        from transformers import Qwen2_5OmniForConditionalGeneration

        path = _model_dir(opts)
        log(_log, logging.INFO, "qwen-omni: loading the thinker", path=str(path), device=str(device),
            dtype=str(dtype).removeprefix("torch."))
        config.enable_audio_output = False  # the talker's weights belong to stage1
        kwargs: dict[str, Any] = {"config": config, "dtype": dtype, "local_files_only": True}
        try:
            model = Qwen2_5OmniForConditionalGeneration.from_pretrained(str(path), device_map=str(device), **kwargs)
        except Exception as exc:  # e.g. device_map needs accelerate: a real error fails again below
            log(_log, logging.WARNING, "qwen-omni: loading on the CPU first", reason=str(exc))
            model = Qwen2_5OmniForConditionalGeneration.from_pretrained(str(path), **kwargs).to(device)
        thinker = model.thinker
    thinker.eval().requires_grad_(False)
    inner = thinker.model
    text, audio = thinker_text_model(thinker), thinker_audio_tower(thinker)
    for owner in (inner, thinker):
        if getattr(owner, "visual", None) is not None:
            owner.visual = None  # duplexd never feeds images: free the vision encoder
    if device.type == "cuda":
        torch.cuda.empty_cache()
    params = sum(p.numel() for p in thinker.parameters())
    log(_log, logging.INFO, "qwen-omni: thinker ready", params_m=round(params / 1e6, 1),
        load_s=round(time.perf_counter() - t0, 2))
    return ThinkerParts(thinker, text, audio, thinker.lm_head, config)


@dataclass(slots=True)
class TalkerParts:
    talker: Any
    token2wav: Any
    config: Any


def load_talker(
    opts: QwenOmniOptions, config: Any, device: torch.device, dtype: torch.dtype, t2w_dtype: torch.dtype
) -> TalkerParts:
    from transformers import Qwen2_5OmniTalkerForConditionalGeneration, Qwen2_5OmniToken2WavModel

    t0 = time.perf_counter()
    log(_log, logging.INFO, "qwen-omni: building talker + token2wav", random=opts.random_init, device=str(device),
        dtype=str(dtype).removeprefix("torch."), token2wav_dtype=str(t2w_dtype).removeprefix("torch."))
    torch.manual_seed(opts.seed + 1)
    with torch.device(device):
        talker = Qwen2_5OmniTalkerForConditionalGeneration._from_config(config.talker_config, dtype=dtype)
        t2w = Qwen2_5OmniToken2WavModel._from_config(config.token2wav_config, dtype=t2w_dtype)
    if not opts.random_init:
        read_prefixed(_model_dir(opts), {"talker.": talker, "token2wav.": t2w}, device)
    t2w.to(t2w_dtype)
    for m in (talker, t2w):
        m.eval().requires_grad_(False)
    log(_log, logging.INFO, "qwen-omni: talker ready",
        talker_params_m=round(sum(p.numel() for p in talker.parameters()) / 1e6, 1),
        token2wav_params_m=round(sum(p.numel() for p in t2w.parameters()) / 1e6, 1),
        load_s=round(time.perf_counter() - t0, 2))
    return TalkerParts(talker, t2w, config)


def read_prefixed(path: Path, modules: dict[str, Any], device: torch.device) -> None:
    """Loads the tensors under each prefix of the checkpoint into its module; an expected
    tensor missing from the checkpoint is an error naming it."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        files = sorted({f for k, f in weight_map.items() if any(k.startswith(p) for p in modules)})
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors holding {', '.join(modules)} weights")
    states: dict[str, dict[str, torch.Tensor]] = {p: {} for p in modules}
    for i, name in enumerate(files, 1):
        t0 = time.perf_counter()
        with safe_open(str(path / name), framework="pt", device=str(device)) as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                for prefix in modules:
                    if key.startswith(prefix):
                        states[prefix][key[len(prefix) :]] = f.get_tensor(key)
        log(_log, logging.INFO, "qwen-omni: read weights", file=name, shard=f"{i}/{len(files)}",
            read_s=round(time.perf_counter() - t0, 2))
    for prefix, module in modules.items():
        state = states[prefix]
        expected = set(module.state_dict().keys())
        missing = sorted(expected - set(state))
        if missing:
            raise KeyError(f"{path}: the checkpoint lacks {len(missing)} {prefix}* tensors, e.g. {missing[:3]}")
        result = module.load_state_dict(state, strict=False)
        if result.unexpected_keys:
            log(_log, logging.WARNING, "qwen-omni: unused checkpoint tensors", prefix=prefix,
                count=len(result.unexpected_keys), first=result.unexpected_keys[:3])


def thinker_text_model(thinker: Any) -> Any:
    """The thinker's decoder stack (layers, norm, embed_tokens), wherever this transformers
    version keeps it (5.17: ``thinker.model`` itself; later: ``thinker.model.language_model``)."""
    inner = thinker.model
    return getattr(inner, "language_model", None) or inner


def thinker_audio_tower(thinker: Any) -> Any:
    """The thinker's audio encoder (5.17: ``thinker.audio_tower``; later: under ``thinker.model``)."""
    return getattr(thinker.model, "audio_tower", None) or thinker.audio_tower
