"""Which positions the qwen-omni thinker prefills next, for every session, within a budget.

A session's context (:mod:`context`) says which turns' offsets are not in its KV slot
yet; a plan turns them into runs of token ids, with the audio encoder's rows for the
positions of an audio turn (they replace the ``<|AUDIO|>`` embeddings).
"""

from __future__ import annotations

from typing import Any

from duplexd.actors.engines.qwen_omni.context import Context, Kind, Turn
from duplexd.actors.engines.qwen_omni.thinker_session import ThinkerSession

# (session, first position, count, runs of (ids, audio rows or None), (turn, written up to))
Plan = tuple[ThinkerSession, int, int, list[tuple[list[int], Any]], list[tuple[Turn, int]]]


def plan_prefill(sessions: list[ThinkerSession], budget: int, audio_token: int, device: Any) -> list[Plan]:
    """Every session's unwritten positions, first come first served, ``budget`` in all."""
    plans: list[Plan] = []
    for s in sessions:
        start, todo = s.ctx.sync()
        if not todo or budget <= 0:
            continue
        segs: list[tuple[list[int], Any]] = []
        marks: list[tuple[Turn, int]] = []
        n = 0
        for turn, a, b in todo:
            take = min(b - a, budget - n)
            if take <= 0:
                break
            segs += segments(s.ctx, turn, a, a + take, audio_token, device)
            marks.append((turn, a + take))
            n += take
        budget -= n
        plans.append((s, start, n, segs, marks))
    return plans


def audio_rows(turn: Turn, lo: int, hi: int, device: Any) -> Any:
    """Rows ``[lo, hi)`` of an audio turn's encoder output, on ``device``."""
    import torch

    parts, at = [], 0
    for a in turn.audio:
        n = a.shape[0]
        if at + n > lo and at < hi:
            parts.append(a[max(0, lo - at) : min(n, hi - at)].to(device))
        at += n
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def segments(ctx: Context, turn: Turn, a: int, b: int, audio_token: int, device: Any) -> list[tuple[list[int], Any]]:
    """Offsets [a, b) of ``turn`` as (ids, audio rows or None) runs."""
    out: list[tuple[list[int], Any]] = []
    head = ctx.head(turn)
    nh = len(head)
    if a < nh:
        out.append((head[a : min(b, nh)], None))
    if turn.kind == Kind.AUDIO:
        n_body = turn.audio_tokens
        lo, hi = max(a, nh) - nh, min(b, nh + n_body) - nh
        if hi > lo:
            out.append(([audio_token] * (hi - lo), audio_rows(turn, lo, hi, device)))
    else:
        body = turn.body[: turn.kept()] if turn.kind == Kind.REPLY else turn.body
        n_body = len(body)
        lo, hi = max(a, nh) - nh, min(b, nh + n_body) - nh
        if hi > lo:
            out.append((body[lo:hi], None))
    tail = ctx.tail(turn)
    st = nh + n_body
    lo, hi = max(a, st) - st, min(b, st + len(tail)) - st
    if hi > lo:
        out.append((tail[lo:hi], None))
    return out
