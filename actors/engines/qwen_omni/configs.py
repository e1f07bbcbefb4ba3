"""Qwen2.5-Omni configurations for random-weight runs, and the fixes every config needs.

``full`` has the shapes of the released 7B checkpoint (thinker: 28 layers, 3584 wide,
152064 tokens; talker: 24 layers, 896 wide; token2wav: 22-layer DiT + BigVGAN), so a
benchmark with random weights costs what the real model costs. ``tiny`` is small enough
for CPU tests and keeps every structural constant that matters for streaming (128 mel
bins, 2 s encoder windows, 24-frame DiT blocks, the 240x BigVGAN upsampling to 24 kHz).
"""

from __future__ import annotations

from typing import Any

# Token ids of the release (Qwen2 tokenizer); the tiny config places its own at the top of a small vocab.
FULL_IDS = {
    "endoftext": 151643,
    "im_start": 151644,
    "im_end": 151645,
    "audio": 151646,
    "audio_start": 151647,
    "audio_end": 151648,
    "vision_start": 151652,
    "vision_end": 151653,
    "image": 151655,
    "video": 151656,
    "tts_pad": 151859,
    "tts_start": 151860,
    "tts_end": 151861,
}
TINY_VOCAB = 256
TINY_IDS = {name: TINY_VOCAB - 1 - i for i, name in enumerate(FULL_IDS)}
TINY_SPECIAL_FIRST = min(TINY_IDS.values())
TINY_CODEC_VOCAB = 72  # codec ids < 64 are speech codes; the specials sit above (as 8292.. sit above 8193)
TINY_CODEC = {"pad": 64, "bos": 65, "eos": 66, "mask": 68}
FULL_CODEC = {"pad": 8292, "bos": 8293, "eos": 8294, "mask": 8296}


def thinker_kwargs(size: str) -> dict[str, Any]:
    if size == "full":
        ids = FULL_IDS
        return {
            "audio_config": {},  # the release's encoder: 32 layers, d_model 1280, 2 s windows
            "vision_config": {
                "depth": 32,
                "hidden_size": 1280,
                "intermediate_size": 3420,
                "num_heads": 16,
                "out_hidden_size": 3584,
                "fullatt_block_indexes": [7, 15, 23, 31],
            },
            "text_config": {
                "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}
            },
            **_thinker_ids(ids),
        }
    ids = TINY_IDS
    hidden = 64
    return {
        "audio_config": {
            "num_mel_bins": 128,
            "encoder_layers": 2,
            "encoder_attention_heads": 2,
            "encoder_ffn_dim": 64,
            "d_model": 32,
            "n_window": 100,
            "output_dim": hidden,
            "max_source_positions": 1500,
        },
        "vision_config": {
            "depth": 1,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": hidden,
            "fullatt_block_indexes": [0],
        },
        "text_config": {
            "vocab_size": TINY_VOCAB,
            "hidden_size": hidden,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 32768,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
        },
        **_thinker_ids(ids),
    }


def _thinker_ids(ids: dict[str, int]) -> dict[str, Any]:
    return {
        "audio_token_index": ids["audio"],
        "image_token_index": ids["image"],
        "video_token_index": ids["video"],
        "audio_start_token_id": ids["audio_start"],
        "audio_end_token_id": ids["audio_end"],
        # Pitfall: the thinker config has no vision_start_token_id, but get_rope_index reads it.
        "vision_start_token_id": ids["vision_start"],
    }


def talker_kwargs(size: str) -> dict[str, Any]:
    if size == "full":
        ids, codec = FULL_IDS, FULL_CODEC
        shape: dict[str, Any] = {
            "vocab_size": 8448,
            "embedding_size": 3584,
            "hidden_size": 896,
            "intermediate_size": 18944,
            "num_hidden_layers": 24,
            "num_attention_heads": 12,
            "num_key_value_heads": 4,
            "head_dim": 128,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        }
    else:
        ids, codec = TINY_IDS, TINY_CODEC
        shape = {
            "vocab_size": TINY_CODEC_VOCAB,
            "embedding_size": 64,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 16,
            "max_position_embeddings": 32768,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
        }
    return {
        **shape,
        "audio_token_index": ids["audio"],
        "image_token_index": ids["image"],
        "video_token_index": ids["video"],
        "audio_start_token_id": ids["audio_start"],
        "audio_end_token_id": ids["audio_end"],
        "vision_start_token_id": ids["vision_start"],
        "vision_end_token_id": ids["vision_end"],
        "tts_text_start_token_id": ids["tts_start"],
        "tts_text_end_token_id": ids["tts_end"],
        "tts_text_pad_token_id": ids["tts_pad"],
        "tts_codec_start_token_id": codec["bos"],
        "tts_codec_end_token_id": codec["eos"],
        "tts_codec_pad_token_id": codec["pad"],
        "tts_codec_mask_token_id": codec["mask"],
    }


def token2wav_kwargs(size: str) -> dict[str, Any]:
    if size == "full":
        return {"dit_config": {}, "bigvgan_config": {}}
    return {
        "dit_config": {
            "hidden_size": 32,
            "num_hidden_layers": 4,
            "num_attention_heads": 2,
            "head_dim": 16,
            "ff_mult": 2,
            "emb_dim": 16,
            "block_size": 24,
            "look_ahead_layers": [2],
            "look_backward_layers": [0, 3],
            "repeats": 2,
            "num_embeds": 64,
            "mel_dim": 80,
            "enc_emb_dim": 16,
            "enc_dim": 16,
            "enc_channels": [16, 16, 16, 16, 48],
            "enc_attention_channels": 8,
            "enc_se_channels": 8,
            "dropout": 0.0,
        },
        "bigvgan_config": {
            "mel_dim": 80,
            "upsample_initial_channel": 64,
            "resblock_kernel_sizes": [3],
            "resblock_dilation_sizes": [[1, 3, 5]],
        },
    }


def omni_config(size: str) -> Any:
    """The whole Qwen2_5OmniConfig (thinker + talker + token2wav) of ``size``."""
    from transformers import Qwen2_5OmniConfig

    return Qwen2_5OmniConfig(
        thinker_config=thinker_kwargs(size),
        talker_config=talker_kwargs(size),
        token2wav_config=token2wav_kwargs(size),
    )


def fix_config(config: Any) -> Any:
    """Fills what released configs lack but the code reads (see the module docstring)."""
    thinker = config.thinker_config
    if getattr(thinker, "vision_start_token_id", None) is None:
        talker = getattr(config, "talker_config", None)
        thinker.vision_start_token_id = getattr(talker, "vision_start_token_id", None) or FULL_IDS["vision_start"]
    return config
