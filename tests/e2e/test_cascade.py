"""The cascade engine end to end: real speech in over ``/v1/realtime``, real speech out.

The server runs for real (supervisor + four processes) with the cascade engine: Silero
VAD in the host, Whisper tiny.en in stage0, Piper in stage1. Questions are checked-in
Piper recordings streamed like a microphone (20 ms frames, real-time pace). The reply
audio is checked to be speech by transcribing it again with Whisper in the test
(round trip), and compared with the transcript the server sent.

The openai-chat policy runs against a stand-in for vLLM: a small local HTTP server that
speaks the chat completions streaming format (SSE), scripted per request.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import socket
import time
import wave
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soxr
import websockets

from tests.chat_completions_server import ChatScript, chat_server
from tests.harness import EventLog, ServerProcess, pcm16, silence

pytest.importorskip("faster_whisper")
pytest.importorskip("piper")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

SPEECH = Path(__file__).resolve().parent.parent / "fixtures" / "speech"


def load_wav(name: str) -> np.ndarray:
    with wave.open(str(SPEECH / f"{name}.wav")) as w:
        assert w.getframerate() == 24000 and w.getnchannels() == 1
        return np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768


def words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split()


def word_errors(ref: list[str], hyp: list[str]) -> int:
    """Levenshtein distance over words."""
    d = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, d[0] = d[0], i
        for j, h in enumerate(hyp, 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (r != h))
    return d[len(hyp)]


# ---------------------------------------------------------------------- realtime client
class RealtimeClient(EventLog):
    """Raw-websocket GA Realtime client that records every event with its arrival time."""

    def __init__(self, ws: Any) -> None:
        super().__init__()
        self.ws = ws
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def connect(cls, server: ServerProcess, query: str = "") -> RealtimeClient:
        ws = await websockets.connect(f"ws://{server.base}/v1/realtime?model=cascade{query}", max_size=None)
        c = cls(ws)
        await c.wait_for("session.created")
        return c

    async def _read(self) -> None:
        try:
            async for frame in self.ws:
                e = json.loads(frame)
                e["_t"] = time.monotonic()
                await self.add(e)
        except websockets.ConnectionClosed:
            pass
        finally:
            await self.mark_closed()

    async def send(self, event: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(event))

    async def append(self, x: np.ndarray) -> None:
        await self.send({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm16(x)).decode()})

    async def stream(self, x: np.ndarray, frame_ms: int = 20) -> None:
        """Like a microphone: ``frame_ms`` frames on a real-time schedule (no drift)."""
        n = 24000 * frame_ms // 1000
        t0 = time.monotonic()
        for i in range(0, len(x), n):
            await self.append(x[i : i + n])
            delay = t0 + (i + n) / 24000 - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)

    async def wait_for(
        self, what: str | Callable[[dict[str, Any]], bool], within_s: float = 20.0, start: int = 0
    ) -> dict[str, Any]:
        return await super().wait_for(what, within_s, start)  # models need longer than tones

    def audio(self, response_id: str) -> np.ndarray:
        chunks = [
            np.frombuffer(base64.b64decode(e["delta"]), "<i2")
            for e in self.of("response.output_audio.delta")
            if e["response_id"] == response_id
        ]
        return (np.concatenate(chunks) if chunks else np.zeros(0, np.int16)).astype(np.float32) / 32768

    def transcript_deltas(self, response_id: str) -> str:
        return "".join(
            e["delta"] for e in self.of("response.output_audio_transcript.delta") if e["response_id"] == response_id
        )

    async def close(self) -> None:
        await self.ws.close()
        self._reader.cancel()


async def transcribing_session(server: ServerProcess, query: str = "", **session: Any) -> RealtimeClient:
    c = await RealtimeClient.connect(server, query)
    audio = {"input": {"transcription": {"model": "whisper-1"}}}
    await c.send({"type": "session.update", "session": {"type": "realtime", "audio": audio, **session}})
    await c.wait_for("session.updated")
    return c


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cascade_server() -> Iterator[ServerProcess]:
    server = ServerProcess(
        engine="cascade",
        sections={
            "host": {"vad": "silero"},
            "engines.cascade": {"policy": "echo"},
            # Generate close to real time so a reply is still in progress when the user talks over it.
            "stage1": {"max_lead_ms": 300},
            "session.overlap": {"short_ack_ms": 300},
        },
    )
    with server:
        yield server


@pytest.fixture(scope="module")
def asr() -> Any:
    from duplexd.actors.engines.cascade.asr import WhisperASR

    model = WhisperASR()
    model.load()
    return model


def reply_is_speech(asr: Any, audio24k: np.ndarray, transcript: str) -> str:
    """Asserts the reply audio is loud enough and says ``transcript``; returns what ASR heard."""
    assert audio24k.size > 24000 // 2, "less than 0.5 s of reply audio"
    rms = float(np.sqrt(np.mean(np.square(audio24k, dtype=np.float64))))
    assert rms > 0.02, f"reply audio is near silent (rms {rms:.4f})"
    heard = asr.transcribe(soxr.resample(audio24k, 24000, 16000).astype(np.float32)).text
    ref, hyp = words(transcript), words(heard)
    assert word_errors(ref, hyp) <= max(1, len(ref) // 8), f"reply says {heard!r}, transcript is {transcript!r}"
    return heard


# ---------------------------------------------------------------------- echo over server VAD
async def test_spoken_question_is_transcribed_and_answered_in_speech(cascade_server: ServerProcess, asr: Any) -> None:
    c = await transcribing_session(cascade_server)
    question = load_wav("weather")
    await c.stream(np.concatenate([silence(300), question, silence(1200)]))
    stopped = await c.wait_for("input_audio_buffer.speech_stopped")
    done = await c.wait_for("response.done")
    assert done["response"]["status"] == "completed", done

    user = await c.wait_for("conversation.item.input_audio_transcription.completed")
    assert words(user["transcript"]) == words("What is the weather like in Paris?")
    assert user["item_id"] == stopped["item_id"]

    rid = done["response"]["id"]
    [item] = done["response"]["output"]
    transcript = item["content"][0]["transcript"]
    assert words(transcript) == words("You said: What is the weather like in Paris?")
    assert c.transcript_deltas(rid).strip() == transcript  # the per-chunk words add up to the transcript

    audio = c.audio(rid)
    heard = reply_is_speech(asr, audio, transcript)
    first_audio = next(e for e in c.of("response.output_audio.delta") if e["response_id"] == rid)
    latency = first_audio["_t"] - stopped["_t"]
    print(f"\nspeech_stopped -> first reply audio {latency * 1000:.0f} ms; reply ASR: {heard!r}")
    assert latency < 5.0
    # Audio arrives before the response is done, none after.
    last_delta = max(i for i, e in enumerate(c.events) if e["type"] == "response.output_audio.delta")
    assert last_delta < c.events.index(done)
    await c.close()


async def test_user_talking_over_the_reply_cancels_it_and_becomes_the_next_turn(
    cascade_server: ServerProcess, asr: Any
) -> None:
    c = await transcribing_session(cascade_server)
    await c.stream(np.concatenate([load_wav("weather"), silence(900)]))
    created = await c.wait_for("response.created", within_s=10)
    rid = created["response"]["id"]
    await c.wait_for(lambda e: e["type"] == "response.output_audio.delta" and e["response_id"] == rid)
    # The user starts talking while the reply plays, then waits for the answer.
    start = len(c.events)
    await c.stream(np.concatenate([load_wav("hello"), silence(1000)]))
    done1 = await c.wait_for(lambda e: e["type"] == "response.done" and e["response"]["id"] == rid)
    assert done1["response"]["status"] == "cancelled"
    assert done1["response"]["status_details"]["reason"] == "turn_detected"
    i_done = c.events.index(done1)
    stale = [e for e in c.events[i_done:] if e["type"] == "response.output_audio.delta" and e["response_id"] == rid]
    assert stale == [], "audio of the cancelled response reached the client after response.done"

    # The interrupting speech is the next user turn, heard in full and answered.
    done2 = await c.wait_for(
        lambda e: e["type"] == "response.done" and e["response"]["id"] != rid, within_s=20, start=start
    )
    assert done2["response"]["status"] == "completed"
    transcripts = [e["transcript"] for e in c.of("conversation.item.input_audio_transcription.completed")]
    assert words(transcripts[-1]) == words("Hello, how are you today?")
    rid2 = done2["response"]["id"]
    said = done2["response"]["output"][0]["content"][0]["transcript"]
    assert words(said) == words("You said: Hello, how are you today?")
    reply_is_speech(asr, c.audio(rid2), said)
    await c.close()


async def test_duplex_mode_the_engine_answers_and_yields_when_talked_over(cascade_server: ServerProcess) -> None:
    c = await RealtimeClient.connect(cascade_server, "&duplex=1")
    await c.stream(np.concatenate([silence(400), load_wav("hello"), silence(1000)]))
    created = await c.wait_for("response.created", within_s=10)
    rid = created["response"]["id"]
    # The user's turn entered the conversation with the engine's transcript.
    users = [
        e["item"]
        for e in c.of("conversation.item.added")
        if e["item"]["role"] == "user" and e["item"]["content"][0].get("transcript")
    ]
    assert words(users[-1]["content"][0]["transcript"]) == words("Hello, how are you today?")
    await c.wait_for(lambda e: e["type"] == "response.output_audio.delta" and e["response_id"] == rid)
    # Talked over, the engine yields: the reply is cancelled and the new speech is answered.
    start = len(c.events)
    await c.stream(np.concatenate([load_wav("weather"), silence(1200)]))
    done1 = await c.wait_for(lambda e: e["type"] == "response.done" and e["response"]["id"] == rid)
    assert done1["response"]["status"] == "cancelled", done1["response"]
    i_done = c.events.index(done1)
    assert not [e for e in c.events[i_done:] if e.get("response_id") == rid and e["type"].endswith("audio.delta")]
    done2 = await c.wait_for(
        lambda e: e["type"] == "response.done" and e["response"]["id"] != rid, within_s=15, start=start
    )
    assert done2["response"]["status"] == "completed"
    said = done2["response"]["output"][0]["content"][0]["transcript"]
    assert words(said) == words("You said: What is the weather like in Paris?")
    assert c.audio(done2["response"]["id"]).size > 24000
    await c.close()


async def test_silent_commit_gets_a_clear_spoken_reply_and_the_session_keeps_working(
    cascade_server: ServerProcess,
) -> None:
    c = await transcribing_session(cascade_server, audio={"input": {"turn_detection": None}})
    await c.append(silence(500))
    await c.send({"type": "input_audio_buffer.commit"})
    await c.send({"type": "response.create"})
    done = await c.wait_for("response.done")
    assert done["response"]["status"] == "completed"
    assert done["response"]["output"][0]["content"][0]["transcript"] == "Sorry, I did not catch that."
    # Bad client input: an error event, and the next turn is still answered.
    await c.send({"type": "input_audio_buffer.append", "audio": "%%% not base64"})
    await c.wait_for("error")
    start = len(c.events)
    await c.append(load_wav("hello"))
    await c.send({"type": "input_audio_buffer.commit"})
    await c.send({"type": "response.create"})
    done = await c.wait_for("response.done", start=start)
    assert words(done["response"]["output"][0]["content"][0]["transcript"]) == words(
        "You said: Hello, how are you today?"
    )
    await c.close()


# ---------------------------------------------------------------------- openai-chat against a stand-in for vLLM
@pytest.fixture(scope="module")
def chat_setup() -> Iterator[tuple[ServerProcess, ChatScript]]:
    script = ChatScript()
    stub = chat_server(script)
    server = ServerProcess(
        engine="cascade",
        sections={
            "host": {"vad": "silero"},
            "engines.cascade": {
                "policy": "openai-chat",
                "openai_url": f"http://127.0.0.1:{stub.server_address[1]}/v1",
                "openai_model": "stand-in",
                "openai_api_key": "sk-test",
            },
        },
    )
    with server:
        yield server, script
    stub.shutdown()


async def _manual_turn(c: RealtimeClient, name: str) -> dict[str, Any]:
    start = len(c.events)
    await c.append(load_wav(name))
    await c.send({"type": "input_audio_buffer.commit"})
    await c.send({"type": "response.create"})
    return await c.wait_for("response.done", within_s=30, start=start)


async def test_openai_chat_policy_streams_sentences_to_the_voice_before_the_reply_is_complete(
    chat_setup: tuple[ServerProcess, ChatScript], asr: Any
) -> None:
    server, script = chat_setup
    c = await transcribing_session(
        server, audio={"input": {"turn_detection": None}}, instructions="You are a weather bot."
    )
    script.say((0.0, "It is sunny in Paris today. "), (2.0, "Expect twenty degrees this afternoon."))
    done = await _manual_turn(c, "weather")
    assert done["response"]["status"] == "completed", done
    rid = done["response"]["id"]
    said = done["response"]["output"][0]["content"][0]["transcript"]
    assert said == "It is sunny in Paris today. Expect twenty degrees this afternoon."
    reply_is_speech(asr, c.audio(rid), said)

    # The first sentence was spoken while the stand-in was still holding back the second.
    first_audio = next(e for e in c.of("response.output_audio.delta") if e["response_id"] == rid)
    assert first_audio["_t"] < script.sent_at[-1][1] - 0.5

    req, hdr = script.requests[-1], script.headers[-1]
    assert req["model"] == "stand-in" and req["stream"] is True
    assert hdr["Authorization"] == "Bearer sk-test"
    assert req["messages"][0] == {"role": "system", "content": "You are a weather bot."}
    assert req["messages"][-1]["role"] == "user"
    assert words(req["messages"][-1]["content"]) == words("What is the weather like in Paris?")

    # The endpoint fails: an error event naming the failure, the response fails, the session lives on.
    script.say(status=503)
    start = len(c.events)
    failed = await _manual_turn(c, "hello")
    assert failed["response"]["status"] == "failed"
    err = next(e for e in c.events[start:] if e["type"] == "error")
    assert err["error"]["code"] == "reply_failed" and "503" in err["error"]["message"]

    # Next turn works, and the model sees the conversation so far (what was actually said).
    script.say((0.0, "I am fine, thanks."))
    ok = await _manual_turn(c, "hello")
    assert ok["response"]["status"] == "completed"
    assert ok["response"]["output"][0]["content"][0]["transcript"] == "I am fine, thanks."
    msgs = script.requests[-1]["messages"]
    roles = [m["role"] for m in msgs]
    assert roles[:3] == ["system", "user", "assistant"] and roles[-1] == "user"
    assert msgs[2]["content"] == "It is sunny in Paris today. Expect twenty degrees this afternoon."
    assert words(msgs[-1]["content"]) == words("Hello, how are you today?")
    await c.close()


# ---------------------------------------------------------------------- saying how it answers (issue 11, item 9)
def test_echo_mode_is_announced_in_health_and_the_startup_log(cascade_server: ServerProcess) -> None:
    code, body = cascade_server.health()
    assert code == 200 and body["status"] == "ok"
    assert body["engine"]["notice"] == "echo mode: I repeat what you say"
    assert "echo mode: I repeat what you say" in cascade_server.logs()


def test_a_reachable_chat_endpoint_is_reported_in_health(chat_setup: tuple[ServerProcess, ChatScript]) -> None:
    server, script = chat_setup
    code, body = server.health()
    assert code == 200 and body["status"] == "ok" and body["warnings"] == []
    (backend,) = body["engine"]["backends"]
    assert backend["name"] == "chat endpoint" and backend["ok"] is True and "stand-in" in backend["detail"]
    assert body["engine"]["notice"] == ""
    assert script.model_queries and script.model_queries[0]["Authorization"] == "Bearer sk-test"
    assert "sk-test" not in json.dumps(body) and "sk-test" not in server.logs()


def test_an_unreachable_chat_endpoint_makes_health_degraded_at_start_up() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the block ends
    url = f"http://127.0.0.1:{port}/v1"
    server = ServerProcess(
        engine="cascade",
        sections={"engines.cascade": {"policy": "openai-chat", "openai_url": url, "warm_up": False}},
    )
    with server:
        code, body = server.health()
        assert code == 200 and body["status"] == "degraded"
        (backend,) = body["engine"]["backends"]
        assert backend["ok"] is False and backend["url"] == url and "unreachable" in backend["detail"]
        assert body["warnings"] and url in body["warnings"][0] and "refused" in body["warnings"][0].lower()
        assert "chat endpoint NOT reachable" in server.logs()


# ---------------------------------------------------------------------- the local policy (default): a real model
STORYTELLER = "You are a storyteller. Tell long, detailed stories of many paragraphs."
COMMON_WORDS = frozenset(
    ["the", "a", "an", "is", "are", "it", "in", "of", "and", "to", "i", "you", "it's", "i'm", "on", "for", "with"]
)


@pytest.fixture(scope="module")
def local_server() -> Iterator[ServerProcess]:
    server = ServerProcess(
        engine="cascade",
        ready_timeout_s=300,  # the first start on a machine converts the model (one progress line)
        sections={
            "host": {"vad": "silero"},
            "engines.cascade": {"policy": "local", "local_max_tokens": 300},
            "stage1": {"max_lead_ms": 300},
            "session.overlap": {"short_ack_ms": 300},
        },
    )
    with server:
        yield server


def local_replies(server: ServerProcess) -> list[dict[str, Any]]:
    """stage0's log line for each local reply the model finished (JSON logs)."""
    out = []
    for line in server.logs().splitlines():
        if '"cascade: local reply finished"' in line:
            out.append(json.loads(line[line.index("{") :]))
    return out


def wait_for_local_reply(server: ServerProcess, index: int, within_s: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + within_s
    while (got := local_replies(server)[index:]) == [] and time.monotonic() < deadline:
        time.sleep(0.05)  # the log file is the event: stage0 writes it when generation ends
    assert got, f"no local reply finished within {within_s} s"
    return got[0]


async def test_local_policy_answers_a_spoken_question_in_english_not_an_echo(
    local_server: ServerProcess, asr: Any
) -> None:
    c = await transcribing_session(local_server)
    await c.stream(np.concatenate([silence(300), load_wav("weather"), silence(1200)]))
    stopped = await c.wait_for("input_audio_buffer.speech_stopped")
    done = await c.wait_for("response.done", within_s=60)
    assert done["response"]["status"] == "completed", done
    user = await c.wait_for("conversation.item.input_audio_transcription.completed")
    asked = words(user["transcript"])
    assert asked == words("What is the weather like in Paris?")
    said = done["response"]["output"][0]["content"][0]["transcript"]
    got = words(said)
    assert len(got) >= 4 and not said.lower().startswith("you said") and got[: len(asked)] != asked, said
    assert sum(w.isascii() for w in got) >= 0.9 * len(got) and COMMON_WORDS & set(got), said
    rid = done["response"]["id"]
    heard = reply_is_speech(asr, c.audio(rid), said)
    first_audio = next(e for e in c.of("response.output_audio.delta") if e["response_id"] == rid)
    print(f"\nlocal: speech_stopped -> first reply audio {(first_audio['_t'] - stopped['_t']) * 1000:.0f} ms")
    print(f"local reply: {said!r}; ASR of its audio: {heard!r}")
    [line] = local_replies(local_server)[-1:]
    assert line["reason"] == "end" and line["tokens"] > 3
    await c.close()


async def test_barge_in_stops_local_generation_between_tokens(local_server: ServerProcess) -> None:
    before = len(local_replies(local_server))
    # Asked for a long story, the model would generate for several seconds (300 tokens).
    c = await transcribing_session(local_server, instructions=STORYTELLER)
    await c.stream(np.concatenate([load_wav("weather"), silence(900)]))
    created = await c.wait_for("response.created", within_s=15)
    rid = created["response"]["id"]
    await c.wait_for(lambda e: e["type"] == "response.output_audio.delta" and e["response_id"] == rid)
    await c.stream(np.concatenate([load_wav("hello"), silence(300)]))  # talks over it
    done = await c.wait_for(lambda e: e["type"] == "response.done" and e["response"]["id"] == rid)
    assert done["response"]["status"] == "cancelled"
    i_done = c.events.index(done)
    assert not [e for e in c.events[i_done:] if e.get("response_id") == rid and e["type"].endswith("audio.delta")]
    # The generation itself stopped: it ended because of the cancel, long before its cap,
    # and at most the one token already being computed came after the cancel.
    line = await asyncio.to_thread(wait_for_local_reply, local_server, before)
    assert line["reason"] == "cancelled", line
    assert 0 < line["tokens"] < 300 and line["tokens_after_cancel"] <= 1, line
    await c.close()
