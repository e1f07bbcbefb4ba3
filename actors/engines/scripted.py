"""Deterministic engines for tests and benchmarks.

The thinker listens until it has heard ``speech_chunks`` chunks of speech-level input,
then speaks a fixed reply. The talker renders each reply as a tone whose first four
samples of every chunk carry a marker, the response's tag, the chunk's sequence number
and the chunk count (see :func:`decode_chunk`). A test decoding received audio can
therefore tell exactly which response and which chunk every byte belongs to: stale or
missing audio is visible. Both sides sleep ``*_step_cost_ms`` per step to emulate a model.
"""

from __future__ import annotations

import time
import zlib
from collections import deque
from dataclasses import dataclass, field

import msgspec
import numpy as np

from duplexd.actors.engines.base import (
    TalkerChunk,
    TalkerInput,
    Thinker,
    ThinkerInput,
    ThinkerOutput,
    TurnTalker,
)
from duplexd.bus.audio_format import OUTPUT_RATE
from duplexd.bus.messages import Action, ChunkKind, EngineInfo, SessionConfig

MARKER = 0x5A5A
_SCALE = 32767.0


class ScriptedOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[engines.scripted]`` settings."""

    input_rate: int = 16000
    chunk_ms: int = 100
    speech_rms: float = 0.02  # a chunk at or above this RMS counts as speech
    speech_chunks: int = 3  # speech chunks heard before the model will speak
    interrupt_chunks: int = 3  # duplex: speech chunks during its reply that make it yield
    reply_ms: int = 2000
    reply_text: str = "This is scripted reply number {n}, spoken as a steady tone."
    out_chunk_ms: int = 40
    think_step_cost_ms: float = 0.0
    talk_step_cost_ms: float = 0.0
    # Echo (benchmarks): in duplex the model speaks every live chunk, handing the chunk's own
    # audio to the talker, which plays it back at the input rate; a turn ends every reply_ms.
    # One output chunk per input chunk: the trivial step a framework comparison needs.
    echo: bool = False


def response_tag(response_id: str) -> int:
    """The 15-bit tag the talker writes into every chunk of ``response_id``."""
    return zlib.crc32(response_id.encode()) & 0x7FFF


def decode_chunk(pcm16: np.ndarray) -> tuple[int, int, int] | None:
    """(tag, seq, total) of a scripted chunk, or None if it carries no marker."""
    if pcm16.size < 4 or int(pcm16[0]) != MARKER:
        return None
    return int(pcm16[1]), int(pcm16[2]), int(pcm16[3])


def _rms(pcm: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(pcm, dtype=np.float64)))) if pcm.size else 0.0


@dataclass(slots=True)
class _ThinkState:
    config: SessionConfig
    speech: int = 0
    speech_ms: int = 0
    replies: int = 0
    spoke_for: str = ""  # the response it already answered (one reply per response)
    speaking_left: int = 0  # duplex: chunks its last reply still plays for
    overlap: int = 0
    echoed: int = 0  # echo: chunks spoken in the current turn


class ScriptedThinker(Thinker):
    """Rule-based stage0 (see module docstring)."""

    def __init__(self, opts: ScriptedOptions) -> None:
        self.opts = opts
        self.info = EngineInfo(
            name="scripted",
            input_rate=opts.input_rate,
            chunk_samples=opts.input_rate * opts.chunk_ms // 1000,
            notice="scripted test engine: it answers with tones, not words",
        )
        self._s: dict[str, _ThinkState] = {}

    def open_session(self, session_id: str, config: SessionConfig) -> None:
        self._s[session_id] = _ThinkState(config)

    def update_session(self, session_id: str, config: SessionConfig) -> None:
        self._s[session_id].config = config

    def close_session(self, session_id: str) -> None:
        self._s.pop(session_id, None)

    def discard_pending(self, session_id: str) -> None:
        st = self._s.get(session_id)
        if st is not None:
            st.speaking_left = 0
            st.overlap = 0

    def step(self, batch: list[ThinkerInput]) -> list[ThinkerOutput]:
        if self.opts.think_step_cost_ms:
            time.sleep(self.opts.think_step_cost_ms / 1000)
        return [self._decide(self._s[x.session_id], x) for x in batch]

    def _reply(self, st: _ThinkState) -> ThinkerOutput:
        st.replies += 1
        st.speech = 0
        text = self.opts.reply_text.format(n=st.replies)
        return ThinkerOutput(Action.SPEAK, text=text, end_of_turn=True, listen_prob=0.1)

    def _echo(self, st: _ThinkState, x: ThinkerInput) -> ThinkerOutput:
        st.echoed += 1
        end = st.echoed >= max(1, self.opts.reply_ms // self.opts.chunk_ms)
        if end:
            st.echoed = 0
        return ThinkerOutput(Action.SPEAK, end_of_turn=end, listen_prob=0.0, hidden=x.pcm)

    def _decide(self, st: _ThinkState, x: ThinkerInput) -> ThinkerOutput:
        speech = _rms(x.pcm) >= self.opts.speech_rms
        if x.kind in (ChunkKind.UTTERANCE, ChunkKind.UTTERANCE_END):
            if speech:
                st.speech += 1
                st.speech_ms += self.opts.chunk_ms
            if x.kind == ChunkKind.UTTERANCE_END:
                transcript = f"scripted user turn, {st.speech_ms} ms of speech"
                st.speech_ms = 0
                return ThinkerOutput(Action.LISTEN, input_transcript=transcript)
            return ThinkerOutput(Action.LISTEN, listen_prob=1.0)
        if x.kind == ChunkKind.CONTINUATION:
            if st.spoke_for == x.response_id or x.force_listen:
                return ThinkerOutput(Action.LISTEN)
            st.spoke_for = x.response_id
            return self._reply(st)
        # LIVE: duplex, the model decides every chunk (the host forces the first N to listen).
        if x.force_listen:
            return ThinkerOutput(Action.LISTEN)
        if self.opts.echo:
            return self._echo(st, x)
        if st.speaking_left > 0:
            st.speaking_left -= 1
            st.overlap = st.overlap + 1 if speech else 0
            if st.overlap >= self.opts.interrupt_chunks:
                # The overlap is the start of the user's next turn.
                st.speech, st.speech_ms = st.overlap, st.overlap * self.opts.chunk_ms
                st.speaking_left = st.overlap = 0
                return ThinkerOutput(Action.LISTEN, interrupt=True, listen_prob=0.95)
            return ThinkerOutput(Action.LISTEN, listen_prob=0.9)
        if speech:
            st.speech += 1
            st.speech_ms += self.opts.chunk_ms
            return ThinkerOutput(Action.LISTEN, listen_prob=0.95)
        # Silence after enough speech: the user finished; speak unless biased to listen.
        p_listen = 0.1 if st.speech >= self.opts.speech_chunks else 0.9
        if min(1.0, p_listen * st.config.listen_prob_scale) >= 0.5:
            return ThinkerOutput(Action.LISTEN, listen_prob=p_listen)
        transcript = f"scripted user turn, {st.speech_ms} ms of speech"
        st.speech_ms = 0
        out = self._reply(st)
        out.input_transcript = transcript
        st.speaking_left = self.opts.reply_ms // self.opts.chunk_ms
        return out


@dataclass(slots=True)
class _TalkTurn:
    key: str
    tag: int
    queue: deque[TalkerChunk] = field(default_factory=deque)
    seq: int = 0
    total: int = 0
    ended: bool = False  # saw end_of_turn
    spoken: bool = False  # some chunk of this turn carried words
    flushed: bool = False  # emitted the end_of_turn chunk
    echo: bool = False  # chunks are played-back input, without markers


class ScriptedTalker(TurnTalker[_TalkTurn]):
    """Tone talker: ``reply_ms`` of marked tone per handoff with text."""

    def __init__(self, opts: ScriptedOptions) -> None:
        super().__init__()
        self.opts = opts
        # Tones are rendered at the bus rate (no resampling in stage1); an echo plays the
        # input back at its own rate, so stage1 converts it as it would a real talker's.
        self.output_rate = opts.input_rate if opts.echo else OUTPUT_RATE

    def feed(self, session_id: str, unit: TalkerInput) -> None:
        turn = self._turn_for(session_id, unit, lambda: _TalkTurn(unit.turn_key, response_tag(unit.turn_key)))
        if self.opts.echo and unit.hidden is not None:
            turn.queue.append(TalkerChunk(np.asarray(unit.hidden, dtype=np.float32), text=unit.text))
            turn.echo = True
        elif unit.text:
            self._render(turn, unit.text)
        turn.ended = turn.ended or unit.end_of_turn

    def _render(self, turn: _TalkTurn, text: str) -> None:
        n = max(1, self.opts.reply_ms // self.opts.out_chunk_ms)
        words = text.split()
        per = [" ".join(words[i * len(words) // n : (i + 1) * len(words) // n]) for i in range(n)]
        samples = self.output_rate * self.opts.out_chunk_ms // 1000
        freq = 300.0 + 40.0 * (turn.tag % 10)
        for i in range(n):
            seq = turn.total + i
            t = (np.arange(samples) + seq * samples) / self.output_rate
            pcm = (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
            pcm[:4] = np.array([MARKER, turn.tag, seq, 0], dtype=np.float32) / _SCALE
            # Chunks join into the transcript: a space only between words, never leading.
            text = (" " + per[i]) if (per[i] and turn.spoken) else per[i]
            turn.spoken = turn.spoken or bool(per[i])
            turn.queue.append(TalkerChunk(pcm, text=text))
        turn.total += n

    def pending(self, session_id: str) -> bool:
        turn = self._turns.get(session_id)
        return turn is not None and (bool(turn.queue) or (turn.ended and not turn.flushed))

    def step(self, session_ids: list[str]) -> list[TalkerChunk | None]:
        if self.opts.talk_step_cost_ms:
            time.sleep(self.opts.talk_step_cost_ms / 1000)
        out: list[TalkerChunk | None] = []
        for sid in session_ids:
            turn = self._turns.get(sid)
            if turn is None:
                out.append(None)
                continue
            if turn.queue:
                chunk = turn.queue.popleft()
                if not turn.echo:
                    chunk.pcm[3] = turn.total / _SCALE
                chunk.end_of_turn = turn.ended and not turn.queue
            elif turn.ended and not turn.flushed:
                chunk = TalkerChunk(np.zeros(0, dtype=np.float32), end_of_turn=True)
            else:
                out.append(None)
                continue
            turn.flushed = chunk.end_of_turn
            out.append(chunk)
        return out
