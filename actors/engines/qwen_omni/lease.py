"""The KV lease table: which session holds which cache slot of a stage.

A session leases a slot when it opens and keeps it across turns and epochs; the slot
goes back at close, after ``idle_s`` without use, or when a new session needs one and
this session is the least recently used idle one. A released session keeps its turns
(token ids and audio embeddings), so its context is prefilled again if it returns.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from duplexd.actors.engines.qwen_omni.context import Context
from duplexd.bus.messages import KvLease


class NoSlotFree(Exception):
    """Every slot is held by a session that is busy."""


@dataclass(slots=True)
class Lease:
    session_id: str
    slot: int | None = None
    leased_at: float = 0.0
    last_used: float = 0.0
    releases: int = 0  # times the session lost its slot (idle expiry or eviction)


class LeaseTable:
    """Slots ``0..n-1``; the lowest free slot goes first (decode batches run over a slot prefix)."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._free = list(range(slots))
        heapq.heapify(self._free)
        self.leases: dict[str, Lease] = {}

    @property
    def used(self) -> int:
        return self.slots - len(self._free)

    def add(self, sid: str, now: float) -> Lease:
        lease = self.leases[sid] = Lease(sid, last_used=now)
        return lease

    def acquire(self, sid: str, now: float, evictable: Callable[[str], bool]) -> tuple[int, str | None]:
        """A slot for ``sid`` (already leased: its own). When none is free, the least
        recently used evictable session loses its slot; returns (slot, that session)."""
        lease = self.leases[sid]
        lease.last_used = now
        if lease.slot is not None:
            return lease.slot, None
        victim = None
        if not self._free:
            idle = [
                x
                for x in self.leases.values()
                if x.slot is not None and x.session_id != sid and evictable(x.session_id)
            ]
            if not idle:
                raise NoSlotFree(f"all {self.slots} KV cache slots are held by busy sessions")
            v = min(idle, key=lambda x: x.last_used)
            victim = v.session_id
            self.release(victim)
        lease.slot = heapq.heappop(self._free)
        lease.leased_at = now
        return lease.slot, victim

    def release(self, sid: str) -> None:
        lease = self.leases.get(sid)
        if lease is None or lease.slot is None:
            return
        heapq.heappush(self._free, lease.slot)
        lease.slot = None
        lease.releases += 1

    def remove(self, sid: str) -> None:
        self.release(sid)
        self.leases.pop(sid, None)

    def idle(self, now: float, idle_s: float) -> list[str]:
        """Sessions holding a slot unused for ``idle_s`` or longer."""
        if idle_s <= 0:
            return []
        return [x.session_id for x in self.leases.values() if x.slot is not None and now - x.last_used >= idle_s]


def lease_report(lease: Lease, ctx: Context, capacity: int, busy: bool, now: float) -> tuple[tuple[Any, ...], KvLease]:
    """The session's lease as the host shows it, and the key that says whether it changed:
    its slot, its size once a turn settles (not while one grows), turns, rollbacks."""
    settled = None if busy else ctx.kv_len
    key = (lease.slot, settled, len(ctx.turns), ctx.rollbacks, ctx.dropped, ctx.evicted_turns, lease.releases)
    held = lease.slot is not None
    return key, KvLease(
        lease.session_id,
        "leased" if held else "released",
        slot=-1 if lease.slot is None else lease.slot,
        tokens=ctx.kv_len,
        capacity=capacity,
        turns=len(ctx.turns),
        rollbacks=ctx.rollbacks,
        dropped_tokens=ctx.dropped,
        evicted_turns=ctx.evicted_turns,
        leased_s=round(now - lease.leased_at, 3) if held else 0.0,
        idle_s=round(now - lease.last_used, 3),
    )
