"""Tiny random llama / qwen2 models written as GGUF files the way llama.cpp's converter
writes them (q/k row permutation for llama, quantized tensors, byte-level BPE tokenizer),
with a Hugging Face model holding the very same (dequantized) weights as the reference."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "Hello, how are you today? I am fine, thank you.",
    "What is the weather like in Paris? It is sunny and warm, 21 degrees.",
    "The quick brown fox jumps over the lazy dog. Don't worry, we'll be there at 10:30.",
    "Numbers like 12345 and 3.14159 split into digits; ünïcödé and emoji 🙂 are bytes.",
]
N_EMBD, N_HEAD, N_HEAD_KV, N_FF, N_LAYER = 64, 4, 2, 128, 2


def permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's LlamaModel.permute (rotate-half rows → interleaved pairs)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# The models' own tokenizer.json pre-tokenizers (Hugging Face), written independently of the
# converter's table, which comes from llama.cpp's regexes.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def train_tokenizer(pre: str) -> Any:
    """A small byte-level BPE trained on CORPUS, with the model's real pre-tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    if pre == "smollm":  # SmolLM2's tokenizer.json
        steps = [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    else:  # Qwen2's tokenizer.json
        steps = [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    tk.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(CORPUS * 4, trainer)
    # Merges that only a wrong pre-tokenizer would reach (digit runs, a space before a digit):
    # the vocabulary has them, so splitting digits or spaces differently changes the ids.
    doc = json.loads(tk.to_str())
    vocab, merges = doc["model"]["vocab"], doc["model"]["merges"]
    for a, b in (("1", "2"), ("12", "3"), ("Ġ", "1"), ("3", "."), ("Ġ", "Ġ")):
        if a + b not in vocab:
            vocab[a + b] = len(vocab)
            merges.append([a, b])
    return Tokenizer.from_str(json.dumps(doc))


@dataclass
class TinyModel:
    path: Path
    hf: Any  # transformers model with the same weights
    tokenizer: Any  # the trained reference tokenizer
    arch: str


def _quantize(name: str, w: np.ndarray, qtype: Any) -> tuple[np.ndarray, np.ndarray]:
    """(raw GGUF data, the weights as llama.cpp will read them back)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    if qtype == GGMLQuantizationType.F32:
        return w.astype(np.float32), w.astype(np.float32)
    if qtype == GGMLQuantizationType.F16:
        h = w.astype(np.float16)
        return h, h.astype(np.float32)
    q = quantize(w.astype(np.float32), qtype)
    return q, dequantize(q, qtype).reshape(w.shape).astype(np.float32)


def build(tmp: Path, arch: str, seed: int = 0) -> TinyModel:
    """Writes ``tmp/<arch>.gguf`` and returns it with its transformers twin."""
    import gguf
    import torch
    from gguf import GGMLQuantizationType as Q

    pre = "smollm" if arch == "llama" else "qwen2"
    tk = train_tokenizer(pre)
    vocab = tk.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    n_vocab = len(tokens)

    merges = [" ".join(m) if isinstance(m, list) else m for m in json.loads(tk.to_str())["model"]["merges"]]
    rng = np.random.default_rng(seed)
    theta = 10000.0 if arch == "llama" else 1000000.0
    if arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(
            vocab_size=n_vocab,
            hidden_size=N_EMBD,
            intermediate_size=N_FF,
            num_hidden_layers=N_LAYER,
            num_attention_heads=N_HEAD,
            num_key_value_heads=N_HEAD_KV,
            max_position_embeddings=256,
            rms_norm_eps=1e-5,
            rope_theta=theta,
            tie_word_embeddings=True,
        )
        hf = LlamaForCausalLM(cfg)
    else:
        from transformers import Qwen2Config, Qwen2ForCausalLM

        cfg = Qwen2Config(
            vocab_size=n_vocab,
            hidden_size=N_EMBD,
            intermediate_size=N_FF,
            num_hidden_layers=N_LAYER,
            num_attention_heads=N_HEAD,
            num_key_value_heads=N_HEAD_KV,
            max_position_embeddings=256,
            rms_norm_eps=1e-6,
            rope_theta=theta,
            tie_word_embeddings=False,
        )
        hf = Qwen2ForCausalLM(cfg)
    hf.eval()
    w = gguf.GGUFWriter(str(tmp / f"{arch}.gguf"), arch)
    w.add_name(f"tiny-random-{arch}")
    w.add_block_count(N_LAYER)
    w.add_context_length(256)
    w.add_embedding_length(N_EMBD)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD_KV)
    w.add_rope_freq_base(theta)
    w.add_rope_dimension_count(N_EMBD // N_HEAD)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(n_vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab["<|im_start|>"])
    w.add_eos_token_id(vocab["<|im_end|>"])
    w.add_unk_token_id(vocab["<|endoftext|>"])
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)

    # The reference model gets exactly what llama.cpp would read back: quantize, dequantize.
    def put(gguf_name: str, param: torch.nn.Parameter, qtype: Any, llama_perm: int = 0) -> None:
        scale = 1.0 if param.ndim == 1 else 0.6 / np.sqrt(param.shape[-1])
        x = rng.standard_normal(param.shape).astype(np.float32) * scale
        if param.ndim == 1 and "norm" in gguf_name:
            x = 1.0 + 0.1 * x
        raw, back = _quantize(gguf_name, permute(x, N_HEAD, llama_perm) if llama_perm else x, qtype)
        w.add_tensor(gguf_name, raw, raw_dtype=None if qtype in (Q.F32, Q.F16) else qtype)
        if llama_perm:  # what the model must see: the un-permuted dequantized weights
            back = permute_inverse(back, llama_perm)
        with torch.no_grad():
            param.copy_(torch.from_numpy(back.reshape(param.shape)))

    m = hf.model
    put("token_embd.weight", m.embed_tokens.weight, Q.Q8_0)
    put("output_norm.weight", m.norm.weight, Q.F32)
    if arch == "qwen2":
        put("output.weight", hf.lm_head.weight, Q.F16)
    for i, layer in enumerate(m.layers):
        p, a, f = f"blk.{i}.", layer.self_attn, layer.mlp
        put(p + "attn_norm.weight", layer.input_layernorm.weight, Q.F32)
        put(p + "ffn_norm.weight", layer.post_attention_layernorm.weight, Q.F32)
        if arch == "llama":
            put(p + "attn_q.weight", a.q_proj.weight, Q.Q8_0, llama_perm=N_HEAD)
            put(p + "attn_k.weight", a.k_proj.weight, Q.Q8_0, llama_perm=N_HEAD_KV)
        else:
            put(p + "attn_q.weight", a.q_proj.weight, Q.Q8_0)
            put(p + "attn_k.weight", a.k_proj.weight, Q.Q8_0)
            for x in "qkv":
                put(p + f"attn_{x}.bias", getattr(a, f"{x}_proj").bias, Q.F32)
        put(p + "attn_v.weight", a.v_proj.weight, Q.Q8_0)
        put(p + "attn_output.weight", a.o_proj.weight, Q.Q4_1 if arch == "llama" else Q.F16)
        put(p + "ffn_gate.weight", f.gate_proj.weight, Q.Q4_1)
        put(p + "ffn_up.weight", f.up_proj.weight, Q.Q4_1)
        put(p + "ffn_down.weight", f.down_proj.weight, Q.Q8_0)
    if arch == "llama":
        hf.tie_weights()
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return TinyModel(tmp / f"{arch}.gguf", hf, tk, arch)


def permute_inverse(w: np.ndarray, n_head: int) -> np.ndarray:
    """Written independently of the converter's: the rows of head h, pair j, half b came from
    row h*hd + b*hd/2 + j of the original."""
    rows = w.shape[0]
    hd = rows // n_head
    out = np.empty_like(w)
    for h in range(n_head):
        for j in range(hd // 2):
            for b in range(2):
                out[h * hd + b * hd // 2 + j] = w[h * hd + 2 * j + b]
    return out
