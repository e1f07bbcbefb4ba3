"""The session actor's façade: its entry points, command dispatch and outbox.

The actor is a plain object driven by one event loop (the session host). Every entry point
takes the current time, mutates state, and appends what must be sent to ``outbox``; the host
does the I/O (:meth:`SessionActor.take_outbox`). No entry point raises for bad input or stage
misbehaviour: both become error events, so the actor is safe to drive with any
interleaving (tests/unit/actors/test_session_properties.py drives it with hypothesis).

Each rule lives in the part that owns its concern (docs/session-semantics.md, "Where each
rule lives"); this class only wires the parts together and routes to them.
"""

from __future__ import annotations

from typing import Any

from duplexd.actors.session.audio_out import AudioForwarder
from duplexd.actors.session.cancel import CancelFences
from duplexd.actors.session.chunks import ChunkLedger
from duplexd.actors.session.continuation import ContinuationPacer
from duplexd.actors.session.core import Dest, HostSettings, IdFactory, Out, SessionCore, random_id
from duplexd.actors.session.decisions import Stage0Decisions
from duplexd.actors.session.idle import IdleTimer
from duplexd.actors.session.items import ItemCommands
from duplexd.actors.session.lifecycle import ResponseLifecycle
from duplexd.actors.session.playback import Cursor, Playback
from duplexd.actors.session.response import Response
from duplexd.actors.session.stage_failures import StageFailures
from duplexd.actors.session.turn_detection import TurnDetector
from duplexd.actors.session.user_input import UserInput
from duplexd.actors.vad import SpeechDetector
from duplexd.bus.messages import (
    AudioIn,
    AudioOut,
    ClientCommand,
    CloseCause,
    EngineInfo,
    InputClear,
    InputCleared,
    InputCommit,
    Item,
    ItemCreate,
    ItemDelete,
    ItemRetrieve,
    ItemTruncate,
    PlaybackAck,
    ResponseCancel,
    ResponseCreate,
    ResponseStatus,
    Role,
    SessionClosed,
    SessionConfig,
    SessionOpened,
    SessionSnapshot,
    SessionUpdate,
    SessionUpdated,
    Snapshot,
    SnapshotRequest,
    Stage0Result,
    StageClose,
    StageError,
    StageOpen,
    TurnMode,
    TurnState,
)


class SessionActor:
    """State and rules of one session: the single writer of its state (see module docstring).

    The rules' invariants: ``epoch`` only grows, and advances on barge-in, response cancel,
    stage failure of an active response and close, each advance announced to adapter and
    stages on the control plane; at most one active response, exactly one ``ResponseDone``
    per response; exactly one stage0 result per chunk sent; output of an older epoch, or of
    a response that has ended, is never forwarded; history holds committed items only, and
    under ``ack_only`` an assistant item holds only what the client reported as played.
    """

    def __init__(
        self,
        session_id: str,
        config: SessionConfig,
        engine: EngineInfo,
        settings: HostSettings | None = None,
        new_id: IdFactory = random_id,
        detector: SpeechDetector | None = None,
    ) -> None:
        core = self._core = SessionCore(session_id, config, engine, settings or HostSettings(), new_id)
        self.stage_names: dict[Role, str] = {}  # which processes serve it (the host sets them)
        self._idle = IdleTimer()
        self.chunks = ChunkLedger(core)
        self.playback = Playback(core)
        self.lifecycle = ResponseLifecycle(core, self.playback, ContinuationPacer(core, self.chunks), self._idle)
        self.user_input = UserInput(core, self.chunks, self.lifecycle)
        self.turns = TurnDetector(core, self.user_input, self.lifecycle, self.playback, self._idle, detector)
        self.decisions = Stage0Decisions(core, self.chunks, self.lifecycle, self.turns)
        self.audio = AudioForwarder(core, self.lifecycle, self.playback)
        self.fences = CancelFences(core, self.lifecycle)
        self.failures = StageFailures(core, self.chunks, self.lifecycle, self.close)
        self.items = ItemCommands(core, self.lifecycle)

    # ================================================================== state, read-only
    @property
    def session_id(self) -> str:
        return self._core.session_id

    @property
    def config(self) -> SessionConfig:
        return self._core.config

    @property
    def engine(self) -> EngineInfo:
        return self._core.engine

    @property
    def settings(self) -> HostSettings:
        return self._core.settings

    @settings.setter
    def settings(self, settings: HostSettings) -> None:
        self._core.settings = settings

    @property
    def epoch(self) -> int:
        return self._core.epoch

    @property
    def closed(self) -> bool:
        return self._core.closed

    @property
    def outbox(self) -> list[Out]:
        """What the host must send, in order (see :meth:`take_outbox`)."""
        return self._core.outbox

    @property
    def response(self) -> Response | None:
        """The active response, if any."""
        return self.lifecycle.response

    @property
    def history(self) -> list[Item]:
        """The committed conversation, in order."""
        return self._core.conversation.items

    @property
    def last_item_id(self) -> str | None:
        return self._core.conversation.last_id

    @property
    def cursor(self) -> Cursor:
        return self.playback.cursor

    @property
    def input_ms(self) -> float:
        return self.user_input.input_ms

    @property
    def outstanding(self) -> int:
        """Chunks sent to stage0 and not answered yet."""
        return len(self.chunks.pending)

    @property
    def chunks_sent(self) -> int:
        return self.chunks.sent

    @property
    def chunk_results(self) -> int:
        return self.chunks.answered

    @property
    def chunks_lost(self) -> int:
        return self.chunks.lost

    @property
    def responses(self) -> int:
        return self._core.counters.responses

    @property
    def done_events(self) -> int:
        return self._core.counters.done_events

    @property
    def dropped_stale(self) -> int:
        return self._core.counters.dropped_stale

    @property
    def backchannels(self) -> int:
        return self._core.counters.backchannels

    @property
    def barge_ins(self) -> int:
        return self._core.counters.barge_ins

    @property
    def stage_errors(self) -> int:
        return self._core.counters.stage_errors

    def take_outbox(self) -> list[Out]:
        """Hands the host everything emitted since the last call, in order."""
        return self._core.take_outbox()

    def turn_state(self, now: float) -> TurnState:
        """Derived from the state, never stored (so it cannot go stale)."""
        rl, turns = self.lifecycle, self.turns
        if turns.overlap is not None and rl.assistant_audible(now):
            return TurnState.BARGE_IN  # the user talks over the assistant; not decided yet
        if turns.user_speaking:
            return TurnState.USER_SPEAKING
        r = rl.response
        if r is not None:
            return TurnState.ASSISTANT_PLAYING if r.first_audio_at is not None else TurnState.ASSISTANT_GENERATING
        if self.playback.tail_playing(now):
            return TurnState.ASSISTANT_PLAYING  # the client still plays the last reply's tail
        if rl.awaiting_reply or rl.owed:
            return TurnState.USER_COMMITTED
        return TurnState.IDLE

    def snapshot(self, now: float) -> SessionSnapshot:
        c = self._core
        return SessionSnapshot(
            session_id=c.session_id,
            epoch=c.epoch,
            turn_state=self.turn_state(now),
            turn_mode=c.config.turn_mode,
            response=self.lifecycle.info_so_far(),
            cursor=self.playback.cursor.view(),
            history=tuple(self.history),
            input_buffer_ms=int(self.user_input.buffer.ms),
            chunks_sent=self.chunks.sent,
            chunk_results=self.chunks.answered,
            dropped_stale=c.counters.dropped_stale,
            responses=c.counters.responses,
            stage0=self.stage_names.get(Role.STAGE0, ""),
            stage1=self.stage_names.get(Role.STAGE1, ""),
            chunks_lost=self.chunks.lost,
            backchannels=c.counters.backchannels,
            barge_ins=c.counters.barge_ins,
            stage_errors=c.counters.stage_errors,
        )

    # ================================================================== lifecycle
    def open(self, now: float) -> None:
        c = self._core
        self.turns.reset()
        self._idle.touch(now)
        c.emit(Dest.STAGE0, StageOpen(c.session_id, c.epoch, c.config), "control")
        c.emit(Dest.STAGE1, StageOpen(c.session_id, c.epoch, c.config), "control")
        c.event(SessionOpened(c.session_id, c.epoch, c.engine))

    def close(self, now: float, reason: str = "closed", cause: CloseCause = CloseCause.NORMAL) -> None:
        c = self._core
        if c.closed:
            return
        # Nothing may start while closing: no queued turn, no deferred speak, no fence.
        self.lifecycle.owed = False
        self.lifecycle.deferred.clear()
        self.fences.clear()
        c.advance_epoch("session_closed")
        if self.lifecycle.response is not None:
            self.lifecycle.finish(ResponseStatus.CANCELLED, now, reason="session_closed")
        c.closed = True
        self.release()
        c.emit(Dest.STAGE0, StageClose(c.session_id, c.epoch), "control")
        c.emit(Dest.STAGE1, StageClose(c.session_id, c.epoch), "control")
        c.event(SessionClosed(c.session_id, c.epoch, reason, cause=cause))

    def release(self) -> None:
        """Give back what the session holds outside itself (its VAD context); idempotent."""
        if self.turns.detector is not None:
            self.turns.detector.release()

    # ================================================================== adapter commands (data plane, in order)
    def on_command(self, msg: ClientCommand, now: float) -> None:
        """One client command, in the order the client sent it."""
        c = self._core
        if c.closed:
            return
        seq: int | None = getattr(msg, "seq", None)  # (the host passes on whatever the adapter sent)
        c.command_seq = seq
        try:
            self._apply(msg, now)
        finally:
            c.command_seq = None
        if seq is not None:
            self.fences.command_done(seq, now)

    def _apply(self, msg: ClientCommand, now: float) -> None:
        c = self._core
        match msg:
            case AudioIn():
                self.turns.on_audio(msg, now)
            case InputCommit():
                self.user_input.commit(now, msg.event_id, explicit=True)
            case InputClear():
                self._clear_input()
                c.event(InputCleared(c.session_id, c.epoch))
            case ResponseCreate():
                self.lifecycle.create(now, msg.options, msg.event_id)
            case SessionUpdate():
                self._update(msg.config, msg.event_id)
            case PlaybackAck():
                self.playback.ack(msg, self.lifecycle.response)
            case ItemTruncate():
                if self.playback.truncate(msg, self.lifecycle.response):
                    # The client stopped playing the reply: not one more byte of it may follow.
                    self.lifecycle.cancel(now, "client_cancelled")
            case ItemCreate():
                self.items.create(msg)
            case ItemDelete():
                self.items.delete(msg)
            case ItemRetrieve():
                self.items.retrieve(msg)
            case SnapshotRequest():
                c.event(Snapshot(c.session_id, c.epoch, self.snapshot(now), msg.event_id))
            case _:
                c.error("unknown_command", f"unsupported command {type(msg).__name__}")

    def _clear_input(self) -> None:
        self.user_input.clear()
        self.turns.clear()

    def _update(self, cfg: SessionConfig, event_id: str) -> None:
        c = self._core
        old = c.config
        c.config = cfg
        if old.turn_mode != cfg.turn_mode:
            if TurnMode.DUPLEX in (cfg.turn_mode, old.turn_mode):
                self._clear_input()
                self.user_input.restart_stream()
            self.turns.reset()
        else:
            self.turns.retune(cfg)
        c.emit(Dest.STAGE0, StageOpen(c.session_id, c.epoch, cfg), "control")
        c.emit(Dest.STAGE1, StageOpen(c.session_id, c.epoch, cfg), "control")
        if old.instructions != cfg.instructions:
            c.send_context()
        c.event(SessionUpdated(c.session_id, c.epoch, cfg, event_id))

    # ================================================================== control plane, stages, host
    def on_cancel(self, msg: ResponseCancel, now: float) -> None:
        """A client cancel; it may overtake data commands (see cancel.py)."""
        if not self._core.closed:
            self.fences.on_cancel(msg, now)

    def on_stage0(self, res: Stage0Result, now: float) -> None:
        if not self._core.closed:
            self.decisions.on_result(res, now)

    def on_audio_out(self, msg: AudioOut, now: float, frames: list[Any] | None = None) -> bool:
        """Returns whether the chunk was forwarded to the client."""
        return self.audio.on_audio_out(msg, now, frames)

    def on_stage_error(self, err: StageError, now: float, chunk_seq: int | None = None) -> None:
        if not self._core.closed:
            self.failures.on_stage_error(err, now, chunk_seq)

    def on_send_failed(self, out: Out, now: float) -> None:
        """The host could not hand ``out`` to a stage (queue full or peer gone)."""
        if not self._core.closed:
            self.failures.on_send_failed(out, now)

    def on_client_overloaded(self, now: float) -> None:
        """The adapter cannot take this session's events in time (see stage_failures.py)."""
        if not self._core.closed:
            self.failures.on_client_overloaded(now)

    def on_stage_lost(self, role: Role, now: float) -> None:
        """The stage serving this session died: fail what it was doing."""
        if not self._core.closed:
            self.failures.on_stage_lost(role, now)

    def on_stage_bound(self, role: Role, now: float) -> None:
        """A (new) stage serves this session: open the session there."""
        if not self._core.closed:
            self.failures.on_stage_bound(role, now)

    # ================================================================== time
    def tick(self, now: float) -> None:
        if self._core.closed:
            return
        self.lifecycle.pump(now)
        self.turns.idle_check(now)

    def next_deadline(self) -> float | None:
        """When ``tick`` next has work (continuation units, idle timeout); None: none is
        due by time alone (a capped turn waits for answers, not for the clock)."""
        if self._core.closed:
            return None
        times = [t for t in (self.lifecycle.deadline(), self.turns.idle_deadline()) if t is not None]
        return min(times) if times else None
