"""Qwen2 decoder layers run over a static KV cache with one slot per session.

The thinker's language model and the talker are both Qwen2 decoders. :class:`SlotDecoder`
runs their layers (the transformers modules themselves: norms, projections, MLPs) with
its own attention over a preallocated cache ``[slots, kv_heads, max_len + 1, head_dim]``
per layer, so every session keeps its context in its own slot across turns (the KV
lease), a rollback is just a shorter length, and one forward serves all sessions:

* :meth:`prefill` — variable-length spans of several sessions in one padded batch;
* :meth:`decode` — one token for rows ``0..B-1`` (= slots): rows without work point at
  the scratch position ``max_len``, which no query ever attends to. Shapes depend only
  on ``(B, span)``, so the step can be captured as a CUDA graph per bucket.

Positions are 1-D: Qwen2.5-Omni's M-RoPE gives audio and text tokens equal temporal,
height and width positions, which makes it the plain rotary embedding.

Fewer kernels per layer than the transformers layer (a decode step is launch-bound at
small batches): q/k/v are one GEMM and gate/up one GEMM (the modules' weights become
views of the fused ones, so nothing is held twice), q and k are rotated together, and
the attention mask is built once per step as an additive mask instead of per layer, and
the RMS norms run as ``F.rms_norm`` (one fused kernel on CUDA instead of seven) once a
probe shows it equals the model's norm module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True, slots=True)
class DecoderShape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    rope_theta: float

    @classmethod
    def of(cls, cfg: Any) -> DecoderShape:
        heads = int(cfg.num_attention_heads)
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
        rope = getattr(cfg, "rope_parameters", None) or {}
        theta = float(rope.get("rope_theta", getattr(cfg, "rope_theta", 1000000.0)))
        if getattr(cfg, "use_sliding_window", False):
            raise ValueError("sliding-window attention is not supported (Qwen2.5-Omni does not use it)")
        kv = int(cfg.num_key_value_heads)
        return cls(int(cfg.num_hidden_layers), int(cfg.hidden_size), heads, kv, head_dim, theta)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class SlotDecoder:
    """Decoder layers + a static per-slot KV cache (see module docstring)."""

    def __init__(
        self,
        layers: Any,
        norm: Any,
        shape: DecoderShape,
        slots: int,
        max_len: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.layers = list(layers)
        self.norm = norm
        self.wqkv: list[torch.Tensor] = []
        self.bqkv: list[torch.Tensor | None] = []
        self.wgu: list[torch.Tensor] = []
        self.bgu: list[torch.Tensor | None] = []
        with torch.no_grad():
            for layer in self.layers:
                self._fuse(layer)
            self.fused_norm = bool(self.layers) and all(
                _rms_matches(n, shape.hidden, device, dtype) for n in (self.layers[0].input_layernorm, norm)
            )
        self.shape = shape
        self.slots = slots
        self.max_len = max_len  # index max_len is the scratch position
        self.device = device
        self.dtype = dtype
        kv = (slots, shape.kv_heads, max_len + 1, shape.head_dim)
        self.k = [torch.zeros(kv, device=device, dtype=dtype) for _ in self.layers]
        self.v = [torch.zeros(kv, device=device, dtype=dtype) for _ in self.layers]
        d = shape.head_dim
        self.inv_freq = 1.0 / (shape.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))
        self.rows = torch.arange(slots, device=device)
        self._span_range = torch.arange(max_len + 1, device=device)

    def _norm(self, module: Any, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(module, x) if self.fused_norm else module(x)

    def _fuse(self, layer: Any) -> None:
        a, m = layer.self_attn, layer.mlp
        qkv = fuse_linears([a.q_proj, a.k_proj, a.v_proj])
        gu = fuse_linears([m.gate_proj, m.up_proj])
        self.wqkv.append(qkv[0])
        self.bqkv.append(qkv[1])
        self.wgu.append(gu[0])
        self.bgu.append(gu[1])

    @property
    def cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    def _rope(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = pos[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    def _qkv(
        self, i: int, layer: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [n, heads, t, d], k and v [n, kv_heads, t, d], q and k rotated."""
        n, t, _ = x.shape
        s = self.shape
        h = self._norm(layer.input_layernorm, x)
        out = F.linear(h, self.wqkv[i], self.bqkv[i])
        nqk = (s.heads + s.kv_heads) * s.head_dim
        qk = out[..., :nqk].view(n, t, s.heads + s.kv_heads, s.head_dim)
        c, si = cos[:, :, None], sin[:, :, None]
        qk = qk * c + _rotate_half(qk) * si
        q = qk[:, :, : s.heads].transpose(1, 2)
        k = qk[:, :, s.heads :].transpose(1, 2)
        v = out[..., nqk:].view(n, t, s.kv_heads, s.head_dim).transpose(1, 2)
        return q, k, v

    def _finish_layer(self, i: int, layer: Any, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        x = x + layer.self_attn.o_proj(attn)
        m = layer.mlp
        gu = F.linear(self._norm(layer.post_attention_layernorm, x), self.wgu[i], self.bgu[i])
        g, u = gu.chunk(2, dim=-1)
        return x + m.down_proj(m.act_fn(g) * u)

    def _additive(self, allowed: torch.Tensor) -> torch.Tensor:
        """A boolean mask as the additive one SDPA would make of it (once, not per layer)."""
        return torch.zeros(allowed.shape, dtype=self.dtype, device=self.device).masked_fill_(~allowed, float("-inf"))

    def decode(self, x: torch.Tensor, pos: torch.Tensor, span: int) -> torch.Tensor:
        """One token for rows (= slots) ``0..B-1``: ``x`` [B, hidden] input embeddings, ``pos``
        [B] the position each writes (``max_len`` for rows without work). Attends to
        positions ``< span`` (every active row's ``pos`` must be below it). Returns the
        final-norm hidden states [B, hidden]."""
        b = x.shape[0]
        s = self.shape
        rep = s.heads // s.kv_heads
        rows = self.rows[:b]
        cos, sin = self._rope(pos[:, None])
        mask = self._additive((self._span_range[:span][None, :] <= pos[:, None])[:, None, None, :])  # [B,1,1,span]
        h = x[:, None, :]
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(i, layer, h, cos, sin)
            self.k[i][rows, :, pos] = k[:, :, 0]
            self.v[i][rows, :, pos] = v[:, :, 0]
            kk = self.k[i][:b, :, :span]
            vv = self.v[i][:b, :, :span]
            # GQA without repeating the cache: a kv head's query heads become its query rows.
            o = F.scaled_dot_product_attention(q.reshape(b, s.kv_heads, rep, s.head_dim), kk, vv, attn_mask=mask)
            h = self._finish_layer(i, layer, h, o.reshape(b, 1, s.heads * s.head_dim))
        return self._norm(self.norm, h)[:, 0]

    def prefill(self, x: torch.Tensor, slots: torch.Tensor, pos0: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        """Spans of several sessions: ``x`` [n, T, hidden] (row i valid for ``lens[i]`` tokens),
        written to ``slots[i]`` from position ``pos0[i]``; each token attends to its slot's
        positions before it. Returns the final-norm hidden states [n, T, hidden]."""
        n, t, _ = x.shape
        s = self.shape
        rep = s.heads // s.kv_heads
        ar = torch.arange(t, device=self.device)
        pos = pos0[:, None] + ar[None, :]
        valid = ar[None, :] < lens[:, None]
        wpos = torch.where(valid, pos, torch.full_like(pos, self.max_len))
        span = int((pos0 + lens).max())
        qpos = torch.minimum(pos, (pos0 + lens - 1)[:, None])  # padding rows attend like the last real one
        mask = self._span_range[:span][None, None, :] <= qpos[:, :, None]  # [n, T, span]
        mask = self._additive(mask[:, None].repeat(1, 1, rep, 1))  # query rows ordered (head-in-group, token)
        cos, sin = self._rope(pos)
        sl = slots[:, None]
        h = x
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(i, layer, h, cos, sin)
            self.k[i][sl, :, wpos] = k.permute(0, 2, 1, 3)
            self.v[i][sl, :, wpos] = v.permute(0, 2, 1, 3)
            kk = self.k[i][slots, :, :span]
            vv = self.v[i][slots, :, :span]
            o = F.scaled_dot_product_attention(q.reshape(n, s.kv_heads, rep * t, s.head_dim), kk, vv, attn_mask=mask)
            o = o.view(n, s.kv_heads, rep, t, s.head_dim).permute(0, 3, 1, 2, 4).reshape(n, t, s.heads * s.head_dim)
            h = self._finish_layer(i, layer, h, o)
        return self._norm(self.norm, h)


def rms_norm(module: Any, x: torch.Tensor) -> torch.Tensor:
    """Qwen2's RMSNorm (float32 statistics, the weight applied in the input's dtype) as one op."""
    y = F.rms_norm(x.float(), (x.shape[-1],), eps=float(module.variance_epsilon))
    return module.weight * y.to(x.dtype)


def _rms_matches(module: Any, hidden: int, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether :func:`rms_norm` computes what ``module`` does (a probe; else the module runs)."""
    if not (hasattr(module, "weight") and hasattr(module, "variance_epsilon")):
        return False
    g = torch.Generator(device="cpu").manual_seed(0)
    x = (3 * torch.randn(4, hidden, generator=g)).to(device, dtype)
    want = module(x).float()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    return bool(((rms_norm(module, x).float() - want).abs().max() <= tol * want.abs().max()).item())


def fuse_linears(linears: list[Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for several linears of the same input; each module's own
    weight becomes a view of it, so the memory is not doubled."""
    w = torch.cat([lin.weight for lin in linears])
    biases = [lin.bias for lin in linears]
    b = torch.cat(biases) if all(x is not None for x in biases) else None
    if any(x is not None for x in biases) and b is None:
        raise ValueError("cannot fuse linears of which only some have a bias")
    at = 0
    for lin in linears:
        n = lin.weight.shape[0]
        lin.weight = torch.nn.Parameter(w[at : at + n], requires_grad=False)
        if b is not None:
            lin.bias = torch.nn.Parameter(b[at : at + n], requires_grad=False)
        at += n
    return w, b


def buckets(limit: int, start: int = 1) -> list[int]:
    """Powers of two from ``start`` up to ``limit``, and ``limit`` itself."""
    out = []
    b = start
    while b < limit:
        out.append(b)
        b *= 2
    out.append(limit)
    return out


def bucket_for(n: int, sizes: list[int]) -> int:
    for b in sizes:
        if b >= n:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {sizes[-1]}")
