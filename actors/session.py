"""The session actor: single writer of one session's state.

It is a plain object driven by one event loop (the session host). Every entry point
takes the current time, mutates state, and appends what must be sent to
``outbox``; the host does the I/O. No entry point raises for bad input or stage
misbehaviour: both become error events, so the actor is safe to drive with any
interleaving (tests/unit/actors drives it with hypothesis).

Rules it keeps (DESIGN.md "Epochs", "Session actor"):

* ``epoch`` only grows; it advances on barge-in, cancel, output clear, stage failure
  and close, and each advance is announced to adapter and stages on the control plane.
* At most one active response; exactly one ``ResponseDone`` per response.
* Exactly one stage0 result per chunk sent (a stage error for the chunk counts as it).
* Output of an older epoch is never forwarded.
* History holds committed items only; under ``ack_only`` an assistant item holds
  only what the client reported as played.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from duplexd.actors.transcript import Segment, cut_text, full_text
from duplexd.actors.vad import SpeechDetector, make_detector
from duplexd.bus.messages import (
    Action,
    AudioChunk,
    AudioIn,
    AudioOut,
    ChunkKind,
    CommitPolicy,
    ContentPart,
    ContextUpdate,
    Decision,
    EngineInfo,
    EpochAdvance,
    ErrorEvent,
    Handoff,
    HistoryEntry,
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


@dataclass(slots=True)
class _Response:
    id: str
    item_id: str
    options: ResponseOptions
    modalities: tuple[str, ...]
    created_at: float
    previous_item_id: str | None
    in_history: bool
    thinker_done: bool = False
    talker_done: bool = False
    incomplete_reason: str = ""
    unit_seq: int = 0
    words: int = 0
    text: list[str] = field(default_factory=list)  # text modality deltas
    segments: list[Segment] = field(default_factory=list)
    generated_ms: int = 0
    first_audio_at: float | None = None
    continuation_sent: int = 0
    next_unit_at: float = 0.0
    input_chunks: int = 0


@dataclass(slots=True)
class _Overlap:
    """User speech heard while the assistant is audible (turn modes)."""

    start_ms: float
    announced: bool = False  # speech_started sent (passed the short-ack threshold)
    barged: bool = False


@dataclass(slots=True)
class _Cursor:
    """Playback position of the newest assistant audio item."""

    item_id: str = ""
    generated_ms: int = 0
    played_ms: int = 0
    committed_ms: int = 0

    def view(self) -> PlaybackCursor:
        # The host forwards audio as it is generated: sent == generated at this hop.
        return PlaybackCursor(self.generated_ms, self.generated_ms, self.played_ms, self.committed_ms)


@dataclass(slots=True)
class _CancelFence:
    after_seq: int
    response_id: str
    event_id: str
    applied: bool = False


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
        self._buffer: list[np.ndarray] = []
        self._buffer_samples = 0
        self._buffer_start_ms = 0.0
        self._live = np.zeros(0, dtype=np.float32)  # duplex: partial chunk
        self._detector = detector
        self._speech_item: str | None = None
        self._speech_start_ms = 0.0
        self._overlap: _Overlap | None = None
        self._last_speech_at = 0.0
        self._idle_fired = False
        # stage0 accounting: chunk_seq -> (kind, item id it belongs to)
        self._chunk_seq = 0
        self._outstanding: dict[int, tuple[ChunkKind, str]] = {}
        self.chunks_sent = 0
        self.chunk_results = 0
        self.chunks_lost = 0  # sent to a stage0 that died before answering
        self.stage0_ready = True
        self.stage1_ready = True
        # responses and history
        self.response: _Response | None = None
        self._pending_response = False  # a response is owed once the active one ends
        self._deferred_speaks: list[Stage0Result] = []
        self.responses = 0
        self.history: list[Item] = []
        self._alignments: dict[str, list[Segment]] = {}
        self._generated: dict[str, int] = {}  # assistant item id -> ms generated
        self.cursor = _Cursor()
        self._play_end_at = 0.0
        self._fence: _CancelFence | None = None
        self._seq_done = -1
        self.dropped_stale = 0
        self.done_events = 0
        self.backchannels = 0
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
    def last_item_id(self) -> str | None:
        return self.history[-1].id if self.history else None

    def _advance_epoch(self, reason: str) -> None:
        self.epoch += 1
        adv = EpochAdvance(self.session_id, self.epoch, reason)
        for dest in (Dest.ADAPTER, Dest.STAGE0, Dest.STAGE1):
            self._emit(dest, adv, "control")

    def turn_state(self, now: float) -> TurnState:
        r = self.response
        if self._overlap is not None and not self._overlap.barged and (r or now < self._play_end_at):
            return TurnState.BARGE_IN
        if self._speech_item is not None:
            return TurnState.USER_SPEAKING
        if r is not None:
            return TurnState.ASSISTANT_PLAYING if r.first_audio_at is not None else TurnState.ASSISTANT_GENERATING
        if now < self._play_end_at:
            return TurnState.ASSISTANT_PLAYING
        if self._pending_response or self._outstanding_utterance():
            return TurnState.USER_COMMITTED
        return TurnState.IDLE

    def _outstanding_utterance(self) -> bool:
        return any(k in (ChunkKind.UTTERANCE, ChunkKind.UTTERANCE_END) for k, _ in self._outstanding.values())

    def _assistant_audible(self, now: float) -> bool:
        return self.response is not None or now < self._play_end_at

    # ================================================================== lifecycle
    def open(self, now: float) -> None:
        self._reset_detector()
        self._last_speech_at = now
        self._emit(Dest.STAGE0, StageOpen(self.session_id, self.epoch, self.config), "control")
        self._emit(Dest.STAGE1, StageOpen(self.session_id, self.epoch, self.config), "control")
        self._event(SessionOpened(self.session_id, self.epoch, self.engine))

    def close(self, now: float, reason: str = "closed") -> None:
        if self.closed:
            return
        if self.response is not None:
            self._finish(ResponseStatus.CANCELLED, now, reason="session_closed")
        self.closed = True
        self.epoch += 1
        self._emit(Dest.STAGE0, StageClose(self.session_id, self.epoch), "control")
        self._emit(Dest.STAGE1, StageClose(self.session_id, self.epoch), "control")
        self._event(SessionClosed(self.session_id, self.epoch, reason))

    def _reset_detector(self) -> None:
        if self.config.turn_mode == TurnMode.SERVER_VAD:
            v = self.config.vad
            if self._detector is None:
                self._detector = make_detector(self.settings.vad, v.threshold, v.silence_duration_ms)
            else:
                self._detector.threshold = v.threshold
                self._detector.silence_ms = v.silence_duration_ms
            self._detector.reset()
        self._speech_item = None
        self._overlap = None

    # ================================================================== adapter commands (data plane, in order)
    def on_command(self, msg: Any, now: float) -> None:
        """One client command, in the order the client sent it."""
        if self.closed:
            return
        seq = getattr(msg, "seq", None)
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
                item = self._find(iid)
                if item is None:
                    self._error("item_not_found", f"no item {iid!r} in the conversation", eid, param="item_id")
                else:
                    self._event(ItemRetrieved(self.session_id, self.epoch, item, eid))
            case SnapshotRequest(event_id=eid):
                self._event(Snapshot(self.session_id, self.epoch, self.snapshot(now), eid))
            case _:
                self._error("unknown_command", f"unsupported command {type(msg).__name__}")
        if seq is not None:
            self._seq_done = max(self._seq_done, seq)
            self._resolve_fence(now)

    # ------------------------------------------------------------------ audio in
    def _on_audio(self, msg: AudioIn, now: float) -> None:
        pcm = np.asarray(msg.pcm, dtype=np.float32).reshape(-1)
        if msg.force and self.response is not None:
            self._barge_in(now, reason="turn_detected")
        dur = pcm.size * 1000 / self.engine.input_rate
        mode = self.config.turn_mode
        if mode == TurnMode.DUPLEX:
            self.input_ms += dur
            self._feed_live(pcm, now)
            return
        if self._buffer_ms() + dur > self.settings.max_input_buffer_ms:
            self._error(
                "input_audio_buffer_full",
                f"input buffer would exceed {self.settings.max_input_buffer_ms} ms; commit or clear it",
            )
            return
        if not self._buffer:
            self._buffer_start_ms = self.input_ms
        self._buffer.append(pcm)
        self._buffer_samples += pcm.size
        self.input_ms += dur
        if mode == TurnMode.SERVER_VAD and self._detector is not None:
            for ev in self._detector.feed(self._to_vad_rate(pcm)):
                if ev.speaking:
                    self._speech_start(ev.at_ms, now)
                else:
                    self._speech_stop(ev.at_ms, now)
            self._overlap_progress(now)

    def _to_vad_rate(self, pcm: np.ndarray) -> np.ndarray:
        if self.engine.input_rate == 16000:
            return pcm
        import soxr

        return soxr.resample(pcm, self.engine.input_rate, 16000)

    def _buffer_ms(self) -> float:
        return self._buffer_samples * 1000 / self.engine.input_rate

    def _clear_input(self) -> None:
        self._buffer.clear()
        self._buffer_samples = 0
        self._buffer_start_ms = self.input_ms
        if self._detector is not None:
            self._detector.reset()
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
        start = max(self._buffer_start_ms, at_ms - self.config.vad.prefix_padding_ms)
        self._event(SpeechStarted(self.session_id, self.epoch, self._speech_item, int(start)))

    def _overlap_progress(self, now: float) -> None:
        ov = self._overlap
        if ov is None or self._detector is None or not self._detector.speaking:
            return
        heard = self.input_ms - ov.start_ms
        if not ov.announced and heard >= self.config.overlap.short_ack_ms:
            ov.announced = True
            self._announce_speech(ov.start_ms)
        if (
            not ov.barged
            and heard >= self.config.overlap.barge_in_ms
            and self.response is not None
            and self.config.vad.interrupt_response
        ):
            ov.barged = True
            self._barge_in(now, reason="turn_detected")

    def _speech_stop(self, at_ms: float, now: float) -> None:
        self._last_speech_at = now
        ov, self._overlap = self._overlap, None
        if ov is not None and not ov.announced:
            # A backchannel ("mm-hmm"): not a turn, not an interruption; forget its audio.
            self.backchannels += 1
            self._buffer.clear()
            self._buffer_samples = 0
            self._buffer_start_ms = self.input_ms
            return
        item = self._speech_item or self._new_id("item")
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
        self, now: float, event_id: str, explicit: bool, item_id: str | None = None, start_ms: float | None = None
    ) -> bool:
        if not self._buffer_samples:
            if explicit:
                self._error("input_audio_buffer_commit_empty", "cannot commit an empty input audio buffer", event_id)
            return False
        pcm = np.concatenate(self._buffer)
        if start_ms is not None:
            # Server VAD commits from the speech start minus the prefix padding.
            skip_ms = max(0.0, start_ms - self.config.vad.prefix_padding_ms - self._buffer_start_ms)
            pcm = pcm[int(skip_ms * self.engine.input_rate / 1000) :]
        self._buffer.clear()
        self._buffer_samples = 0
        self._buffer_start_ms = self.input_ms
        item_id = item_id or self._new_id("item")
        prev = self.last_item_id
        audio_ms = pcm_ms(pcm.size, self.engine.input_rate)
        item = Item(id=item_id, role="user", content=(ContentPart(type="input_audio"),), audio_ms=audio_ms)
        self.history.append(item)
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
        self._outstanding[seq] = (kind, item_id)
        self.chunks_sent += 1
        self._emit(
            Dest.STAGE0,
            AudioChunk(self.session_id, self.epoch, seq, kind, pcm, response_id=response_id, force_listen=force_listen),
        )

    def _feed_live(self, pcm: np.ndarray, now: float) -> None:
        n = self.engine.chunk_samples
        buf = np.concatenate((self._live, pcm)) if self._live.size else pcm
        k = buf.size // n
        for i in range(k):
            force = self._chunk_seq < self.config.force_listen_count
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
        in_history = opts.conversation != "none"
        r = _Response(
            id=self._new_id("resp"),
            item_id=self._new_id("item"),
            options=opts,
            modalities=tuple(modalities),
            created_at=now,
            previous_item_id=self.last_item_id,
            in_history=in_history,
            next_unit_at=now,
        )
        self.response = r
        self.responses += 1
        self._pending_response = False
        self._send_context(opts.instructions)
        item = self._assistant_item(r, "in_progress", "")
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
        entries = tuple(HistoryEntry(i.role, _item_text(i)) for i in self.history)
        self._emit(
            Dest.STAGE0,
            ContextUpdate(self.session_id, self.epoch, entries, instructions=instructions or self.config.instructions),
        )

    def _continuation(self, now: float) -> None:
        """Feed silence units (turn modes) so the model can finish its reply, paced."""
        r = self.response
        if r is None or r.thinker_done or self.config.turn_mode == TurnMode.DUPLEX:
            return
        cap_units = max(1, int(self.config.continuation_cap_ms // self.chunk_ms))
        interval = self.chunk_ms / 1000 * self.settings.continuation_pace
        while now >= r.next_unit_at and not r.thinker_done:
            if r.continuation_sent >= cap_units:
                if not self._awaiting_continuation(r):
                    self._thinker_finished(r, now, incomplete="turn_cap")
                return
            r.continuation_sent += 1
            r.next_unit_at += interval
            self._send_chunk(ChunkKind.CONTINUATION, np.zeros(self.engine.chunk_samples, np.float32), response_id=r.id)

    def _awaiting_continuation(self, r: _Response) -> bool:
        return any(k == ChunkKind.CONTINUATION for k, _ in self._outstanding.values())

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
        if "audio" in r.modalities:
            transcript = full_text(r.segments)
            self._alignments[r.item_id] = r.segments
            self._generated[r.item_id] = r.generated_ms
            committed_ms = r.generated_ms
            played = self.cursor.played_ms if self.cursor.item_id == r.item_id else 0
            if self.config.commit_policy == CommitPolicy.ACK_ONLY:
                committed_ms = min(played, r.generated_ms)
                transcript = cut_text(r.segments, committed_ms)
            self.cursor = _Cursor(r.item_id, r.generated_ms, played, committed_ms if r.in_history else 0)
            if r.first_audio_at is not None:
                self._play_end_at = max(self._play_end_at, r.first_audio_at + r.generated_ms / 1000)
            item = self._assistant_item(
                r, "completed" if status == ResponseStatus.COMPLETED else "incomplete", transcript, committed_ms
            )
        else:
            transcript = "".join(r.text)
            item = self._assistant_item(
                r, "completed" if status == ResponseStatus.COMPLETED else "incomplete", transcript
            )
        has_output = bool(transcript) or r.generated_ms > 0 or status == ResponseStatus.COMPLETED
        output: tuple[Item, ...] = ()
        if has_output:
            output = (item,)
            if r.in_history:
                self.history.append(item)
                self._send_context()
            self._event(ItemDone(self.session_id, self.epoch, item, r.previous_item_id))
        self.done_events += 1
        self._event(
            ResponseDone(
                self.session_id,
                self.epoch,
                self._info(r, status, reason, output, error),
                transcript=full_text(r.segments) if "audio" in r.modalities else transcript,
            )
        )
        self._last_speech_at = now
        self._idle_fired = False
        if self._pending_response and status == ResponseStatus.COMPLETED:
            self._create_response(now, ResponseOptions(), "")
        else:
            self._pending_response = False
        if self._deferred_speaks and self.response is None:
            speaks, self._deferred_speaks = self._deferred_speaks, []
            for res in speaks:
                self._on_speak(res, now)

    def _barge_in(self, now: float, reason: str) -> None:
        self._cancel(now, reason)

    def _cancel(self, now: float, reason: str) -> None:
        if self.response is None:
            return
        self._advance_epoch(reason)
        self._deferred_speaks.clear()
        self._finish(ResponseStatus.CANCELLED, now, reason=reason)

    # ------------------------------------------------------------------ cancel (control plane)
    def on_cancel(self, msg: ResponseCancel, now: float) -> None:
        if self.closed:
            return
        r = self.response
        if msg.response_id and r is not None and msg.response_id != r.id:
            self._error(
                "response_not_found",
                f"response {msg.response_id!r} is not in progress",
                msg.event_id,
                param="response_id",
            )
            return
        if r is not None:
            self._cancel(now, "client_cancelled")
            if self._seq_done < msg.after_seq:
                self._fence = _CancelFence(msg.after_seq, msg.response_id, msg.event_id, applied=True)
            return
        if self._seq_done >= msg.after_seq:
            self._error("response_cancel_not_active", "there is no response in progress to cancel", msg.event_id)
            return
        # The client's response.create may still be queued on the data plane: fence it.
        self._fence = _CancelFence(msg.after_seq, msg.response_id, msg.event_id)

    def _resolve_fence(self, now: float) -> None:
        f = self._fence
        if f is None:
            return
        if self.response is not None and not f.applied and self._seq_done <= f.after_seq:
            f.applied = True
            self._cancel(now, "client_cancelled")
        if self._seq_done >= f.after_seq:
            self._fence = None
            if not f.applied:
                self._error("response_cancel_not_active", "there is no response in progress to cancel", f.event_id)

    def output_clear(self, now: float) -> None:
        """Realtime ``output_audio_buffer.clear``: stop the assistant now."""
        if self.response is not None:
            self._cancel(now, "client_cancelled")

    # ------------------------------------------------------------------ stage0 results
    def on_stage0(self, res: Stage0Result, now: float) -> None:
        if self.closed:
            return
        entry = self._outstanding.pop(res.chunk_seq, None)
        if entry is None:
            self._error("stage_protocol_error", f"unexpected result for chunk {res.chunk_seq}", type_="server_error")
            return
        self.chunk_results += 1
        kind, item_id = entry
        if res.input_transcript is not None:
            self._on_transcript(kind, item_id, res.input_transcript, now)
        r = self.response
        if r is not None and kind == ChunkKind.CONTINUATION and res.epoch == self.epoch:
            r.input_chunks += 1
        if res.epoch < self.epoch:
            self.dropped_stale += 1
            return
        self._event(
            Decision(
                self.session_id,
                self.epoch,
                res.chunk_seq,
                res.action,
                res.listen_prob,
                res.text,
                res.end_of_turn,
                r.id if r else "",
                res.cost_ms,
            )
        )
        if kind in (ChunkKind.UTTERANCE, ChunkKind.UTTERANCE_END):
            return  # the model must listen while the user's committed turn plays in
        if res.interrupt and r is not None:
            self._barge_in(now, "turn_detected")
            return
        if res.action == Action.SPEAK:
            if kind == ChunkKind.CONTINUATION and (r is None or r.thinker_done):
                return
            self._on_speak(res, now)
        elif r is not None and not r.thinker_done:
            if kind == ChunkKind.CONTINUATION and res.end_of_turn:
                self._thinker_finished(r, now)
            elif kind == ChunkKind.LIVE and r.unit_seq > 0:
                self._thinker_finished(r, now)  # duplex: a listen after speaking ends the turn
        if r is not None and kind == ChunkKind.CONTINUATION:
            self._continuation(now)

    def _on_transcript(self, kind: ChunkKind, item_id: str, transcript: str, now: float) -> None:
        if kind == ChunkKind.LIVE:
            # Duplex: the model heard a user turn; it enters history as a user item.
            item_id = self._new_id("item")
            prev = self.last_item_id
            item = Item(id=item_id, role="user", content=(ContentPart(type="input_audio", transcript=transcript),))
            self.history.append(item)
            self._event(ItemAdded(self.session_id, self.epoch, item, prev))
            self._event(ItemDone(self.session_id, self.epoch, item, prev))
        else:
            for i, it in enumerate(self.history):
                if it.id == item_id:
                    self.history[i] = _with_transcript(it, transcript)
                    break
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
        if self.closed or msg.epoch < self.epoch or r is None or msg.response_id != r.id:
            self.dropped_stale += 1
            return False
        n = int(np.asarray(msg.pcm).size)
        dur = pcm_ms(n, self.settings.output_rate)
        if n:
            if r.first_audio_at is None:
                r.first_audio_at = now
            start = r.generated_ms
            r.generated_ms += dur
            r.segments.append(Segment(start, r.generated_ms, msg.text))
            if self.cursor.item_id != r.item_id:
                self.cursor = _Cursor(r.item_id)
            self.cursor.generated_ms = r.generated_ms
            self._emit(Dest.ADAPTER, msg, frames=frames)
        elif msg.text:
            r.segments.append(Segment(r.generated_ms, r.generated_ms, msg.text))
        if msg.end_of_turn:
            if n == 0:
                self._emit(Dest.ADAPTER, msg, frames=frames)
            r.talker_done = True
            if not r.thinker_done:
                # stage1 finished what it was given; the thinker's turn is over too.
                r.thinker_done = True
            self._maybe_finish(now)
        return True

    # ------------------------------------------------------------------ stage failures
    def on_stage_error(self, err: StageError, now: float, chunk_seq: int | None = None) -> None:
        if self.closed:
            return
        if err.role == Role.STAGE0 and chunk_seq is not None and self._outstanding.pop(chunk_seq, None):
            self.chunk_results += 1
        self._fail(now, err.code, err.message)

    def _fail(self, now: float, code: str, message: str) -> None:
        r = self.response
        rid = r.id if r else ""
        self._error(code, message, response_id=rid, type_="server_error")
        if r is not None:
            self._advance_epoch("stage_error")
            self._deferred_speaks.clear()
            self._finish(ResponseStatus.FAILED, now, reason="error", error=(code, message))

    def on_send_failed(self, out: Out, now: float) -> None:
        """The host could not hand ``out`` to a stage (queue full or peer gone)."""
        msg = out.msg
        if out.plane == "control":
            # An epoch/open/close the stage never saw: its epoch would diverge from ours.
            self._error(
                "stage_unreachable",
                "the model stage did not accept a control message; the session is closed to keep it consistent",
                type_="server_error",
            )
            self.close(now, "stage unreachable")
        elif isinstance(msg, AudioChunk):
            if self._outstanding.pop(msg.chunk_seq, None) is not None:
                self.chunks_sent -= 1  # it never left: nothing will answer it
            if now - self._overload_reported >= 1.0:
                self._overload_reported = now
                self._error("overloaded", "the model is overloaded; input audio was dropped", type_="server_error")
        elif isinstance(msg, Handoff):
            self._fail(now, "overloaded", "speech synthesis is overloaded")

    def on_stage_lost(self, role: Role, now: float) -> None:
        """The stage serving this session died: fail what it was doing."""
        if role == Role.STAGE0:
            self.stage0_ready = False
            self.chunks_lost += len(self._outstanding)
            self._outstanding.clear()
        else:
            self.stage1_ready = False
        self._fail(now, "stage_unavailable", f"{role.value} stopped; the session recovers when it is back")

    def on_stage_bound(self, role: Role, now: float) -> None:
        """A (new) stage serves this session: open the session there."""
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
        if old.turn_mode != cfg.turn_mode or old.vad != cfg.vad:
            if cfg.turn_mode == TurnMode.DUPLEX:
                self._clear_input()
            self._reset_detector()
        self._emit(Dest.STAGE0, StageOpen(self.session_id, self.epoch, cfg), "control")
        self._emit(Dest.STAGE1, StageOpen(self.session_id, self.epoch, cfg), "control")
        if old.instructions != cfg.instructions:
            self._send_context()
        self._event(SessionUpdated(self.session_id, self.epoch, cfg, event_id))

    # ------------------------------------------------------------------ playback and history
    def _ack(self, msg: PlaybackAck) -> None:
        gen = self._generated.get(msg.item_id)
        r = self.response
        if r is not None and r.item_id == msg.item_id:
            gen = r.generated_ms
        if gen is None:
            self._error("item_not_found", f"no assistant audio item {msg.item_id!r}", msg.event_id, param="item_id")
            return
        played = max(0, min(msg.played_ms, gen))
        c = self.cursor
        if c.item_id == msg.item_id:
            played = c.played_ms = max(played, c.played_ms)
        finished = r is None or r.item_id != msg.item_id
        if finished and self.config.commit_policy == CommitPolicy.ACK_ONLY:
            item = self._find(msg.item_id)
            played = max(played, item.audio_ms if item else 0)  # acks never shrink history
            if self._rewrite_assistant(msg.item_id, played) and c.item_id == msg.item_id:
                c.committed_ms = played
        self._event(
            PlaybackCommitted(
                self.session_id, self.epoch, msg.response_id, msg.item_id, played, tuple(self.history), msg.event_id
            )
        )

    def _rewrite_assistant(self, item_id: str, ms: int) -> bool:
        for i, it in enumerate(self.history):
            if it.id == item_id and it.role == "assistant":
                text = cut_text(self._alignments.get(item_id, []), ms)
                part = it.content[0] if it.content else ContentPart(type="output_audio")
                self.history[i] = Item(
                    id=it.id,
                    role=it.role,
                    type=it.type,
                    status=it.status,
                    content=(ContentPart(type=part.type, transcript=text),),
                    audio_ms=ms,
                )
                self._send_context()
                return True
        return False

    def _truncate(self, msg: ItemTruncate) -> None:
        item = self._find(msg.item_id)
        if item is None or item.role != "assistant":
            self._error(
                "item_not_found", f"no assistant item {msg.item_id!r} to truncate", msg.event_id, param="item_id"
            )
            return
        gen = self._generated.get(msg.item_id, item.audio_ms)
        if msg.audio_end_ms < 0 or msg.audio_end_ms > gen:
            self._error(
                "invalid_value",
                f"audio_end_ms {msg.audio_end_ms} is outside the item's {gen} ms of audio",
                msg.event_id,
                param="audio_end_ms",
            )
            return
        if msg.content_index != 0:
            self._error("invalid_value", "content_index must be 0", msg.event_id, param="content_index")
            return
        self._rewrite_assistant(msg.item_id, msg.audio_end_ms)
        if self.cursor.item_id == msg.item_id:
            self.cursor.played_ms = self.cursor.committed_ms = msg.audio_end_ms
        self._event(
            ItemTruncated(self.session_id, self.epoch, msg.item_id, msg.audio_end_ms, msg.content_index, msg.event_id)
        )

    def _find(self, item_id: str) -> Item | None:
        return next((it for it in self.history if it.id == item_id), None)

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
        if self._find(item.id) is not None:
            self._error("item_already_exists", f"item {item.id!r} already exists", msg.event_id, param="item.id")
            return
        if msg.previous_item_id is None:
            pos = len(self.history)
        elif msg.previous_item_id == "root":
            pos = 0
        else:
            idx = next((i for i, it in enumerate(self.history) if it.id == msg.previous_item_id), None)
            if idx is None:
                self._error(
                    "item_not_found",
                    f"previous_item_id {msg.previous_item_id!r} not found",
                    msg.event_id,
                    param="previous_item_id",
                )
                return
            pos = idx + 1
        prev = self.history[pos - 1].id if pos > 0 else None
        self.history.insert(pos, item)
        self._event(ItemAdded(self.session_id, self.epoch, item, prev))
        self._event(ItemDone(self.session_id, self.epoch, item, prev))
        self._send_context()

    def _item_delete(self, item_id: str, event_id: str) -> None:
        idx = next((i for i, it in enumerate(self.history) if it.id == item_id), None)
        if idx is None:
            self._error("item_not_found", f"no item {item_id!r} in the conversation", event_id, param="item_id")
            return
        del self.history[idx]
        self._event(ItemDeleted(self.session_id, self.epoch, item_id, event_id))
        self._send_context()

    # ================================================================== time
    def tick(self, now: float) -> None:
        if self.closed:
            return
        r = self.response
        if r is not None and not r.thinker_done and self.config.turn_mode != TurnMode.DUPLEX:
            self._continuation(now)
        self._idle_check(now)

    def _idle_check(self, now: float) -> None:
        v = self.config.vad
        if (
            self.config.turn_mode != TurnMode.SERVER_VAD
            or not v.idle_timeout_ms
            or self._idle_fired
            or self.response is not None
            or self._speech_item is not None
            or self._overlap is not None
        ):
            return
        since = max(self._last_speech_at, self._play_end_at)
        if now - since < v.idle_timeout_ms / 1000:
            return
        self._idle_fired = True
        item = self._new_id("item")
        end = int(self.input_ms)
        self._event(IdleTimeout(self.session_id, self.epoch, item, int(self._buffer_start_ms), end))
        self._commit(now, "", explicit=False, item_id=item)
        self._create_response(now, ResponseOptions(), "")

    def next_deadline(self) -> float | None:
        """When ``tick`` next has work (continuation units, idle timeout)."""
        if self.closed:
            return None
        r = self.response
        times: list[float] = []
        if r is not None and not r.thinker_done and self.config.turn_mode != TurnMode.DUPLEX:
            times.append(r.next_unit_at)
        v = self.config.vad
        if self.config.turn_mode == TurnMode.SERVER_VAD and v.idle_timeout_ms and not self._idle_fired and r is None:
            times.append(max(self._last_speech_at, self._play_end_at) + v.idle_timeout_ms / 1000)
        return min(times) if times else None

    # ================================================================== inspection
    def snapshot(self, now: float) -> SessionSnapshot:
        r = self.response
        info = None
        if r is not None:
            info = self._info(r, ResponseStatus.IN_PROGRESS)
        return SessionSnapshot(
            session_id=self.session_id,
            epoch=self.epoch,
            turn_state=self.turn_state(now),
            turn_mode=self.config.turn_mode,
            response=info,
            cursor=self.cursor.view(),
            history=tuple(self.history),
            input_buffer_ms=int(self._buffer_ms()),
            chunks_sent=self.chunks_sent,
            chunk_results=self.chunk_results,
            dropped_stale=self.dropped_stale,
            responses=self.responses,
        )


def _item_text(item: Item) -> str:
    for part in item.content:
        if part.transcript:
            return part.transcript
        if part.text:
            return part.text
    return ""


def _with_transcript(item: Item, transcript: str) -> Item:
    parts = tuple(
        ContentPart(type=p.type, text=p.text, transcript=transcript) if p.type == "input_audio" else p
        for p in item.content
    )
    return Item(id=item.id, role=item.role, type=item.type, status=item.status, content=parts, audio_ms=item.audio_ms)
