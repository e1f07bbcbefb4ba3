"""The session actor: single writer of one session's state.

It is a plain object driven by one event loop (the session host). Every entry point
takes the current time, mutates state, and appends what must be sent to ``outbox``;
the host does the I/O. No entry point raises for bad input or stage misbehaviour: both
become error events, so the actor is safe to drive with any interleaving
(tests/unit/actors/test_session_properties.py drives it with hypothesis).

Rules it keeps (DESIGN.md "Epochs", "Session actor"; docs/session-semantics.md):

* ``epoch`` only grows; it advances on barge-in, response cancel, stage failure of an
  active response and close, and each advance is announced to adapter and stages on the
  control plane. An input-buffer clear does not advance it (nothing downstream has seen
  uncommitted input, and an advance would abort the assistant's audio).
* At most one active response; exactly one ``ResponseDone`` per response.
* Exactly one stage0 result per chunk sent (a stage error for the chunk, or the loss of
  the stage, counts as it); a second answer is a protocol error and is not applied.
* Output of an older epoch, or of a response that has ended, is never forwarded.
* History holds committed items only; under ``ack_only`` an assistant item holds only
  what the client reported as played (ack or truncate), transcript cut to match.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from duplexd.actors.conversation import Conversation
from duplexd.actors.input_buffer import InputBuffer
from duplexd.actors.transcript import Segment, cut_text, full_text
from duplexd.actors.vad import SpeechDetector, make_detector
from duplexd.bus.messages import (
    Action,
    AudioChunk,
    AudioIn,
    AudioOut,
    ChunkKind,
    CloseCause,
    CommitPolicy,
    ContentPart,
    ContextUpdate,
    Decision,
    EngineInfo,
    EpochAdvance,
    ErrorEvent,
    Handoff,
    IdleTimeout,
    InputClear,
    InputCleared,
    InputCommit,
    InputCommitted,
    InputTranscript,
    Item,
    ItemAdded,
    ItemCreate,
    ItemDelete,
    ItemDeleted,
    ItemDone,
    ItemRetrieve,
    ItemRetrieved,
    ItemTruncate,
    ItemTruncated,
    PlaybackAck,
    PlaybackCommitted,
    PlaybackCursor,
    ResponseCancel,
    ResponseCreate,
    ResponseCreated,
    ResponseDone,
    ResponseInfo,
    ResponseOptions,
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
    SpeechStarted,
    SpeechStopped,
    Stage0Result,
    StageClose,
    StageError,
    StageOpen,
    TextOut,
    TurnMode,
    TurnState,
    Usage,
    pcm_ms,
)


class Dest(enum.IntEnum):
    ADAPTER = 0
    STAGE0 = 1
    STAGE1 = 2


@dataclass(slots=True)
class Out:
    """One message the host must send on the session's behalf."""

    dest: Dest
    plane: str  # "control" | "data"
    msg: Any
    frames: list[Any] | None = None  # raw frames to forward unchanged (zero-copy)


@dataclass(frozen=True, slots=True)
class HostSettings:
    """Host-wide knobs (``[host]`` config) that are not per-session protocol settings."""

    vad: str = "silero"  # silero | energy
    max_input_buffer_ms: int = 15 * 60 * 1000
    continuation_pace: float = 1.0  # 1.0: one silence unit per chunk of wall time
    output_rate: int = 24000


# Server VAD keeps at most this much audio before a speech start (prefix padding + slack):
# silence the detector has ruled out is not kept for 15 minutes.
_VAD_KEEP_SLACK_MS = 1000
_VAD_TRIM_AFTER_MS = 5000


@dataclass(slots=True)
class _Response:
    id: str
    item_id: str
    options: ResponseOptions
    modalities: tuple[str, ...]
    created_at: float
    previous_item_id: str | None
    in_history: bool
    origin_seq: int | None  # the client command that created it (cancel fences)
    thinker_done: bool = False
    talker_done: bool = False
    incomplete_reason: str = ""
    unit_seq: int = 0
    words: int = 0
    text: list[str] = field(default_factory=list)  # text modality deltas
    segments: list[Segment] = field(default_factory=list)
    generated_samples: int = 0
    generated_ms: int = 0
    sent_ms: int = 0
    first_audio_at: float | None = None
    play_end_at: float = 0.0  # when the client will have played what was sent (estimate)
    continuation_sent: int = 0
    next_unit_at: float = 0.0
    input_chunks: int = 0
    truncated_ms: int | None = None  # conversation.item.truncate on the item in progress


@dataclass(slots=True)
class _Chunk:
    """A chunk sent to stage0 that has not been answered yet."""

    kind: ChunkKind
    epoch: int
    item_id: str = ""
    response_id: str = ""
    force_listen: bool = False


@dataclass(slots=True)
class _Overlap:
    """User speech heard while the assistant is audible (server VAD)."""

    start_ms: float
    announced: bool = False  # speech_started sent (passed the short-ack threshold)


@dataclass(slots=True)
class _Cursor:
    """Playback position of the newest assistant audio item."""

    item_id: str = ""
    generated_ms: int = 0
    sent_ms: int = 0
    played_ms: int = 0
    committed_ms: int = 0

    def view(self) -> PlaybackCursor:
        return PlaybackCursor(self.generated_ms, self.sent_ms, self.played_ms, self.committed_ms)


@dataclass(slots=True)
class _CancelFence:
    """A client cancel that overtook data commands up to ``after_seq`` on the bus."""

    after_seq: int
    event_id: str
    applied: bool = False  # it cancelled something (else: an error once resolved)


IdFactory = Callable[[str], str]


def random_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


class SessionActor:
    """State and rules of one session (see module docstring)."""

    def __init__(
        self,
        session_id: str,
        config: SessionConfig,
        engine: EngineInfo,
        settings: HostSettings | None = None,
        new_id: IdFactory = random_id,
        detector: SpeechDetector | None = None,
    ) -> None:
        self.session_id = session_id
        self.config = config
        self.engine = engine
        self.settings = settings or HostSettings()
        self._new_id = new_id
        self.epoch = 0
        self.outbox: list[Out] = []
        self.closed = False
        # input
        self.input_ms = 0.0  # stream position: ms of input audio received
        self._buffer = InputBuffer(engine.input_rate)
        self._live = np.zeros(0, dtype=np.float32)  # duplex: partial chunk
        self._live_chunks = 0  # duplex chunks sent (force_listen_count)
        self._detector = detector
        self._speech_item: str | None = None
        self._speech_start_ms = 0.0
        self._overlap: _Overlap | None = None
        self._last_speech_at = 0.0
        self._idle_fired = False
        self._awaiting_reply = False  # a user turn was committed and not answered yet
        # stage0 accounting
        self._chunk_seq = 0
        self._outstanding: dict[int, _Chunk] = {}
        self.chunks_sent = 0
        self.chunk_results = 0
        self.chunks_lost = 0  # sent to a stage0 that died before answering
        self.stage0_ready = True
        self.stage1_ready = True
        self.stage_names: dict[Role, str] = {}  # which processes serve it (the host sets them)
        # responses and history
        self.response: _Response | None = None
        self._pending_response = False  # a response is owed once the active one ends
        self._deferred_speaks: list[Stage0Result] = []
        self.conversation = Conversation()
        self.cursor = _Cursor()
        self._play_end_at = 0.0
        # client command order (cancel fences)
        self._fences: list[_CancelFence] = []
        self._seq_done = 0  # adapter seqs start at 1
        self._cmd_seq: int | None = None
        # counters
        self.responses = 0
        self.done_events = 0
        self.dropped_stale = 0
        self.backchannels = 0
        self.barge_ins = 0
        self.stage_errors = 0
        self._overload_reported = -1e9

    # ================================================================== helpers
    def _emit(self, dest: Dest, msg: Any, plane: str = "data", frames: list[Any] | None = None) -> None:
        self.outbox.append(Out(dest, plane, msg, frames))

    def _event(self, msg: Any) -> None:
        self._emit(Dest.ADAPTER, msg)

    def _error(
        self,
        code: str,
        message: str,
        event_id: str = "",
        response_id: str = "",
        type_: str = "invalid_request_error",
        param: str = "",
    ) -> None:
        self._event(
            ErrorEvent(
                self.session_id,
                self.epoch,
                code,
                message,
                type=type_,
                param=param,
                event_id=event_id,
                response_id=response_id,
            )
        )

    def drain(self) -> list[Out]:
        out, self.outbox = self.outbox, []
        return out

    @property
    def chunk_ms(self) -> float:
        return self.engine.chunk_samples * 1000 / self.engine.input_rate

    @property
    def history(self) -> list[Item]:
        """The committed conversation, in order."""
        return self.conversation.items

    @property
    def last_item_id(self) -> str | None:
        return self.conversation.last_id

    @property
    def outstanding(self) -> int:
        """Chunks sent to stage0 and not answered yet."""
        return len(self._outstanding)

    def _advance_epoch(self, reason: str) -> None:
        self.epoch += 1
        adv = EpochAdvance(self.session_id, self.epoch, reason)
        for dest in (Dest.ADAPTER, Dest.STAGE0, Dest.STAGE1):
            self._emit(dest, adv, "control")

    def turn_state(self, now: float) -> TurnState:
        """Derived from the state, never stored (so it cannot go stale)."""
        r = self.response
        if self._overlap is not None and self._assistant_audible(now):
            return TurnState.BARGE_IN  # the user talks over the assistant; not decided yet
        if self._speech_item is not None or self._overlap is not None:
            return TurnState.USER_SPEAKING
        if r is not None:
            return TurnState.ASSISTANT_PLAYING if r.first_audio_at is not None else TurnState.ASSISTANT_GENERATING
        if now < self._play_end_at:
            return TurnState.ASSISTANT_PLAYING  # the client still plays the last reply's tail
        if self._awaiting_reply or self._pending_response:
            return TurnState.USER_COMMITTED
        return TurnState.IDLE

    def _assistant_audible(self, now: float) -> bool:
        return self.response is not None or now < self._play_end_at

    def _cap_units(self) -> int:
        return max(1, int(self.config.continuation_cap_ms // self.chunk_ms))

    # ================================================================== lifecycle
    def open(self, now: float) -> None:
        self._reset_detector()
        self._last_speech_at = now
        self._emit(Dest.STAGE0, StageOpen(self.session_id, self.epoch, self.config), "control")
        self._emit(Dest.STAGE1, StageOpen(self.session_id, self.epoch, self.config), "control")
        self._event(SessionOpened(self.session_id, self.epoch, self.engine))

    def close(self, now: float, reason: str = "closed", cause: CloseCause = CloseCause.NORMAL) -> None:
        if self.closed:
            return
        # Nothing may start while closing: no queued turn, no deferred speak, no fence.
        self._pending_response = False
        self._deferred_speaks.clear()
        self._fences.clear()
        self._advance_epoch("session_closed")
        if self.response is not None:
            self._finish(ResponseStatus.CANCELLED, now, reason="session_closed")
        self.closed = True
        self._emit(Dest.STAGE0, StageClose(self.session_id, self.epoch), "control")
        self._emit(Dest.STAGE1, StageClose(self.session_id, self.epoch), "control")
        self._event(SessionClosed(self.session_id, self.epoch, reason, cause=cause))

    def _reset_detector(self) -> None:
        if self.config.turn_mode == TurnMode.SERVER_VAD:
            v = self.config.vad
            floor = self.config.overlap.silence_rms
            if self._detector is None:
                self._detector = make_detector(self.settings.vad, v.threshold, v.silence_duration_ms, floor)
            else:
                self._detector.threshold = v.threshold
                self._detector.silence_ms = v.silence_duration_ms
                self._detector.floor_rms = floor
            self._detector.reset(self.input_ms)
        self._speech_item = None
        self._overlap = None

    # ================================================================== adapter commands (data plane, in order)
    def on_command(self, msg: Any, now: float) -> None:
        """One client command, in the order the client sent it."""
        if self.closed:
            return
        seq = getattr(msg, "seq", None)
        self._cmd_seq = seq
        try:
            self._command(msg, now)
        finally:
            self._cmd_seq = None
        if seq is not None:
            self._seq_done = max(self._seq_done, seq)
            self._resolve_fences(now)

    def _command(self, msg: Any, now: float) -> None:
        match msg:
            case AudioIn():
                self._on_audio(msg, now)
            case InputCommit(event_id=eid):
                self._commit(now, eid, explicit=True)
            case InputClear():
                self._clear_input()
                self._event(InputCleared(self.session_id, self.epoch))
            case ResponseCreate(options=opts, event_id=eid):
                self._create_response(now, opts, eid)
            case SessionUpdate(config=cfg, event_id=eid):
                self._update(cfg, now, eid)
            case PlaybackAck():
                self._ack(msg)
            case ItemTruncate():
                self._truncate(msg)
            case ItemCreate():
                self._item_create(msg)
            case ItemDelete(item_id=iid, event_id=eid):
                self._item_delete(iid, eid)
            case ItemRetrieve(item_id=iid, event_id=eid):
                item = self.conversation.find(iid)
                if item is None:
                    self._error("item_not_found", f"no item {iid!r} in the conversation", eid, param="item_id")
                else:
                    self._event(ItemRetrieved(self.session_id, self.epoch, item, eid))
            case SnapshotRequest(event_id=eid):
                self._event(Snapshot(self.session_id, self.epoch, self.snapshot(now), eid))
            case _:
                self._error("unknown_command", f"unsupported command {type(msg).__name__}")

    # ------------------------------------------------------------------ audio in
    def _on_audio(self, msg: AudioIn, now: float) -> None:
        pcm = np.asarray(msg.pcm, dtype=np.float32).reshape(-1)
        if msg.force:
            self._interrupt(now)  # the explicit interrupt flag always wins
        dur = pcm.size * 1000 / self.engine.input_rate
        mode = self.config.turn_mode
        if mode == TurnMode.DUPLEX:
            self.input_ms += dur
            self._feed_live(pcm)
            return
        if self._buffer.ms + dur > self.settings.max_input_buffer_ms:
            # Dropped whole: the stream position does not move, so VAD positions stay true.
            self._error(
                "input_audio_buffer_full",
                f"input buffer would exceed {self.settings.max_input_buffer_ms} ms; commit or clear it",
            )
            return
        self._buffer.append(pcm, self.input_ms)
        self.input_ms += dur
        d = self._detector
        if mode == TurnMode.SERVER_VAD and d is not None:
            for ev in d.feed(pcm, self.engine.input_rate):
                if ev.speaking:
                    self._speech_start(ev.at_ms, now)
                else:
                    self._speech_stop(ev.at_ms, now)
            self._overlap_progress(now)
            self._trim_buffer()

    def _trim_buffer(self) -> None:
        """Server VAD only commits from a speech start: drop old silence it ruled out."""
        d = self._detector
        if (
            self._buffer.ms < min(_VAD_TRIM_AFTER_MS, self.settings.max_input_buffer_ms / 2)
            or (d is not None and d.speaking)
            or self._speech_item is not None
            or self._overlap is not None
        ):
            return
        keep = int((self.config.vad.prefix_padding_ms + _VAD_KEEP_SLACK_MS) * self.engine.input_rate / 1000)
        self._buffer.keep_tail(keep, self.input_ms)

    def _drop_buffer(self) -> None:
        self._buffer.drop(self.input_ms)

    def _clear_input(self) -> None:
        self._drop_buffer()
        self._live = np.zeros(0, dtype=np.float32)
        if self._detector is not None:
            self._detector.reset(self.input_ms)
        self._speech_item = None
        self._overlap = None

    def _speech_start(self, at_ms: float, now: float) -> None:
        self._last_speech_at = now
        self._idle_fired = False
        self._speech_start_ms = at_ms
        if self._assistant_audible(now):
            # Not announced yet: a backchannel must not make clients stop playback.
            self._overlap = _Overlap(at_ms)
            return
        self._announce_speech(at_ms)

    def _announce_speech(self, at_ms: float) -> None:
        self._speech_item = self._new_id("item")
        start = max(self._buffer.start_ms, at_ms - self.config.vad.prefix_padding_ms)
        self._event(SpeechStarted(self.session_id, self.epoch, self._speech_item, int(start)))

    def _overlap_progress(self, now: float) -> None:
        ov, d = self._overlap, self._detector
        if ov is None or d is None or not d.speaking:
            return
        # Voiced time only: the hangover silence before a stop is not "sustained speech".
        self._overlap_check(d.voiced_until_ms - ov.start_ms, now)

    def _overlap_check(self, heard_ms: float, now: float) -> None:
        ov = self._overlap
        if ov is None:
            return
        o = self.config.overlap
        if not ov.announced and heard_ms >= o.short_ack_ms:
            ov.announced = True
            self._announce_speech(ov.start_ms)
        if heard_ms >= o.barge_in_ms and self.config.vad.interrupt_response:
            self._interrupt(now)

    def _promote_overlap(self) -> None:
        """The assistant was interrupted: the overlapping speech is the user's turn."""
        ov, self._overlap = self._overlap, None
        if ov is not None and not ov.announced:
            self._announce_speech(ov.start_ms)

    def _speech_stop(self, at_ms: float, now: float) -> None:
        self._last_speech_at = now
        if self._overlap is not None:
            # A single large append may start and stop speech at once: judge the full span.
            self._overlap_check(at_ms - self._overlap.start_ms, now)
            ov, self._overlap = self._overlap, None
            if ov is not None and not ov.announced:
                # A backchannel ("mm-hmm"): not a turn, not an interruption; forget its audio.
                self.backchannels += 1
                self._drop_buffer()
                return
        if self._speech_item is None:
            self._announce_speech(self._speech_start_ms)  # keep started/stopped paired
        item = self._speech_item
        assert item is not None
        self._speech_item = None
        self._event(SpeechStopped(self.session_id, self.epoch, item, int(at_ms)))
        if not self._commit(now, "", explicit=False, item_id=item, start_ms=self._speech_start_ms):
            return
        if self.config.vad.create_response:
            if self.response is None:
                self._create_response(now, ResponseOptions(), "")
            else:
                self._pending_response = True  # answer it once the current reply ends

    # ------------------------------------------------------------------ commit → stage0
    def _commit(
        self,
        now: float,
        event_id: str,
        explicit: bool,
        item_id: str | None = None,
        start_ms: float | None = None,
        allow_empty: bool = False,
    ) -> bool:
        if not self._buffer.samples and not allow_empty:
            if explicit:
                msg = "cannot commit an empty input audio buffer"
                if self.config.turn_mode == TurnMode.DUPLEX:
                    msg += " (duplex mode streams input to the model; there is nothing to commit)"
                self._error("input_audio_buffer_commit_empty", msg, event_id)
            return False
        # Server VAD commits from the speech start minus the prefix padding.
        pcm = self._buffer.take(
            None if start_ms is None else start_ms - self.config.vad.prefix_padding_ms, self.input_ms
        )
        item_id = item_id or self._new_id("item")
        audio_ms = pcm_ms(pcm.size, self.engine.input_rate)
        item = Item(id=item_id, role="user", content=(ContentPart(type="input_audio"),), audio_ms=audio_ms)
        prev = self.conversation.append(item)
        self._awaiting_reply = True
        self._event(InputCommitted(self.session_id, self.epoch, item_id, prev))
        self._event(ItemAdded(self.session_id, self.epoch, item, prev))
        self._event(ItemDone(self.session_id, self.epoch, item, prev))
        self._send_utterance(pcm, item_id)
        return True

    def _send_utterance(self, pcm: np.ndarray, item_id: str) -> None:
        n = self.engine.chunk_samples
        count = max(1, -(-pcm.size // n))
        padded = np.zeros(count * n, dtype=np.float32)
        padded[: pcm.size] = pcm
        for i in range(count):
            kind = ChunkKind.UTTERANCE_END if i == count - 1 else ChunkKind.UTTERANCE
            self._send_chunk(kind, padded[i * n : (i + 1) * n], item_id=item_id, force_listen=True)

    def _send_chunk(
        self, kind: ChunkKind, pcm: np.ndarray, item_id: str = "", response_id: str = "", force_listen: bool = False
    ) -> None:
        seq = self._chunk_seq
        self._chunk_seq += 1
        if not self.stage0_ready:
            return  # nothing to answer it: not counted as sent
        self._outstanding[seq] = _Chunk(kind, self.epoch, item_id, response_id, force_listen)
        self.chunks_sent += 1
        self._emit(
            Dest.STAGE0,
            AudioChunk(self.session_id, self.epoch, seq, kind, pcm, response_id=response_id, force_listen=force_listen),
        )

    def _feed_live(self, pcm: np.ndarray) -> None:
        n = self.engine.chunk_samples
        buf = np.concatenate((self._live, pcm)) if self._live.size else pcm
        k = buf.size // n
        for i in range(k):
            force = self._live_chunks < self.config.force_listen_count
            self._live_chunks += 1
            self._send_chunk(ChunkKind.LIVE, buf[i * n : (i + 1) * n], force_listen=force)
        self._live = buf[k * n :].copy()

    # ------------------------------------------------------------------ responses
    def _create_response(self, now: float, opts: ResponseOptions, event_id: str) -> _Response | None:
        if self.response is not None:
            self._error(
                "conversation_already_has_active_response",
                f"response {self.response.id} is still in progress",
                event_id,
            )
            return None
        if not (self.stage0_ready and self.stage1_ready):
            self._error(
                "stage_unavailable", "the model is restarting; try again shortly", event_id, type_="server_error"
            )
            return None
        modalities = opts.output_modalities or self.config.output_modalities
        r = _Response(
            id=self._new_id("resp"),
            item_id=self._new_id("item"),
            options=opts,
            modalities=tuple(modalities),
            created_at=now,
            previous_item_id=self.last_item_id,
            in_history=opts.conversation != "none",
            origin_seq=self._cmd_seq,
            next_unit_at=now,
        )
        self.response = r
        self.responses += 1
        self._pending_response = False
        self._awaiting_reply = False
        item = self._assistant_item(r, "in_progress", "")
        if r.in_history:
            # The item takes its place in the conversation now (Realtime: output_item.added),
            # so user turns committed while it plays come after it.
            self.conversation.append(item)
        self._send_context(opts.instructions)
        self._event(ResponseCreated(self.session_id, self.epoch, self._info(r, ResponseStatus.IN_PROGRESS), item))
        if self.config.turn_mode != TurnMode.DUPLEX:
            self._continuation(now)
        return r

    def _assistant_item(self, r: _Response, status: str, transcript: str, audio_ms: int = 0) -> Item:
        if "audio" in r.modalities:
            part = ContentPart(type="output_audio", transcript=transcript)
        else:
            part = ContentPart(type="output_text", text=transcript)
        return Item(id=r.item_id, role="assistant", status=status, content=(part,), audio_ms=audio_ms)

    def _info(
        self,
        r: _Response,
        status: ResponseStatus,
        reason: str = "",
        output: tuple[Item, ...] = (),
        error: tuple[str, str] = ("", ""),
    ) -> ResponseInfo:
        return ResponseInfo(
            id=r.id,
            status=status,
            reason=reason,
            error_code=error[0],
            error_message=error[1],
            output=output,
            usage=Usage(
                input_chunks=r.input_chunks,
                output_audio_ms=r.generated_ms,
                output_text_chars=sum(len(t) for t in r.text) or len(full_text(r.segments)),
            ),
            modalities=r.modalities,
            metadata=r.options.metadata,
            conversation="auto" if r.in_history else "none",
        )

    def _send_context(self, instructions: str | None = None) -> None:
        self._emit(
            Dest.STAGE0,
            ContextUpdate(
                self.session_id,
                self.epoch,
                self.conversation.context(),
                instructions=instructions or self.config.instructions,
            ),
        )

    def _continuation(self, now: float) -> None:
        """Feed silence units (turn modes) so the model can finish its reply, paced and capped."""
        r = self.response
        if r is None or r.thinker_done or self.config.turn_mode == TurnMode.DUPLEX:
            return
        cap = self._cap_units()
        interval = self.chunk_ms / 1000 * self.settings.continuation_pace
        while not r.thinker_done:
            if r.continuation_sent >= cap:
                # Cap reached: the turn ends once every unit sent has been answered.
                if not self._awaiting_continuation(r):
                    self._thinker_finished(r, now, incomplete="turn_cap")
                return
            if now < r.next_unit_at:
                return
            r.continuation_sent += 1
            r.next_unit_at += interval
            self._send_chunk(ChunkKind.CONTINUATION, np.zeros(self.engine.chunk_samples, np.float32), response_id=r.id)

    def _awaiting_continuation(self, r: _Response) -> bool:
        return any(c.kind == ChunkKind.CONTINUATION and c.response_id == r.id for c in self._outstanding.values())

    def _thinker_finished(self, r: _Response, now: float, incomplete: str = "") -> None:
        if r.thinker_done:
            return
        r.thinker_done = True
        r.incomplete_reason = r.incomplete_reason or incomplete
        if "audio" in r.modalities and r.unit_seq > 0:
            # Tell stage1 the turn has no more units, so it flushes.
            self._emit(
                Dest.STAGE1,
                Handoff(
                    self.session_id, self.epoch, r.id, r.item_id, r.unit_seq, end_of_turn=True, voice=self._voice(r)
                ),
            )
            r.unit_seq += 1
        else:
            r.talker_done = True
        self._maybe_finish(now)

    def _voice(self, r: _Response) -> str:
        return r.options.voice or self.config.voice

    def _maybe_finish(self, now: float) -> None:
        r = self.response
        if r is not None and r.thinker_done and r.talker_done:
            status = ResponseStatus.INCOMPLETE if r.incomplete_reason else ResponseStatus.COMPLETED
            self._finish(status, now, reason=r.incomplete_reason)

    def _finish(self, status: ResponseStatus, now: float, reason: str = "", error: tuple[str, str] = ("", "")) -> None:
        """The one place a response ends: item into history, ItemDone, ResponseDone."""
        r = self.response
        if r is None:
            return
        self.response = None
        item_status = "completed" if status == ResponseStatus.COMPLETED else "incomplete"
        if "audio" in r.modalities:
            full = full_text(r.segments)
            committed = r.generated_ms
            played = self.cursor.played_ms if self.cursor.item_id == r.item_id else 0
            if self.config.commit_policy == CommitPolicy.ACK_ONLY:
                committed = min(played, committed)
            if r.truncated_ms is not None:
                committed = min(committed, r.truncated_ms)
            transcript = full if committed >= r.generated_ms else cut_text(r.segments, committed)
            self.conversation.record_audio(r.item_id, r.segments, r.generated_ms)
            self.cursor = _Cursor(r.item_id, r.generated_ms, r.sent_ms, played, committed if r.in_history else 0)
            if status in (ResponseStatus.CANCELLED, ResponseStatus.FAILED):
                # The epoch advance told the client to flush: nothing of it plays on.
                self._play_end_at = min(self._play_end_at, now)
            else:
                self._play_end_at = max(self._play_end_at, r.play_end_at)
            item = self._assistant_item(r, item_status, transcript, committed)
        else:
            full = transcript = "".join(r.text)
            item = self._assistant_item(r, item_status, transcript)
        if r.in_history and self.conversation.replace(item):  # (unless the client deleted it meanwhile)
            self._send_context()
        self._event(ItemDone(self.session_id, self.epoch, item, r.previous_item_id))
        self.done_events += 1
        self._event(
            ResponseDone(self.session_id, self.epoch, self._info(r, status, reason, (item,), error), transcript=full)
        )
        self._last_speech_at = now
        self._idle_fired = False
        owed = self._pending_response and status in (ResponseStatus.COMPLETED, ResponseStatus.INCOMPLETE)
        self._pending_response = False
        if self.closed:
            return
        if owed:
            # A user turn committed while this reply played: answer it now.
            self._create_response(now, ResponseOptions(), "")
        if self._deferred_speaks and self.response is None and self.config.turn_mode == TurnMode.DUPLEX:
            # The model started its next turn while this one still played: replay it, in
            # order; a speak that ends that turn defers the rest again.
            speaks, self._deferred_speaks = self._deferred_speaks, []
            for res in speaks:
                self._on_speak(res, now)
        elif self.config.turn_mode != TurnMode.DUPLEX:
            self._deferred_speaks.clear()

    def _barge_in(self, now: float) -> None:
        self.barge_ins += 1
        self._promote_overlap()
        self._cancel(now, "turn_detected")

    def _interrupt(self, now: float) -> None:
        """The user took the floor. A response still generating is cancelled; a finished
        one whose tail the client is still playing (up to stage1's lead) is silenced by an
        epoch advance, which tells clients to flush what they buffered."""
        if self.response is not None:
            self._barge_in(now)
        elif now < self._play_end_at:
            self.barge_ins += 1
            self._promote_overlap()
            self._advance_epoch("turn_detected")
            self._play_end_at = now

    def _cancel(self, now: float, reason: str) -> None:
        if self.response is None:
            return
        self._advance_epoch(reason)
        self._deferred_speaks.clear()
        self._finish(ResponseStatus.CANCELLED, now, reason=reason)

    # ------------------------------------------------------------------ cancel (control plane)
    def on_cancel(self, msg: ResponseCancel, now: float) -> None:
        """A client cancel. It travels on the control plane and may overtake data commands
        the client sent before it (up to ``after_seq``): a response those commands create
        is cancelled as soon as it appears (see docs/session-semantics.md)."""
        if self.closed:
            return
        r = self.response
        if msg.response_id:
            # Ids come from the server: one not active now cannot be created by queued commands.
            if r is None or msg.response_id != r.id:
                self._error(
                    "response_cancel_not_active",
                    f"response {msg.response_id!r} is not in progress",
                    msg.event_id,
                    param="response_id",
                )
                return
            self._cancel(now, "client_cancelled")
            return
        if r is not None:
            self._cancel(now, "client_cancelled")
            if self._seq_done < msg.after_seq:
                self._fences.append(_CancelFence(msg.after_seq, msg.event_id, applied=True))
            return
        if self._seq_done >= msg.after_seq:
            self._error("response_cancel_not_active", "there is no response in progress to cancel", msg.event_id)
            return
        self._fences.append(_CancelFence(msg.after_seq, msg.event_id))

    def _resolve_fences(self, now: float) -> None:
        if not self._fences:
            return
        r = self.response
        if r is not None and r.origin_seq is not None:
            covering = [f for f in self._fences if f.after_seq >= r.origin_seq]
            if covering:
                f = next((f for f in covering if not f.applied), covering[0])
                f.applied = True
                self._cancel(now, "client_cancelled")
        keep: list[_CancelFence] = []
        for f in self._fences:
            if self._seq_done < f.after_seq:
                keep.append(f)
            elif not f.applied:
                self._error("response_cancel_not_active", "there is no response in progress to cancel", f.event_id)
        self._fences = keep

    def output_clear(self, now: float) -> None:
        """Realtime ``output_audio_buffer.clear``: stop the assistant now."""
        if not self.closed and self.response is not None:
            self._cancel(now, "client_cancelled")

    # ------------------------------------------------------------------ stage0 results
    def on_stage0(self, res: Stage0Result, now: float) -> None:
        if self.closed:
            return
        c = self._outstanding.pop(res.chunk_seq, None)
        if c is None:
            self._error(
                "stage_protocol_error",
                f"stage0 answered chunk {res.chunk_seq}, which is not awaiting an answer",
                type_="server_error",
            )
            return
        self.chunk_results += 1
        if res.input_transcript is not None:
            # The user's words are never stale: stage0 keeps them across epochs, so does history.
            self._on_transcript(c, res.input_transcript)
        if res.epoch < self.epoch or c.epoch < self.epoch:
            self.dropped_stale += 1
            return
        r = self.response
        action = res.action
        if c.force_listen and action == Action.SPEAK:
            action = Action.LISTEN  # forced chunks always listen, whatever the engine said
        refused, opens_at = False, len(self.outbox)
        if (
            c.kind == ChunkKind.LIVE
            and action == Action.SPEAK
            and not res.interrupt
            and r is None
            and self.config.turn_mode == TurnMode.DUPLEX
        ):
            # Duplex: this speak opens a response. It is created first so the decision can
            # name it, and the decision goes out first: cause, then response.created.
            r = self._create_response(now, ResponseOptions(), "")
            refused = r is None  # (stage restarting: its error event was sent once)
        deferred = c.kind == ChunkKind.LIVE and action == Action.SPEAK and r is not None and r.thinker_done
        decision = Decision(
            self.session_id,
            self.epoch,
            res.chunk_seq,
            action,
            res.listen_prob,
            res.text if action == Action.SPEAK else "",
            res.end_of_turn,
            c.response_id or (r.id if r and not deferred else ""),
            res.cost_ms,
        )
        self.outbox.insert(opens_at, Out(Dest.ADAPTER, "data", decision))
        if refused or c.kind in (ChunkKind.UTTERANCE, ChunkKind.UTTERANCE_END):
            return  # (utterances: the model must listen while the user's committed turn plays in)
        if c.kind == ChunkKind.CONTINUATION:
            if r is None or r.id != c.response_id:
                return  # a unit of a response that already ended
            r.input_chunks += 1
            if not r.thinker_done:
                if action == Action.SPEAK:
                    self._on_speak(res, now)
                elif res.end_of_turn:
                    self._thinker_finished(r, now)
            self._continuation(now)
            return
        # LIVE (duplex): the model's decision governs.
        if res.interrupt:
            self._interrupt(now)
            self._deferred_speaks.clear()
            return
        if action == Action.SPEAK:
            self._on_speak(res, now)
        elif r is not None and not r.thinker_done and r.unit_seq > 0:
            self._thinker_finished(r, now)  # duplex: a listen after speaking ends the turn

    def _on_transcript(self, c: _Chunk, transcript: str) -> None:
        if c.kind == ChunkKind.CONTINUATION:
            return  # silence units carry no user words
        if c.kind == ChunkKind.LIVE:
            # Duplex: the model heard a user turn; it enters history as its own user item.
            item_id = self._new_id("item")
            item = Item(id=item_id, role="user", content=(ContentPart(type="input_audio", transcript=transcript),))
            prev = self.conversation.append(item)
            self._event(ItemAdded(self.session_id, self.epoch, item, prev))
            self._event(ItemDone(self.session_id, self.epoch, item, prev))
        else:
            item_id = c.item_id
            if not self.conversation.set_transcript(item_id, transcript):
                return  # the client deleted the item meanwhile
        self._event(InputTranscript(self.session_id, self.epoch, item_id, transcript))

    def _on_speak(self, res: Stage0Result, now: float) -> None:
        r = self.response
        if r is None:
            if self.config.turn_mode != TurnMode.DUPLEX:
                return
            r = self._create_response(now, ResponseOptions(), "")
            if r is None:
                return
        elif r.thinker_done:
            if self.config.turn_mode == TurnMode.DUPLEX:
                self._deferred_speaks.append(res)  # a new turn while the last one still plays
            return
        text, end = res.text, res.end_of_turn
        limit = r.options.max_output_tokens or self.config.max_output_tokens
        if limit and text:
            words = text.split()
            if r.words + len(words) > limit:
                text = " ".join(words[: max(0, limit - r.words)])
                end = True
                r.incomplete_reason = "max_output_tokens"
            r.words += len(text.split())
        if "audio" in r.modalities:
            self._emit(
                Dest.STAGE1,
                Handoff(
                    self.session_id,
                    self.epoch,
                    r.id,
                    r.item_id,
                    r.unit_seq,
                    text=text,
                    end_of_turn=end,
                    tokens=res.tokens,
                    hidden=res.hidden,
                    voice=self._voice(r),
                ),
            )
            r.unit_seq += 1
        elif text:
            r.text.append(text)
            self._event(TextOut(self.session_id, self.epoch, r.id, r.item_id, text))
        if end:
            r.thinker_done = True
            if "audio" not in r.modalities:
                r.talker_done = True
            self._maybe_finish(now)

    # ------------------------------------------------------------------ stage1 audio
    def on_audio_out(self, msg: AudioOut, now: float, frames: list[Any] | None = None) -> bool:
        """Returns whether the chunk was forwarded to the client."""
        r = self.response
        if (
            self.closed
            or msg.epoch != self.epoch
            or r is None
            or msg.response_id != r.id
            or r.talker_done
            or "audio" not in r.modalities
        ):
            self.dropped_stale += 1
            return False
        n = int(np.asarray(msg.pcm).size)
        if n:
            if r.first_audio_at is None:
                r.first_audio_at = now
            start = r.generated_ms
            r.generated_samples += n
            r.generated_ms = r.sent_ms = pcm_ms(r.generated_samples, self.settings.output_rate)
            # The client plays at real time from the first chunk; a late chunk resumes after a gap.
            r.play_end_at = max(r.play_end_at, now) + n / self.settings.output_rate
            r.segments.append(Segment(start, r.generated_ms, msg.text))
            if self.cursor.item_id != r.item_id:
                self.cursor = _Cursor(r.item_id)
            # The host forwards audio as it is generated: sent == generated at this hop.
            self.cursor.generated_ms = self.cursor.sent_ms = r.generated_ms
            self._emit(Dest.ADAPTER, msg, frames=frames)
        elif msg.text:
            r.segments.append(Segment(r.generated_ms, r.generated_ms, msg.text))
        if msg.end_of_turn:
            if n == 0:
                self._emit(Dest.ADAPTER, msg, frames=frames)
            r.talker_done = True
            # stage1 finished what it was given: the turn is over, whatever stage0 still says.
            r.thinker_done = True
            self._maybe_finish(now)
        return True

    # ------------------------------------------------------------------ stage failures
    def on_stage_error(self, err: StageError, now: float, chunk_seq: int | None = None) -> None:
        if self.closed:
            return
        self.stage_errors += 1
        if err.role == Role.STAGE0 and chunk_seq is not None and self._outstanding.pop(chunk_seq, None):
            self.chunk_results += 1  # the error is that chunk's one answer
        message = f"{err.role.value}: {err.message}"
        if err.code == "stage_open_failed":
            # The stage refused the session: nothing sent there would ever be answered.
            self._error(err.code, message + "; the session is closed", type_="server_error")
            self.close(now, "model stage refused the session", CloseCause.FAILED)
            return
        if err.epoch < self.epoch:
            # About work of an older epoch: the response it served has already ended.
            self._error(err.code, message, type_="server_error")
            return
        self._fail(now, err.code, message)

    def _fail(self, now: float, code: str, message: str) -> None:
        r = self.response
        self._error(code, message, response_id=r.id if r else "", type_="server_error")
        if r is not None:
            self._advance_epoch("stage_error")
            self._deferred_speaks.clear()
            self._finish(ResponseStatus.FAILED, now, reason="error", error=(code, message))

    def on_send_failed(self, out: Out, now: float) -> None:
        """The host could not hand ``out`` to a stage (queue full or peer gone)."""
        if self.closed:
            return
        msg = out.msg
        if out.plane == "control":
            # An epoch/open/close the stage never saw: its epoch would diverge from ours.
            self._error(
                "stage_unreachable",
                "the model stage did not accept a control message; the session is closed to keep it consistent",
                type_="server_error",
            )
            self.close(now, "stage unreachable", CloseCause.FAILED)
        elif isinstance(msg, AudioChunk):
            if self._outstanding.pop(msg.chunk_seq, None) is not None:
                self.chunks_sent -= 1  # it never left: nothing will answer it
            if now - self._overload_reported >= 1.0:
                self._overload_reported = now
                self._error("overloaded", "the model is overloaded; input audio was dropped", type_="server_error")
            self._continuation(now)  # a capped turn may have been waiting for that unit
        elif isinstance(msg, Handoff):
            r = self.response
            if r is not None and msg.response_id == r.id:
                self._fail(now, "overloaded", "speech synthesis is overloaded")

    def on_client_overloaded(self, now: float) -> None:
        """The adapter cannot take this session's events as fast as they come: fail the
        response (error, epoch advance, ``response.done`` failed), or close the session
        when none is active."""
        if self.closed:
            return
        if self.response is not None:
            self._fail(now, "overloaded", "the server could not deliver this response in time; it was stopped")
            return
        self._error("overloaded", "the server could not deliver this session's events in time", type_="server_error")
        self.close(now, "overloaded", CloseCause.FAILED)

    def on_stage_lost(self, role: Role, now: float) -> None:
        """The stage serving this session died: fail what it was doing."""
        if self.closed:
            return
        if role == Role.STAGE0:
            self.stage0_ready = False
            self.chunks_lost += len(self._outstanding)
            self._outstanding.clear()
        else:
            self.stage1_ready = False
        self._fail(now, "stage_unavailable", f"{role.value} stopped; the session recovers when it is back")

    def on_stage_bound(self, role: Role, now: float) -> None:
        """A (new) stage serves this session: open the session there."""
        if self.closed:
            return
        self._emit(
            Dest.STAGE0 if role == Role.STAGE0 else Dest.STAGE1,
            StageOpen(self.session_id, self.epoch, self.config),
            "control",
        )
        if role == Role.STAGE0:
            self.stage0_ready = True
            self._send_context()
        else:
            self.stage1_ready = True

    # ------------------------------------------------------------------ session settings
    def _update(self, cfg: SessionConfig, now: float, event_id: str) -> None:
        old = self.config
        self.config = cfg
        if old.turn_mode != cfg.turn_mode:
            if TurnMode.DUPLEX in (cfg.turn_mode, old.turn_mode):
                self._clear_input()
                self._live_chunks = 0  # the duplex stream (re)starts: force_listen_count again
            self._reset_detector()
        elif self._detector is not None:
            # New thresholds apply from the next window; speech in progress is kept.
            self._detector.threshold = cfg.vad.threshold
            self._detector.silence_ms = cfg.vad.silence_duration_ms
            self._detector.floor_rms = cfg.overlap.silence_rms
        self._emit(Dest.STAGE0, StageOpen(self.session_id, self.epoch, cfg), "control")
        self._emit(Dest.STAGE1, StageOpen(self.session_id, self.epoch, cfg), "control")
        if old.instructions != cfg.instructions:
            self._send_context()
        self._event(SessionUpdated(self.session_id, self.epoch, cfg, event_id))

    # ------------------------------------------------------------------ playback and history
    def _ack(self, msg: PlaybackAck) -> None:
        r = self.response
        active = r is not None and r.item_id == msg.item_id
        gen = r.generated_ms if r is not None and active else self.conversation.generated_ms(msg.item_id)
        if gen is None:
            self._error("item_not_found", f"no assistant audio item {msg.item_id!r}", msg.event_id, param="item_id")
            return
        played = max(0, min(msg.played_ms, gen))
        c = self.cursor
        if c.item_id == msg.item_id:
            played = c.played_ms = max(played, c.played_ms)
        if not active and self.config.commit_policy == CommitPolicy.ACK_ONLY:
            item = self.conversation.find(msg.item_id)
            if item is not None and item.role == "assistant":
                if played > item.audio_ms:  # acks never shrink history (truncate does)
                    self._cut_assistant(msg.item_id, played)
                played = max(played, item.audio_ms)
                if c.item_id == msg.item_id:
                    c.committed_ms = played
        self._event(
            PlaybackCommitted(
                self.session_id, self.epoch, msg.response_id, msg.item_id, played, tuple(self.history), msg.event_id
            )
        )

    def _cut_assistant(self, item_id: str, ms: int) -> None:
        if self.conversation.cut_assistant(item_id, ms):
            self._send_context()

    def _truncate(self, msg: ItemTruncate) -> None:
        item = self.conversation.find(msg.item_id)
        if item is None or item.role != "assistant":
            self._error(
                "item_not_found", f"no assistant item {msg.item_id!r} to truncate", msg.event_id, param="item_id"
            )
            return
        r = self.response
        active = r is not None and r.item_id == msg.item_id
        gen = r.generated_ms if r is not None and active else self.conversation.generated_ms(msg.item_id)
        gen = item.audio_ms if gen is None else gen
        if msg.content_index != 0:
            self._error("invalid_value", "content_index must be 0", msg.event_id, param="content_index")
            return
        if msg.audio_end_ms < 0 or msg.audio_end_ms > gen:
            self._error(
                "invalid_value",
                f"audio_end_ms {msg.audio_end_ms} is outside the item's {gen} ms of audio",
                msg.event_id,
                param="audio_end_ms",
            )
            return
        c = self.cursor
        if r is not None and active:
            # Still playing: the item enters history cut here when the response ends.
            r.truncated_ms = msg.audio_end_ms
            if c.item_id == msg.item_id:
                c.played_ms = msg.audio_end_ms
        else:
            self._cut_assistant(msg.item_id, msg.audio_end_ms)
            if c.item_id == msg.item_id:
                c.played_ms = c.committed_ms = msg.audio_end_ms
        self._event(
            ItemTruncated(self.session_id, self.epoch, msg.item_id, msg.audio_end_ms, msg.content_index, msg.event_id)
        )

    def _item_create(self, msg: ItemCreate) -> None:
        item = msg.item
        if item.role not in ("user", "assistant", "system"):
            self._error(
                "invalid_value",
                f"item role {item.role!r} is not user, assistant or system",
                msg.event_id,
                param="item.role",
            )
            return
        if self.conversation.find(item.id) is not None or (
            self.response is not None and self.response.item_id == item.id
        ):
            self._error("item_already_exists", f"item {item.id!r} already exists", msg.event_id, param="item.id")
            return
        if item.status == "in_progress":
            item = Item(id=item.id, role=item.role, type=item.type, content=item.content, audio_ms=item.audio_ms)
        try:
            prev = self.conversation.insert(item, msg.previous_item_id)
        except KeyError:
            self._error(
                "item_not_found",
                f"previous_item_id {msg.previous_item_id!r} not found",
                msg.event_id,
                param="previous_item_id",
            )
            return
        self._event(ItemAdded(self.session_id, self.epoch, item, prev))
        self._event(ItemDone(self.session_id, self.epoch, item, prev))
        self._send_context()

    def _item_delete(self, item_id: str, event_id: str) -> None:
        if not self.conversation.delete(item_id):
            self._error("item_not_found", f"no item {item_id!r} in the conversation", event_id, param="item_id")
            return
        r = self.response
        if r is not None and r.item_id == item_id:
            r.in_history = False  # the response plays on, out of the conversation
        self._event(ItemDeleted(self.session_id, self.epoch, item_id, event_id))
        self._send_context()

    # ================================================================== time
    def tick(self, now: float) -> None:
        if self.closed:
            return
        self._continuation(now)
        self._idle_check(now)

    def _idle_deadline(self) -> float | None:
        v = self.config.vad
        if (
            self.config.turn_mode != TurnMode.SERVER_VAD
            or not v.idle_timeout_ms
            or self._idle_fired
            or self.response is not None
            or self._speech_item is not None
            or self._overlap is not None
            or self._pending_response
        ):
            return None
        return max(self._last_speech_at, self._play_end_at) + v.idle_timeout_ms / 1000

    def _idle_check(self, now: float) -> None:
        deadline = self._idle_deadline()
        if deadline is None or now < deadline:
            return
        self._idle_fired = True
        item = self._new_id("item")
        start, end = int(self._buffer.start_ms), int(self.input_ms)
        self._event(IdleTimeout(self.session_id, self.epoch, item, start, end))
        # Realtime commits the buffer even if empty, then asks the model to respond.
        self._commit(now, "", explicit=False, item_id=item, allow_empty=True)
        self._create_response(now, ResponseOptions(), "")

    def next_deadline(self) -> float | None:
        """When ``tick`` next has work (continuation units, idle timeout); None: none is
        due by time alone (a capped turn waits for answers, not for the clock)."""
        if self.closed:
            return None
        r = self.response
        times: list[float] = []
        if (
            r is not None
            and not r.thinker_done
            and self.config.turn_mode != TurnMode.DUPLEX
            and r.continuation_sent < self._cap_units()
        ):
            times.append(r.next_unit_at)
        idle = self._idle_deadline()
        if idle is not None:
            times.append(idle)
        return min(times) if times else None

    # ================================================================== inspection
    def snapshot(self, now: float) -> SessionSnapshot:
        r = self.response
        info = None
        if r is not None:
            so_far = full_text(r.segments) if "audio" in r.modalities else "".join(r.text)
            item = self._assistant_item(r, "in_progress", so_far, r.generated_ms)
            info = self._info(r, ResponseStatus.IN_PROGRESS, output=(item,))
        return SessionSnapshot(
            session_id=self.session_id,
            epoch=self.epoch,
            turn_state=self.turn_state(now),
            turn_mode=self.config.turn_mode,
            response=info,
            cursor=self.cursor.view(),
            history=tuple(self.history),
            input_buffer_ms=int(self._buffer.ms),
            chunks_sent=self.chunks_sent,
            chunk_results=self.chunk_results,
            dropped_stale=self.dropped_stale,
            responses=self.responses,
            stage0=self.stage_names.get(Role.STAGE0, ""),
            stage1=self.stage_names.get(Role.STAGE1, ""),
            chunks_lost=self.chunks_lost,
            backchannels=self.backchannels,
            barge_ins=self.barge_ins,
            stage_errors=self.stage_errors,
        )
