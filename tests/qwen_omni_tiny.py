"""A tiny Qwen2.5-Omni model directory, written by the tests (no download): random weights in
the ``tiny`` shapes, saved with ``save_pretrained`` next to a word tokenizer and a speaker
map, so the engine loads it through its real local-path code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

SEED = 1234


def make_model_dir(path: Path, seed: int = SEED) -> Path:
    import torch
    import transformers
    from transformers import Qwen2_5OmniForConditionalGeneration

    from duplexd.actors.engines.qwen_omni.configs import omni_config
    from duplexd.actors.engines.qwen_omni.loading import (
        speaker_raw,
        synthetic_speakers,
        thinker_audio_tower,
        thinker_text_model,
    )
    from duplexd.actors.engines.qwen_omni.tokens import word_tokenizer

    transformers.logging.set_verbosity_error()
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = omni_config("tiny")
    model = Qwen2_5OmniForConditionalGeneration(config).eval()
    big = model.token2wav.code2wav_bigvgan_model
    with torch.no_grad():
        # Random init makes BigVGAN nearly silent (~1e-8); louder output lets tests compare audio.
        big.conv_post.weight.mul_(2.0e5)
        # Weights of std 0.02 make attention nearly uniform and the encoder all position, no
        # content: a model that barely notices its context could not show a corrupted one.
        # Sharper attention makes positions count; stronger convolutions make audio count.
        for part in (thinker_text_model(model.thinker), model.talker):
            for name, m in part.named_modules():
                if name.endswith(("q_proj", "k_proj")):
                    m.weight.mul_(8.0)
        tower = thinker_audio_tower(model.thinker)
        tower.conv1.weight.mul_(30.0)
        tower.conv2.weight.mul_(30.0)
    speakers = synthetic_speakers(config, seed, torch.device("cpu"))
    model.speaker_map = speaker_raw(speakers)  # pitfall: random init has an empty speaker map
    model.save_pretrained(str(path))
    torch.save(speaker_raw(speakers), str(path / "spk_dict.pt"))
    word_tokenizer("tiny").save_pretrained(str(path))
    return path


def engine_options(model_dir: Path, **over: Any) -> dict[str, Any]:
    """``[engines.qwen_omni]`` for fast, deterministic CPU runs."""
    opts: dict[str, Any] = {
        "model_path": str(model_dir),
        "stage0_device": "cpu",
        "stage1_device": "cpu",
        "cpu_threads": 1,
        "greedy": True,
        "talker_greedy": True,
        "max_sessions": 4,
        "max_context": 1024,
        "max_reply_tokens": 24,
        "min_reply_tokens": 20,
        "max_codec_tokens": 48,
        "min_codec_tokens": 40,
        "t2w_steps": 2,
        "t2w_chunk": 24,
        "vocoder_context": 4,
        "speech_chars_per_s": 40.0,  # the reply's ~9 words spread over its ~1 s of audio
    }
    opts.update(over)
    return opts
