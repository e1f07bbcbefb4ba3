"""A tiny random Moshi (LM, depth decoder, Mimi codec) for tests and the CPU benchmark run.

The codec keeps Mimi's real frame geometry (24 kHz, SEANet ratios 8·6·5·4, 12.5 Hz codes,
two 25 Hz transformer steps per frame) with few channels; the LM keeps 8 codebooks per
stream. ``save_tiny`` writes a real ``save_pretrained`` checkpoint plus a word-level
tokenizer, so tests load it through the engine's own loading code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TEXT_VOCAB = 48
AUDIO_VOCAB = 64
PAD, EPAD = 3, 0


def tiny_config(**lm: Any) -> Any:
    from transformers import MimiConfig, MoshiConfig

    mimi = MimiConfig(
        hidden_size=16,
        num_filters=4,
        num_residual_layers=1,
        codebook_size=AUDIO_VOCAB,
        codebook_dim=8,
        vector_quantization_hidden_dimension=8,
        num_quantizers=8,
        upsample_groups=16,
        num_hidden_layers=2,
        intermediate_size=32,
        num_attention_heads=2,
        num_key_value_heads=2,
        sliding_window=10,
        max_position_embeddings=64,
    )
    depth = {
        "hidden_size": 16,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "ffn_dim": 32,
    }
    args: dict[str, Any] = {
        "vocab_size": TEXT_VOCAB,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "ffn_dim": 64,
        "max_position_embeddings": 512,
        "sliding_window": 512,
        "num_codebooks": 8,
    }
    args.update(lm)
    return MoshiConfig(audio_encoder_config=mimi.to_dict(), depth_decoder_config=depth, **args)


def tiny_model(seed: int = 0, **lm: Any) -> Any:
    import torch
    from transformers import MoshiForConditionalGeneration

    torch.manual_seed(seed)
    model = MoshiForConditionalGeneration(tiny_config(**lm)).eval()
    _codebooks(model, seed)
    return model


def _codebooks(model: Any, seed: int) -> None:
    """HF initialises codebooks to zero (all codes tie): give them distinct centroids."""
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    for mod in model.audio_encoder.modules():
        if type(mod).__name__ == "MimiEuclideanCodebook":
            mod.embed_sum.copy_(torch.randn(mod.embed_sum.shape, generator=g))
            mod.cluster_usage.fill_(1.0)
            mod._embed = None


def tiny_tokenizer() -> Any:
    """A word-level tokenizer over the tiny vocabulary (ids 0 and 3 are the pads)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(TEXT_VOCAB)]
    words[EPAD], words[PAD] = "<epad>", "<pad>"
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    from tokenizers import decoders

    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", additional_special_tokens=["<epad>"])


def save_tiny(path: Path, seed: int = 0, **lm: Any) -> Path:
    """A tiny checkpoint directory (weights, config, tokenizer) at ``path``."""
    path.mkdir(parents=True, exist_ok=True)
    tiny_model(seed, **lm).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path
