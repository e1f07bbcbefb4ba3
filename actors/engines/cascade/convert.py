"""GGUF → CTranslate2: the local reply policy's model converter (llama and qwen2 decoders).

A GGUF file (llama.cpp's format) holds the weights, often quantized, and the tokenizer.
This reads it with the pure-Python ``gguf`` package, dequantizes every tensor with numpy,
and writes a CTranslate2 decoder (int8 weights) plus a ``tokenizers`` byte-level BPE
tokenizer rebuilt from the GGUF vocabulary and merges:

- llama: llama.cpp's converter permutes the rows of the q and k projections so that its
  rope rotates adjacent pairs; undoing that permutation gives back the Hugging Face
  layout, which CTranslate2 runs with ``rotary_interleave=False``.
- qwen2: no permutation (llama.cpp runs it in NeoX rope mode), and q/k/v carry biases.
- Llama 3.1-style rope scaling is stored in GGUF only as a per-frequency factor tensor;
  the standard Llama 3 parameters are recovered from it (and checked against it).

The chat format (ChatML or Llama 3 headers) is read from the GGUF chat template and
recorded with the model, so prompts are built from token ids, never by string tricks.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from duplexd.actors.engines.cascade.gguf_file import GgufTensor, read_gguf_file

ARCHITECTURES = ("llama", "qwen2")
# GGUF token types (llama.cpp's llama_token_type)
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4

# Pre-tokenizer split patterns of the byte-level BPE vocabularies, by tokenizer.ggml.pre
# (llama.cpp's llama-vocab.cpp: the same regexes as the models' own tokenizer.json).
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_QWEN2 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# name → (split digits one by one first, pattern)
_PRE_TOKENIZERS: dict[str, tuple[bool, str]] = {
    "default": (False, _GPT2),
    "gpt-2": (False, _GPT2),
    "smollm": (True, _GPT2),
    "starcoder": (True, _GPT2),
    "qwen2": (False, _QWEN2),
    "deepseek-r1-qwen": (False, _QWEN2),
    "llama-bpe": (False, _LLAMA3),
    "llama3": (False, _LLAMA3),
    "smaug-bpe": (False, _LLAMA3),
}


class ConversionError(Exception):
    """The file is not a GGUF this converter supports; the message says what is missing."""


@dataclass(frozen=True, slots=True)
class ChatFormat:
    """How a chat is laid out in tokens, and where a reply ends."""

    name: str  # "chatml" | "llama3"
    bos: str  # token prepended to the prompt ("" = none)
    end_tokens: tuple[str, ...]  # generation stops at any of these

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "bos": self.bos, "end_tokens": list(self.end_tokens)}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> ChatFormat:
        return cls(str(doc["name"]), str(doc.get("bos", "")), tuple(str(t) for t in doc["end_tokens"]))


def detect_chat_format(template: str, vocab: set[str], bos: str, add_bos: bool) -> ChatFormat:
    """The chat layout named by a chat template (or, without one, by the special tokens)."""
    if "<|im_start|>" in template or (not template and "<|im_start|>" in vocab):
        if "<|im_end|>" not in vocab:
            raise ConversionError("ChatML template but no <|im_end|> token in the vocabulary")
        return ChatFormat("chatml", bos if add_bos else "", ("<|im_end|>",))
    if "<|start_header_id|>" in template or (not template and "<|start_header_id|>" in vocab):
        ends = tuple(t for t in ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>") if t in vocab)
        if "<|eot_id|>" not in ends:
            raise ConversionError("Llama 3 template but no <|eot_id|> token in the vocabulary")
        return ChatFormat("llama3", bos or "<|begin_of_text|>", ends)
    raise ConversionError(
        "unsupported chat template (supported: ChatML <|im_start|>, as SmolLM2 and Qwen2 use, "
        f"and Llama 3 headers): {template[:120]!r}"
    )


# ---------------------------------------------------------------------- reading GGUF
@dataclass(slots=True)
class GgufModel:
    """What the converter needs from one GGUF file."""

    arch: str
    meta: dict[str, Any]
    tensors: list[GgufTensor]  # data memory-mapped

    def get(self, key: str, default: Any = None) -> Any:
        return self.meta.get(key, default)

    def hp(self, key: str, default: Any = None) -> Any:
        """An architecture hyperparameter, e.g. ``hp("block_count")`` → ``llama.block_count``."""
        return self.meta.get(f"{self.arch}.{key}", default)


def read_gguf(path: str | Path) -> GgufModel:
    try:
        meta, tensors = read_gguf_file(path)
    except (ValueError, OSError, KeyError) as exc:
        raise ConversionError(f"{path}: not a readable GGUF file ({exc})") from exc
    arch = meta.get("general.architecture", "")
    if arch not in ARCHITECTURES:
        raise ConversionError(f"{path}: architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})")
    return GgufModel(arch, meta, tensors)


def _dequantized(tensors: list[GgufTensor]) -> dict[str, np.ndarray]:
    """Name → float32 array in PyTorch layout (rows = output features)."""
    from gguf.quants import dequantize

    out: dict[str, np.ndarray] = {}
    for t in tensors:
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists the innermost dimension first
        out[t.name] = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
    return out


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's ``permute`` of q/k rows (pairs back to the rotate-half layout)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(factor: float, low: float, high: float, original_max: int, base: float, dim: int) -> np.ndarray:
    """The per-frequency divisors of Llama 3.1 rope scaling (as llama.cpp writes rope_freqs)."""
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    out = []
    low_wavelen, high_wavelen = original_max / low, original_max / high
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (original_max / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


# ---------------------------------------------------------------------- tokenizer
def build_tokenizer(m: GgufModel) -> tuple[Any, list[str]]:
    """The byte-level BPE tokenizer of a GGUF file, and the CTranslate2 vocabulary (by id)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    kind = m.get("tokenizer.ggml.model", "")
    if kind != "gpt2":
        raise ConversionError(
            f"tokenizer {kind!r} is not supported: only byte-level BPE ('gpt2': SmolLM2, Qwen2, Llama 3) is"
        )
    pre = m.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        raise ConversionError(
            f"pre-tokenizer {pre!r} is not supported (supported: {', '.join(sorted(_PRE_TOKENIZERS))})"
        )
    tokens: list[str] = list(m.get("tokenizer.ggml.tokens") or [])
    merges: list[str] = list(m.get("tokenizer.ggml.merges") or [])
    types: list[int] = list(m.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    if not tokens or not merges:
        raise ConversionError("the GGUF file has no tokenizer vocabulary or merges")
    vocab: dict[str, int] = {}
    unique: list[str] = []
    for i, tok in enumerate(tokens):
        # CTranslate2 maps token strings to ids: keep them unique
        name = f"<duplexd_duplicate_{i}>" if tok in vocab else tok
        vocab[name] = i
        unique.append(name)
    pairs = [(a, b) for a, _, b in (mg.partition(" ") for mg in merges)]
    bpe = models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False)
    tk = Tokenizer(bpe)
    digits, pattern = _PRE_TOKENIZERS[pre]
    steps: list[Any] = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
    steps += [
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ]
    tk.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tk.decoder = decoders.ByteLevel()
    specials = [
        AddedToken(tok, special=True, normalized=False)
        for tok, ty in zip(unique, types, strict=False)
        if ty in (_TOKEN_CONTROL, _TOKEN_USER_DEFINED)
    ]
    tk.add_special_tokens(specials)
    return tk, unique


# ---------------------------------------------------------------------- CTranslate2 spec
def build_spec(m: GgufModel, weights: dict[str, np.ndarray], vocab: list[str], dtype: Any = np.float32) -> Any:
    """The CTranslate2 decoder spec of a llama/qwen2 GGUF model (weights in HF layout)."""
    from ctranslate2.specs import attention_spec, common_spec, transformer_spec

    n_layer = int(m.hp("block_count"))
    n_head = int(m.hp("attention.head_count"))
    n_head_kv = int(m.hp("attention.head_count_kv", n_head))
    n_embd = int(m.hp("embedding_length"))
    head_dim = int(m.hp("attention.key_length", n_embd // n_head))
    rope_dim = int(m.hp("rope.dimension_count", head_dim))
    base = float(m.hp("rope.freq_base", 10000.0))
    scaling_type, scaling_factor, original_max = None, 1.0, 0
    low = high = None
    kind = m.hp("rope.scaling.type", "none")
    if kind == "linear":
        scaling_type, scaling_factor = attention_spec.RotaryScalingType.Linear, float(m.hp("rope.scaling.factor"))
    elif kind not in ("none", ""):
        raise ConversionError(f"rope scaling {kind!r} is not supported")
    if "rope_freqs.weight" in weights:
        got = weights["rope_freqs.weight"].reshape(-1)
        factor, low, high, original_max = float(got.max()), 1.0, 4.0, 8192
        want = llama3_rope_factors(factor, low, high, original_max, base, rope_dim)
        if want.shape != got.shape or not np.allclose(want, got, rtol=1e-3, atol=1e-4):
            raise ConversionError("rope_freqs does not match Llama 3 rope scaling (low 1, high 4, original 8192)")
        scaling_type, scaling_factor = attention_spec.RotaryScalingType.Llama3, factor

    def w(name: str) -> np.ndarray:
        try:
            return weights[name].astype(dtype, copy=False)
        except KeyError:
            raise ConversionError(f"tensor {name} is missing") from None

    spec = transformer_spec.TransformerDecoderModelSpec.from_config(
        n_layer,
        n_head,
        pre_norm=True,
        activation=common_spec.Activation.SWISH,
        ffn_glu=True,
        rms_norm=True,
        rotary_dim=0 if rope_dim == head_dim else rope_dim,
        rotary_interleave=False,
        rotary_scaling_type=scaling_type,
        rotary_scaling_factor=scaling_factor,
        rotary_base=base,
        original_max_position_embeddings=original_max,
        num_heads_kv=None if n_head_kv == n_head else n_head_kv,
        head_dim=None if head_dim == n_embd // n_head else head_dim,
    )
    dec = spec.decoder
    dec.scale_embeddings = False
    dec.embeddings.weight = w("token_embd.weight")
    dec.layer_norm.gamma = w("output_norm.weight")
    dec.projection.weight = w("output.weight") if "output.weight" in weights else dec.embeddings.weight
    for i, layer in enumerate(dec.layer):
        p = f"blk.{i}."
        att = layer.self_attention
        att.layer_norm.gamma = w(p + "attn_norm.weight")
        layer.ffn.layer_norm.gamma = w(p + "ffn_norm.weight")
        q, k, v = w(p + "attn_q.weight"), w(p + "attn_k.weight"), w(p + "attn_v.weight")
        if m.arch == "llama":
            q, k = unpermute_qk(q, n_head), unpermute_qk(k, n_head_kv)
        att.linear[0].weight = np.concatenate([q, k, v])
        biases = [p + f"attn_{x}.bias" for x in "qkv"]
        if any(b in weights for b in biases):
            att.linear[0].bias = np.concatenate(
                [w(b) if b in weights else np.zeros(x.shape[0], dtype) for b, x in zip(biases, (q, k, v), strict=True)]
            )
        att.linear[1].weight = w(p + "attn_output.weight")
        if p + "attn_output.bias" in weights:
            att.linear[1].bias = w(p + "attn_output.bias")
        layer.ffn.linear_0.weight = w(p + "ffn_gate.weight")
        layer.ffn.linear_0_noact.weight = w(p + "ffn_up.weight")
        layer.ffn.linear_1.weight = w(p + "ffn_down.weight")
    if low is not None:
        for layer in dec.layer:
            layer.self_attention.rotary_low_freq_factor = low
            layer.self_attention.rotary_high_freq_factor = high
    spec.register_vocabulary(vocab)
    return spec


def _token(vocab: list[str], key: str, m: GgufModel) -> str:
    idx = m.get(key)
    return vocab[int(idx)] if idx is not None and 0 <= int(idx) < len(vocab) else ""


@dataclass(frozen=True, slots=True)
class ConversionResult:
    chat: ChatFormat
    arch: str
    name: str
    params: int
    seconds: float


def convert_gguf(
    src: str | Path,
    out_dir: str | Path,
    quantization: str = "int8",
    progress: Callable[[str], None] | None = None,
) -> ConversionResult:
    """Converts ``src`` into ``out_dir`` (which must not exist yet): model.bin, config.json,
    vocabulary.json, tokenizer.json. Writing the cache manifest is the caller's job."""
    say = progress or (lambda _msg: None)
    t0 = time.perf_counter()
    m = read_gguf(src)
    say(f"read {Path(src).name}: {m.arch}, {m.hp('block_count')} layers, {len(m.tensors)} tensors")
    tokenizer, vocab = build_tokenizer(m)
    weights = _dequantized(m.tensors)
    params = sum(int(a.size) for n, a in weights.items() if n != "rope_freqs.weight")
    say(f"dequantized {params / 1e6:.0f}M parameters")
    # Above ~1B parameters keep the dequantized copy in float16: it halves peak memory and
    # costs nothing visible once the weights are int8.
    dtype = np.float16 if params > 1_000_000_000 and quantization.startswith("int8") else np.float32
    spec = build_spec(m, weights, vocab, dtype)
    del weights
    bos, eos = _token(vocab, "tokenizer.ggml.bos_token_id", m), _token(vocab, "tokenizer.ggml.eos_token_id", m)
    spec.config.bos_token = bos or eos
    spec.config.eos_token = eos
    spec.config.unk_token = _token(vocab, "tokenizer.ggml.unknown_token_id", m)
    spec.config.layer_norm_epsilon = float(m.hp("attention.layer_norm_rms_epsilon", 1e-6))
    chat = detect_chat_format(
        str(m.get("tokenizer.chat_template", "") or ""), set(vocab), bos, bool(m.get("tokenizer.ggml.add_bos_token"))
    )
    spec.validate()
    spec.optimize(quantization=quantization)
    say(f"quantized to {quantization}")
    out = Path(out_dir)
    os.makedirs(out)
    spec.save(str(out))
    tokenizer.save(str(out / "tokenizer.json"))
    return ConversionResult(
        chat, m.arch, str(m.get("general.name", Path(src).stem)), params, round(time.perf_counter() - t0, 3)
    )
