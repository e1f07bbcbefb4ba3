"""Deterministic scenarios for each rule of the session actor (docs/session-semantics.md).

The actor is driven exactly as the host drives it (entry points with injected time and
ids); the stages are played by the test, which answers chunks and streams audio the way
stage0 and stage1 do. Speech detection is the real EnergyDetector on synthetic speech.
"""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np
import pytest

from duplexd.actors.session import Dest, HostSettings, Out, SessionActor
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
    IdleTimeout,
    InputClear,
    InputCommit,
    InputCommitted,
    Item,
    ItemCreate,
    ItemDelete,
    ItemTruncate,
    ItemTruncated,
    OverlapParams,
    PlaybackAck,
    PlaybackCommitted,
    ResponseCancel,
    ResponseCreate,
    ResponseCreated,
    ResponseDone,
    ResponseOptions,
    Role,
    SessionClosed,
    SessionConfig,
    SessionUpdate,
    Snapshot,
    SnapshotRequest,
    SpeechStarted,
    SpeechStopped,
    Stage0Result,
    StageClose,
    StageError,
    StageOpen,
    TurnMode,
    TurnState,
    VadParams,
)
from tests.unit.actors.kit import Ids

RATE = 16000
CHUNK = 1600  # 100 ms
ENGINE = EngineInfo("rules", input_rate=RATE, chunk_samples=CHUNK)
SID = "sess_rules"


def speech(ms: int) -> np.ndarray:
    t = np.arange(RATE * ms // 1000) / RATE
    return (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def silence(ms: int) -> np.ndarray:
    return np.zeros(RATE * ms // 1000, dtype=np.float32)


class Session:
    """One actor, its host, its stages and its client, played by the test."""

    def __init__(self, pace: float = 1.0, **cfg: Any) -> None:
        base: dict[str, Any] = {
            "vad": VadParams(prefix_padding_ms=100, silence_duration_ms=300),
            "overlap": OverlapParams(short_ack_ms=300),
            "continuation_cap_ms": 500,
        }
        base.update(cfg)
        self.config = SessionConfig(**base)
        self.now = 10.0
        self.seq = 0
        self.out: list[Out] = []
        self.a = SessionActor(
            SID,
            self.config,
            ENGINE,
            HostSettings(vad="energy", continuation_pace=pace),
            new_id=Ids(),
            detector=EnergyDetector(),
        )
        self.a.open(self.now)
        self.take()
        self.stage1_seq: dict[str, int] = {}

    # ---------------------------------------------------------------- plumbing
    def take(self) -> list[Out]:
        new = self.a.take_outbox()
        self.out += new
        return new

    def mark(self) -> int:
        return len(self.out)

    def sent(self, typ: type, dest: Dest | None = Dest.ADAPTER, since: int = 0) -> list[Any]:
        return [o.msg for o in self.out[since:] if isinstance(o.msg, typ) and (dest is None or o.dest == dest)]

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def command(self, msg: Any) -> list[Out]:
        self.a.on_command(msg, self.now)
        return self.take()

    def talk(self, pcm: np.ndarray, piece_ms: int = 100, force: bool = False) -> list[Out]:
        """Client audio at real-time pace, in pieces (as a client streams it)."""
        n = RATE * piece_ms // 1000
        outs: list[Out] = []
        for i in range(0, pcm.size, n):
            piece = pcm[i : i + n]
            self.now += piece.size / RATE
            outs += self.command(AudioIn(SID, 0, self.next_seq(), piece, force=force))
            self.a.tick(self.now)
            outs += self.take()
        return outs

    def user_turn(self, ms: int = 500) -> None:
        self.talk(speech(ms))
        self.talk(silence(400))

    def manual_turn(self) -> None:
        self.talk(speech(300))
        self.command(InputCommit(SID, 0, self.next_seq()))
        self.command(ResponseCreate(SID, 0, self.next_seq()))

    # ---------------------------------------------------------------- stage0
    def outstanding(self) -> list[AudioChunk]:
        chunks = {m.chunk_seq: m for m in self.sent(AudioChunk, Dest.STAGE0)}
        return [chunks[s] for s in sorted(self.a.chunks.pending)]

    def answer(
        self,
        chunk: AudioChunk,
        speak: bool = False,
        text: str = "",
        end: bool = False,
        epoch: int | None = None,
        **kw: Any,
    ) -> list[Out]:
        res = Stage0Result(
            SID,
            chunk.epoch if epoch is None else epoch,
            chunk.chunk_seq,
            Action.SPEAK if speak else Action.LISTEN,
            end_of_turn=end,
            text=text,
            **kw,
        )
        self.a.on_stage0(res, self.now)
        return self.take()

    def model_replies(self, text: str = "one two three four five six seven eight nine ten") -> str:
        """stage0 listens to the committed turn, then speaks the whole reply at the first unit."""
        for c in self.outstanding():
            if c.kind == ChunkKind.CONTINUATION:
                self.answer(c, speak=True, text=text, end=True)
                break
            self.answer(c)
        r = self.a.response
        assert r is not None
        return r.id

    # ---------------------------------------------------------------- stage1
    def play(self, rid: str, n: int, words: list[str] | None = None, end: bool = False) -> list[bool]:
        """stage1 streams ``n`` chunks of 40 ms for ``rid`` (one word each), maybe ending the turn."""
        h = next(m for m in self.sent(Handoff, Dest.STAGE1) if m.response_id == rid)
        out = []
        for i in range(n):
            seq = self.stage1_seq.get(rid, 0)
            self.stage1_seq[rid] = seq + 1
            word = (words[seq] if words and seq < len(words) else "w") if words is not None else f"w{seq}"
            self.now += 0.04
            msg = AudioOut(
                SID,
                h.epoch,
                rid,
                h.item_id,
                seq,
                np.zeros(960, np.int16),
                text=(" " if seq else "") + word,
                end_of_turn=end and i == n - 1,
            )
            out.append(self.a.on_audio_out(msg, self.now))
            self.take()
        return out

    def end_turn(self, rid: str) -> bool:
        h = next(m for m in self.sent(Handoff, Dest.STAGE1) if m.response_id == rid)
        seq = self.stage1_seq.get(rid, 0)
        ok = self.a.on_audio_out(
            AudioOut(SID, h.epoch, rid, h.item_id, seq, np.zeros(0, np.int16), end_of_turn=True), self.now
        )
        self.take()
        return ok

    def done(self, rid: str) -> ResponseDone:
        return next(m for m in self.sent(ResponseDone) if m.response.id == rid)

    def errors(self, since: int = 0) -> list[str]:
        return [m.code for m in self.sent(ErrorEvent, since=since)]


def _speaking_response(s: Session, words: int = 10) -> str:
    s.user_turn()
    rid = s.model_replies(" ".join(f"w{i}" for i in range(words)))
    s.play(rid, 5)
    return rid


# ============================================================================ overlap policy
def test_sustained_speech_barges_in_epoch_advance_cancel_and_one_done() -> None:
    s = Session()
    rid = _speaking_response(s)
    m = s.mark()
    s.talk(speech(900))
    adv = s.sent(EpochAdvance, None, m)
    assert {o.dest for o in s.out[m:] if isinstance(o.msg, EpochAdvance)} == {Dest.ADAPTER, Dest.STAGE0, Dest.STAGE1}
    assert adv[0].epoch == 1 and adv[0].reason == "turn_detected"
    done = s.done(rid)
    assert done.response.status == "cancelled" and done.response.reason == "turn_detected"
    assert done.epoch == 1
    assert s.a.barge_ins == 1
    # The overlap was announced once it passed short_ack, before the cancel, starting where the speech began.
    started = s.sent(SpeechStarted, since=m)
    assert len(started) == 1
    idx = [o.msg for o in s.out].index(started[0])
    assert idx < [o.msg for o in s.out].index(done)
    # Everything stage1 still sends for the cancelled response is dropped.
    assert s.play(rid, 3) == [False, False, False]
    assert s.a.dropped_stale >= 3
    # The barge-in speech is the user's next turn: committed and answered.
    s.talk(silence(400))
    assert s.sent(SpeechStopped, since=m)[0].item_id == started[0].item_id
    created = s.sent(ResponseCreated, since=m)
    assert len(created) == 1 and created[0].epoch == 1
    assert s.a.history[-2].id == started[0].item_id and s.a.history[-2].role == "user"


def test_backchannel_is_not_announced_does_not_cancel_and_leaves_no_item() -> None:
    s = Session()
    rid = _speaking_response(s)
    items = len(s.a.history)
    m = s.mark()
    s.talk(speech(200))
    assert s.a.turn_state(s.now) == TurnState.BARGE_IN
    s.talk(silence(400))
    assert s.sent(SpeechStarted, since=m) == [] and s.sent(SpeechStopped, since=m) == []
    assert s.sent(EpochAdvance, None, m) == []
    assert s.a.backchannels == 1 and s.a.epoch == 0
    assert all(s.play(rid, 5, end=True))
    assert s.done(rid).response.status == "completed"
    assert len(s.a.history) == items  # the "mm-hmm" is not a turn
    assert s.a.input_ms > 0 and s.a.snapshot(s.now).input_buffer_ms == 0


def test_speech_started_during_playback_cancels_the_reply_in_the_same_step() -> None:
    """The wire contract Realtime clients rely on: ``speech_started`` over the assistant is the
    interruption. The cancel (epoch advance on all hops, one response.done cancelled) comes in
    the same step, so no audio of the reply can follow the event."""
    s = Session()
    rid = _speaking_response(s)
    m = s.mark()
    s.talk(speech(400))  # past short_ack (300)
    started = s.sent(SpeechStarted, since=m)
    assert len(started) == 1
    msgs = [o.msg for o in s.out[m:]]
    at = msgs.index(started[0])
    step = msgs[at:]
    assert [type(x) for x in step[1:4]] == [EpochAdvance] * 3
    done = s.done(rid)
    assert done in step and done.response.status == "cancelled" and done.response.reason == "turn_detected"
    # The step that sent speech_started ended the reply: everything stage1 still has is dropped.
    assert not any(isinstance(x, AudioOut) for x in msgs[at:])
    assert s.play(rid, 3) == [False, False, False]


def test_a_client_cancel_that_crosses_the_servers_turn_detected_cancel_is_not_an_error() -> None:
    """LiveKit sends response.cancel on speech_started; the server cancelled already."""
    s = Session()
    rid = _speaking_response(s)
    s.talk(speech(400))
    assert s.done(rid).response.reason == "turn_detected"
    m = s.mark()
    s.a.on_cancel(ResponseCancel(SID, s.a.epoch, s.seq, event_id="lk1"), s.now)
    s.a.on_cancel(ResponseCancel(SID, s.a.epoch, s.seq, response_id=rid, event_id="lk2"), s.now)
    s.take()
    assert s.sent(ErrorEvent, since=m) == [] and s.sent(ResponseDone, since=m) == []
    # Any other cancel with nothing active still is one.
    s.a.on_cancel(ResponseCancel(SID, s.a.epoch, s.seq, response_id="resp_other", event_id="x"), s.now)
    s.take()
    assert [e.code for e in s.sent(ErrorEvent, since=m)] == ["response_cancel_not_active"]


def test_with_interrupt_response_off_speech_over_the_reply_is_a_turn_answered_after_it() -> None:
    s = Session(vad=VadParams(prefix_padding_ms=100, silence_duration_ms=300, interrupt_response=False))
    rid = _speaking_response(s)
    m = s.mark()
    s.talk(speech(500))  # past short_ack 300: announced, but the reply goes on
    s.talk(silence(400))
    assert len(s.sent(SpeechStarted, since=m)) == 1
    assert s.sent(EpochAdvance, None, m) == []
    committed = s.sent(InputCommitted, since=m)
    assert len(committed) == 1
    # It comes after the assistant item, which took its place in history when the reply began.
    assert committed[0].previous_item_id == s.a.response.item_id  # type: ignore[union-attr]
    assert s.sent(ResponseCreated, since=m) == []
    assert s.a.turn_state(s.now) != TurnState.IDLE
    s.end_turn(rid)
    assert s.done(rid).response.status == "completed"
    second = s.sent(ResponseCreated, since=m)
    assert len(second) == 1 and second[0].response.id != rid


def test_one_large_append_is_judged_by_the_whole_span() -> None:
    s = Session()
    rid = _speaking_response(s)
    # 1.2 s of speech then silence, in one append: start and stop in one call.
    s.talk(np.concatenate([speech(1200), silence(400)]), piece_ms=1600)
    assert s.done(rid).response.reason == "turn_detected"
    assert s.a.backchannels == 0


def test_speech_started_reports_the_real_start_of_speech_as_soon_as_the_rule_allows() -> None:
    """``audio_start_ms`` is where the speech began on the input clock (not moved by the prefix
    padding), and over the assistant the event goes out as soon as the overlap is voiced for
    ``short_ack_ms`` (default), in the client's 20 ms pieces."""
    s = Session()
    m = s.mark()
    s.talk(silence(512))  # 16 VAD windows: the speech starts on a window boundary
    onset = s.a.input_ms
    s.talk(speech(300))
    assert [e.audio_start_ms for e in s.sent(SpeechStarted, since=m)] == [onset]
    s.talk(silence(400))

    v = Session(overlap=OverlapParams())  # the default threshold
    rid = _speaking_response(v)
    v.talk(silence(1024 + int(-v.a.input_ms) % 32))  # (again on a window boundary)
    onset = v.a.input_ms
    heard_at: list[float] = []
    for _ in range(40):
        outs = v.talk(speech(20), piece_ms=20)
        if any(isinstance(o.msg, SpeechStarted) for o in outs):
            heard_at.append(v.a.input_ms)
            break
    assert heard_at, "never announced"
    started = v.sent(SpeechStarted)[-1]
    assert started.audio_start_ms == onset
    assert OverlapParams().short_ack_ms <= heard_at[0] - onset <= OverlapParams().short_ack_ms + 40
    assert v.done(rid).response.status == "cancelled"


def test_interrupt_response_off_never_barges_in_but_force_always_does() -> None:
    s = Session(vad=VadParams(prefix_padding_ms=100, silence_duration_ms=300, interrupt_response=False))
    rid = _speaking_response(s)
    s.talk(speech(1500))
    assert s.a.response is not None and s.a.epoch == 0
    s.talk(speech(100), force=True)
    assert s.done(rid).response.reason == "turn_detected"
    assert s.a.epoch == 1


def test_force_flag_cancels_in_manual_and_duplex_modes_too() -> None:
    for mode in (TurnMode.MANUAL, TurnMode.DUPLEX):
        s = Session(turn_mode=mode)
        s.command(ResponseCreate(SID, 0, s.next_seq()))
        rid = s.a.response.id  # type: ignore[union-attr]
        s.talk(silence(100), force=True)
        assert s.done(rid).response.status == "cancelled"


# ============================================================================ cancel
def test_cancel_with_nothing_active_is_an_error_and_the_session_keeps_working() -> None:
    s = Session(turn_mode=TurnMode.MANUAL)
    s.a.on_cancel(ResponseCancel(SID, 0, s.seq, event_id="evt_1"), s.now)
    s.take()
    err = s.sent(ErrorEvent)
    assert [e.code for e in err] == ["response_cancel_not_active"] and err[0].event_id == "evt_1"
    s.manual_turn()
    rid = s.model_replies()
    s.play(rid, 3, end=True)
    assert s.done(rid).response.status == "completed"


def test_cancel_before_anything_was_sent_answers_at_once() -> None:
    # after_seq 0: the adapter has sent no data command yet (its seqs start at 1).
    s = Session(turn_mode=TurnMode.MANUAL)
    s.a.on_cancel(ResponseCancel(SID, 0, 0), s.now)
    s.take()
    assert s.errors() == ["response_cancel_not_active"]


def test_cancel_overtaking_a_queued_create_cancels_the_response_it_creates() -> None:
    s = Session(turn_mode=TurnMode.MANUAL)
    s.talk(speech(300))
    commit, create = InputCommit(SID, 0, s.next_seq()), ResponseCreate(SID, 0, s.next_seq())
    # The cancel travels on the control plane and arrives first.
    s.a.on_cancel(ResponseCancel(SID, 0, create.seq), s.now)
    assert s.take() == []
    s.command(commit)
    s.command(create)
    created = s.sent(ResponseCreated)
    assert len(created) == 1
    done = s.done(created[0].response.id)
    assert done.response.status == "cancelled" and done.response.reason == "client_cancelled"
    assert s.errors() == []
    # Its stage0 units are void: a speak for them hands nothing to stage1.
    for c in s.outstanding():
        s.answer(c, speak=c.kind == ChunkKind.CONTINUATION, text="late", end=True)
    assert s.sent(Handoff, Dest.STAGE1) == []


def test_two_cancels_for_one_response_the_second_is_an_error() -> None:
    s = Session(turn_mode=TurnMode.MANUAL)
    s.talk(speech(300))
    commit, create = InputCommit(SID, 0, s.next_seq()), ResponseCreate(SID, 0, s.next_seq())
    s.a.on_cancel(ResponseCancel(SID, 0, create.seq, event_id="a"), s.now)
    s.a.on_cancel(ResponseCancel(SID, 0, create.seq, event_id="b"), s.now)
    s.command(commit)
    s.command(create)
    assert len(s.sent(ResponseDone)) == 1
    errs = s.sent(ErrorEvent)
    assert [(e.code, e.event_id) for e in errs] == [("response_cancel_not_active", "b")]


def test_cancel_by_an_id_that_is_not_active_is_an_error() -> None:
    s = Session(turn_mode=TurnMode.MANUAL)
    s.manual_turn()
    rid = s.a.response.id  # type: ignore[union-attr]
    s.a.on_cancel(ResponseCancel(SID, 0, s.seq, response_id="resp_other"), s.now)
    s.take()
    assert s.errors() == ["response_cancel_not_active"] and s.a.response is not None
    s.a.on_cancel(ResponseCancel(SID, 0, s.seq, response_id=rid), s.now)
    s.take()
    assert s.done(rid).response.reason == "client_cancelled"


def test_a_queued_user_turn_is_not_answered_after_its_reply_is_cancelled() -> None:
    s = Session(vad=VadParams(prefix_padding_ms=100, silence_duration_ms=300, interrupt_response=False))
    rid = _speaking_response(s)
    s.talk(speech(500))  # a turn that did not interrupt: answered after the reply...
    s.talk(silence(400))
    assert s.a.lifecycle.owed
    s.a.on_cancel(ResponseCancel(SID, 0, s.seq), s.now)  # ...unless the client stops the reply
    s.take()
    assert s.done(rid).response.status == "cancelled"
    assert s.a.response is None and len(s.sent(ResponseCreated)) == 1


# ============================================================================ playback-aware history
def test_ack_only_commits_only_the_played_audio_with_the_transcript_cut_to_match() -> None:
    s = Session(turn_mode=TurnMode.MANUAL, commit_policy=CommitPolicy.ACK_ONLY)
    s.manual_turn()
    words = [f"word{i}" for i in range(10)]
    rid = s.model_replies(" ".join(words))
    item = s.a.response.item_id  # type: ignore[union-attr]
    s.play(rid, 5, words)
    s.command(PlaybackAck(SID, 0, s.next_seq(), rid, item, 120))  # 3 chunks of 40 ms played
    s.play(rid, 5, words, end=True)
    done = s.done(rid)
    assert done.transcript == " ".join(words)  # what was generated
    out = done.response.output[0]
    assert out.audio_ms == 120 and out.content[0].transcript == "word0 word1 word2"
    hist = s.a.history[-1]
    assert hist.id == item and hist.audio_ms == 120 and hist.content[0].transcript == "word0 word1 word2"
    assert s.a.cursor.view().committed_ms == 120 and s.a.cursor.view().generated_ms == 400
    # Later acks grow it; an older (smaller) ack never shrinks it.
    s.command(PlaybackAck(SID, 0, s.next_seq(), rid, item, 210))
    assert s.a.history[-1].audio_ms == 210
    assert s.a.history[-1].content[0].transcript == "word0 word1 word2 word3 word4"
    s.command(PlaybackAck(SID, 0, s.next_seq(), rid, item, 50))
    assert s.a.history[-1].audio_ms == 210
    acks = s.sent(PlaybackCommitted)
    assert [a.played_ms for a in acks] == [120, 210, 210]
    assert acks[-1].history[-1].audio_ms == 210
    # Beyond what was generated is clamped.
    s.command(PlaybackAck(SID, 0, s.next_seq(), rid, item, 99_999))
    assert s.a.history[-1].audio_ms == 400 and s.a.history[-1].content[0].transcript == " ".join(words)


def test_ack_only_with_nothing_played_commits_an_empty_item() -> None:
    s = Session(turn_mode=TurnMode.MANUAL, commit_policy=CommitPolicy.ACK_ONLY)
    s.manual_turn()
    rid = s.model_replies("never heard")
    s.play(rid, 4, end=True)
    h = s.a.history[-1]
    assert h.role == "assistant" and h.audio_ms == 0 and h.content[0].transcript == ""


def test_commit_all_on_done_then_truncate_cuts_history_to_the_played_words() -> None:
    s = Session(turn_mode=TurnMode.MANUAL)
    s.manual_turn()
    words = ["alpha", "beta", "gamma", "delta"]
    rid = s.model_replies(" ".join(words))
    item = s.a.response.item_id  # type: ignore[union-attr]
    s.play(rid, 4, words, end=True)
    assert s.a.history[-1].audio_ms == 160 and s.a.history[-1].content[0].transcript == "alpha beta gamma delta"
    s.command(ItemTruncate(SID, 0, s.next_seq(), item, 100))  # in the middle of "gamma"'s chunk
    trunc = s.sent(ItemTruncated)
    assert trunc and trunc[0].audio_end_ms == 100
    assert s.a.history[-1].audio_ms == 100 and s.a.history[-1].content[0].transcript == "alpha beta"
    assert s.a.cursor.view().played_ms == 100 and s.a.cursor.view().committed_ms == 100


def test_truncating_the_item_that_plays_stops_its_audio_at_once() -> None:
    """The client stopped playback at ``audio_end_ms``: no more of that reply may reach it. The
    response ends cancelled in the same step (epoch advance, so every hop drops its audio) and
    its item enters history cut where the client stopped."""
    s = Session()
    rid = _speaking_response(s)
    item = s.a.response.item_id  # type: ignore[union-attr]
    m = s.mark()
    s.command(ItemTruncate(SID, 0, s.next_seq(), item, 80))
    assert s.sent(ItemTruncated, since=m)
    done = s.done(rid)
    assert done.response.status == "cancelled" and done.response.reason == "client_cancelled"
    assert [a.reason for a in s.sent(EpochAdvance, Dest.ADAPTER, m)] == ["client_cancelled"]
    assert s.play(rid, 3) == [False, False, False]
    assert done.response.output[0].audio_ms == 80
    assert s.a.history[-1].audio_ms == 80 and s.a.history[-1].content[0].transcript == "w0 w1"
    # A cancel the client sends after its truncate finds nothing left to cancel.
    s.a.on_cancel(ResponseCancel(SID, 0, s.seq), s.now)
    s.take()
    assert s.errors(m) == ["response_cancel_not_active"]


def test_bad_truncates_and_acks_are_errors() -> None:
    s = Session(turn_mode=TurnMode.MANUAL)
    s.manual_turn()
    rid = s.model_replies("a b")
    item = s.a.response.item_id  # type: ignore[union-attr]
    s.play(rid, 2, end=True)
    m = s.mark()
    s.command(ItemTruncate(SID, 0, s.next_seq(), item, 81))  # 80 ms generated
    s.command(ItemTruncate(SID, 0, s.next_seq(), item, 10, content_index=1))
    s.command(ItemTruncate(SID, 0, s.next_seq(), "item_nope", 10))
    s.command(ItemTruncate(SID, 0, s.next_seq(), s.a.history[0].id, 10))  # a user item
    s.command(PlaybackAck(SID, 0, s.next_seq(), rid, "item_nope", 10))
    assert s.errors(m) == ["invalid_value", "invalid_value", "item_not_found", "item_not_found", "item_not_found"]
    assert s.a.history[-1].audio_ms == 80


def test_client_made_assistant_item_keeps_its_text_when_truncated() -> None:
    s = Session(turn_mode=TurnMode.MANUAL)
    item = Item(id="mine", role="assistant", content=(ContentPart(type="text", text="typed by the client"),))
    s.command(ItemCreate(SID, 0, s.next_seq(), item))
    s.command(ItemTruncate(SID, 0, s.next_seq(), "mine", 0))
    assert s.a.history[-1].content[0].text == "typed by the client"


# ============================================================================ continuation, stage0 controls
def test_continuation_units_are_paced_capped_and_a_capped_turn_waits_for_its_answers() -> None:
    s = Session(turn_mode=TurnMode.MANUAL, continuation_cap_ms=300)
    s.manual_turn()
    rid = s.a.response.id  # type: ignore[union-attr]
    units = lambda: [c for c in s.sent(AudioChunk, Dest.STAGE0) if c.kind == ChunkKind.CONTINUATION]  # noqa: E731
    assert len(units()) == 1  # the first unit goes at once
    assert s.a.next_deadline() == pytest.approx(s.now + 0.1)  # the next unit, one chunk later
    for _ in range(5):
        s.now += 0.1
        s.a.tick(s.now)
        s.take()
    assert len(units()) == 3  # capped at 300 ms of silence
    assert all(u.response_id == rid and not u.force_listen for u in units())
    # Cap reached, answers outstanding: nothing is due by time (no busy timer), the turn waits.
    assert s.a.next_deadline() is None and s.a.response is not None
    for c in s.outstanding():
        s.answer(c)  # the model keeps listening
    done = s.done(rid)
    assert done.response.status == "incomplete" and done.response.reason == "turn_cap"
    assert s.a.next_deadline() is None


def test_a_unit_answered_for_an_ended_response_is_not_applied_to_the_next_one() -> None:
    s = Session(turn_mode=TurnMode.MANUAL, pace=0.0)  # pace 0: all units at once
    s.manual_turn()
    first = s.outstanding()
    rid1 = s.a.response.id  # type: ignore[union-attr]
    cont = [c for c in first if c.kind == ChunkKind.CONTINUATION]
    s.answer(cont[0], speak=True, text="first reply", end=True)
    s.play(rid1, 2, end=True)
    assert s.done(rid1).response.status == "completed"
    s.command(ResponseCreate(SID, 0, s.next_seq()))
    rid2 = s.a.response.id  # type: ignore[union-attr]
    # A late speak for a unit of the first response (same epoch: it completed) must not feed the second.
    s.answer(cont[1], speak=True, text="stale words", end=True)
    assert [h.response_id for h in s.sent(Handoff, Dest.STAGE1)] == [rid1]
    assert s.a.response is not None and s.a.response.id == rid2


def test_force_listen_count_forces_the_first_live_chunks_to_listen() -> None:
    s = Session(turn_mode=TurnMode.DUPLEX, force_listen_count=3)
    s.talk(speech(500))
    live = s.sent(AudioChunk, Dest.STAGE0)
    assert [c.force_listen for c in live] == [True, True, True, False, False]
    for c in live:
        s.answer(c, speak=True, text="too early", end=True)  # an engine that ignores the flag
    decisions = s.sent(Decision)
    assert [d.action for d in decisions[:3]] == [Action.LISTEN] * 3
    assert decisions[3].action == Action.SPEAK
    # Only the fourth chunk's speak started a response.
    assert len(s.sent(ResponseCreated)) == 1


def test_one_result_per_chunk_duplicates_are_refused() -> None:
    s = Session(turn_mode=TurnMode.MANUAL)
    s.manual_turn()
    c = s.outstanding()[0]
    s.answer(c)
    m = s.mark()
    s.answer(c, speak=True, text="again")
    assert s.errors(m) == ["stage_protocol_error"]
    assert s.sent(Decision, since=m) == []
    assert s.a.chunk_results == 1


def test_a_stale_stage0_result_is_counted_and_not_applied() -> None:
    s = Session(turn_mode=TurnMode.MANUAL, pace=0.0)
    s.manual_turn()
    rid = s.a.response.id  # type: ignore[union-attr]
    s.a.on_cancel(ResponseCancel(SID, 0, s.seq), s.now)
    s.take()
    assert s.done(rid).response.status == "cancelled"
    for c in s.outstanding():
        s.answer(
            c,
            speak=True,
            text="old",
            end=True,
            input_transcript="user said" if c.kind == ChunkKind.UTTERANCE_END else None,
        )
    assert s.sent(Handoff, Dest.STAGE1) == [] and s.sent(Decision) == []
    assert s.a.dropped_stale == s.a.chunk_results and s.a.outstanding == 0
    # The user's words are never stale: the transcript still reaches their item.
    assert s.a.history[0].content[0].transcript == "user said"


# ============================================================================ duplex
def test_duplex_the_model_speaks_without_response_create_and_a_listen_ends_its_turn() -> None:
    s = Session(turn_mode=TurnMode.DUPLEX, force_listen_count=1)
    s.talk(speech(300))
    chunks = s.sent(AudioChunk, Dest.STAGE0)
    s.answer(chunks[0])
    s.answer(chunks[1], speak=True, text="hello", input_transcript="hi there")
    created = s.sent(ResponseCreated)
    assert len(created) == 1
    rid = created[0].response.id
    speak = [d for d in s.sent(Decision) if d.action == Action.SPEAK]
    assert speak[0].response_id == rid  # the speak that started it names it, and comes first
    msgs = [o.msg for o in s.out]
    assert msgs.index(speak[0]) < msgs.index(created[0])
    assert [it.role for it in s.a.history] == ["user", "assistant"]
    assert s.a.history[0].content[0].transcript == "hi there"
    s.answer(chunks[2], speak=True, text="world")
    hands = s.sent(Handoff, Dest.STAGE1)
    assert [h.text for h in hands] == ["hello", "world"] and not hands[-1].end_of_turn
    s.talk(silence(100))
    s.answer(s.outstanding()[0])  # listen after speaking: the model yields the floor
    assert s.sent(Handoff, Dest.STAGE1)[-1].end_of_turn
    s.play(rid, 3, end=True)
    assert s.done(rid).response.status == "completed"


def test_duplex_a_turn_started_while_the_last_still_plays_waits_and_close_ends_cleanly() -> None:
    s = Session(turn_mode=TurnMode.DUPLEX, force_listen_count=0)
    s.talk(speech(300))
    c = s.sent(AudioChunk, Dest.STAGE0)
    s.answer(c[0], speak=True, text="first", end=True)
    rid1 = s.a.response.id  # type: ignore[union-attr]
    s.answer(c[1], speak=True, text="second", end=True)  # the model's next turn, while rid1 plays
    assert len(s.sent(ResponseCreated)) == 1
    s.play(rid1, 2, end=True)
    created = s.sent(ResponseCreated)
    assert len(created) == 2
    rid2 = created[1].response.id
    assert s.sent(Handoff, Dest.STAGE1)[-1].text == "second"
    # Another one deferred behind rid2, then the session closes: nothing new may start.
    s.answer(c[2], speak=True, text="third", end=True)
    s.a.close(s.now, "bye")
    s.take()
    assert len(s.sent(ResponseCreated)) == 2
    assert s.done(rid2).response.reason == "session_closed"
    assert isinstance(s.out[-1].msg, SessionClosed)


def test_duplex_model_interrupt_yields_the_floor() -> None:
    s = Session(turn_mode=TurnMode.DUPLEX, force_listen_count=0)
    s.talk(speech(200))
    c = s.sent(AudioChunk, Dest.STAGE0)
    s.answer(c[0], speak=True, text="talking")
    rid = s.a.response.id  # type: ignore[union-attr]
    s.answer(c[1], interrupt=True)
    assert s.done(rid).response.reason == "turn_detected" and s.a.epoch == 1


def test_interrupt_while_the_client_still_plays_a_finished_reply_flushes_it() -> None:
    """stage1 runs ahead of real time: a reply can be fully generated (response done) while
    the client still plays its tail. Talking over that tail advances the epoch, so clients
    flush, in duplex (model interrupt) and server VAD (sustained speech) alike."""
    s = Session(turn_mode=TurnMode.DUPLEX, force_listen_count=0)
    s.talk(speech(300))
    c = s.sent(AudioChunk, Dest.STAGE0)
    s.answer(c[0], speak=True, text="a long reply", end=True)
    rid = s.a.response.id  # type: ignore[union-attr]
    s.play(rid, 50, end=True)  # 2 s generated in 2 s of test time, sent at once
    s.now -= 1.5  # ...as if generated 1.5 s ahead of playback
    assert s.done(rid).response.status == "completed"
    assert s.a.turn_state(s.now) == TurnState.ASSISTANT_PLAYING
    m = s.mark()
    s.answer(c[1], interrupt=True)
    adv = s.sent(EpochAdvance, None, m)
    assert {o.dest for o in s.out[m:] if isinstance(o.msg, EpochAdvance)} == {Dest.ADAPTER, Dest.STAGE0, Dest.STAGE1}
    assert adv[0].reason == "turn_detected" and s.a.epoch == 1 and s.a.barge_ins == 1
    assert len(s.sent(ResponseDone)) == 1  # that response already ended; nothing more about it
    assert s.a.turn_state(s.now) != TurnState.ASSISTANT_PLAYING
    m = s.mark()
    s.answer(c[2], interrupt=True)  # nothing audible any more: no second advance
    assert s.sent(EpochAdvance, None, m) == []

    v = Session()
    rid = _speaking_response(v)
    v.play(rid, 50, end=True)
    v.now -= 1.5
    assert v.done(rid).response.status == "completed"
    m = v.mark()
    v.talk(speech(900))
    assert [a.reason for a in v.sent(EpochAdvance, Dest.ADAPTER, m)] == ["turn_detected"]
    assert len(v.sent(SpeechStarted, since=m)) == 1


# ============================================================================ failures
def test_stage_error_fails_the_response_and_names_it() -> None:
    s = Session()
    rid = _speaking_response(s)
    m = s.mark()
    s.a.on_stage_error(StageError(SID, 0, "engine_error", "cuda oom", Role.STAGE1), s.now)
    s.take()
    err = s.sent(ErrorEvent, since=m)[0]
    assert err.code == "engine_error" and err.response_id == rid and err.session_id == SID
    assert err.type == "server_error" and "cuda oom" in err.message
    done = s.done(rid)
    assert done.response.status == "failed" and done.response.error_code == "engine_error"
    assert s.a.epoch == 1  # stage1 stops synthesising it
    # The session keeps working.
    s.user_turn()
    rid2 = s.model_replies()
    s.play(rid2, 2, end=True)
    assert s.done(rid2).response.status == "completed"


def test_a_stage_error_about_an_older_epoch_leaves_the_new_response_alone() -> None:
    s = Session(turn_mode=TurnMode.MANUAL)
    s.manual_turn()
    s.a.on_cancel(ResponseCancel(SID, 0, s.seq), s.now)
    s.take()
    old_chunk = s.outstanding()[0]
    s.command(ResponseCreate(SID, 0, s.next_seq()))
    rid2 = s.a.response.id  # type: ignore[union-attr]
    s.a.on_stage_error(StageError(SID, 0, "engine_error", "old", Role.STAGE0, old_chunk.chunk_seq), s.now, 0)
    s.take()
    assert s.a.response is not None and s.a.response.id == rid2
    assert s.sent(ErrorEvent)[-1].code == "engine_error"
    assert s.a.chunk_results == 1  # the error was that chunk's answer


def test_stage0_loss_counts_unanswered_chunks_and_rebinding_reopens() -> None:
    s = Session(turn_mode=TurnMode.MANUAL)
    s.manual_turn()
    rid = s.a.response.id  # type: ignore[union-attr]
    sent = s.a.chunks_sent
    s.a.on_stage_lost(Role.STAGE0, s.now)
    s.take()
    assert s.a.chunks_lost == sent and s.a.outstanding == 0
    assert s.done(rid).response.status == "failed"
    s.command(ResponseCreate(SID, 0, s.next_seq(), event_id="e"))
    assert s.errors()[-1] == "stage_unavailable"
    s.a.on_stage_bound(Role.STAGE0, s.now)
    s.take()
    s.command(ResponseCreate(SID, 0, s.next_seq()))
    assert s.a.response is not None


def test_an_undeliverable_cancel_closes_the_session_rather_than_diverge() -> None:
    s = Session()
    rid = _speaking_response(s)
    s.a.on_cancel(ResponseCancel(SID, 0, s.seq), s.now)
    outs = s.take()
    adv = next(o for o in outs if isinstance(o.msg, EpochAdvance) and o.dest == Dest.STAGE1)
    s.a.on_send_failed(adv, s.now)  # stage1's control queue refused the epoch advance
    s.take()
    assert s.a.closed
    assert "stage_unreachable" in s.errors()
    assert len([d for d in s.sent(ResponseDone) if d.response.id == rid]) == 1
    assert s.sent(StageClose, Dest.STAGE1) and isinstance(s.sent(SessionClosed)[0], SessionClosed)
    # Anything later is ignored.
    n = s.mark()
    s.a.on_send_failed(adv, s.now)
    s.command(ResponseCreate(SID, 0, s.next_seq()))
    assert s.out[n:] == []


def test_a_stage_that_refuses_the_session_closes_it() -> None:
    s = Session()
    s.a.on_stage_error(StageError(SID, 0, "stage_open_failed", "no room", Role.STAGE1), s.now)
    s.take()
    assert s.a.closed and s.errors() == ["stage_open_failed"]


# ============================================================================ input, idle, state
def test_input_clear_does_not_advance_the_epoch_or_stop_the_reply() -> None:
    s = Session()
    rid = _speaking_response(s)
    s.talk(speech(100))
    s.command(InputClear(SID, 0, s.next_seq()))
    assert s.a.epoch == 0 and s.a.response is not None
    assert all(s.play(rid, 2, end=True))
    assert s.done(rid).response.status == "completed"


def test_idle_timeout_commits_and_responds_and_never_spins() -> None:
    s = Session(vad=VadParams(prefix_padding_ms=100, silence_duration_ms=300, idle_timeout_ms=2000))
    deadline = s.a.next_deadline()
    assert deadline == 12.0
    s.talk(speech(300))
    assert s.a.next_deadline() is None  # no idle timer while the user speaks
    s.a.on_command(InputClear(SID, 0, s.next_seq()), s.now)  # the turn is dropped
    s.take()
    s.now += 2.5
    s.a.tick(s.now)
    s.take()
    idle = s.sent(IdleTimeout)
    assert len(idle) == 1
    assert s.sent(InputCommitted)[-1].item_id == idle[0].item_id
    assert len(s.sent(ResponseCreated)) == 1
    assert s.a.next_deadline() is None or s.a.next_deadline() > s.now  # type: ignore[operator]


def test_turn_states() -> None:
    s = Session(overlap=OverlapParams(short_ack_ms=300))
    assert s.a.turn_state(s.now) == TurnState.IDLE
    s.talk(speech(300))
    assert s.a.turn_state(s.now) == TurnState.USER_SPEAKING
    vad = msgspec.structs.replace(s.config.vad, create_response=False)
    s.command(SessionUpdate(SID, 0, s.next_seq(), msgspec.structs.replace(s.config, vad=vad)))
    s.talk(silence(700))
    assert s.a.turn_state(s.now) == TurnState.USER_COMMITTED
    s.command(ResponseCreate(SID, 0, s.next_seq()))
    assert s.a.turn_state(s.now) == TurnState.ASSISTANT_GENERATING
    rid = s.model_replies()
    s.play(rid, 3)
    assert s.a.turn_state(s.now) == TurnState.ASSISTANT_PLAYING
    s.talk(speech(200))
    assert s.a.turn_state(s.now) == TurnState.BARGE_IN
    s.talk(silence(500))
    s.play(rid, 10, end=True)
    assert s.a.turn_state(s.now) == TurnState.ASSISTANT_PLAYING  # the client still plays the tail
    s.now += 1.0
    assert s.a.turn_state(s.now) == TurnState.IDLE


def test_snapshot_shows_the_state() -> None:
    s = Session(turn_mode=TurnMode.MANUAL, commit_policy=CommitPolicy.ACK_ONLY)
    s.manual_turn()
    rid = s.model_replies("one two three")
    item = s.a.response.item_id  # type: ignore[union-attr]
    s.play(rid, 3, ["one", "two", "three"])
    s.command(PlaybackAck(SID, 0, s.next_seq(), rid, item, 40))
    s.command(SnapshotRequest(SID, 0, s.next_seq(), "evt_s"))
    snap = s.sent(Snapshot)[-1].snapshot
    assert snap.session_id == SID and snap.epoch == 0 and snap.turn_mode == TurnMode.MANUAL
    assert snap.turn_state == TurnState.ASSISTANT_PLAYING
    assert snap.response is not None and snap.response.id == rid and snap.response.status == "in_progress"
    assert snap.response.output[0].id == item and snap.response.output[0].content[0].transcript == "one two three"
    assert snap.response.usage.output_audio_ms == 120
    assert (snap.cursor.generated_ms, snap.cursor.sent_ms, snap.cursor.played_ms) == (120, 120, 40)
    assert [it.role for it in snap.history] == ["user", "assistant"]
    assert snap.chunks_sent == s.a.chunks_sent and snap.responses == 1


def test_long_silence_in_server_vad_does_not_fill_the_buffer() -> None:
    s = Session()
    s.a.settings = s.a.settings.__class__(vad="energy", max_input_buffer_ms=3000)
    s.talk(silence(10_000), piece_ms=500)
    assert s.errors() == []
    assert s.a.snapshot(s.now).input_buffer_ms <= 5000
    s.talk(speech(300))
    s.talk(silence(400))
    committed = s.sent(InputCommitted)
    assert len(committed) == 1
    user = next(it for it in s.a.history if it.id == committed[0].item_id)
    assert 300 <= user.audio_ms <= 300 + 100 + 400 + 64  # speech + prefix padding + hangover


def test_deleting_the_item_in_progress_keeps_the_reply_out_of_history() -> None:
    s = Session(turn_mode=TurnMode.MANUAL)
    s.manual_turn()
    rid = s.model_replies("x y")
    item = s.a.response.item_id  # type: ignore[union-attr]
    s.command(ItemDelete(SID, 0, s.next_seq(), item))
    s.play(rid, 2, end=True)
    assert s.done(rid).response.status == "completed"
    assert item not in [it.id for it in s.a.history]


def test_max_output_tokens_ends_incomplete() -> None:
    s = Session(turn_mode=TurnMode.MANUAL)
    s.talk(speech(300))
    s.command(InputCommit(SID, 0, s.next_seq()))
    s.command(ResponseCreate(SID, 0, s.next_seq(), ResponseOptions(max_output_tokens=2)))
    rid = s.model_replies("one two three four")
    assert s.sent(Handoff, Dest.STAGE1)[0].text == "one two"
    s.play(rid, 1, end=True)
    done = s.done(rid)
    assert done.response.status == "incomplete" and done.response.reason == "max_output_tokens"


def test_text_modality_streams_text_and_completes_without_stage1() -> None:
    s = Session(turn_mode=TurnMode.MANUAL)
    s.talk(speech(300))
    s.command(InputCommit(SID, 0, s.next_seq()))
    s.command(ResponseCreate(SID, 0, s.next_seq(), ResponseOptions(output_modalities=("text",))))
    for c in s.outstanding():
        if c.kind == ChunkKind.CONTINUATION:
            s.answer(c, speak=True, text="in writing", end=True)
            break
        s.answer(c)
    done = s.sent(ResponseDone)[0]
    assert done.response.status == "completed" and done.transcript == "in writing"
    assert s.a.history[-1].content[0].text == "in writing"
    assert s.sent(Handoff, Dest.STAGE1) == []


def test_mode_switch_to_duplex_restarts_force_listen_and_drops_the_turn_buffer() -> None:
    s = Session(force_listen_count=2)
    s.talk(speech(300))
    s.command(SessionUpdate(SID, 0, s.next_seq(), msgspec.structs.replace(s.config, turn_mode=TurnMode.DUPLEX)))
    assert s.a.snapshot(s.now).input_buffer_ms == 0
    s.talk(speech(300))
    live = [c for c in s.sent(AudioChunk, Dest.STAGE0) if c.kind == ChunkKind.LIVE]
    assert [c.force_listen for c in live] == [True, True, False]


def test_listen_prob_scale_and_session_settings_reach_both_stages() -> None:
    s = Session(turn_mode=TurnMode.DUPLEX)
    cfg = msgspec.structs.replace(s.config, listen_prob_scale=3.0, force_listen_count=5)
    m = s.mark()
    s.command(SessionUpdate(SID, 0, s.next_seq(), cfg))
    opens = [o for o in s.out[m:] if isinstance(o.msg, StageOpen)]
    assert {o.dest for o in opens} == {Dest.STAGE0, Dest.STAGE1} and all(o.plane == "control" for o in opens)
    assert all(o.msg.config.listen_prob_scale == 3.0 for o in opens)


def test_a_duplex_speak_while_stage1_is_down_is_refused_once() -> None:
    s = Session(turn_mode=TurnMode.DUPLEX, force_listen_count=0)
    s.a.on_stage_lost(Role.STAGE1, s.now)
    s.take()
    s.talk(speech(100))
    m = s.mark()
    s.answer(s.outstanding()[0], speak=True, text="hi")
    assert s.errors(m) == ["stage_unavailable"]
    assert s.sent(ResponseCreated) == [] and s.sent(Handoff, Dest.STAGE1) == []
    assert [d.action for d in s.sent(Decision, since=m)] == [Action.SPEAK]


def test_late_audio_of_a_completed_response_is_dropped_at_the_same_epoch() -> None:
    s = Session(turn_mode=TurnMode.MANUAL)
    s.manual_turn()
    rid1 = s.model_replies("first")
    s.play(rid1, 2, end=True)
    s.command(ResponseCreate(SID, 0, s.next_seq()))
    rid2 = s.a.response.id  # type: ignore[union-attr]
    assert s.a.epoch == 0  # completing does not advance the epoch: the response id fences it
    m = s.mark()
    assert s.play(rid1, 2) == [False, False]
    assert s.sent(AudioOut, since=m) == [] and s.a.response.id == rid2  # type: ignore[union-attr]


def test_audio_of_the_active_response_stamped_with_an_older_epoch_is_dropped() -> None:
    s = Session(turn_mode=TurnMode.MANUAL)
    s.manual_turn()
    s.a.on_cancel(ResponseCancel(SID, 0, s.seq), s.now)
    s.take()
    s.command(ResponseCreate(SID, 0, s.next_seq()))
    r = s.a.response
    assert r is not None and s.a.epoch == 1
    bad = AudioOut(SID, 0, r.id, r.item_id, 0, np.zeros(960, np.int16))
    future = AudioOut(SID, 2, r.id, r.item_id, 0, np.zeros(960, np.int16))
    assert not s.a.on_audio_out(bad, s.now) and not s.a.on_audio_out(future, s.now)
    assert s.sent(AudioOut) == []


def test_response_create_while_one_is_active_is_an_error() -> None:
    s = Session(turn_mode=TurnMode.MANUAL)
    s.manual_turn()
    rid = s.a.response.id  # type: ignore[union-attr]
    s.command(ResponseCreate(SID, 0, s.next_seq(), event_id="evt_2"))
    err = s.sent(ErrorEvent)[-1]
    assert err.code == "conversation_already_has_active_response" and err.event_id == "evt_2"
    assert len(s.sent(ResponseCreated)) == 1 and s.a.response.id == rid  # type: ignore[union-attr]
