"""Moshi's temporal transformer and depth decoder, one frame for a batch of slots, on the
weights of HF ``MoshiForConditionalGeneration`` (no copies: the HF tensors are used as is).

Temporal transformer: the 17 streams of a frame (text, Moshi's 8 codebooks, the user's 8)
are embedded and summed, run through the decoder layers with a per-slot ring KV cache of
``context`` frames (see ring.py: a full ring slides), and the normed hidden state gives
the text logits.

Depth decoder: 8 sub-steps per frame, each a causal step over the codebooks of this frame
with codebook-specific weights (HF's "flexible" linears, indexed by a Python int here, so
no weight is gathered or copied), sampling one codebook per sub-step for every slot at
once. Its KV spans the 8 sub-steps of one frame only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from duplexd.actors.engines.moshi.ring import apply_rope, ring_mask, ring_write, rope_cos_sin
from duplexd.actors.engines.moshi.sampling import sample_top_k, stream_key


def _rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # MoshiRMSNorm, computed in float32 like HF's
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.eps)
    return (y * norm.weight.float()).to(x.dtype)


def round_up(n: int, m: int = 16) -> int:
    return -(-n // m) * m


class TemporalLM:
    """The temporal transformer over ``slots`` slots with a ``context``-frame window."""

    def __init__(self, model: nn.Module, slots: int, context: int) -> None:
        cfg = model.config
        dec = model.decoder.model
        self.text_embed = dec.embed_tokens
        self.audio_embed = list(model.embed_tokens)
        self.layers = list(dec.layers)
        self.norm = dec.norm
        self.head = model.decoder.lm_head
        a0 = self.layers[0].self_attn
        self.heads, self.kv_heads, self.head_dim = a0.num_heads, a0.num_key_value_heads, a0.head_dim
        self.scaling = a0.scaling
        self.act = self.layers[0].mlp.activation_fn
        rot = a0.rotary_emb
        p = next(model.parameters())
        self.inv_freq = rot.inv_freq.to(p.device)
        self.rope_scale = float(getattr(rot, "attention_scaling", 1.0))
        self.window = context
        self.size = round_up(context)  # rows aligned for the attention kernels; the mask keeps the window
        self.vocab = cfg.vocab_size
        shape = (slots, self.kv_heads, self.size, self.head_dim)
        self.k = [torch.zeros(shape, device=p.device, dtype=p.dtype) for _ in self.layers]
        self.v = [torch.zeros(shape, device=p.device, dtype=p.dtype) for _ in self.layers]

    def embed(self, text: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        """[B] text tokens and [B, 16] audio tokens (Moshi's 8, then the user's 8) → [B, D]."""
        x = self.text_embed(text)
        for k, emb in enumerate(self.audio_embed):
            x = x + emb(audio[:, k])
        return x

    def __call__(self, x: torch.Tensor, frame: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One frame ``x`` [B, D] of slots at ``frame`` [B] → (normed hidden [B, D], text logits [B, V])."""
        b = x.shape[0]
        pos = frame[:, None]
        cos, sin = rope_cos_sin(pos, self.inv_freq, self.rope_scale, x.dtype)
        mask = ring_mask(pos, frame, self.size, self.window, x.dtype)
        index = torch.remainder(pos, self.size)
        h = x[:, None]
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            y = _rms_norm(layer.input_layernorm, h)
            q = F.linear(y, attn.q_proj.linear.weight).view(b, 1, self.heads, self.head_dim).transpose(1, 2)
            k = F.linear(y, attn.k_proj.linear.weight).view(b, 1, self.kv_heads, self.head_dim).transpose(1, 2)
            v = F.linear(y, attn.v_proj.linear.weight).view(b, 1, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            kc, vc = self.k[i][:b], self.v[i][:b]
            ring_write(kc, index, k)
            ring_write(vc, index, v)
            o = F.scaled_dot_product_attention(
                q, kc, vc, attn_mask=mask, scale=self.scaling, enable_gqa=self.kv_heads != self.heads
            )
            h = h + F.linear(o.transpose(1, 2).reshape(b, 1, -1), attn.o_proj.linear.weight)
            y = _rms_norm(layer.post_attention_layernorm, h)
            g = F.linear(y, layer.mlp.fc1.weight)
            g1, g2 = g.chunk(2, dim=-1)
            h = h + F.linear(self.act(g1) * g2, layer.mlp.fc2.weight)
        h = _rms_norm(self.norm, h)[:, 0]
        return h, F.linear(h, self.head.weight).float()


class DepthDecoder:
    """Moshi's depth decoder, batched over slots (see module docstring)."""

    def __init__(self, model: nn.Module, slots: int) -> None:
        dd = model.depth_decoder
        cfg = dd.config
        self.codebooks = cfg.num_codebooks
        self.text_embed = dd.text_embed_tokens
        self.embed = list(dd.embed_tokens)
        self.in_proj = dd.input_projections.weight  # [K, Dd, D]
        self.layers = list(dd.layers)
        self.heads_w = dd.lm_heads.weight  # [K, A, Dd]
        a0 = self.layers[0].self_attn
        self.heads, self.kv_heads, self.head_dim = a0.num_heads, a0.num_key_value_heads, a0.head_dim
        self.scaling = a0.scaling
        self.act = self.layers[0].mlp.activation_fn
        p = next(dd.parameters())
        shape = (slots, self.kv_heads, self.codebooks, self.head_dim)
        self.k = [torch.zeros(shape, device=p.device, dtype=p.dtype) for _ in self.layers]
        self.v = [torch.zeros(shape, device=p.device, dtype=p.dtype) for _ in self.layers]

    def logits(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """Sub-step ``k`` on its input ``x`` [B, Dd] (token embedding + projected hidden)."""
        b = x.shape[0]
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            y = _rms_norm(layer.input_layernorm, x)
            q = F.linear(y, attn.q_proj.linear.weight[k]).view(b, self.heads, 1, self.head_dim)
            kk = F.linear(y, attn.k_proj.linear.weight[k]).view(b, self.kv_heads, self.head_dim)
            vv = F.linear(y, attn.v_proj.linear.weight[k]).view(b, self.kv_heads, self.head_dim)
            kc, vc = self.k[i][:b], self.v[i][:b]
            kc[:, :, k] = kk
            vc[:, :, k] = vv
            o = F.scaled_dot_product_attention(
                q,
                kc[:, :, : k + 1],
                vc[:, :, : k + 1],
                scale=self.scaling,
                enable_gqa=self.kv_heads != self.heads,
            )
            x = x + F.linear(o.reshape(b, -1), attn.o_proj.linear.weight[k])
            y = _rms_norm(layer.post_attention_layernorm, x)
            g = F.linear(y, layer.mlp.fc1.weight[k])
            g1, g2 = g.chunk(2, dim=-1)
            x = x + F.linear(self.act(g1) * g2, layer.mlp.fc2.weight[k])
        return F.linear(x, self.heads_w[k]).float()

    def step_input(self, hidden: torch.Tensor, prev: torch.Tensor, k: int) -> torch.Tensor:
        emb = self.text_embed(prev) if k == 0 else self.embed[k - 1](prev)
        return emb + F.linear(hidden, self.in_proj[k])

    def sample(
        self,
        hidden: torch.Tensor,
        text: torch.Tensor,
        temperature: torch.Tensor,
        top_k: int,
        seed: torch.Tensor,
        frame: torch.Tensor,
    ) -> torch.Tensor:
        """All codebooks of one frame: [B, K] codes, each sampled given the ones before."""
        prev = text
        codes = []
        for k in range(self.codebooks):
            logits = self.logits(self.step_input(hidden, prev, k), k)
            prev = sample_top_k(logits, temperature, top_k, stream_key(seed, frame, k + 1))
            codes.append(prev)
        return torch.stack(codes, dim=-1)
