"""Ring-buffer KV caches with per-slot positions, and rotary embeddings for them.

A slot's keys and values live in a ring of ``R`` entries: absolute position ``p`` is
written at index ``p % R``. Keys are stored already rotated (RoPE at their absolute
position), and attention scores under RoPE depend only on position differences, so the
ring order does not matter: when the ring is full each new position overwrites the
oldest, which is exactly a sliding window. Which position an index holds follows from
the slot's newest position, so the mask is computed in the step (no host bookkeeping,
nothing data-dependent: capturable in a CUDA graph).
"""

from __future__ import annotations

import math

import torch

_TWO_PI = 2 * math.pi


def ring_positions(newest: torch.Tensor, size: int) -> torch.Tensor:
    """[B, size]: the absolute position each ring index holds once ``newest`` [B] was
    written (negative: never written)."""
    j = torch.arange(size, device=newest.device)
    return newest[:, None] - torch.remainder(newest[:, None] - j, size)


def ring_mask(
    query_pos: torch.Tensor, newest: torch.Tensor, size: int, window: int, dtype: torch.dtype
) -> torch.Tensor:
    """Additive attention mask [B, 1, Q, size] for queries at ``query_pos`` [B, Q]: a key is
    visible when it was written, is not in the query's future and lies within ``window``."""
    kp = ring_positions(newest, size)[:, None, :]
    qp = query_pos[:, :, None]
    ok = (kp >= 0) & (kp <= qp) & (qp - kp < window)
    zero = torch.zeros((), dtype=dtype, device=newest.device)
    neg = torch.full((), float("-inf"), dtype=dtype, device=newest.device)
    return torch.where(ok, zero, neg)[:, None]


def rope_cos_sin(
    pos: torch.Tensor, inv_freq: torch.Tensor, scaling: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [B, Q, head_dim] at integer positions ``pos`` [B, Q]. Angles are reduced
    modulo 2π in float64, so hours-long sessions (large positions) keep exact rotations."""
    ang = torch.remainder(pos.to(torch.float64)[..., None] * inv_freq.to(torch.float64), _TWO_PI).to(torch.float32)
    emb = torch.cat((ang, ang), dim=-1)
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x`` [B, H, Q, D] rotated by cos/sin [B, Q, D]."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def ring_write(cache: torch.Tensor, index: torch.Tensor, new: torch.Tensor) -> None:
    """Write ``new`` [B, H, Q, D] into ``cache`` [B, H, R, D] at ring indices ``index`` [B, Q]."""
    b = torch.arange(cache.shape[0], device=cache.device)[:, None].expand_as(index)
    # index_put_ takes the indexed dims first: write through a [B, R, H, D] view.
    cache.permute(0, 2, 1, 3).index_put_((b, index), new.permute(0, 2, 1, 3))
