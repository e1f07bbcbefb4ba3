"""The idle-timeout clock (server VAD ``idle_timeout_ms``).

If nothing is said for that long after the last speech or the end of the assistant's
playback, turn detection commits the buffer and asks for a response. It fires once per
silence: speech, or the end of a response, starts a new one.
"""

from __future__ import annotations


class IdleTimer:
    """When the last activity was, and whether this silence already timed out."""

    def __init__(self) -> None:
        self.last_activity_at = 0.0
        self.fired = False

    def touch(self, now: float) -> None:
        self.last_activity_at = now

    def restart(self, now: float) -> None:
        """Activity that starts a new silence (speech start, a response ending)."""
        self.last_activity_at = now
        self.fired = False

    def deadline(self, timeout_ms: int, play_end_at: float) -> float | None:
        if not timeout_ms or self.fired:
            return None
        return max(self.last_activity_at, play_end_at) + timeout_ms / 1000
