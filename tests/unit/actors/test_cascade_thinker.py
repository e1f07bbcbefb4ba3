"""CascadeThinker with its real models (Silero, Whisper tiny.en) driven chunk by chunk,
as stage0 drives it; the openai-chat policy against the local stand-in server."""

from __future__ import annotations

import time
import wave
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soxr

from duplexd.actors.engines.base import EngineError, ThinkerInput, ThinkerOutput
from duplexd.actors.engines.cascade import CascadeOptions, CascadeThinker
from duplexd.bus.messages import Action, ChunkKind, HistoryEntry, SessionConfig, TurnMode
from tests.chat_completions_server import ChatScript, chat_server

pytest.importorskip("faster_whisper")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

SPEECH = Path(__file__).resolve().parents[2] / "fixtures" / "speech"
N = 1600  # 100 ms at 16 kHz


def speech16k(name: str) -> np.ndarray:
    with wave.open(str(SPEECH / f"{name}.wav")) as w:
        x = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768
    return soxr.resample(x, 24000, 16000).astype(np.float32)


def chunks(x: np.ndarray) -> list[np.ndarray]:
    x = np.pad(x, (0, -x.size % N))
    return [x[i : i + N] for i in range(0, x.size, N)]


def quiet(ms: int) -> np.ndarray:
    return np.zeros(16 * ms, np.float32)


def words(text: str) -> list[str]:
    return "".join(c if c.isalnum() or c == " " else " " for c in text.lower()).split()


class Driver:
    """Feeds one session the way stage0 does: one chunk per step, one result per chunk."""

    def __init__(self, th: CascadeThinker, sid: str, mode: TurnMode = TurnMode.SERVER_VAD) -> None:
        self.th, self.sid, self.seq = th, sid, 0
        th.open_session(sid, SessionConfig(turn_mode=mode))

    def step(self, kind: ChunkKind, pcm: np.ndarray | None = None, response_id: str = "") -> ThinkerOutput:
        pcm = np.zeros(N, np.float32) if pcm is None else pcm
        x = ThinkerInput(self.sid, self.seq, kind, pcm, kind in (ChunkKind.UTTERANCE, ChunkKind.UTTERANCE_END))
        x.response_id = response_id
        self.seq += 1
        [out] = self.th.step([x])
        return out

    def utterance(self, x: np.ndarray) -> ThinkerOutput:
        cs = chunks(x)
        for c in cs[:-1]:
            assert self.step(ChunkKind.UTTERANCE, c).action == Action.LISTEN
        return self.step(ChunkKind.UTTERANCE_END, cs[-1])

    def live(self, x: np.ndarray) -> list[ThinkerOutput]:
        return [self.step(ChunkKind.LIVE, c) for c in chunks(x)]


@pytest.fixture(scope="module")
def thinker() -> CascadeThinker:
    th = CascadeThinker(CascadeOptions(policy="echo"))
    th.load()
    th.warm_up()
    return th


def test_turn_is_transcribed_then_answered_once_per_response(thinker: CascadeThinker) -> None:
    d = Driver(thinker, "s-turn")
    out = d.utterance(speech16k("hello"))
    assert out.action == Action.LISTEN and words(out.input_transcript or "") == words("Hello, how are you today?")
    thinker.set_context("s-turn", (HistoryEntry("user", ""),), "")  # the host's context lags the ASR
    speak = d.step(ChunkKind.CONTINUATION, response_id="resp_1")
    assert speak.action == Action.SPEAK and speak.end_of_turn
    assert words(speak.text) == words("You said: Hello, how are you today?")
    # Units of the same response still in flight: listen, never a second answer.
    for _ in range(3):
        again = d.step(ChunkKind.CONTINUATION, response_id="resp_1")
        assert again.action == Action.LISTEN and not again.end_of_turn
    # A new response without a new user turn answers from the history (the client added text).
    thinker.set_context("s-turn", (HistoryEntry("user", "Tell me a joke."),), "")
    assert d.step(ChunkKind.CONTINUATION, response_id="resp_2").text == "You said: Tell me a joke."
    thinker.close_session("s-turn")


def test_a_turn_without_words_gets_the_empty_reply_not_an_older_turn(thinker: CascadeThinker) -> None:
    d = Driver(thinker, "s-empty")
    thinker.set_context("s-empty", (HistoryEntry("user", "Earlier words."), HistoryEntry("user", "")), "")
    assert d.utterance(quiet(600)).input_transcript == ""
    out = d.step(ChunkKind.CONTINUATION, response_id="resp_1")
    assert out.action == Action.SPEAK and out.text == "Sorry, I did not catch that." and out.end_of_turn
    thinker.close_session("s-empty")


def test_a_long_turn_is_transcribed_in_bounded_blocks(thinker: CascadeThinker) -> None:
    opts = CascadeOptions(policy="echo", max_utterance_ms=2000)
    th = CascadeThinker(opts)
    th.asr = thinker.asr  # the loaded model
    d = Driver(th, "s-long")
    x = np.concatenate([speech16k("weather"), quiet(300), speech16k("hello")])
    cs = chunks(x)
    costs = []
    for c in cs[:-1]:
        t0 = time.perf_counter()
        d.step(ChunkKind.UTTERANCE, c)
        costs.append(time.perf_counter() - t0)
    out = d.step(ChunkKind.UTTERANCE_END, cs[-1])
    assert sum(c > 0.05 for c in costs) >= 1  # a block was transcribed before the end of the turn
    got = words(out.input_transcript or "")
    assert got[:3] == ["what", "is", "the"] and got[-2:] == ["you", "today"]


def test_duplex_endpointing_answers_and_yields_when_talked_over(thinker: CascadeThinker) -> None:
    d = Driver(thinker, "s-dx", TurnMode.DUPLEX)
    outs = d.live(np.concatenate([quiet(500), speech16k("hello"), quiet(900)]))
    assert all(o.action == Action.LISTEN for o in outs[:3])  # force_listen_count
    speaks = [o for o in outs if o.action == Action.SPEAK]
    assert len(speaks) == 1
    [sp] = speaks
    assert words(sp.input_transcript or "") == words("Hello, how are you today?")
    assert words(sp.text) == words("You said: Hello, how are you today?") and sp.end_of_turn
    # The reply plays now (by estimate): silence is a listen, no new turn.
    assert all(o.action == Action.LISTEN and not o.interrupt for o in d.live(quiet(500)))
    # The user talks over it: the engine yields once, after about interrupt_ms of voiced speech.
    outs = d.live(speech16k("weather"))
    yields = [i for i, o in enumerate(outs) if o.interrupt]
    assert len(yields) == 1
    assert 5 <= yields[0] <= 14, yields  # 600 ms of voice plus the start confirmation, in 100 ms chunks
    # ...and the interrupting speech is the next turn, answered when it ends.
    outs = d.live(quiet(900))
    [sp2] = [o for o in outs if o.action == Action.SPEAK]
    assert words(sp2.input_transcript or "") == words("What is the weather like in Paris?")
    thinker.close_session("s-dx")


def test_duplex_backchannel_over_the_reply_neither_interrupts_nor_becomes_a_turn(thinker: CascadeThinker) -> None:
    d = Driver(thinker, "s-bc", TurnMode.DUPLEX)
    outs = d.live(np.concatenate([quiet(500), speech16k("weather"), quiet(900)]))
    assert sum(o.action == Action.SPEAK for o in outs) == 1
    hello = speech16k("hello")[: 16 * 450]  # "Hello", a short acknowledgement
    outs = d.live(np.concatenate([hello, quiet(1500)]))
    assert not any(o.interrupt for o in outs)
    assert not any(o.action == Action.SPEAK or o.input_transcript for o in outs)
    thinker.close_session("s-bc")


# ---------------------------------------------------------------------- openai-chat
@pytest.fixture()
def chat() -> Iterator[tuple[CascadeThinker, ChatScript]]:
    script = ChatScript()
    srv = chat_server(script)
    opts = CascadeOptions(policy="openai-chat", openai_url=f"http://127.0.0.1:{srv.server_address[1]}/v1")
    yield CascadeThinker(opts), script  # no model needed: turns come as text history
    srv.shutdown()


def wait_until(pred: object, within_s: float = 5.0) -> None:
    deadline = time.monotonic() + within_s
    while not pred() and time.monotonic() < deadline:  # type: ignore[operator]
        time.sleep(0.01)


def test_chat_reply_is_spoken_sentence_by_sentence_without_blocking(chat: tuple[CascadeThinker, ChatScript]) -> None:
    th, script = chat
    script.say((1.0, "Sure thing. "), (0.6, "Here is more."))
    d = Driver(th, "s-chat")
    th.set_context("s-chat", (HistoryEntry("user", "Hi."), HistoryEntry("assistant", "Hello!")), "Be brief.")
    th._s["s-chat"].transcript = "What now?"  # the newest ASR result, not yet in the history
    t0 = time.perf_counter()
    first = d.step(ChunkKind.CONTINUATION, response_id="r1")
    assert first.action == Action.LISTEN and not first.end_of_turn  # still thinking: nothing to say yet
    assert time.perf_counter() - t0 < 0.5  # the step never waits on the network (the reply takes 1 s)
    outs: list[ThinkerOutput] = []
    deadline = time.monotonic() + 5
    while not any(o.end_of_turn for o in outs) and time.monotonic() < deadline:
        outs.append(d.step(ChunkKind.CONTINUATION, response_id="r1"))
        time.sleep(0.05)
    speaks = [o for o in outs if o.action == Action.SPEAK]
    assert [o.text for o in speaks] == ["Sure thing.", "Here is more."]
    assert [o.end_of_turn for o in speaks] == [False, True]
    assert script.requests[0]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi."},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "What now?"},
    ]


def test_chat_failure_fails_only_its_session_and_loses_nothing_of_the_others(
    chat: tuple[CascadeThinker, ChatScript],
) -> None:
    th, script = chat
    a, b = Driver(th, "a"), Driver(th, "b")
    th.set_context("a", (HistoryEntry("user", "A?"),), "")
    th.set_context("b", (HistoryEntry("user", "B?"),), "")
    script.say(status=500)
    assert a.step(ChunkKind.CONTINUATION, response_id="ra").action == Action.LISTEN
    wait_until(lambda: th._s["a"].reply.stream.finished)
    script.say((0.2, "B answer."))
    assert b.step(ChunkKind.CONTINUATION, response_id="rb").action == Action.LISTEN  # B is still thinking
    wait_until(lambda: th._s["b"].reply.stream.finished)
    xa = ThinkerInput("a", 10, ChunkKind.CONTINUATION, np.zeros(N, np.float32), response_id="ra")
    xb = ThinkerInput("b", 10, ChunkKind.CONTINUATION, np.zeros(N, np.float32), response_id="rb")
    with pytest.raises(EngineError) as exc:
        th.step([xa, xb])
    assert exc.value.session_id == "a" and exc.value.code == "reply_failed" and "HTTP 500" in str(exc.value)
    # stage0 re-steps the rest of the batch: B's sentence was not consumed by the failed step.
    [ob] = th.step([xb])
    assert ob.action == Action.SPEAK and ob.text == "B answer." and ob.end_of_turn
    # A is reported once; its later units listen, and the host's epoch advance forgets the reply.
    assert th.step([xa])[0].action == Action.LISTEN
    th.discard_pending("a")
    assert th.step([xa])[0].action == Action.LISTEN  # a unit of the cancelled response
    script.say((0.0, "A again."))
    xa2 = ThinkerInput("a", 11, ChunkKind.CONTINUATION, np.zeros(N, np.float32), response_id="ra2")
    wait_until(lambda: th.step([xa2])[0].text == "A again.")
    assert len(script.requests) == 3


def test_cancel_stops_the_chat_stream(chat: tuple[CascadeThinker, ChatScript]) -> None:
    th, script = chat
    script.say((0.0, "One. "), (1.0, "Two. "), (1.0, "Three."))
    d = Driver(th, "s-cancel")
    th.set_context("s-cancel", (HistoryEntry("user", "Count."),), "")
    out = d.step(ChunkKind.CONTINUATION, response_id="r1")
    wait_until(lambda: script.sent_at and script.sent_at[0])
    th.discard_pending("s-cancel")  # barge-in / response.cancel
    assert script.disconnected.wait(3.0)
    assert d.step(ChunkKind.CONTINUATION, response_id="r1").action == Action.LISTEN
    assert out.action in (Action.LISTEN, Action.SPEAK)
