"""Property tests: the session actor under random interleavings of everything that can happen.

The state machine plays the adapter (commands on the data plane, which may queue behind
each other, and cancels on the control plane, which overtake them), stage0 (answers to
chunks, in any order, with their epoch or an older one, duplicates, errors), stage1 (audio
for any response it was handed, current or long gone, of any epoch), the host (stage loss
and rebinding, refused sends, timer ticks) and time. It records everything the actor emits
and checks the invariants of docs/session-semantics.md after every step:

* at most one active response; exactly one terminal event per response (checked again
  after a final close);
* no output of an old epoch, or of an ended response, is ever forwarded, and no handoff
  for it is sent to stage1;
* epochs never decrease (the actor's, and those stamped on what it emits, in order);
* under ``ack_only`` history never holds unplayed assistant audio; an item's transcript
  is always a prefix of what was generated, cut where its audio is cut;
* one stage0 result per chunk (sent = answered + lost + outstanding; one decision at most
  per chunk; forced chunks always listen);
* no exception escapes the actor (any would fail the test).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from duplexd.actors.session import Dest, HostSettings, Out, SessionActor
from duplexd.actors.session.conversation import item_text
from duplexd.actors.session.transcript import Segment, cut_text
from duplexd.actors.vad import EnergyDetector
from duplexd.bus.messages import (
    Action,
    AudioChunk,
    AudioIn,
    AudioOut,
    ChunkKind,
    CommitPolicy,
    ContentPart,
    Decision,
    EngineInfo,
    EpochAdvance,
    ErrorEvent,
    Handoff,
    InputClear,
    InputCommit,
    Item,
    ItemCreate,
    ItemDelete,
    ItemTruncate,
    ItemTruncated,
    OverlapParams,
    PlaybackAck,
    ResponseCancel,
    ResponseCreate,
    ResponseCreated,
    ResponseDone,
    ResponseOptions,
    ResponseStatus,
    Role,
    SessionClosed,
    SessionConfig,
    SessionUpdate,
    SessionUpdated,
    SnapshotRequest,
    SpeechStarted,
    Stage0Result,
    StageError,
    TurnMode,
    VadParams,
)
from tests.unit.actors.kit import Ids

RATE = 16000
CHUNK = 1600  # 100 ms
ENGINE = EngineInfo("prop", input_rate=RATE, chunk_samples=CHUNK)
SID = "sess_prop"
WORDS = ["hello", "there", "how", "are", "you", "today", ""]
TERMINAL_REASONS = {
    ResponseStatus.CANCELLED: {"turn_detected", "client_cancelled", "session_closed"},
    ResponseStatus.INCOMPLETE: {"max_output_tokens", "turn_cap"},
    ResponseStatus.FAILED: {"error"},
    ResponseStatus.COMPLETED: {""},
}


@dataclass
class Turn:
    """What stage1 was handed for one response."""

    epoch: int
    item_id: str
    ended: bool = False  # a handoff with end_of_turn arrived
    seq: int = 0


@dataclass
class Recorder:
    """Everything the actor emitted, and the invariants checked as it is emitted."""

    epoch: int = 0  # newest epoch stamped on anything emitted
    advanced: int = 0  # newest EpochAdvance
    advance_dests: dict[int, set[Dest]] = field(default_factory=dict)
    created_at_epoch: dict[str, int] = field(default_factory=dict)
    active: str | None = None
    active_item: str = ""
    created: list[str] = field(default_factory=list)
    done: dict[str, ResponseDone] = field(default_factory=dict)
    full_transcript: dict[str, tuple[str, int]] = field(default_factory=dict)  # item -> (text, generated ms)
    done_policy: dict[str, CommitPolicy] = field(default_factory=dict)  # item -> policy when it ended
    chunks: dict[int, AudioChunk] = field(default_factory=dict)  # every chunk ever sent to stage0
    decisions: set[int] = field(default_factory=set)
    turns: dict[str, Turn] = field(default_factory=dict)
    forwarded: int = 0
    errors: list[ErrorEvent] = field(default_factory=list)
    closed: bool = False
    live_since_duplex: int = 0
    mode: TurnMode = TurnMode.SERVER_VAD
    last_stage_outs: list[Out] = field(default_factory=list)

    def take(self, actor: SessionActor, outs: list[Out]) -> None:
        self.last_stage_outs = [o for o in outs if o.dest != Dest.ADAPTER]
        for i, out in enumerate(outs):
            assert not self.closed, f"emitted after SessionClosed: {out.msg!r}"
            msg = out.msg
            ep = getattr(msg, "epoch", None)
            if ep is not None:
                assert ep >= self.epoch, f"epoch went back: {type(msg).__name__} {ep} after {self.epoch}"
                self.epoch = ep
            match msg:
                case EpochAdvance(epoch=e):
                    assert out.plane == "control"
                    assert e > self.advanced or out.dest != Dest.ADAPTER
                    if out.dest == Dest.ADAPTER:
                        self.advanced = e
                    self.advance_dests.setdefault(e, set()).add(out.dest)
                case ResponseCreated(response=info):
                    assert self.active is None, f"{info.id} created while {self.active} is active"
                    assert info.id not in self.created
                    assert info.status == ResponseStatus.IN_PROGRESS
                    self.active = info.id
                    self.active_item = msg.item.id
                    self.created.append(info.id)
                    self.created_at_epoch[info.id] = self.advanced
                case ResponseDone(response=info, transcript=transcript):
                    assert info.id == self.active, f"done for {info.id}, active {self.active}"
                    assert info.id not in self.done, f"second terminal event for {info.id}"
                    assert info.status != ResponseStatus.IN_PROGRESS
                    assert info.reason in TERMINAL_REASONS[info.status], (info.status, info.reason)
                    if info.status == ResponseStatus.FAILED:
                        assert info.error_code
                    if info.status in (ResponseStatus.CANCELLED, ResponseStatus.FAILED):
                        # Stopping a response always advances the epoch, announced on every hop.
                        assert self.advanced > self.created_at_epoch[info.id], f"{info.id} stopped, same epoch"
                        assert self.advance_dests[self.advanced] == {Dest.ADAPTER, Dest.STAGE0, Dest.STAGE1}
                    self.done[info.id] = msg
                    self.active = None
                    assert len(info.output) == 1
                    item = info.output[0]
                    self.full_transcript[item.id] = (transcript, info.usage.output_audio_ms)
                    self.done_policy[item.id] = actor.config.commit_policy
                case AudioOut(response_id=rid) if out.dest == Dest.ADAPTER:
                    # The stale-audio rule: only the active response's audio, at the newest epoch.
                    assert rid == self.active, f"audio of {rid} forwarded; active {self.active}"
                    assert rid not in self.done
                    assert msg.epoch == self.advanced, f"audio of epoch {msg.epoch} after advance {self.advanced}"
                    self.forwarded += 1
                case Handoff(response_id=rid):
                    assert out.dest == Dest.STAGE1
                    assert rid == self.active and rid not in self.done, f"handoff for {rid}, active {self.active}"
                    assert msg.epoch == self.advanced
                    t = self.turns.setdefault(rid, Turn(msg.epoch, msg.item_id))
                    t.ended = t.ended or msg.end_of_turn
                case AudioChunk(chunk_seq=seq):
                    assert seq not in self.chunks, f"chunk {seq} sent twice"
                    assert msg.epoch == self.advanced
                    self.chunks[seq] = msg
                    if msg.kind == ChunkKind.LIVE:
                        forced = self.live_since_duplex < actor.config.force_listen_count
                        assert msg.force_listen == forced, f"live chunk {self.live_since_duplex}: {msg.force_listen}"
                        self.live_since_duplex += 1
                    elif msg.kind in (ChunkKind.UTTERANCE, ChunkKind.UTTERANCE_END):
                        assert msg.force_listen
                case Decision(chunk_seq=seq):
                    assert seq not in self.decisions, f"two decisions for chunk {seq}"
                    self.decisions.add(seq)
                    if self.chunks[seq].force_listen:
                        assert msg.action == Action.LISTEN
                case SessionUpdated(config=cfg):
                    if cfg.turn_mode != self.mode and TurnMode.DUPLEX in (cfg.turn_mode, self.mode):
                        self.live_since_duplex = 0
                    self.mode = cfg.turn_mode
                case SpeechStarted() if self.active is not None and actor.config.vad.interrupt_response:
                    # speech_started over a reply is the interruption: it ends in the same step,
                    # so no audio of it can follow the event.
                    assert actor.config.turn_mode == TurnMode.SERVER_VAD
                    self._ends_in_step(self.active, outs[i:], ResponseStatus.CANCELLED)
                case ItemTruncated(item_id=iid) if self.active is not None and iid == self.active_item:
                    # A truncate of the item that plays: the client will hear no more of it.
                    self._ends_in_step(self.active, outs[i:], ResponseStatus.CANCELLED)
                case ErrorEvent():
                    self.errors.append(msg)
                case SessionClosed():
                    self.closed = True
                case _:
                    pass

    @staticmethod
    def _ends_in_step(rid: str, rest: list[Out], status: ResponseStatus) -> None:
        ends = [o.msg for o in rest if isinstance(o.msg, ResponseDone) and o.msg.response.id == rid]
        assert ends and ends[0].response.status == status, f"{rid} did not end {status} in the same step"


def _speech(ms: int) -> np.ndarray:
    t = np.arange(RATE * ms // 1000) / RATE
    return (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def _silence(ms: int) -> np.ndarray:
    return np.zeros(RATE * ms // 1000, dtype=np.float32)


class SessionMachine(RuleBasedStateMachine):
    """Plays adapter, host and both stages around one SessionActor."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 100.0
        self.seq = 0
        self.queue: deque[Any] = deque()  # data commands sent by the adapter, not yet processed
        self.rec = Recorder()
        self.reported: dict[str, int] = {}  # assistant item -> most audio the client reported played
        self.max_epoch = 0
        self.steps = 0
        self.samples: dict[str, int] = {}  # assistant item -> samples accepted
        self.segments: dict[str, list[Segment]] = {}  # assistant item -> (ms span, text) per chunk
        self.actor: SessionActor

    # ------------------------------------------------------------------ plumbing
    def _collect(self) -> None:
        self.steps += 1
        self.rec.take(self.actor, self.actor.take_outbox())

    def _cfg(self, **kw: Any) -> SessionConfig:
        base = {
            "turn_mode": TurnMode.SERVER_VAD,
            "vad": VadParams(prefix_padding_ms=100, silence_duration_ms=200),
            "overlap": OverlapParams(short_ack_ms=300),
            "continuation_cap_ms": 600,
            "force_listen_count": 2,
        }
        base.update(kw)
        return SessionConfig(**base)

    def _send(self, msg: Any) -> None:
        # What the client reports as played is an upper bound on what ack_only may commit.
        if isinstance(msg, PlaybackAck):
            self.reported[msg.item_id] = max(self.reported.get(msg.item_id, 0), msg.played_ms)
        elif isinstance(msg, ItemTruncate):
            self.reported[msg.item_id] = max(self.reported.get(msg.item_id, 0), msg.audio_end_ms)
        self.queue.append(msg)

    def _next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def _known_items(self) -> list[str]:
        ids = [it.id for it in self.actor.history]
        ids += list(self.rec.full_transcript)
        return sorted(set(ids)) or ["item_none"]

    # ------------------------------------------------------------------ setup
    @initialize(
        mode=st.sampled_from(list(TurnMode)),
        policy=st.sampled_from(list(CommitPolicy)),
        pace=st.sampled_from([0.0, 1.0]),
    )
    def open(self, mode: TurnMode, policy: CommitPolicy, pace: float) -> None:
        cfg = self._cfg(turn_mode=mode, commit_policy=policy)
        self.rec.mode = mode
        self.actor = SessionActor(
            SID,
            cfg,
            ENGINE,
            HostSettings(vad="energy", max_input_buffer_ms=20000, continuation_pace=pace),
            new_id=Ids(),
            detector=EnergyDetector(cfg.vad.threshold, cfg.vad.silence_duration_ms),
        )
        self.actor.open(self.now)
        self._collect()

    # ------------------------------------------------------------------ adapter: data plane
    @rule(
        kind=st.sampled_from(["speech", "silence"]),
        ms=st.sampled_from([100, 200, 300, 500, 800, 1200]),
        force=st.sampled_from([False, False, False, False, True]),
    )
    def append(self, kind: str, ms: int, force: bool) -> None:
        pcm = _speech(ms) if kind == "speech" else _silence(ms)
        self._send(AudioIn(SID, 0, self._next_seq(), pcm, force=force and kind == "speech"))

    @rule(speech_ms=st.sampled_from([200, 400, 900, 1500]), then_ms=st.sampled_from([0, 300]))
    def user_talks(self, speech_ms: int, then_ms: int) -> None:
        """Speech, maybe a pause after it, sent and taken at once: turns, backchannels, barge-ins."""
        self._send(AudioIn(SID, 0, self._next_seq(), _speech(speech_ms)))
        if then_ms:
            self._send(AudioIn(SID, 0, self._next_seq(), _silence(then_ms)))
        self.deliver(len(self.queue))

    @rule()
    def commit(self) -> None:
        self._send(InputCommit(SID, 0, self._next_seq(), event_id="evt_commit"))

    @rule()
    def clear(self) -> None:
        self._send(InputClear(SID, 0, self._next_seq()))

    @rule(
        modalities=st.sampled_from([None, ("audio",), ("text",)]),
        out_of_band=st.booleans(),
        max_tokens=st.sampled_from([None, 2]),
    )
    def create(self, modalities: tuple[str, ...] | None, out_of_band: bool, max_tokens: int | None) -> None:
        opts = ResponseOptions(
            output_modalities=modalities,
            conversation="none" if out_of_band else None,
            max_output_tokens=max_tokens,
        )
        self._send(ResponseCreate(SID, 0, self._next_seq(), opts, event_id="evt_create"))

    @rule(
        mode=st.sampled_from(list(TurnMode)),
        policy=st.sampled_from(list(CommitPolicy)),
        short_ack=st.sampled_from([200, 300, 700]),
        interrupt=st.booleans(),
        create_response=st.booleans(),
        idle=st.sampled_from([0, 0, 1500]),
        roll=st.integers(0, 1),
    )
    def update(
        self,
        mode: TurnMode,
        policy: CommitPolicy,
        short_ack: int,
        interrupt: bool,
        create_response: bool,
        idle: int,
        roll: int,
    ) -> None:
        if roll:
            return
        cfg = self._cfg(
            turn_mode=mode,
            commit_policy=policy,
            overlap=OverlapParams(short_ack_ms=short_ack),
            vad=VadParams(
                prefix_padding_ms=100,
                silence_duration_ms=200,
                interrupt_response=interrupt,
                create_response=create_response,
                idle_timeout_ms=idle,
            ),
        )
        self._send(SessionUpdate(SID, 0, self._next_seq(), cfg))

    @rule(data=st.data(), ms=st.sampled_from([-10, 0, 40, 100, 170, 400, 3000]))
    def ack(self, data: st.DataObject, ms: int) -> None:
        item = data.draw(st.sampled_from(self._known_items()))
        self._send(PlaybackAck(SID, 0, self._next_seq(), "resp_x", item, ms))

    @rule(data=st.data(), ms=st.sampled_from([-10, 0, 60, 130, 400, 5000]), index=st.sampled_from([0, 0, 0, 1]))
    def truncate(self, data: st.DataObject, ms: int, index: int) -> None:
        item = data.draw(st.sampled_from(self._known_items()))
        self._send(ItemTruncate(SID, 0, self._next_seq(), item, ms, index))

    @rule(
        role=st.sampled_from(["user", "assistant", "system", "tool"]),
        where=st.sampled_from([None, "root", "last", "missing"]),
    )
    def item_create(self, role: str, where: str | None) -> None:
        prev = {"last": self.actor.last_item_id or "missing", "missing": "item_missing"}.get(where or "", where)
        item = Item(id=f"client_{self.seq}", role=role, content=(ContentPart(type="input_text", text="typed"),))
        self._send(ItemCreate(SID, 0, self._next_seq(), item, prev))

    @rule(data=st.data())
    def item_delete(self, data: st.DataObject) -> None:
        self._send(ItemDelete(SID, 0, self._next_seq(), data.draw(st.sampled_from(self._known_items()))))

    @rule()
    def snapshot(self) -> None:
        self._send(SnapshotRequest(SID, 0, self._next_seq()))
        snap = self.actor.snapshot(self.now)  # also callable directly, at any time
        assert snap.epoch == self.actor.epoch
        assert (snap.response is None) == (self.actor.response is None)

    @rule(n=st.integers(1, 6))
    def deliver(self, n: int) -> None:
        """The host takes queued data commands, in order."""
        for _ in range(min(n, len(self.queue))):
            msg = self.queue.popleft()
            if isinstance(msg, AudioIn):
                self.now += msg.pcm.size / RATE  # audio arrives at real-time pace
            self.actor.on_command(msg, self.now)
            self._collect()

    # ------------------------------------------------------------------ adapter: control plane
    @rule(by_id=st.sampled_from(["none", "active", "stale"]), roll=st.integers(0, 1))
    def cancel(self, by_id: str, roll: int) -> None:
        if roll:
            return
        rid = {"none": "", "active": self.rec.active or "", "stale": "resp_gone"}[by_id]
        # Overtakes everything still queued: after_seq is the last seq the client sent.
        self.actor.on_cancel(ResponseCancel(SID, 0, self.seq, rid, "evt_cancel"), self.now)
        self._collect()

    # ------------------------------------------------------------------ stage0
    def _answer(self, seq: int, speak: bool, end: bool, interrupt: bool, transcript: str | None, epoch: int) -> None:
        words = WORDS[seq % len(WORDS)], WORDS[(seq * 7 + 3) % len(WORDS)]
        res = Stage0Result(
            SID,
            epoch,
            seq,
            Action.SPEAK if speak else Action.LISTEN,
            end_of_turn=end,
            interrupt=interrupt,
            text=" ".join(w for w in words if w) if speak else "",
            input_transcript=transcript,
        )
        self.actor.on_stage0(res, self.now)
        self._collect()

    @precondition(lambda self: bool(self.actor.chunks.pending))
    @rule(
        n=st.integers(1, 16),
        speak_p=st.sampled_from([0.0, 0.5, 1.0]),
        end_p=st.sampled_from([0.0, 0.3, 1.0]),
        transcript=st.sampled_from([None, "user words"]),
    )
    def stage0_step(self, n: int, speak_p: float, end_p: float, transcript: str | None) -> None:
        """A well-behaved stage0: answers chunks in order, with each chunk's epoch."""
        for i, seq in enumerate(sorted(self.actor.chunks.pending)[:n]):
            chunk = self.rec.chunks[seq]
            # Deterministic per chunk given the drawn probabilities (hypothesis shrinks them).
            speak = chunk.kind in (ChunkKind.CONTINUATION, ChunkKind.LIVE) and (seq * 37 % 100) < speak_p * 100
            end = (seq * 53 % 100) < end_p * 100
            text = transcript if chunk.kind in (ChunkKind.UTTERANCE_END, ChunkKind.LIVE) and i == 0 else None
            self._answer(seq, speak, end, False, text, chunk.epoch)
            if self.actor.closed:
                return

    @precondition(lambda self: bool(self.actor.chunks.pending))
    @rule(
        data=st.data(),
        speak=st.booleans(),
        end=st.booleans(),
        interrupt=st.booleans(),
        stale=st.booleans(),
    )
    def stage0_any_order(self, data: st.DataObject, speak: bool, end: bool, interrupt: bool, stale: bool) -> None:
        """Any outstanding chunk, any decision (even a speak for a forced chunk), maybe an old epoch."""
        seq = data.draw(st.sampled_from(sorted(self.actor.chunks.pending)))
        chunk = self.rec.chunks[seq]
        self._answer(seq, speak, end, interrupt, None, max(0, chunk.epoch - 1) if stale else chunk.epoch)

    @precondition(lambda self: bool(self.rec.chunks))
    @rule(data=st.data())
    def stage0_duplicate_or_unknown(self, data: st.DataObject) -> None:
        """A second answer for a chunk (or one never sent) is refused, not applied."""
        seq = data.draw(st.sampled_from([*sorted(self.rec.chunks)[-5:], 10_000]))
        if seq in self.actor.chunks.pending:
            return
        errors = len(self.rec.errors)
        self.actor.on_stage0(Stage0Result(SID, self.actor.epoch, seq, Action.SPEAK, text="dup"), self.now)
        self._collect()
        if not self.actor.closed:
            assert len(self.rec.errors) == errors + 1 and self.rec.errors[-1].code == "stage_protocol_error"

    # ------------------------------------------------------------------ stage1
    def _audio(self, rid: str, samples: int, finish: bool, epoch: int | None = None) -> bool:
        t = self.rec.turns[rid]
        text = WORDS[t.seq % len(WORDS)]
        msg = AudioOut(
            SID,
            t.epoch if epoch is None else epoch,
            rid,
            t.item_id,
            t.seq,
            np.zeros(samples, dtype=np.int16),
            text=(" " + text) if t.seq and text else text,
            end_of_turn=finish,
        )
        t.seq += 1
        stale = rid in self.rec.done or msg.epoch != self.actor.epoch
        forwarded = self.actor.on_audio_out(msg, self.now)
        self._collect()
        if forwarded:
            assert rid in self.rec.created
            # The alignment the history must be cut by: one segment per accepted chunk.
            samples = self.samples.get(t.item_id, 0)
            start, end = samples * 1000 // 24000, (samples + msg.pcm.size) * 1000 // 24000
            self.samples[t.item_id] = samples + msg.pcm.size
            if msg.pcm.size or msg.text:
                self.segments.setdefault(t.item_id, []).append(Segment(start, end, msg.text))
        if stale:
            assert not forwarded  # (the recorder checks everything that reached the adapter)
        return forwarded

    @precondition(lambda self: self.rec.active in self.rec.turns)
    @rule(n=st.integers(1, 12), finish=st.booleans())
    def stage1_step(self, n: int, finish: bool) -> None:
        """A well-behaved stage1: streams the active turn (40 ms chunks), ends it if it was told to."""
        rid = self.rec.active
        assert rid is not None
        for _ in range(n):
            self.now += 0.04
            self._audio(rid, 960, False)
        if finish and self.rec.turns[rid].ended:
            self._audio(rid, 0, True)

    @precondition(lambda self: bool(self.rec.turns))
    @rule(
        data=st.data(),
        which=st.sampled_from(["last_ended", "active_wrong_epoch", "any"]),
        samples=st.sampled_from([960, 480, 0]),
        finish=st.booleans(),
    )
    def stage1_misbehaves(self, data: st.DataObject, which: str, samples: int, finish: bool) -> None:
        """Audio that must not reach the client: of the response that just ended (late chunks,
        same epoch if it completed), of the active one stamped with another epoch (an older
        one, or a future one while there is none older), or any."""
        ended = [rid for rid in reversed(self.rec.created) if rid in self.rec.done and rid in self.rec.turns]
        if which == "last_ended" and ended:
            rid, epoch = ended[0], self.rec.turns[ended[0]].epoch
        elif which == "active_wrong_epoch" and self.rec.active in self.rec.turns:
            rid, epoch = self.rec.active, self._wrong_epoch()
        else:
            rid = data.draw(st.sampled_from(sorted(self.rec.turns)))
            epoch = self.rec.turns[rid].epoch
        self._audio(rid, samples, finish, epoch)

    def _wrong_epoch(self) -> int:
        return self.actor.epoch - 1 if self.actor.epoch else self.actor.epoch + 1

    def _reply_playing(self) -> str | None:
        """Brings about a reply whose audio is streaming: the host takes what is queued, a
        response is asked for if none is active, and stage0 speaks (without ending its turn)
        at the first unit that may. Returns its id, or None if the session would not."""
        self.deliver(len(self.queue))
        if self.rec.active is None and not self.actor.closed:
            self._send(ResponseCreate(SID, 0, self._next_seq(), event_id="evt_create"))
            self.deliver(1)
        for attempt in range(2):
            rid = self.rec.active
            if rid is None or rid in self.rec.turns or self.actor.closed:
                break
            for seq in sorted(self.actor.chunks.pending):
                c = self.rec.chunks[seq]
                speak = c.kind in (ChunkKind.CONTINUATION, ChunkKind.LIVE) and not c.force_listen
                if seq in self.actor.chunks.pending:
                    self._answer(seq, speak, False, False, None, c.epoch)
                if speak or self.actor.closed or self.rec.active != rid:
                    break
            if not attempt and self.rec.active == rid and rid not in self.rec.turns:
                # Duplex has no continuation units: the model speaks on the user's stream.
                self._send(AudioIn(SID, 0, self._next_seq(), _silence(400)))
                self.deliver(1)
        rid = self.rec.active
        return rid if rid in self.rec.turns and not self.actor.closed else None

    @rule(
        how=st.sampled_from(["cancel", "force", "speech", "truncate"]),
        played=st.integers(1, 4),
        late=st.sampled_from(["old_epoch", "next_reply_old_epoch", "both"]),
    )
    def barge_in_after_audio(self, how: str, played: int, late: str) -> None:
        """Where the epoch fence matters: a reply is interrupted right after some of its audio
        (a client cancel, the force flag, sustained speech, or the client truncating what it
        played), the next reply starts at the new
        epoch, and stage1 still sends what it had: audio of the interrupted reply at its old
        epoch, or audio of the next reply stamped with the epoch it last knew."""
        rid = self._reply_playing()
        if rid is None:
            return
        old_epoch = self.actor.epoch
        for _ in range(played):
            self.now += 0.04
            self._audio(rid, 960, False)
        if how == "cancel":
            self.actor.on_cancel(ResponseCancel(SID, 0, self.seq, "", "evt_cancel"), self.now)
            self._collect()
        elif how == "truncate":
            self._send(ItemTruncate(SID, 0, self._next_seq(), self.rec.turns[rid].item_id, 40 * played - 10))
            self.deliver(len(self.queue))
        else:
            force = how == "force"
            self._send(AudioIn(SID, 0, self._next_seq(), _speech(100 if force else 1500), force=force))
            self._send(AudioIn(SID, 0, self._next_seq(), _silence(300)))
            self.deliver(len(self.queue))
        if late in ("old_epoch", "both"):
            self._audio(rid, 960, False, old_epoch)
        nxt = self._reply_playing()
        if nxt is not None and late in ("next_reply_old_epoch", "both"):
            self._audio(nxt, 960, False, old_epoch if old_epoch != self.actor.epoch else self._wrong_epoch())

    @rule(
        chunks=st.integers(1, 15),
        ack_ms=st.sampled_from([None, 0, 80, 200, 10_000]),
        inject=st.sampled_from([None, None, "older_epoch", "previous"]),
    )
    def serve(self, chunks: int, ack_ms: int | None, inject: str | None) -> None:
        """One cooperative round: the host takes what is queued, stage0 answers everything in
        order and speaks (ending its turn) at the first unit that may, stage1 streams the reply
        while the client acks part of it, then ends the turn. ``inject`` slips one bad chunk
        into the stream: the active response stamped with an older epoch, or a late chunk of
        the previous response."""
        self.deliver(len(self.queue))
        spoke = False
        for seq in sorted(self.actor.chunks.pending):
            if self.actor.closed or seq not in self.actor.chunks.pending:
                break
            c = self.rec.chunks[seq]
            speak = not spoke and c.kind in (ChunkKind.CONTINUATION, ChunkKind.LIVE) and not c.force_listen
            spoke = spoke or speak
            text = "user words" if c.kind == ChunkKind.UTTERANCE_END else None
            self._answer(seq, speak, speak, False, text, c.epoch)
        rid = self.rec.active
        if rid is None or rid not in self.rec.turns:
            return
        previous = next((p for p in reversed(self.rec.created) if p in self.rec.done and p in self.rec.turns), None)
        for i in range(chunks):
            self.now += 0.04
            self._audio(rid, 960, False)
            if i == chunks // 2:
                if inject == "older_epoch":
                    self._audio(rid, 960, False, max(0, self.actor.epoch - 1) if self.actor.epoch else 99)
                elif inject == "previous" and previous is not None:
                    self._audio(previous, 960, False)
            if ack_ms is not None and i == chunks // 2:
                self._send(PlaybackAck(SID, 0, self._next_seq(), rid, self.rec.turns[rid].item_id, ack_ms))
                self.deliver(1)
            if self.rec.active != rid:
                return
        if self.rec.turns[rid].ended:
            self._audio(rid, 0, True)

    # ------------------------------------------------------------------ failures (rarer: they end things)
    @rule(
        role=st.sampled_from([Role.STAGE0, Role.STAGE1]),
        code=st.sampled_from(["engine_error", "engine_error", "engine_error", "stage_open_failed"]),
        older=st.booleans(),
        data=st.data(),
        roll=st.integers(0, 2),
    )
    def stage_error(self, role: Role, code: str, older: bool, data: st.DataObject, roll: int) -> None:
        if roll:
            return
        seq = None
        if role == Role.STAGE0 and self.actor.chunks.pending and data.draw(st.booleans()):
            seq = data.draw(st.sampled_from(sorted(self.actor.chunks.pending)))
        epoch = self.rec.chunks[seq].epoch if seq is not None else max(0, self.actor.epoch - (1 if older else 0))
        errs = len(self.rec.errors)
        active, was_closed, current = self.rec.active, self.actor.closed, self.actor.epoch
        self.actor.on_stage_error(StageError(SID, epoch, code, "boom", role, -1 if seq is None else seq), self.now, seq)
        self._collect()
        if was_closed:
            return
        # Every stage error reaches the client; one about current work fails the response, named.
        new = self.rec.errors[errs:]
        assert new and new[0].code == code
        if code == "stage_open_failed":
            assert self.actor.closed
        elif active is not None and epoch >= current:
            assert self.rec.done[active].response.status == ResponseStatus.FAILED
            assert new[0].response_id == active
        elif active is not None:
            assert self.rec.active == active  # an error about older work leaves the new response alone

    @rule(role=st.sampled_from([Role.STAGE0, Role.STAGE1]), roll=st.integers(0, 2))
    def stage_lost_and_back(self, role: Role, roll: int) -> None:
        if roll or self.actor.closed:
            return
        lost_before = self.actor.chunks_lost
        outstanding = self.actor.outstanding if role == Role.STAGE0 else 0
        self.actor.on_stage_lost(role, self.now)
        self._collect()
        assert self.actor.chunks_lost == lost_before + outstanding
        assert self.actor.response is None
        self.actor.on_stage_bound(role, self.now)
        self._collect()

    @precondition(lambda self: bool(self.rec.last_stage_outs))
    @rule(data=st.data(), roll=st.integers(0, 2))
    def send_failed(self, data: st.DataObject, roll: int) -> None:
        if roll:
            return
        out = data.draw(st.sampled_from(self.rec.last_stage_outs))
        self.rec.last_stage_outs = []
        self.actor.on_send_failed(out, self.now)
        self._collect()
        if out.plane == "control":
            assert self.actor.closed  # a stage that missed a control message: close, never diverge

    # ------------------------------------------------------------------ time
    @rule(ms=st.sampled_from([50, 100, 300, 1000, 2500]))
    def tick(self, ms: int) -> None:
        self.now += ms / 1000
        self.actor.tick(self.now)
        self._collect()
        later = self.actor.next_deadline()
        # After a tick, nothing is due already (else the host would spin on a past deadline).
        assert later is None or later > self.now, (later, self.now)

    @precondition(lambda self: not self.actor.closed)
    @rule(roll=st.integers(0, 3))
    def close(self, roll: int) -> None:
        if roll:
            return
        self.actor.close(self.now, "client closed")
        self._collect()
        assert self.actor.response is None

    # ------------------------------------------------------------------ invariants
    @invariant()
    def epochs_never_decrease(self) -> None:
        if not hasattr(self, "actor"):
            return
        assert self.actor.epoch >= self.max_epoch
        self.max_epoch = self.actor.epoch

    @invariant()
    def one_active_response(self) -> None:
        if not hasattr(self, "actor"):
            return
        r = self.actor.response
        assert (r.id if r else None) == self.rec.active
        assert self.actor.done_events == len(self.rec.done)

    @invariant()
    def one_result_per_chunk(self) -> None:
        if not hasattr(self, "actor"):
            return
        a = self.actor
        assert a.chunks_sent == a.chunk_results + a.chunks_lost + a.outstanding
        assert set(a.chunks.pending) <= set(self.rec.chunks)

    @invariant()
    def history_holds_only_what_was_played(self) -> None:
        if not hasattr(self, "actor"):
            return
        ids = [it.id for it in self.actor.history]
        assert len(ids) == len(set(ids)), "duplicate item in history"
        for it in self.actor.history:
            if it.role != "assistant" or it.id not in self.rec.full_transcript:
                continue
            full, generated = self.rec.full_transcript[it.id]
            text = item_text(it)
            assert it.audio_ms <= generated or generated == 0
            if self.rec.done_policy[it.id] == CommitPolicy.ACK_ONLY and generated:
                assert it.audio_ms <= self.reported.get(it.id, 0), (it.id, it.audio_ms, self.reported.get(it.id))
            if it.status != "in_progress" and any(p.type == "output_audio" for p in it.content):
                # Exactly the words of the audio committed, by the per-chunk alignment.
                assert text == cut_text(self.segments.get(it.id, []), it.audio_ms), (text, it.audio_ms)
            if generated:
                assert full.startswith(text), (text, full)
                if it.audio_ms >= generated:
                    assert text == full
                if it.audio_ms == 0:
                    assert text == ""

    def teardown(self) -> None:
        if not hasattr(self, "actor"):
            return
        # Everything queued arrives, then the session closes: every response has ended once.
        while self.queue:
            self.actor.on_command(self.queue.popleft(), self.now)
            self._collect()
        self.actor.close(self.now)
        self._collect()
        assert set(self.rec.created) == set(self.rec.done), "a response never got its terminal event"
        assert self.actor.next_deadline() is None


SessionMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestSessionProperties = SessionMachine.TestCase
