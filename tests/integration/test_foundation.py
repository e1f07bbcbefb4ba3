"""The vertical slice over real processes: health, one full turn, cancel, bad input."""

from __future__ import annotations

import asyncio

import pytest

from duplexd.actors.engines.scripted import response_tag
from duplexd.bus.messages import PROTOCOL_VERSION
from tests.harness import NativeClient, ServerProcess, tone

pytestmark = pytest.mark.timeout(60)


def test_health_reports_four_ready_roles_with_distinct_pids(scripted_server: ServerProcess) -> None:
    code, body = scripted_server.health()
    assert code == 200
    assert body["status"] == "ok"
    roles = {r["role"]: r for r in body["roles"]}
    assert set(roles) == {"adapter", "host", "stage0", "stage1"}
    assert all(r["state"] == "ready" and r["protocol_version"] == PROTOCOL_VERSION for r in roles.values())
    assert len({r["pid"] for r in roles.values()}) == 4
    assert body["protocol_version"] == PROTOCOL_VERSION
    assert body["engine"]["name"] == "scripted"


async def _manual_session(server: ServerProcess) -> NativeClient:
    c = await NativeClient.connect(server)
    await c.send({"type": "session.update", "session": {"turn_mode": "manual"}})
    await c.wait_for("session.updated")
    return c


async def _turn(c: NativeClient) -> tuple[dict, dict]:
    start = len(c.events)
    await c.stream(tone(600))
    await c.send({"type": "input_audio_buffer.commit"})
    await c.send({"type": "response.create"})
    created = await c.wait_for("response.created", start=start)
    done = await c.wait_for("response.done", start=start)
    return created, done


async def test_full_turn_speech_in_listen_speak_audio_out_done(scripted_server: ServerProcess) -> None:
    c = await _manual_session(scripted_server)
    created, done = await _turn(c)
    rid = created["response"]["id"]
    assert done["response"]["id"] == rid
    assert done["response"]["status"] == "completed"
    types = [e["type"] for e in c.events]
    assert "input_audio_buffer.committed" in types
    # The committed 600 ms (6 chunks of 100 ms) are answered by listens, then the model speaks.
    listens = c.of("response.listen")
    assert len(listens) >= 6
    speak = c.of("response.speak")
    assert speak and speak[0]["end_of_turn"] and speak[0]["response_id"] == rid
    # Audio: 2000 ms of 40 ms chunks, all of this response, in order, none missing.
    frames = [f for f in c.audio if f.header["response_id"] == rid]
    markers = [f.marker for f in frames]
    assert all(m is not None for m in markers)
    assert {m[0] for m in markers} == {response_tag(rid)}
    assert [m[1] for m in markers] == list(range(50))
    assert all(m[2] == 50 for m in markers)
    assert sum(len(f.pcm) for f in frames) == 48000
    assert done["transcript"].startswith("This is scripted reply number 1")
    # response.done comes after the last audio frame.
    assert types.index("response.done") > max(f.received_after for f in frames)
    await c.close()


async def test_cancel_mid_response_stops_audio_and_next_turn_works(scripted_server: ServerProcess) -> None:
    c = await _manual_session(scripted_server)
    await c.stream(tone(500))
    await c.send({"type": "input_audio_buffer.commit"})
    await c.send({"type": "response.create"})
    created = await c.wait_for("response.created")
    rid = created["response"]["id"]
    await c.wait_for(lambda e: e["type"] == "audio" and e["response_id"] == rid)
    await asyncio.sleep(0.2)
    await c.send({"type": "response.cancel"})
    done = await c.wait_for("response.done")
    assert done["response"]["id"] == rid
    assert done["response"]["status"] == "cancelled"
    assert done["response"]["reason"] == "client_cancelled"
    done_at = c.events.index(done)
    # A round trip through the session host (what it forwarded before has arrived; audio of
    # the cancelled response reaching it later is fenced there), then a second turn.
    n = len(c.events)
    await c.send({"type": "session.get"})
    await c.wait_for("session.snapshot", start=n)
    created2, done2 = await _turn(c)
    rid2 = created2["response"]["id"]
    assert done2["response"]["status"] == "completed"
    assert rid2 != rid
    # Zero audio of the cancelled response after its response.done, checked on the waveform.
    tag = response_tag(rid)
    after = [f for f in c.audio if f.received_after > done_at and f.marker and f.marker[0] == tag]
    assert after == []
    before = [f.marker[1] for f in c.audio if f.marker and f.marker[0] == tag]
    assert 0 < len(before) < 50  # it really was cut short
    assert before == list(range(len(before)))  # and nothing was missing before the cut
    second = [f.marker for f in c.audio if f.header["response_id"] == rid2]
    assert [m[1] for m in second] == list(range(50)) and {m[0] for m in second} == {response_tag(rid2)}
    assert len(c.of("response.done")) == 2
    assert c.of("epoch.advanced")[0]["epoch"] == 1
    await c.close()


async def test_bad_input_gets_errors_and_session_keeps_working(scripted_server: ServerProcess) -> None:
    c = await _manual_session(scripted_server)
    await c.ws.send("{not json")
    e1 = await c.wait_for("error")
    assert e1["error"]["code"] == "invalid_json"
    n = len(c.events)
    await c.send({"type": "no.such.event", "event_id": "evt_x"})
    e2 = await c.wait_for("error", start=n)
    assert e2["error"]["code"] == "unknown_event" and e2["error"]["event_id"] == "evt_x"
    n = len(c.events)
    await c.ws.send(b"\x07garbage")
    e3 = await c.wait_for("error", start=n)
    assert e3["error"]["code"] == "invalid_audio_frame"
    n = len(c.events)
    await c.ws.send(b"\x01\x00\x01\x02")  # 3 bytes of pcm16: odd length
    e4 = await c.wait_for("error", start=n)
    assert e4["error"]["code"] == "invalid_audio_length"
    n = len(c.events)
    await c.send({"type": "input_audio_buffer.append", "audio": "%%%not base64%%%"})
    e5 = await c.wait_for("error", start=n)
    assert e5["error"]["code"] == "invalid_base64"
    n = len(c.events)
    await c.send({"type": "response.cancel"})
    e6 = await c.wait_for("error", start=n)
    assert e6["error"]["code"] == "response_cancel_not_active"
    n = len(c.events)
    await c.send({"type": "input_audio_buffer.commit"})
    e7 = await c.wait_for("error", start=n)
    assert e7["error"]["code"] == "input_audio_buffer_commit_empty"
    _, done = await _turn(c)
    assert done["response"]["status"] == "completed"
    await c.close()
