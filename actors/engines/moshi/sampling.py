"""Top-k sampling with per-session, counter-based noise: capturable in CUDA graphs.

The noise for a candidate token is a hash of (session seed, frame index, stream, token
id), not a draw from a global generator. So a session samples exactly the same tokens
whatever the batch it shares, whichever slot it holds and whichever order the top-k
candidates come in (only numerically near-tied logits can differ), and a captured graph
needs no generator state. Gumbel-max over the top-k candidates samples from their softmax
at the given temperature.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
_K1 = 0x7FEB352D  # odd multipliers below 2**31: products of 32-bit values stay inside int64
_K2 = 0x68E31DA5
_GOLDEN = 0x9E3779B1


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (two xorshift-multiply rounds) on int64 tensors."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = (x * _K1) & _M32
    x = x ^ (x >> 15)
    x = (x * _K2) & _M32
    return x ^ (x >> 16)


def stream_key(seed: torch.Tensor, frame: torch.Tensor, stream: int) -> torch.Tensor:
    """[B] keys for one sampling stream (0: text, 1..: audio codebooks) of one frame."""
    return _mix(_mix(seed) ^ _mix(frame * 16 + stream))


def gumbel(key: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise for ``token`` [B, K] under ``key`` [B]."""
    h = _mix(key[:, None] ^ ((token * _GOLDEN) & _M32))
    u = ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))
    return -torch.log(-torch.log(u))


def sample_top_k(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: int, key: torch.Tensor
) -> torch.Tensor:
    """One token per row of ``logits`` [B, V] (float32): top-k, then softmax sampling at
    ``temperature`` [B]; a temperature of 0 or less is greedy."""
    k = min(top_k, logits.shape[-1])
    values, index = torch.topk(logits, k, dim=-1)
    greedy = temperature <= 0
    t = torch.where(greedy, torch.ones_like(temperature), temperature)
    noisy = values / t[:, None] + gumbel(key, index)
    score = torch.where(greedy[:, None], values, noisy)
    pick = torch.argmax(score, dim=-1, keepdim=True)
    return torch.gather(index, -1, pick)[:, 0]
