"""Which sessions a stage0 batch step serves when more are waiting than fit: each its
real-time share, so a session that bursts cannot starve the others.

Every input chunk is stamped on arrival with a virtual finish time (the VirtualClock of
Zhang, SIGCOMM 1990): ``tag = max(previous tag of the session, arrival) + chunk duration``.
A session sending at real time has tags close to the wall clock; one sending 10× faster
runs its tags ahead by 9 s for every second it bursts. A step serves the sessions whose
head chunk has the smallest tag, one chunk each (the model holds one position per session
per step), up to ``max_batch``.

The bound, for sessions that send at most real time while the replica has the capacity
for them (``steady sessions ≤ max_batch`` per step, step time ≤ chunk duration): a steady
chunk's tag is at most its arrival + one chunk duration, and a burster's head tag is
beyond that as soon as it is one chunk ahead of real time, so the burster only takes slots
the steady sessions leave free. A steady chunk then waits at most for the step running when
it arrives plus its own step, as if the burster were not there. First come, first served
(by arrival) would instead queue every steady chunk behind the burster's whole backlog.
A replica with less capacity than its sessions' real-time shares cannot keep anyone at
real time; that is for admission (max sessions per replica) to prevent.
"""

from __future__ import annotations

from collections import deque


class FairShare:
    """Virtual-clock tags of each session's queued chunks, and the pick of a step."""

    def __init__(self) -> None:
        self._clock: dict[str, float] = {}
        self._tags: dict[str, deque[float]] = {}

    def open(self, session_id: str) -> None:
        self._tags[session_id] = deque()

    def close(self, session_id: str) -> None:
        self._tags.pop(session_id, None)
        self._clock.pop(session_id, None)

    def arrived(self, session_id: str, now: float, duration_s: float) -> float:
        """Stamp a chunk that joined the session's queue; returns its tag."""
        tag = max(self._clock.get(session_id, now), now) + duration_s
        self._clock[session_id] = tag
        self._tags.setdefault(session_id, deque()).append(tag)
        return tag

    def served(self, session_id: str) -> None:
        """The session's head chunk was taken into a step."""
        tags = self._tags.get(session_id)
        if tags:
            tags.popleft()

    def head(self, session_id: str) -> float:
        tags = self._tags.get(session_id)
        return tags[0] if tags else float("inf")

    def pick(self, waiting: list[str], limit: int) -> list[str]:
        """The ``limit`` waiting sessions with the earliest head tags (ties: given order)."""
        if len(waiting) <= limit:
            return waiting
        order = sorted(range(len(waiting)), key=lambda i: (self.head(waiting[i]), i))
        return [waiting[i] for i in sorted(order[:limit])]
