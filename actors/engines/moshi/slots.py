"""The slot table: which session holds which row of the preallocated batch."""

from __future__ import annotations

import heapq


class SlotsExhausted(Exception):
    """Every slot is leased."""


class SlotTable:
    """Leases the lowest free slot, so occupied rows stay at the bottom of the batch and a
    step runs the smallest bucket that covers them."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._free = list(range(size))
        self._held: dict[str, int] = {}

    def lease(self, session_id: str) -> int:
        if session_id in self._held:
            return self._held[session_id]
        if not self._free:
            raise SlotsExhausted(f"all {self.size} model slots are in use")
        slot = heapq.heappop(self._free)
        self._held[session_id] = slot
        return slot

    def release(self, session_id: str) -> int | None:
        slot = self._held.pop(session_id, None)
        if slot is not None:
            heapq.heappush(self._free, slot)
        return slot

    def slot(self, session_id: str) -> int | None:
        return self._held.get(session_id)

    @property
    def held(self) -> dict[str, int]:
        return self._held

    def rows(self) -> int:
        """Rows a step must cover: up to the highest slot held."""
        return max(self._held.values(), default=-1) + 1
