"""Continuation pacing (turn modes): silence units that let the model finish its reply.

Once a response exists, stage0 gets silent ``CONTINUATION`` chunks — the first at once,
then one per chunk of wall time (``host.continuation_pace``) — capped at
``continuation_cap_ms``. At the cap the turn ends once every unit sent has been answered.
"""

from __future__ import annotations

import numpy as np

from duplexd.actors.session.chunks import ChunkLedger
from duplexd.actors.session.core import SessionCore
from duplexd.actors.session.response import Response
from duplexd.bus.messages import ChunkKind, TurnMode


class ContinuationPacer:
    """Sends the units of a response that are due."""

    def __init__(self, core: SessionCore, chunks: ChunkLedger) -> None:
        self._core = core
        self._chunks = chunks

    def cap_units(self) -> int:
        return max(1, int(self._core.config.continuation_cap_ms // self._core.chunk_ms))

    def _paced(self, r: Response) -> bool:
        return not r.thinker_done and self._core.config.turn_mode != TurnMode.DUPLEX

    def pump(self, r: Response, now: float) -> bool:
        """Sends the units due by ``now``; True when the cap is reached and every unit sent
        has been answered, so the model's turn is over."""
        if not self._paced(r):
            return False
        cap = self.cap_units()
        interval = self._core.chunk_ms / 1000 * self._core.settings.continuation_pace
        samples = self._core.engine.chunk_samples
        while True:
            if r.continuation_sent >= cap:
                return not self._chunks.awaiting_continuation(r.id)
            if now < r.next_unit_at:
                return False
            r.continuation_sent += 1
            r.next_unit_at += interval
            self._chunks.send(ChunkKind.CONTINUATION, np.zeros(samples, np.float32), response_id=r.id)

    def deadline(self, r: Response) -> float | None:
        """When the next unit is due; None when none is due by time alone (a capped turn
        waits for answers, not for the clock)."""
        if self._paced(r) and r.continuation_sent < self.cap_units():
            return r.next_unit_at
        return None
