"""Stage0 actor: batches input chunks of all its sessions through the thinker.

Every AudioChunk gets exactly one Stage0Result (or a StageError naming the chunk).
Input audio is never epoch-dropped here: it is the user's voice and the model's context
must hold all of it across barge-ins. A result carries the epoch of its chunk; the host
ignores decisions of older epochs. On an epoch advance the engine discards only the
output it had pending for the old epoch.

A ContextUpdate takes effect in order with the session's chunks: the engine sees the
history only after every chunk the host sent before it has been stepped. Engines that
keep working without input (a reply still being generated) are stepped with an empty
batch, and their KV lease changes go to the host as ``KvLeaseReport``.
"""

from __future__ import annotations

import logging
import time
from collections import deque

from duplexd.actors.engines.base import EngineError, Thinker, ThinkerInput, ThinkerOutput
from duplexd.actors.fair_share import FairShare
from duplexd.actors.worker import StageWorker, WorkerOptions
from duplexd.bus.addresses import BusAddresses
from duplexd.bus.log import get_logger, log
from duplexd.bus.messages import (
    AudioChunk,
    ContextUpdate,
    EngineInfo,
    KvLeaseReport,
    Role,
    SessionConfig,
    Stage0Result,
    StageData,
    StageError,
)
from duplexd.bus.metrics import QUEUE_DEPTH, STAGE_ERRORS, STEP_BATCH, STEP_SECONDS

_log = get_logger(__name__)


class Stage0Worker(StageWorker):
    """Generic stage0 around a :class:`Thinker`."""

    role = Role.STAGE0

    def __init__(
        self,
        thinker: Thinker,
        addrs: BusAddresses,
        opts: WorkerOptions | None = None,
        identity: str | None = None,
        max_batch: int = 64,
    ) -> None:
        super().__init__(addrs, opts, identity)
        self.thinker = thinker
        self.max_batch = max_batch
        # A session's chunks, with the ContextUpdates that arrived behind them; at rest
        # the head of a queue is always a chunk (leading contexts are applied after a step).
        self.queues: dict[str, deque[AudioChunk | ContextUpdate]] = {}
        # More sessions waiting than max_batch: each gets its real-time share (fair_share.py).
        self.fair = FairShare()
        info = thinker.info
        self._chunk_s = info.chunk_samples / info.input_rate if info.input_rate > 0 else 0.1
        # Lockstep engines (one step = one frame of every session): see Thinker.
        self.grace_s = thinker.lockstep_grace_s
        self.idle_s = thinker.lockstep_idle_s
        self._arrivals: dict[str, deque[float]] = {}
        self._last_arrival: dict[str, float] = {}
        QUEUE_DEPTH.labels(queue="stage0_input").set_function(lambda: sum(len(q) for q in self.queues.values()))

    def engine_info(self) -> EngineInfo:
        return self.thinker.info

    def open_session(self, session_id: str, config: SessionConfig) -> None:
        self.thinker.open_session(session_id, config)
        self.queues[session_id] = deque()
        self._arrivals[session_id] = deque()
        self.fair.open(session_id)
        self._report_leases()

    def update_session(self, session_id: str, config: SessionConfig) -> None:
        self.thinker.update_session(session_id, config)

    def close_session(self, session_id: str) -> None:
        self.queues.pop(session_id, None)
        self._arrivals.pop(session_id, None)
        self._last_arrival.pop(session_id, None)
        self.fair.close(session_id)
        self.thinker.close_session(session_id)
        self._report_leases()

    def _report_leases(self) -> None:
        if self.chan is None:
            return
        for lease in self.thinker.lease_updates():
            self.send_control(KvLeaseReport(lease.session_id, self.epochs.get(lease.session_id, 0), lease))

    def advance_epoch(self, session_id: str) -> None:
        self.thinker.discard_pending(session_id)

    def is_current(self, session_id: str, epoch: int) -> bool:
        if session_id not in self.epochs:
            return False
        if epoch > self.epochs[session_id]:
            self.epochs[session_id] = epoch
            self.advance_epoch(session_id)
        return True  # input chunks and context are never stale (see module docstring)

    def on_data(self, msg: StageData) -> None:
        if isinstance(msg, AudioChunk):
            self.queues[msg.session_id].append(msg)
            self.fair.arrived(msg.session_id, time.monotonic(), self._chunk_s)
            if self.grace_s > 0:
                now = time.monotonic()
                self._arrivals[msg.session_id].append(now)
                self._last_arrival[msg.session_id] = now
        elif isinstance(msg, ContextUpdate):
            q = self.queues[msg.session_id]
            if q:
                q.append(msg)  # after the chunks sent before it
            else:
                self._set_context(msg)

    def _set_context(self, msg: ContextUpdate) -> None:
        try:
            self.thinker.set_context(msg.session_id, msg.history, msg.instructions)
        except Exception as exc:
            self.report_error(msg.session_id, "context_failed", f"{type(exc).__name__}: {exc}")

    def has_work(self) -> bool:
        if self.thinker.has_background_work():
            return True
        if not any(self.queues.values()):
            return False
        if self.grace_s <= 0:
            return True
        now = time.monotonic()
        streaming = [sid for sid, at in self._last_arrival.items() if now - at <= self.idle_s]
        if all(self.queues[sid] for sid in streaming):
            return True
        return now - self._oldest_arrival() >= self.grace_s

    def next_due_s(self) -> float | None:
        due = [d for d in (self.thinker.next_due_s(), self._lockstep_due_s()) if d is not None]
        return min(due) if due else None

    def _lockstep_due_s(self) -> float | None:
        if self.grace_s <= 0 or not any(self.queues.values()):
            return None
        return max(0.0, self._oldest_arrival() + self.grace_s - time.monotonic())

    def _oldest_arrival(self) -> float:
        return min((a[0] for a in self._arrivals.values() if a), default=time.monotonic())

    def _take(self, sid: str) -> AudioChunk:
        chunk = self.queues[sid].popleft()
        assert isinstance(chunk, AudioChunk)  # heads are chunks (see __init__)
        self.fair.served(sid)
        if self._arrivals.get(sid):
            self._arrivals[sid].popleft()
        return chunk

    def _apply_leading_contexts(self, sids: list[str]) -> None:
        """Contexts that waited behind the chunks just stepped take effect now."""
        for sid in sids:
            q = self.queues.get(sid)
            while q and isinstance(head := q[0], ContextUpdate):
                q.popleft()
                self._set_context(head)

    def step(self) -> None:
        waiting = [sid for sid, q in self.queues.items() if q]
        waiting = self.fair.pick(waiting, self.max_batch)
        chunks = [self._take(sid) for sid in waiting]
        t0 = time.perf_counter()
        outputs = self._run(chunks) if chunks or self.thinker.has_background_work() else []
        cost = time.perf_counter() - t0
        if chunks:
            STEP_SECONDS.labels(stage="stage0").observe(cost)
            STEP_BATCH.labels(stage="stage0").observe(len(chunks))
        for chunk, out in zip(chunks, outputs, strict=True):
            if out is not None:
                self.send_data(_result(chunk, out, cost * 1000))
        self._apply_leading_contexts(waiting)
        self._report_leases()

    def _run(self, chunks: list[AudioChunk]) -> list[ThinkerOutput | None]:
        """Step the batch; a failing session is answered with a StageError and the
        rest of the batch is retried without it."""
        live = list(chunks)
        results: dict[int, ThinkerOutput | None] = {}
        if not live:
            try:
                self.thinker.step([])  # background work only: an engine reports its failures per chunk
            except Exception:
                STAGE_ERRORS.labels(stage="stage0").inc()
                log(_log, logging.ERROR, "thinker background step failed", exc_info=True)
            return []
        while live:
            batch = [
                ThinkerInput(c.session_id, c.chunk_seq, c.kind, c.pcm, c.force_listen, c.response_id) for c in live
            ]
            try:
                outs = self.thinker.step(batch)
                if len(outs) != len(batch):
                    raise EngineError(f"thinker returned {len(outs)} results for {len(batch)} chunks")
            except EngineError as exc:
                bad = [c for c in live if exc.session_id in (None, c.session_id)]
                self._fail(bad, exc.code, str(exc), results)
                live = [c for c in live if c not in bad]
                continue
            except Exception as exc:
                log(_log, logging.ERROR, "thinker step failed", exc_info=True)
                self._fail(live, "engine_error", f"{type(exc).__name__}: {exc}", results)
                break
            for c, o in zip(live, outs, strict=True):
                results[id(c)] = o
            break
        return [results.get(id(c)) for c in chunks]

    def _fail(
        self, chunks: list[AudioChunk], code: str, message: str, results: dict[int, ThinkerOutput | None]
    ) -> None:
        for c in chunks:
            results[id(c)] = None
            STAGE_ERRORS.labels(stage="stage0").inc()
            log(
                _log,
                logging.ERROR,
                "thinker failed a chunk",
                session_id=c.session_id,
                epoch=c.epoch,
                code=code,
                error=message,
            )
            self.send_control(StageError(c.session_id, c.epoch, code, message, Role.STAGE0, c.chunk_seq))


def _result(chunk: AudioChunk, out: ThinkerOutput, cost_ms: float) -> Stage0Result:
    return Stage0Result(
        session_id=chunk.session_id,
        epoch=chunk.epoch,
        chunk_seq=chunk.chunk_seq,
        action=out.action,
        end_of_turn=out.end_of_turn,
        interrupt=out.interrupt,
        listen_prob=out.listen_prob,
        text=out.text,
        input_transcript=out.input_transcript,
        tokens=out.tokens,
        hidden=out.hidden,
        cost_ms=cost_ms,
    )
