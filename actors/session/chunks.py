"""Stage0 chunk accounting: every chunk sent, and its one answer.

Each chunk is answered exactly once: by a ``Stage0Result``, by a ``StageError`` naming it,
or by the loss of the stage (counted in ``lost``). So at all times
``sent == answered + lost + len(pending)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from duplexd.actors.session.core import Dest, SessionCore
from duplexd.actors.session.input_buffer import Pcm
from duplexd.bus.messages import AudioChunk, ChunkKind


@dataclass(slots=True)
class PendingChunk:
    """A chunk sent to stage0 that has not been answered yet."""

    kind: ChunkKind
    epoch: int
    item_id: str = ""
    response_id: str = ""
    force_listen: bool = False


class ChunkLedger:
    """Sends chunks to stage0 and keeps the one-answer-per-chunk books."""

    def __init__(self, core: SessionCore) -> None:
        self._core = core
        self._next_seq = 0
        self.pending: dict[int, PendingChunk] = {}
        self.sent = 0
        self.answered = 0
        self.lost = 0  # sent to a stage0 that died before answering

    def send(
        self, kind: ChunkKind, pcm: Pcm, item_id: str = "", response_id: str = "", force_listen: bool = False
    ) -> None:
        c = self._core
        seq = self._next_seq
        self._next_seq += 1
        if not c.stage0_ready:
            return  # nothing to answer it: not counted as sent
        self.pending[seq] = PendingChunk(kind, c.epoch, item_id, response_id, force_listen)
        self.sent += 1
        c.emit(
            Dest.STAGE0,
            AudioChunk(c.session_id, c.epoch, seq, kind, pcm, response_id=response_id, force_listen=force_listen),
        )

    def send_utterance(self, pcm: Pcm, item_id: str) -> None:
        """A committed user turn, cut into chunks (the last one padded); the model listens to all."""
        n = self._core.engine.chunk_samples
        count = max(1, -(-pcm.size // n))
        padded = np.zeros(count * n, dtype=np.float32)
        padded[: pcm.size] = pcm
        for i in range(count):
            kind = ChunkKind.UTTERANCE_END if i == count - 1 else ChunkKind.UTTERANCE
            self.send(kind, padded[i * n : (i + 1) * n], item_id=item_id, force_listen=True)

    def answer(self, seq: int) -> PendingChunk | None:
        """The chunk ``seq`` is answered; None if it was not awaiting an answer."""
        c = self.pending.pop(seq, None)
        if c is not None:
            self.answered += 1
        return c

    def refused(self, seq: int) -> None:
        """The host could not hand chunk ``seq`` to stage0: it never left."""
        if self.pending.pop(seq, None) is not None:
            self.sent -= 1

    def lose_all(self) -> None:
        """Stage0 died: nothing it had will be answered."""
        self.lost += len(self.pending)
        self.pending.clear()

    def awaiting_continuation(self, response_id: str) -> bool:
        return any(
            c.kind == ChunkKind.CONTINUATION and c.response_id == response_id for c in self.pending.values()
        )
