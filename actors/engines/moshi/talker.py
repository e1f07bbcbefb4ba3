"""Stage1 of the Moshi engine: plays out the audio stage0 already decoded.

Moshi's codec decoder is streaming: its convolution and transformer state must see
every frame of a session's output, listening frames included. The session actor hands
stage1 only the speaking frames (one handoff per SPEAK decision), so decoding here would
splice the decoder's state across every pause and garble the start of each turn. Stage0
therefore decodes every frame of every session in its batched step, and the handoff
carries the 24 kHz waveform (``hidden``) with the frame's tokens (``tokens``: text id
then 8 codes, for inspection). This talker cuts it into 80 ms chunks, each with the
text that frame spoke, and ends the turn when stage0 says so. Stage1 keeps its role:
epoch advances abort a turn between chunks, so a cancelled reply stops at once.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from duplexd.actors.engines.base import TalkerChunk, TalkerInput, TurnTalker
from duplexd.actors.engines.moshi.options import MoshiOptions
from duplexd.actors.engines.moshi.thinker import FRAME_SAMPLES, SAMPLE_RATE


@dataclass(slots=True)
class _Turn:
    key: str
    queue: deque[TalkerChunk] = field(default_factory=deque)
    ended: bool = False
    flushed: bool = False


class MoshiTalker(TurnTalker[_Turn]):
    """Pass-through talker for Moshi's decoded frames (see module docstring)."""

    def __init__(self, opts: MoshiOptions) -> None:
        super().__init__()
        self.opts = opts
        self.output_rate = SAMPLE_RATE

    def feed(self, session_id: str, unit: TalkerInput) -> None:
        turn = self._turn_for(session_id, unit, lambda: _Turn(unit.turn_key))
        pcm = np.zeros(0, np.float32) if unit.hidden is None else np.asarray(unit.hidden, np.float32).reshape(-1)
        text = unit.text
        for i in range(0, pcm.size, FRAME_SAMPLES):
            turn.queue.append(TalkerChunk(pcm[i : i + FRAME_SAMPLES], text=text))
            text = ""  # the unit's words ride on its first frame
        if text:
            turn.queue.append(TalkerChunk(np.zeros(0, np.float32), text=text))
        turn.ended = turn.ended or unit.end_of_turn

    def pending(self, session_id: str) -> bool:
        turn = self._turns.get(session_id)
        return turn is not None and (bool(turn.queue) or (turn.ended and not turn.flushed))

    def step(self, session_ids: list[str]) -> list[TalkerChunk | None]:
        out: list[TalkerChunk | None] = []
        for sid in session_ids:
            turn = self._turns.get(sid)
            if turn is None:
                out.append(None)
                continue
            if turn.queue:
                chunk = turn.queue.popleft()
                chunk.end_of_turn = turn.ended and not turn.queue
            elif turn.ended and not turn.flushed:
                chunk = TalkerChunk(np.zeros(0, np.float32), end_of_turn=True)
            else:
                out.append(None)
                continue
            turn.flushed = chunk.end_of_turn
            out.append(chunk)
        return out
