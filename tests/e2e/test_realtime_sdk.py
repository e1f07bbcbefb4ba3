"""``/v1/realtime`` driven by the official ``openai`` SDK against the real server processes.

The SDK does not validate server events (a missing field reads as None), so every event
received here is checked against :data:`SCHEMA` (required fields and their types, from
the OpenAI Realtime API reference, docs/realtime-conformance.md) and, where the SDK's own
pydantic models know the event type, validated by them too. Output audio of the scripted
engine carries per-chunk markers (``decode_chunk``): the tests prove which response every
audio byte belongs to.
"""

from __future__ import annotations

import asyncio
import audioop
import base64
import contextlib
import json
import time
import typing
import wave
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import websockets
from openai import AsyncOpenAI
from openai.types.beta.realtime import RealtimeServerEvent as BetaServerEvent
from openai.types.realtime import RealtimeServerEvent as GAServerEvent
from pydantic import BaseModel, ValidationError

from duplexd.actors.engines.scripted import decode_chunk, response_tag
from tests.harness import EventLog, ServerProcess, frames, pcm16, silence, tone

pytestmark = pytest.mark.timeout(90)

API_KEY = "sk-duplexd-e2e-list-key"
FILE_KEY = "sk-duplexd-e2e-file-key"
SPEECH = Path(__file__).resolve().parent.parent / "fixtures" / "speech"
REPLY_1 = "This is scripted reply number 1, spoken as a steady tone."
REPLY_MS = 2400  # scripted reply length: 60 marked chunks of 40 ms
CHUNKS = REPLY_MS // 40

# ---------------------------------------------------------------------- the schema table
# Required fields of every server event, from the Realtime API reference. A tuple of types allows
# each; None in it allows null. Every event carries a string event_id (checked apart).
STR, INT, OBJ, ARR = str, int, dict, list
_WHERE = {"response_id": STR, "item_id": STR, "output_index": INT, "content_index": INT}
_ITEM_EVENT = {"item": OBJ, "previous_item_id": (STR, None)}
SCHEMA: dict[str, dict[str, Any]] = {
    "error": {"error": OBJ},
    "session.created": {"session": OBJ},
    "session.updated": {"session": OBJ},
    "conversation.created": {"conversation": OBJ},
    "input_audio_buffer.speech_started": {"audio_start_ms": INT, "item_id": STR},
    "input_audio_buffer.speech_stopped": {"audio_end_ms": INT, "item_id": STR},
    "input_audio_buffer.committed": {"item_id": STR, "previous_item_id": (STR, None)},
    "input_audio_buffer.cleared": {},
    "input_audio_buffer.timeout_triggered": {"item_id": STR, "audio_start_ms": INT, "audio_end_ms": INT},
    "output_audio_buffer.cleared": {"response_id": (STR, None)},
    "conversation.item.added": _ITEM_EVENT,
    "conversation.item.done": _ITEM_EVENT,
    "conversation.item.created": _ITEM_EVENT,
    "conversation.item.truncated": {"item_id": STR, "content_index": INT, "audio_end_ms": INT},
    "conversation.item.deleted": {"item_id": STR},
    "conversation.item.retrieved": {"item": OBJ},
    "conversation.item.input_audio_transcription.completed": {"item_id": STR, "content_index": INT, "transcript": STR},
    "rate_limits.updated": {"rate_limits": ARR},
    "response.created": {"response": OBJ},
    "response.done": {"response": OBJ},
    "response.output_item.added": {"response_id": STR, "output_index": INT, "item": OBJ},
    "response.output_item.done": {"response_id": STR, "output_index": INT, "item": OBJ},
    "response.content_part.added": {**_WHERE, "part": OBJ},
    "response.content_part.done": {**_WHERE, "part": OBJ},
    "response.output_audio.delta": {**_WHERE, "delta": STR},
    "response.output_audio.done": _WHERE,
    "response.output_audio_transcript.delta": {**_WHERE, "delta": STR},
    "response.output_audio_transcript.done": {**_WHERE, "transcript": STR},
    "response.output_text.delta": {**_WHERE, "delta": STR},
    "response.output_text.done": {**_WHERE, "text": STR},
    "response.audio.delta": {**_WHERE, "delta": STR},
    "response.audio.done": _WHERE,
    "response.audio_transcript.delta": {**_WHERE, "delta": STR},
    "response.audio_transcript.done": {**_WHERE, "transcript": STR},
    "response.text.delta": {**_WHERE, "delta": STR},
    "response.text.done": {**_WHERE, "text": STR},
}
NESTED: dict[str, dict[str, Any]] = {
    "error": {"type": STR, "code": STR, "message": STR, "param": (STR, None), "event_id": (STR, None)},
    "response": {
        "id": STR,
        "object": STR,
        "status": STR,
        "status_details": (OBJ, None),
        "output": ARR,
        "conversation_id": (STR, None),
        "usage": (OBJ, None),
        "max_output_tokens": (INT, STR),
    },
    "item": {"id": STR, "object": STR, "type": STR, "status": STR, "role": STR, "content": ARR},
    "part": {"type": STR},
    "conversation": {"id": STR, "object": STR},
}
GA_SESSION = {
    "type": STR,
    "id": STR,
    "object": STR,
    "model": STR,
    "output_modalities": ARR,
    "instructions": STR,
    "audio": OBJ,
    "tools": ARR,
    "tool_choice": STR,
    "max_output_tokens": (INT, STR),
}
BETA_SESSION = {
    "id": STR,
    "object": STR,
    "model": STR,
    "modalities": ARR,
    "instructions": STR,
    "voice": (STR, None),
    "input_audio_format": STR,
    "output_audio_format": STR,
    "turn_detection": (OBJ, None),
    "tools": ARR,
    "tool_choice": STR,
    "temperature": (float, int),
    "max_response_output_tokens": (INT, STR),
}
GA_ONLY = {
    "conversation.item.added",
    "conversation.item.done",
    "input_audio_buffer.timeout_triggered",
    *(k for k in SCHEMA if k.startswith(("response.output_audio", "response.output_text"))),
}
BETA_ONLY = {"conversation.item.created", *(k for k in SCHEMA if k.startswith(("response.audio", "response.text")))}


def _models_of(union: Any) -> dict[str, type[BaseModel]]:
    """The SDK's pydantic model of each server event type."""
    members = typing.get_args(typing.get_args(union)[0])
    return {typing.get_args(m.model_fields["type"].annotation)[0]: m for m in members}


SDK_MODELS = {False: _models_of(GAServerEvent), True: _models_of(BetaServerEvent)}


def _check_fields(obj: dict[str, Any], spec: dict[str, Any], where: str) -> None:
    for key, want in spec.items():
        assert key in obj, f"{where}: missing required field {key!r} in {obj}"
        allowed = want if isinstance(want, tuple) else (want,)
        value = obj[key]
        ok = any(
            (value is None) if t is None else isinstance(value, t) and not isinstance(value, bool) for t in allowed
        )
        assert ok, f"{where}: field {key!r} = {value!r} is not {allowed}"


def check_event(ev: dict[str, Any], beta: bool, strict: bool = True) -> None:
    """Required fields of one server event (the schema table), then the SDK's models."""
    etype = ev.get("type")
    assert etype in SCHEMA, f"server sent an event outside the schema: {etype!r}"
    assert isinstance(ev.get("event_id"), str) and ev["event_id"], f"{etype}: no event_id"
    assert etype not in (GA_ONLY if beta else BETA_ONLY), f"{etype} is not a {'beta' if beta else 'GA'} event"
    _check_fields(ev, SCHEMA[etype], etype)
    for key, spec in NESTED.items():
        if isinstance(ev.get(key), dict):
            _check_fields(ev[key], spec, f"{etype}.{key}")
    for it in [ev.get("item"), *(ev.get("response", {}).get("output", []) if "response" in ev else [])]:
        if isinstance(it, dict):
            _check_fields(it, NESTED["item"], f"{etype} item")
            for part in it["content"]:
                _check_fields(part, NESTED["part"], f"{etype} item part")
    if etype in ("session.created", "session.updated"):
        _check_fields(ev["session"], BETA_SESSION if beta else GA_SESSION, f"{etype}.session")
        if not beta:
            a = ev["session"]["audio"]
            _check_fields(a["input"], {"format": OBJ, "turn_detection": (OBJ, None)}, "session.audio.input")
            _check_fields(
                a["output"], {"format": OBJ, "voice": (STR, None), "speed": (float, int)}, "session.audio.output"
            )
    model = SDK_MODELS[beta].get(etype)
    if strict and model is not None:
        try:
            model.model_validate(ev)
        except ValidationError as exc:  # pragma: no cover - a failure message
            raise AssertionError(f"{etype} does not validate against the openai SDK model: {exc}") from exc


# ---------------------------------------------------------------------- client side
class Recorder(EventLog):
    """Reads an SDK realtime connection with ``async for event in conn``; keeps each
    event's JSON (the SDK models keep exactly the fields the server sent)."""

    def __init__(self, conn: Any, beta: bool, strict: bool = True) -> None:
        super().__init__()
        self.conn = conn
        self.beta = beta
        self.strict = strict
        self.sdk: list[Any] = []
        self._task = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        try:
            async for event in self.conn:
                raw = (
                    event.model_dump(mode="json", exclude_unset=True, warnings=False)
                    if isinstance(event, BaseModel)
                    else event
                )
                self.sdk.append(event)
                await self.add(raw)
        except websockets.ConnectionClosed:
            pass
        finally:
            await self.mark_closed()

    def check_all(self) -> None:
        for e in self.events:
            check_event(e, self.beta, self.strict)
        ids = [e["event_id"] for e in self.events]
        assert len(ids) == len(set(ids)), "event_id values repeat"

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task


def b64(x: np.ndarray) -> str:
    return base64.b64encode(pcm16(x)).decode()


def audio_of(ev: dict[str, Any]) -> np.ndarray:
    return np.frombuffer(base64.b64decode(ev["delta"]), dtype="<i2")


def speech(name: str) -> np.ndarray:
    with wave.open(str(SPEECH / f"{name}.wav")) as w:
        assert w.getframerate() == 24000 and w.getsampwidth() == 2
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768.0


def client(server: ServerProcess, key: str = API_KEY) -> AsyncOpenAI:
    return AsyncOpenAI(api_key=key, base_url=f"http://{server.base}/v1", websocket_base_url=f"ws://{server.base}/v1")


@contextlib.asynccontextmanager
async def realtime(
    server: ServerProcess, beta: bool = False, key: str = API_KEY, strict: bool = True, **query: str
) -> AsyncIterator[tuple[Any, Recorder]]:
    c = client(server, key)
    extra = {"extra_query": query} if query else {}
    manager = (
        c.beta.realtime.connect(model="gpt-4o-realtime-preview", **extra)
        if beta
        else c.realtime.connect(model="gpt-realtime", **extra)
    )
    async with manager as conn:
        rec = Recorder(conn, beta, strict)
        await rec.wait_for("conversation.created")
        try:
            yield conn, rec
            rec.check_all()
        finally:
            await rec.stop()


async def stream(conn: Any, x: np.ndarray, frame_ms: int = 20, pace: float = 0.0) -> None:
    """Append ``x`` in frames; ``pace`` 1.0 is real time (a live microphone)."""
    t0 = time.monotonic()
    for i, f in enumerate(frames(x, frame_ms)):
        await conn.input_audio_buffer.append(audio=b64(f))
        if pace:
            delay = t0 + (i + 1) * frame_ms / 1000 / pace - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)


async def manual(conn: Any, rec: Recorder, beta: bool = False) -> None:
    n = len(rec.events)
    if beta:
        await conn.session.update(session={"turn_detection": None})
    else:
        await conn.session.update(session={"type": "realtime", "audio": {"input": {"turn_detection": None}}})
    up = await rec.wait_for("session.updated", start=n)
    td = up["session"]["turn_detection"] if beta else up["session"]["audio"]["input"]["turn_detection"]
    assert td is None


async def turn(conn: Any, rec: Recorder, response: dict[str, Any] | None = None) -> tuple[int, dict, dict]:
    """Append 500 ms, commit, response.create; returns (start index, created, done)."""
    start = len(rec.events)
    await stream(conn, tone(500))
    await conn.input_audio_buffer.commit()
    await conn.response.create(**({"response": response} if response else {}))
    created = await rec.wait_for("response.created", start=start)
    done = await rec.wait_for("response.done", start=start)
    return start, created, done


def response_events(rec: Recorder, rid: str) -> list[dict[str, Any]]:
    def mine(e: dict[str, Any]) -> bool:
        return e.get("response_id") == rid or e.get("response", {}).get("id") == rid

    return [e for e in rec.events if mine(e)]


# ---------------------------------------------------------------------- server
@pytest.fixture(scope="module")
def realtime_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Silero server VAD, API keys from a list and a file, scripted engine."""
    keyfile = tmp_path_factory.mktemp("keys") / "keys.txt"
    keyfile.write_text(f"# e2e keys\n{FILE_KEY}\n")
    server = ServerProcess(
        sections={
            "server": {"api_keys": [API_KEY], "api_key_file": str(keyfile)},
            "host": {"vad": "silero"},
            "session.overlap": {"short_ack_ms": 250},
            "engines.scripted": {"reply_ms": REPLY_MS, "out_chunk_ms": 40},
            "stage1": {"max_lead_ms": 400},
        }
    )
    with server:
        yield server


# ---------------------------------------------------------------------- tests
async def test_manual_turn_ga_full_event_sequence(realtime_server: ServerProcess) -> None:
    async with realtime(realtime_server, model="duplexd-test") as (conn, rec):
        created = rec.events[0]
        assert rec.types()[:2] == ["session.created", "conversation.created"]
        sess = created["session"]
        assert sess["type"] == "realtime" and sess["model"] == "duplexd-test"  # ?model= wins
        assert sess["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}
        assert sess["audio"]["input"]["turn_detection"]["type"] == "server_vad"
        # Partial update: only instructions and turn detection change; the rest stays.
        n = len(rec.events)
        await conn.session.update(
            session={"type": "realtime", "instructions": "Be brief.", "audio": {"input": {"turn_detection": None}}}
        )
        up = (await rec.wait_for("session.updated", start=n))["session"]
        assert up["instructions"] == "Be brief." and up["audio"]["input"]["turn_detection"] is None
        assert up["audio"]["output"] == sess["audio"]["output"] and up["output_modalities"] == ["audio"]

        start, created_ev, done = await turn(conn, rec)
        rid = created_ev["response"]["id"]
        assert created_ev["response"]["status"] == "in_progress"
        committed = rec.of("input_audio_buffer.committed", start)[0]
        user_item = committed["item_id"]
        added = rec.of("conversation.item.added", start)[0]
        assert added["item"]["id"] == user_item and added["item"]["role"] == "user"
        assert added["item"]["content"][0]["type"] == "input_audio"
        # The Realtime order around the deltas.
        seq = [
            t
            for t in rec.types(start)
            if t not in ("response.output_audio.delta", "response.output_audio_transcript.delta")
        ]
        assert seq[seq.index("response.created") :] == [
            "response.created",
            "rate_limits.updated",
            "response.output_item.added",
            "conversation.item.added",
            "response.content_part.added",
            "response.output_audio.done",
            "response.output_audio_transcript.done",
            "response.content_part.done",
            "response.output_item.done",
            "conversation.item.done",
            "response.done",
        ]
        # Audio: every chunk of this response, in order, nothing else.
        deltas = rec.of("response.output_audio.delta", start)
        markers = [decode_chunk(audio_of(d)) for d in deltas]
        assert [m[1] for m in markers] == list(range(CHUNKS))
        assert {m[0] for m in markers} == {response_tag(rid)} and {d["response_id"] for d in deltas} == {rid}
        assert sum(len(audio_of(d)) for d in deltas) == REPLY_MS * 24
        text = "".join(d["delta"] for d in rec.of("response.output_audio_transcript.delta", start))
        assert text == REPLY_1
        assert rec.of("response.output_audio_transcript.done", start)[0]["transcript"] == REPLY_1
        resp = done["response"]
        assert resp["id"] == rid and resp["status"] == "completed" and resp["status_details"] is None
        assert resp["object"] == "realtime.response" and resp["output_modalities"] == ["audio"]
        out_item = resp["output"][0]
        assert out_item["role"] == "assistant" and out_item["content"][0] == {
            "type": "output_audio",
            "transcript": REPLY_1,
        }
        assert resp["usage"]["output_token_details"] == {"text_tokens": 11, "audio_tokens": CHUNKS}
        # The SDK's typed view of the same events.
        sdk_done = rec.sdk[rec.events.index(done)]
        assert sdk_done.response.status == "completed" and sdk_done.response.output[0].content[0].transcript == REPLY_1

        # Items: create, retrieve, delete, and a missing item's error echoes the event_id.
        n = len(rec.events)
        await conn.conversation.item.create(
            item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi there"}]}
        )
        added = await rec.wait_for("conversation.item.added", start=n)
        assert added["item"]["content"] == [{"type": "input_text", "text": "Hi there"}]
        assert added["previous_item_id"] == out_item["id"]
        await rec.wait_for("conversation.item.done", start=n)
        await conn.conversation.item.retrieve(item_id=out_item["id"])
        got = await rec.wait_for("conversation.item.retrieved", start=n)
        assert got["item"]["content"][0]["transcript"] == REPLY_1
        await conn.conversation.item.delete(item_id=user_item)
        assert (await rec.wait_for("conversation.item.deleted", start=n))["item_id"] == user_item
        await conn.conversation.item.retrieve(item_id=user_item, event_id="evt_gone")
        err = await rec.wait_for("error", start=n)
        assert err["error"]["code"] == "item_not_found" and err["error"]["event_id"] == "evt_gone"
        # Clearing the input buffer.
        await stream(conn, tone(100))
        await conn.input_audio_buffer.clear()
        await rec.wait_for("input_audio_buffer.cleared", start=n)
        await conn.input_audio_buffer.commit(event_id="evt_empty")
        err = await rec.wait_for(lambda e: e["type"] == "error" and e["error"]["event_id"] == "evt_empty", start=n)
        assert err["error"]["code"] == "input_audio_buffer_commit_empty"


async def test_server_vad_turn_from_real_speech(realtime_server: ServerProcess) -> None:
    async with realtime(realtime_server) as (conn, rec):
        n = len(rec.events)
        await conn.session.update(
            session={
                "type": "realtime",
                "audio": {
                    "input": {
                        "transcription": {"model": "whisper-1"},
                        "turn_detection": {"type": "server_vad", "silence_duration_ms": 400, "prefix_padding_ms": 200},
                    }
                },
            }
        )
        td = (await rec.wait_for("session.updated", start=n))["session"]["audio"]["input"]["turn_detection"]
        assert td["silence_duration_ms"] == 400 and td["prefix_padding_ms"] == 200 and td["threshold"] == 0.5
        hello = speech("hello")
        start = len(rec.events)
        await stream(conn, np.concatenate([silence(300), hello, silence(900)]), pace=1.0)
        started = await rec.wait_for("input_audio_buffer.speech_started", start=start)
        stopped = await rec.wait_for("input_audio_buffer.speech_stopped", start=start)
        committed = await rec.wait_for("input_audio_buffer.committed", start=start)
        assert started["item_id"] == stopped["item_id"] == committed["item_id"]
        # audio_start_ms is where the speech really starts (300 ms of silence, then hello.wav's
        # first word 60 ms in), not moved by the prefix padding; the utterance lasts ~1.3 s.
        assert abs(started["audio_start_ms"] - 360) <= 80
        assert 1300 <= stopped["audio_end_ms"] <= 2200
        done = await rec.wait_for("response.done", start=start)
        assert done["response"]["status"] == "completed"
        transcript = await rec.wait_for("conversation.item.input_audio_transcription.completed", start=start)
        assert transcript["item_id"] == committed["item_id"] and "ms of speech" in transcript["transcript"]
        order = rec.types(start)
        assert order.index("input_audio_buffer.speech_started") < order.index("input_audio_buffer.speech_stopped")
        assert order.index("input_audio_buffer.committed") < order.index("conversation.item.added")
        assert order.index("conversation.item.added") < order.index("response.created")
        item = rec.of("conversation.item.added", start)[0]["item"]
        assert item["role"] == "user" and item["id"] == committed["item_id"]


async def test_idle_timeout_prompts_a_response(realtime_server: ServerProcess) -> None:
    async with realtime(realtime_server) as (conn, rec):
        n = len(rec.events)
        await conn.session.update(
            session={"type": "realtime", "audio": {"input": {"turn_detection": {"idle_timeout_ms": 1000}}}}
        )
        td = (await rec.wait_for("session.updated", start=n))["session"]["audio"]["input"]["turn_detection"]
        assert td["type"] == "server_vad" and td["idle_timeout_ms"] == 1000  # partial: the type stays
        t0 = time.monotonic()
        fired = await rec.wait_for("input_audio_buffer.timeout_triggered", start=n, within_s=5)
        assert time.monotonic() - t0 >= 0.5 and fired["audio_end_ms"] >= fired["audio_start_ms"]
        done = await rec.wait_for("response.done", start=n)
        assert done["response"]["status"] == "completed"


async def test_cancel_mid_response_then_next_turn(realtime_server: ServerProcess) -> None:
    async with realtime(realtime_server) as (conn, rec):
        await manual(conn, rec)
        start = len(rec.events)
        await stream(conn, tone(500))
        await conn.input_audio_buffer.commit()
        user_item = (await rec.wait_for("input_audio_buffer.committed", start=start))["item_id"]
        await conn.response.create()
        rid = (await rec.wait_for("response.created", start=start))["response"]["id"]
        await rec.wait_for("response.output_audio.delta", start=start)
        await asyncio.sleep(0.2)
        await conn.response.cancel(event_id="evt_cancel")
        done = await rec.wait_for("response.done", start=start)
        assert done["response"]["id"] == rid and done["response"]["status"] == "cancelled"
        assert done["response"]["status_details"] == {"type": "cancelled", "reason": "client_cancelled"}
        done_at = rec.events.index(done)
        # A round trip through the session host: everything it sent before the answer has
        # arrived, and audio of the cancelled response that reaches it later is fenced there.
        n = len(rec.events)
        await conn.conversation.item.retrieve(item_id=user_item)
        await rec.wait_for("conversation.item.retrieved", start=n)
        mine = response_events(rec, rid)
        assert [e["type"] for e in mine].count("response.done") == 1
        late = [e for e in rec.events[done_at + 1 :] if e.get("response_id") == rid]
        assert late == []
        tag = response_tag(rid)
        late_audio = [
            e
            for e in rec.of("response.output_audio.delta", done_at + 1)
            if (decode_chunk(audio_of(e)) or (-1,))[0] == tag
        ]
        assert late_audio == []
        before = [decode_chunk(audio_of(e))[1] for e in rec.of("response.output_audio.delta", start)[:done_at]]
        assert 0 < len(before) < CHUNKS and before == list(range(len(before)))
        # The .done cascade closed the cut item before response.done.
        assert rec.types(start)[done_at - start - 5 : done_at - start + 1] == [
            "response.output_audio.done",
            "response.output_audio_transcript.done",
            "response.content_part.done",
            "response.output_item.done",
            "conversation.item.done",
            "response.done",
        ]
        # Cancel with nothing running: an error naming the client's event.
        n = len(rec.events)
        await conn.response.cancel(event_id="evt_idle_cancel")
        err = await rec.wait_for("error", start=n)
        assert err["error"]["code"] == "response_cancel_not_active" and err["error"]["event_id"] == "evt_idle_cancel"
        # output_audio_buffer.clear mid-response: cleared + cancelled, never an error.
        n = len(rec.events)
        await stream(conn, tone(500))
        await conn.input_audio_buffer.commit()
        await conn.response.create()
        rid2 = (await rec.wait_for("response.created", start=n))["response"]["id"]
        await rec.wait_for("response.output_audio.delta", start=n)
        await conn.output_audio_buffer.clear()
        cleared = await rec.wait_for("output_audio_buffer.cleared", start=n)
        assert cleared["response_id"] == rid2
        done2 = await rec.wait_for("response.done", start=n)
        assert done2["response"]["status"] == "cancelled"
        await conn.output_audio_buffer.clear()  # idle: still just "cleared"
        await rec.wait_for(lambda e: e["type"] == "output_audio_buffer.cleared", start=rec.events.index(done2))
        assert rec.of("error", n) == []
        # The session still works: a full turn completes.
        start3, created3, done3 = await turn(conn, rec)
        assert done3["response"]["status"] == "completed"
        markers = [decode_chunk(audio_of(d)) for d in rec.of("response.output_audio.delta", start3)]
        assert [m[1] for m in markers] == list(range(CHUNKS))
        assert {m[0] for m in markers} == {response_tag(created3["response"]["id"])}


async def test_barge_in_then_truncate_to_played_audio(realtime_server: ServerProcess) -> None:
    async with realtime(realtime_server) as (conn, rec):
        start = len(rec.events)
        await conn.response.create()
        created = await rec.wait_for("response.created", start=start)
        rid = created["response"]["id"]
        first = await rec.wait_for("response.output_audio.delta", start=start)
        t_first = time.monotonic()
        item_id = first["item_id"]
        # The user talks over the assistant (a live microphone: real time, then silence).
        talk = asyncio.get_running_loop().create_task(
            stream(conn, np.concatenate([speech("weather"), speech("hello"), silence(800)]), pace=1.0)
        )
        try:
            done = await rec.wait_for("response.done", start=start, within_s=10)
            t_done = time.monotonic()
            assert done["response"]["id"] == rid and done["response"]["status"] == "cancelled"
            assert done["response"]["status_details"] == {"type": "cancelled", "reason": "turn_detected"}
            order = rec.types(start)
            assert order.index("input_audio_buffer.speech_started") < order.index("response.done")
            done_at = rec.events.index(done)
            # speech_started is the interruption: the cancel came with it, so not one delta of the
            # reply follows it (a client that stops playback there has nothing stale to play).
            started_at = rec.events.index(rec.of("input_audio_buffer.speech_started", start)[0])
            assert [e for e in rec.of("response.output_audio.delta", started_at) if e["response_id"] == rid] == []
            # What the client "played": real time since the first delta, capped by what arrived.
            received_ms = sum(len(audio_of(d)) for d in rec.of("response.output_audio.delta", start)) // 24
            played_ms = min(received_ms, int((t_done - t_first) * 1000))
            assert 0 < played_ms < REPLY_MS
            n = len(rec.events)
            await conn.conversation.item.truncate(item_id=item_id, content_index=0, audio_end_ms=played_ms)
            truncated = await rec.wait_for("conversation.item.truncated", start=n)
            assert truncated == {**truncated, "item_id": item_id, "content_index": 0, "audio_end_ms": played_ms}
            await conn.conversation.item.retrieve(item_id=item_id)
            kept = (await rec.wait_for("conversation.item.retrieved", start=n))["item"]["content"][0]["transcript"]
            assert REPLY_1.startswith(kept) and len(kept) < len(REPLY_1)
            # Truncating past the audio that exists is refused.
            await conn.conversation.item.truncate(
                item_id=item_id, content_index=0, audio_end_ms=60_000, event_id="e_far"
            )
            err = await rec.wait_for("error", start=n)
            assert err["error"]["code"] == "invalid_value" and err["error"]["event_id"] == "e_far"
            # The interrupting speech becomes the next turn, answered in full.
            nxt = await rec.wait_for(
                lambda e: e["type"] == "response.done" and e["response"]["id"] != rid, start=done_at, within_s=15
            )
            assert nxt["response"]["status"] == "completed"
        finally:
            await talk
        tag = response_tag(rid)
        late = [e for e in rec.of("response.output_audio.delta", done_at + 1) if decode_chunk(audio_of(e))[0] == tag]
        assert late == [] and [e for e in rec.events[done_at + 1 :] if e.get("response_id") == rid] == []


async def test_truncating_the_playing_item_stops_its_audio(realtime_server: ServerProcess) -> None:
    """The client stops playback itself (its own interruption logic) and reports where: after
    conversation.item.truncated not one more byte of that reply arrives, and the reply ends."""
    async with realtime(realtime_server) as (conn, rec):
        await manual(conn, rec)
        start = len(rec.events)
        await stream(conn, tone(500))
        await conn.input_audio_buffer.commit()
        await conn.response.create()
        rid = (await rec.wait_for("response.created", start=start))["response"]["id"]
        first = await rec.wait_for("response.output_audio.delta", start=start)
        await conn.conversation.item.truncate(item_id=first["item_id"], content_index=0, audio_end_ms=0)
        truncated = await rec.wait_for("conversation.item.truncated", start=start)
        done = await rec.wait_for("response.done", start=start)
        assert done["response"]["id"] == rid
        assert done["response"]["status_details"] == {"type": "cancelled", "reason": "client_cancelled"}
        assert done["response"]["output"][0]["content"][0]["transcript"] == ""  # nothing was heard
        # Whatever arrives later (the next reply, in-flight audio) carries nothing of this one.
        start2, created2, done2 = await turn(conn, rec)
        assert done2["response"]["status"] == "completed"
        after = rec.events.index(truncated)
        tag = response_tag(rid)
        late = [e for e in rec.of("response.output_audio.delta", after) if decode_chunk(audio_of(e))[0] == tag]
        assert late == [] and [e for e in rec.of("response.output_audio.delta", after) if e["response_id"] == rid] == []


async def test_text_only_response(realtime_server: ServerProcess) -> None:
    async with realtime(realtime_server) as (conn, rec):
        await manual(conn, rec)
        start, created, done = await turn(conn, rec, response={"output_modalities": ["text"], "metadata": {"k": "v"}})
        rid = created["response"]["id"]
        assert created["response"]["output_modalities"] == ["text"]
        assert rec.of("response.output_audio.delta", start) == []
        deltas = rec.of("response.output_text.delta", start)
        assert "".join(d["delta"] for d in deltas) == REPLY_1 and {d["response_id"] for d in deltas} == {rid}
        assert rec.of("response.output_text.done", start)[0]["text"] == REPLY_1
        assert rec.of("response.content_part.done", start)[0]["part"] == {"type": "text", "text": REPLY_1}
        resp = done["response"]
        assert resp["status"] == "completed" and resp["metadata"] == {"k": "v"}
        assert resp["output"][0]["content"] == [{"type": "output_text", "text": REPLY_1}]
        # The session stays audio: the next response speaks.
        start2, _, done2 = await turn(conn, rec)
        assert done2["response"]["output_modalities"] == ["audio"]
        assert len(rec.of("response.output_audio.delta", start2)) == CHUNKS


async def test_beta_dialect_session(realtime_server: ServerProcess) -> None:
    async with realtime(realtime_server, beta=True) as (conn, rec):
        sess = rec.events[0]["session"]
        assert sess["input_audio_format"] == "pcm16" and sess["modalities"] == ["audio", "text"]
        assert sess["turn_detection"]["type"] == "server_vad" and sess["model"] == "gpt-4o-realtime-preview"
        n = len(rec.events)
        await conn.session.update(
            session={"turn_detection": None, "voice": "alloy", "instructions": "Short.", "temperature": 0.7}
        )
        up = (await rec.wait_for("session.updated", start=n))["session"]
        assert up["turn_detection"] is None and up["voice"] == "alloy" and up["temperature"] == 0.7
        assert up["instructions"] == "Short." and "audio" not in up
        start, created, done = await turn(conn, rec)
        rid = created["response"]["id"]
        assert created["response"]["modalities"] == ["audio", "text"] and created["response"]["voice"] == "alloy"
        types = rec.types(start)
        assert "conversation.item.created" in types and "conversation.item.added" not in types
        deltas = rec.of("response.audio.delta", start)
        assert [decode_chunk(audio_of(d))[1] for d in deltas] == list(range(CHUNKS))
        assert "".join(d["delta"] for d in rec.of("response.audio_transcript.delta", start)) == REPLY_1
        seq = [t for t in types if t not in ("response.audio.delta", "response.audio_transcript.delta")]
        assert seq[seq.index("response.created") :] == [
            "response.created",
            "rate_limits.updated",
            "response.output_item.added",
            "conversation.item.created",
            "response.content_part.added",
            "response.audio.done",
            "response.audio_transcript.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.done",
        ]
        assert done["response"]["output"][0]["content"] == [{"type": "audio", "transcript": REPLY_1}]
        assert done["response"]["id"] == rid
        # Beta text modality on the session: response.text.* events.
        n = len(rec.events)
        await conn.session.update(session={"modalities": ["text"]})
        assert (await rec.wait_for("session.updated", start=n))["session"]["modalities"] == ["text"]
        start2, _, done2 = await turn(conn, rec)
        reply_2 = REPLY_1.replace("number 1", "number 2")
        assert "".join(d["delta"] for d in rec.of("response.text.delta", start2)) == reply_2
        assert rec.of("response.audio.delta", start2) == []
        assert done2["response"]["modalities"] == ["text"]


async def test_g711_in_and_out(realtime_server: ServerProcess) -> None:
    async with realtime(realtime_server) as (conn, rec):
        n = len(rec.events)
        await conn.session.update(
            session={
                "type": "realtime",
                "audio": {
                    "input": {"format": {"type": "audio/pcma"}, "turn_detection": None, "transcription": {}},
                    "output": {"format": {"type": "audio/pcmu"}},
                },
            }
        )
        audio = (await rec.wait_for("session.updated", start=n))["session"]["audio"]
        assert audio["input"]["format"] == {"type": "audio/pcma"} and audio["output"]["format"] == {
            "type": "audio/pcmu"
        }
        # 600 ms of tone then 400 ms of silence, A-law at 8 kHz.
        x = np.concatenate([tone(600, rate=8000), silence(400, rate=8000)])
        start = len(rec.events)
        for f in frames(x, 20, rate=8000):
            await conn.input_audio_buffer.append(audio=base64.b64encode(audioop.lin2alaw(pcm16(f), 2)).decode())
        await conn.input_audio_buffer.commit()
        await conn.response.create()
        done = await rec.wait_for("response.done", start=start)
        assert done["response"]["status"] == "completed"
        assert done["response"]["audio"]["output"]["format"] == {"type": "audio/pcmu"}
        # The engine heard 600 ms of speech-level audio: the A-law input was decoded right.
        heard = (await rec.wait_for("conversation.item.input_audio_transcription.completed", start=start))["transcript"]
        assert heard == "scripted user turn, 600 ms of speech"
        # Output: the reply in mu-law at 8 kHz (one byte a sample), a tone at the response's frequency.
        ulaw = b"".join(base64.b64decode(d["delta"]) for d in rec.of("response.output_audio.delta", start))
        assert abs(len(ulaw) - REPLY_MS * 8) <= 16
        lin = np.frombuffer(audioop.ulaw2lin(ulaw, 2), dtype="<i2").astype(np.float64)
        spectrum = np.abs(np.fft.rfft(lin * np.hanning(len(lin))))
        peak_hz = np.argmax(spectrum) * 8000 / len(lin)
        want_hz = 300.0 + 40.0 * (response_tag(done["response"]["id"]) % 10)
        assert abs(peak_hz - want_hz) < 5, (peak_hz, want_hz)


async def test_duplex_query_parameter_model_driven_turn(realtime_server: ServerProcess) -> None:
    # strict=False: turn_detection {"type": "duplex"} is a duplexd extension the SDK's models do not know.
    async with realtime(realtime_server, strict=False, duplex="1") as (conn, rec):
        assert rec.events[0]["session"]["audio"]["input"]["turn_detection"] == {"type": "duplex"}
        start = len(rec.events)
        await stream(conn, np.concatenate([silence(400), tone(800), silence(800)]), pace=4.0)
        done = await rec.wait_for("response.done", start=start, within_s=20)
        assert done["response"]["status"] == "completed"
        deltas = rec.of("response.output_audio.delta", start)
        assert {decode_chunk(audio_of(d))[0] for d in deltas} == {response_tag(done["response"]["id"])}


async def test_bad_input_gets_error_events_and_session_keeps_working(realtime_server: ServerProcess) -> None:
    async with realtime(realtime_server) as (conn, rec):
        await manual(conn, rec)

        async def expect(raw: str, code: str, param: str | None = None, event_id: str | None = None) -> float:
            n = len(rec.events)
            t0 = time.monotonic()
            await conn.send_raw(raw)
            err = await rec.wait_for("error", start=n)
            assert err["error"]["code"] == code, err
            assert err["error"]["message"] and err["error"]["type"] == "invalid_request_error"
            if param is not None:
                assert err["error"]["param"] == param
            if event_id is not None:
                assert err["error"]["event_id"] == event_id
            return time.monotonic() - t0

        def ev(**kw: Any) -> str:
            return json.dumps(kw)

        await expect("{not json", "invalid_json")
        await expect("[1, 2]", "invalid_event")
        await expect(ev(type="no.such.event", event_id="e1"), "unknown_event", "type", "e1")
        await expect(ev(type="input_audio_buffer.append", event_id="e2"), "missing_required_parameter", "audio", "e2")
        await expect(ev(type="conversation.item.truncate", item_id="x", content_index=0), "missing_required_parameter")
        await expect(ev(type="input_audio_buffer.append", audio="%%%not base64%%%", event_id="e3"), "invalid_base64")
        await expect(
            ev(type="input_audio_buffer.append", audio=base64.b64encode(b"\x00\x01\x02").decode()),
            "invalid_audio_length",
        )
        await expect(ev(type="input_audio_buffer.commit", bogus=1), "unknown_parameter", "bogus")
        await expect(
            ev(type="session.update", session={"type": "realtime", "colour": "red"}),
            "unknown_parameter",
            "session.colour",
        )
        bad_td = {"type": "realtime", "audio": {"input": {"turn_detection": {"type": "psychic"}}}}
        await expect(
            ev(type="session.update", session=bad_td), "invalid_value", "session.audio.input.turn_detection.type"
        )
        await expect(
            ev(
                type="session.update",
                session={"type": "realtime", "audio": {"input": {"format": {"type": "audio/pcm", "rate": 11025}}}},
            ),
            "invalid_value",
        )
        await expect(
            ev(type="response.create", response={"tools": [{"type": "function", "name": "f"}]}), "unsupported_parameter"
        )
        # 15.5 MiB of audio in one append (a frame within the 21 MiB frame limit): refused at
        # once, without decoding it. (A frame above the limit closes the socket: 1009.)
        big = base64.b64encode(bytes(31 * 512 * 1024)).decode()
        took = await expect(
            ev(type="input_audio_buffer.append", audio=big, event_id="e_big"), "audio_too_large", "audio", "e_big"
        )
        assert took < 5.0
        # A rejected session.update changed nothing (still manual turns, pcm input).
        n = len(rec.events)
        await conn.session.update(session={"type": "realtime", "instructions": "after errors"})
        after = (await rec.wait_for("session.updated", start=n))["session"]
        assert after["audio"]["input"]["turn_detection"] is None
        assert after["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}
        # And the next valid turn works.
        start, created, done = await turn(conn, rec)
        assert done["response"]["status"] == "completed"
        assert len(rec.of("response.output_audio.delta", start)) == CHUNKS


# ---------------------------------------------------------------------- API keys
async def test_api_keys_from_list_file_and_subprotocol(realtime_server: ServerProcess) -> None:
    async with realtime(realtime_server, key=FILE_KEY) as (_, rec):
        assert rec.events[0]["type"] == "session.created"
    with pytest.raises(websockets.InvalidStatus) as bad:
        async with realtime(realtime_server, key="sk-wrong"):
            pass
    assert bad.value.response.status_code == 401
    url = f"ws://{realtime_server.base}/v1/realtime?model=gpt-4o-realtime-preview"
    with pytest.raises(websockets.InvalidStatus) as missing:
        await websockets.connect(url)
    assert missing.value.response.status_code == 401
    assert json.loads(missing.value.response.body)["error"]["code"] == "invalid_api_key"
    # Browsers cannot set headers: the key (and the beta marker) ride in the subprotocol list.
    protocols = ["realtime", f"openai-insecure-api-key.{API_KEY}", "openai-beta.realtime-v1"]
    async with websockets.connect(url, subprotocols=protocols) as ws:  # type: ignore[arg-type]
        assert ws.subprotocol == "realtime"
        first = json.loads(await ws.recv())
        assert first["type"] == "session.created" and first["session"]["input_audio_format"] == "pcm16"
        check_event(first, beta=True)


def test_non_loopback_bind_needs_api_keys() -> None:
    refused = ServerProcess(sections={"server": {"host": "0.0.0.0"}})
    try:
        with pytest.raises(RuntimeError, match="refusing to bind 0.0.0.0: no API keys configured"):
            refused.start()
    finally:
        refused.stop()
    with ServerProcess(sections={"server": {"host": "0.0.0.0", "api_keys": [API_KEY]}}) as served:

        async def probe() -> None:
            url = f"ws://{served.base}/v1/realtime"
            with pytest.raises(websockets.InvalidStatus):
                await websockets.connect(url)
            async with realtime(served) as (_, rec):
                assert rec.events[0]["type"] == "session.created"

        asyncio.run(probe())
