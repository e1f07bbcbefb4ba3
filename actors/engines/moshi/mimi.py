"""The Mimi codec, streaming and batched over session slots, on the weights of HF ``MimiModel``.

Every 80 ms frame a slot's encoder takes 1920 samples (24 kHz) and gives 8 codes; its
decoder takes 8 codes and gives 1920 samples. All streaming state lives in preallocated
per-slot tensors: the left context of every causal convolution, the overlap tail of every
transposed convolution, and the ring KV caches of the two transformers. The step of a
batch of ``B`` slots works on rows ``[:B]`` of those tensors in place, so it can be
captured in a CUDA graph. A slot whose stream starts (``fresh``) reads initial padding
instead of its state, so opening a session needs no reset of these tensors.

HF's own ``decode`` runs the convolutions without streaming state (it is exact only for
a whole sequence at once); the tests check these streams against HF's full-sequence
encode and decode.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from duplexd.actors.engines.moshi.ring import apply_rope, ring_mask, ring_write, rope_cos_sin

FRAME_SAMPLES = 1920  # 80 ms at 24 kHz


def mimi_parts(mimi: nn.Module) -> dict[str, Any]:
    """The codec's sub-modules under both transformers layouts (5.2x nests them in
    encoder/decoder models; earlier 5.x keeps them flat on MimiModel)."""
    enc, dec = mimi.encoder, mimi.decoder
    if hasattr(enc, "encoder_seanet"):
        return {
            "seanet_enc": enc.encoder_seanet,
            "enc_tf": enc.encoder_transformer,
            "down": enc.downsample,
            "up": dec.upsample,
            "dec_tf": dec.decoder_transformer,
            "seanet_dec": dec.decoder_seanet,
            "quantizer": mimi.quantizer,
        }
    return {
        "seanet_enc": enc,
        "enc_tf": mimi.encoder_transformer,
        "down": mimi.downsample,
        "up": mimi.upsample,
        "dec_tf": mimi.decoder_transformer,
        "seanet_dec": dec,
        "quantizer": mimi.quantizer,
    }


class _Conv:
    """A causal MimiConv1d with per-slot left context."""

    def __init__(self, mod: nn.Module, slots: int, device: torch.device, dtype: torch.dtype) -> None:
        if not getattr(mod, "causal", True):
            raise NotImplementedError("streaming needs causal convolutions (use_causal_conv = true)")
        self.conv: nn.Conv1d = mod.conv
        self.pad = int(mod.padding_total)
        self.replicate = mod.pad_mode == "replicate"
        if mod.pad_mode not in ("constant", "replicate"):
            raise NotImplementedError(f"pad_mode {mod.pad_mode!r} cannot stream")
        self.state = torch.zeros(slots, self.conv.in_channels, self.pad, device=device, dtype=dtype)

    def __call__(self, x: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
        if self.pad == 0:
            return self.conv(x)
        b = x.shape[0]
        st = self.state[:b]
        init = x[..., :1].expand(-1, -1, self.pad) if self.replicate else torch.zeros_like(st)
        xc = torch.cat((torch.where(fresh[:, None, None], init, st), x), dim=-1)
        st.copy_(xc[..., -self.pad :])
        return self.conv(xc)


class _ConvTranspose:
    """A causal MimiConvTranspose1d whose overlap tail carries into the next frame."""

    def __init__(self, mod: nn.Module, slots: int, device: torch.device, dtype: torch.dtype) -> None:
        self.conv: nn.ConvTranspose1d = mod.conv
        k, s = self.conv.kernel_size[0], self.conv.stride[0]
        self.tail = k - s
        if mod.padding_left != 0 or mod.padding_right != self.tail:
            raise NotImplementedError("streaming needs causal transposed convolutions (trim_right_ratio = 1)")
        self.state = torch.zeros(slots, self.conv.out_channels, self.tail, device=device, dtype=dtype)

    def __call__(self, x: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.tail == 0:
            return y
        b = x.shape[0]
        st = self.state[:b]
        head = y[..., : self.tail] + torch.where(fresh[:, None, None], torch.zeros_like(st), st)
        tail = y[..., -self.tail :]
        if self.conv.bias is not None:
            tail = tail - self.conv.bias[:, None]  # added again by the next frame's own output
        st.copy_(tail)
        return torch.cat((head, y[..., self.tail : -self.tail]), dim=-1)


Op = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _seanet_ops(seanet: nn.Module, slots: int, device: torch.device, dtype: torch.dtype) -> list[Op]:
    """The SEANet layers as streaming ops ``(x, fresh) -> x``."""
    ops: list[Op] = []
    for layer in seanet.layers:
        name = type(layer).__name__
        if name == "MimiConv1d":
            ops.append(_Conv(layer, slots, device, dtype))
        elif name == "MimiConvTranspose1d":
            ops.append(_ConvTranspose(layer, slots, device, dtype))
        elif name == "MimiResnetBlock":
            ops.append(_resnet(layer, slots, device, dtype))
        elif isinstance(layer, nn.ELU):
            ops.append(_elu(float(layer.alpha)))
        else:
            raise NotImplementedError(f"unexpected Mimi SEANet layer {name}")
    return ops


def _elu(alpha: float) -> Op:
    def op(x: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
        return F.elu(x, alpha)

    return op


def _resnet(block: nn.Module, slots: int, device: torch.device, dtype: torch.dtype) -> Op:
    inner = _seanet_ops(_Layers(block.block), slots, device, dtype)
    shortcut = _Conv(block.shortcut, slots, device, dtype) if type(block.shortcut).__name__ == "MimiConv1d" else None

    def run(x: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
        h = x
        for op in inner:
            h = op(h, fresh)
        return (shortcut(x, fresh) if shortcut is not None else x) + h

    return run


class _Layers:
    def __init__(self, layers: nn.ModuleList) -> None:
        self.layers = layers


class StreamingTransformer:
    """A Mimi transformer (LayerNorm, RoPE attention, layer scale, MLP) over a ring KV
    cache of ``sliding_window + frames - 1`` positions per slot and layer."""

    def __init__(self, tf: nn.Module, frames: int, slots: int, device: torch.device, dtype: torch.dtype) -> None:
        cfg = tf.config
        self.layers = list(tf.layers)
        a0 = self.layers[0].self_attn
        self.heads, self.kv_heads, self.head_dim = a0.num_heads, a0.num_key_value_heads, a0.head_dim
        self.window = int(cfg.sliding_window or cfg.max_position_embeddings)
        self.frames = frames
        # room for the oldest key a query may still see, rounded up for the attention kernels
        self.size = -(-(self.window + frames - 1) // 16) * 16
        self.inv_freq = tf.rotary_emb.inv_freq.to(device)
        self.rope_scale = float(getattr(tf.rotary_emb, "attention_scaling", 1.0))
        self.dtype = dtype
        shape = (slots, self.kv_heads, self.size, self.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in self.layers]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in self.layers]

    def __call__(self, x: torch.Tensor, frame: torch.Tensor) -> torch.Tensor:
        """``x`` [B, frames, C] at this slot's ``frame`` [B] (its frames-th time step)."""
        b, q, _ = x.shape
        pos = frame[:, None] * q + torch.arange(q, device=x.device)
        newest = pos[:, -1]
        cos, sin = rope_cos_sin(pos, self.inv_freq, self.rope_scale, x.dtype)
        mask = ring_mask(pos, newest, self.size, self.window, x.dtype)
        index = torch.remainder(pos, self.size)
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            qs = attn.q_proj(h).view(b, q, self.heads, self.head_dim).transpose(1, 2)
            ks = attn.k_proj(h).view(b, q, self.kv_heads, self.head_dim).transpose(1, 2)
            vs = attn.v_proj(h).view(b, q, self.kv_heads, self.head_dim).transpose(1, 2)
            qs, ks = apply_rope(qs, cos, sin), apply_rope(ks, cos, sin)
            kc, vc = self.k[i][:b], self.v[i][:b]
            ring_write(kc, index, ks)
            ring_write(vc, index, vs)
            o = F.scaled_dot_product_attention(
                qs, kc, vc, attn_mask=mask, scale=attn.scaling, enable_gqa=self.kv_heads != self.heads
            )
            o = attn.o_proj(o.transpose(1, 2).reshape(b, q, -1))
            x = x + layer.self_attn_layer_scale(o)
            x = x + layer.mlp_layer_scale(layer.mlp(layer.post_attention_layernorm(x)))
        return x


class _Codebooks:
    """One residual VQ (input/output projections and its first ``count`` codebooks)."""

    def __init__(self, rvq: nn.Module, count: int, device: torch.device) -> None:
        self.embed = [layer.codebook.embed.detach().to(device, torch.float32) for layer in rvq.layers[:count]]
        self.sqnorm = [(e * e).sum(-1) for e in self.embed]
        self.in_proj = rvq.input_proj
        self.out_proj = rvq.output_proj

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        r = (self.in_proj(x[..., None])[..., 0] if self.in_proj is not None else x).float()
        out = []
        for e, n in zip(self.embed, self.sqnorm, strict=True):
            i = torch.argmin(n[None] - 2 * r @ e.T, dim=-1)  # nearest centroid (|r|^2 is common)
            r = r - e[i]
            out.append(i)
        return out

    def decode(self, codes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        q = sum(e[codes[:, j]] for j, e in enumerate(self.embed))
        q = q.to(dtype)[..., None]
        return self.out_proj(q)[..., 0] if self.out_proj is not None else q[..., 0]


class StreamingMimi:
    """Batched streaming Mimi over ``slots`` session slots (see module docstring)."""

    def __init__(self, mimi: nn.Module, num_codebooks: int, slots: int) -> None:
        parts = mimi_parts(mimi)
        cfg = mimi.config
        p = next(mimi.parameters())
        device, dtype = p.device, p.dtype
        self.device, self.dtype = device, dtype
        self.num_codebooks = num_codebooks
        # 12.5 Hz codes, 25 Hz transformers: frames per code step (2 for Mimi)
        ratio = int(math.prod(cfg.upsampling_ratios))
        self.frame_samples = int(round(cfg.sampling_rate / cfg.frame_rate))
        self.steps = self.frame_samples // ratio
        if self.frame_samples % ratio:
            raise NotImplementedError("the codec frame must be a whole number of SEANet hops")
        self.enc_ops = _seanet_ops(parts["seanet_enc"], slots, device, dtype)
        self.enc_tf = StreamingTransformer(parts["enc_tf"], self.steps, slots, device, dtype)
        self.dec_tf = StreamingTransformer(parts["dec_tf"], self.steps, slots, device, dtype)
        self.dec_ops = _seanet_ops(parts["seanet_dec"], slots, device, dtype)
        if (parts["down"] is None) != (parts["up"] is None) or (parts["down"] is None and self.steps != 1):
            raise NotImplementedError("unexpected Mimi resampling layout")
        self.down = _Conv(parts["down"], slots, device, dtype) if parts["down"] is not None else None
        self.up = _ConvTranspose(parts["up"], slots, device, dtype) if parts["up"] is not None else None
        q = parts["quantizer"]
        n_sem = q.num_semantic_quantizers
        self.semantic = _Codebooks(q.semantic_residual_vector_quantizer, n_sem, device)
        self.acoustic = _Codebooks(q.acoustic_residual_vector_quantizer, num_codebooks - n_sem, device)
        self.n_sem = n_sem

    def encode(self, pcm: torch.Tensor, frame: torch.Tensor) -> torch.Tensor:
        """``pcm`` [B, 1, frame_samples] of slots at ``frame`` [B] → codes [B, num_codebooks]."""
        fresh = frame == 0
        x = pcm.to(self.dtype)
        for op in self.enc_ops:
            x = op(x, fresh)
        x = self.enc_tf(x.transpose(1, 2), frame).transpose(1, 2)
        if self.down is not None:
            x = self.down(x, fresh)
        lat = x[..., 0]
        codes = self.semantic.encode(lat) + self.acoustic.encode(lat)
        return torch.stack(codes, dim=-1)

    def decode(self, codes: torch.Tensor, frame: torch.Tensor) -> torch.Tensor:
        """``codes`` [B, num_codebooks] of slots at decoder ``frame`` [B] → pcm [B, frame_samples]."""
        fresh = frame == 0
        lat = self.semantic.decode(codes[:, : self.n_sem], self.dtype) + self.acoustic.decode(
            codes[:, self.n_sem :], self.dtype
        )
        x = lat[..., None]
        if self.up is not None:
            x = self.up(x, fresh)
        x = self.dec_tf(x.transpose(1, 2), frame).transpose(1, 2)
        for op in self.dec_ops:
            x = op(x, fresh)
        return x[:, 0]
