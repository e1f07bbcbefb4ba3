"""Stage1 actor: turns handoffs into assistant audio, one chunk per session per step.

Handoff arrays larger than the codec's inline limit travel as raw frames and are views
of the received memory; ``duplexd_handoff_arrays_total{zero_copy}`` counts whether they
arrived that way.

Output is the bus output format (:mod:`duplexd.bus.audio_format`: pcm16 24 kHz); a talker
with another native rate is resampled here with a
streaming low-latency resampler per turn (nothing held back: a chunk's audio leaves with
it, not with the next one). Generation is paced to stay at most ``max_lead_ms``
ahead of real time per turn, so a barge-in discards little server-side audio and
memory stays bounded. An epoch advance aborts the session's synthesis between steps.
"""

from __future__ import annotations

import heapq
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from duplexd.actors.engines.base import EngineError, Talker, TalkerChunk, TalkerInput
from duplexd.actors.worker import StageWorker, WorkerOptions
from duplexd.bus.addresses import BusAddresses
from duplexd.bus.audio_format import OUTPUT_DTYPE, OUTPUT_RATE, output_seconds
from duplexd.bus.codec import DEFAULT_INLINE_THRESHOLD as INLINE_MAX
from duplexd.bus.log import get_logger, log
from duplexd.bus.messages import AudioOut, EngineInfo, Handoff, Role, SessionConfig, StageData
from duplexd.bus.metrics import HANDOFF_ARRAYS, STAGE_ERRORS, STEP_BATCH, STEP_SECONDS
from duplexd.bus.resample import StreamResampler, stream_resampler

_log = get_logger(__name__)


@dataclass(slots=True)
class _Turn:
    response_id: str
    item_id: str
    epoch: int
    resampler: StreamResampler | None
    seq: int = 0
    generated_ms: float = 0.0
    started_at: float | None = None


def frame_backed(arr: np.ndarray) -> bool:
    """Whether ``arr`` views the memory of a received bus frame (no copy was made)."""
    base: Any = arr
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    return isinstance(base, memoryview) and type(base.obj).__name__ == "Frame"


def to_pcm16(x: np.ndarray) -> np.ndarray:
    out: np.ndarray = np.round(np.clip(x, -1.0, 1.0) * 32767.0).astype(OUTPUT_DTYPE)
    return out


class Stage1Worker(StageWorker):
    """Generic stage1 around a :class:`Talker`."""

    role = Role.STAGE1

    def __init__(
        self,
        talker: Talker,
        addrs: BusAddresses,
        opts: WorkerOptions | None = None,
        identity: str | None = None,
        max_lead_ms: int = 1500,
        max_batch: int = 64,
    ) -> None:
        super().__init__(addrs, opts, identity)
        self.talker = talker
        self.max_lead_ms = max_lead_ms
        self.max_batch = max_batch
        self.turns: dict[str, _Turn] = {}
        # Pacing without scanning: sessions that may have a chunk to make (an ordered set),
        # and those held back by max_lead_ms in a heap of (may-go-on time, session).
        self._dirty: dict[str, None] = {}
        self._paced: list[tuple[float, str]] = []
        self._held: dict[str, float] = {}

    def engine_info(self) -> EngineInfo | None:
        return None

    def open_session(self, session_id: str, config: SessionConfig) -> None:
        self.talker.open_session(session_id, config)

    def update_session(self, session_id: str, config: SessionConfig) -> None:
        self.talker.update_session(session_id, config)

    def close_session(self, session_id: str) -> None:
        self._forget(session_id)
        self.talker.close_session(session_id)

    def advance_epoch(self, session_id: str) -> None:
        self._forget(session_id)
        self.talker.abort(session_id)

    def _forget(self, session_id: str) -> None:
        self.turns.pop(session_id, None)
        self._dirty.pop(session_id, None)
        self._held.pop(session_id, None)  # its heap entry goes stale

    def on_data(self, msg: StageData) -> None:
        if not isinstance(msg, Handoff):
            return
        for arr in (msg.tokens, msg.hidden):
            if arr is not None and arr.nbytes > INLINE_MAX:
                HANDOFF_ARRAYS.labels(zero_copy=str(frame_backed(arr)).lower()).inc()
        sid = msg.session_id
        turn = self.turns.get(sid)
        if turn is None or turn.response_id != msg.response_id:
            rs = None
            if self.talker.output_rate != OUTPUT_RATE:
                rs = stream_resampler(self.talker.output_rate, OUTPUT_RATE)
            turn = self.turns[sid] = _Turn(msg.response_id, msg.item_id, msg.epoch, rs)
        self._dirty[sid] = None
        try:
            self.talker.feed(
                sid, TalkerInput(msg.text, msg.end_of_turn, msg.tokens, msg.hidden, msg.voice, turn_key=msg.response_id)
            )
        except Exception as exc:
            self._session_failed(sid, exc)

    def _ahead_until(self, turn: _Turn) -> float | None:
        """When a turn generated ``max_lead_ms`` ahead of real time may go on (None: now)."""
        if not self.max_lead_ms or turn.started_at is None:
            return None
        return turn.started_at + (turn.generated_ms - self.max_lead_ms) / 1000

    def _eligible(self, now: float) -> list[str]:
        """Sessions with a chunk to make now. Touches only sessions that may have changed:
        fed or stepped since the last look, or whose pacing time came (the timer heap);
        a talker whose ``pending`` turns true by itself has every turn looked at."""
        heap, held, dirty = self._paced, self._held, self._dirty
        while heap and heap[0][0] <= now:
            due, sid = heapq.heappop(heap)
            if held.get(sid) == due:
                del held[sid]
                dirty[sid] = None
        if self.talker.polls_pending:
            for sid in self.turns:
                if sid not in held:
                    dirty[sid] = None
        out: list[str] = []
        for sid in list(dirty):
            turn = self.turns.get(sid)
            if turn is None or not self.talker.pending(sid):
                del dirty[sid]
                continue
            until = self._ahead_until(turn)
            if until is not None and until > now:
                del dirty[sid]
                if sid not in held:
                    held[sid] = until
                    heapq.heappush(heap, (until, sid))
                continue
            out.append(sid)
            if len(out) >= self.max_batch:
                break  # the rest stay marked for the next step
        return out

    def has_work(self) -> bool:
        now = time.monotonic()
        if self._paced and self._paced[0][0] <= now:
            return True
        return bool(self._dirty) and bool(self._eligible(now))

    def next_due_s(self) -> float | None:
        now = time.monotonic()
        heap = self._paced
        while heap and self._held.get(heap[0][1]) != heap[0][0]:
            heapq.heappop(heap)  # stale: the turn ended or was cancelled while held
        due = [heap[0][0] - now] if heap else []
        engine = self.talker.next_due_s()
        if engine is not None:
            due.append(engine)
        return max(0.0, min(due)) if due else None

    def step(self) -> None:
        now = time.monotonic()
        sids = self._eligible(now)
        t0 = time.perf_counter()
        try:
            chunks = self.talker.step(sids)
        except EngineError as exc:
            self._step_failed(sids if exc.session_id is None else [exc.session_id], exc)
            return
        except Exception as exc:
            log(_log, logging.ERROR, "talker step failed", exc_info=True)
            self._step_failed(sids, exc)
            return
        STEP_SECONDS.labels(stage="stage1").observe(time.perf_counter() - t0)
        STEP_BATCH.labels(stage="stage1").observe(len(sids))
        for sid, chunk in zip(sids, chunks, strict=True):
            if chunk is not None:
                self._emit(sid, chunk, now)
            if sid in self.turns:
                self._dirty[sid] = None  # look again: more to make, or paced

    def _emit(self, sid: str, chunk: TalkerChunk, now: float) -> None:
        turn = self.turns.get(sid)
        if turn is None:
            return
        pcm = chunk.pcm.astype(np.float32, copy=False)
        if turn.resampler is not None:
            pcm = turn.resampler.push(pcm)
            if chunk.end_of_turn:
                pcm = np.concatenate((pcm, turn.resampler.flush()))
        if turn.started_at is None and pcm.size:
            turn.started_at = now
        start_ms = int(turn.generated_ms)
        turn.generated_ms += output_seconds(pcm.size) * 1000
        self.send_data(
            AudioOut(
                sid,
                turn.epoch,
                turn.response_id,
                turn.item_id,
                turn.seq,
                to_pcm16(pcm),
                text=chunk.text,
                end_of_turn=chunk.end_of_turn,
                start_ms=start_ms,
            )
        )
        turn.seq += 1
        if chunk.end_of_turn:
            del self.turns[sid]

    def _step_failed(self, sids: list[str], exc: BaseException) -> None:
        for sid in sids:
            self._session_failed(sid, exc)

    def _session_failed(self, sid: str, exc: BaseException) -> None:
        STAGE_ERRORS.labels(stage="stage1").inc()
        code = exc.code if isinstance(exc, EngineError) else "engine_error"
        self._forget(sid)
        try:
            self.talker.abort(sid)
        except Exception:
            log(_log, logging.ERROR, "talker abort failed", session_id=sid, exc_info=True)
        self.report_error(sid, code, f"{type(exc).__name__}: {exc}")
