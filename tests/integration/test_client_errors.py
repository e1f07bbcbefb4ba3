"""One input dialect on every endpoint, against the real server processes.

The same bad field gets the same error code on ``/v1/realtime``, ``/v1/duplex`` and the
MiniCPM-o demo bridge; ``null`` for an optional field means "not set" everywhere; and
every error event a client gets has exactly one structured server log line (session id,
code, the client event type), wherever the error was found (adapter or session host).
The demo protocol's error events carry only a text, so its codes are read from that line.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import numpy as np
import pytest
import websockets

from tests.harness import JsonClient, NativeClient, ServerProcess, free_port

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    s = ServerProcess(
        sections={
            "server": {"bridge_port": free_port()},
            "engines.scripted": {"reply_ms": 400, "out_chunk_ms": 40},
            "host": {"vad": "energy"},
        }
    )
    with s:
        yield s



async def _realtime(server: ServerProcess) -> JsonClient:
    c = JsonClient(await websockets.connect(f"ws://{server.base}/v1/realtime", max_size=None))
    await c.wait_for("session.created")
    # Manual turns: tones are speech to the energy VAD, and nothing here should start a turn.
    await c.ask(
        {"type": "session.update", "session": {"type": "realtime", "audio": {"input": {"turn_detection": None}}}},
        "session.updated",
    )
    return c


async def _native(server: ServerProcess) -> NativeClient:
    c = await NativeClient.connect(server)
    n = len(c.events)
    await c.send({"type": "session.update", "session": {"turn_mode": "manual"}})
    await c.wait_for("session.updated", start=n)
    return c


async def _bridge(server: ServerProcess) -> JsonClient:
    port = next(
        v
        for line in server.logs().splitlines()
        if '"demo bridge listening"' in line
        for k, v in json.loads(line).items()
        if k == "port"
    )
    c = JsonClient(await websockets.connect(f"ws://127.0.0.1:{port}/ws/duplex?session_id=errors", max_size=None))
    await c.ask({"type": "prepare", "config": {"force_listen_count": 0}}, "prepared")
    return c


@pytest.fixture
async def clients(server: ServerProcess) -> AsyncIterator[tuple[JsonClient, NativeClient, JsonClient]]:
    rt, nat, demo = await _realtime(server), await _native(server), await _bridge(server)
    yield rt, nat, demo
    for c in (rt, nat, demo):
        await c.close()


def _error_lines(server: ServerProcess) -> list[dict[str, Any]]:
    out = []
    for line in server.logs().splitlines():
        if '"client error"' in line:
            rec = json.loads(line)
            if rec.get("msg") == "client error":
                out.append(rec)
    return out


def _log_line(server: ServerProcess, seen: int, within_s: float = 10.0) -> dict[str, Any]:
    """The next client-error log line after the first ``seen`` (the log is written by
    another process: wait for it to appear)."""
    deadline = time.monotonic() + within_s
    while True:
        lines = _error_lines(server)
        if len(lines) > seen:
            assert len(lines) == seen + 1, lines[seen:]  # one line per error event
            return lines[seen]
        assert time.monotonic() < deadline, "no client error log line"
        time.sleep(0.05)


B64_SILENCE = base64.b64encode(np.zeros(1600, "<f4").tobytes()).decode()

# (what is wrong, Realtime event, native event, demo-bridge message or None, code, param)
SAME_BAD_FIELD = [
    (
        "content_index is not an integer",
        {"type": "conversation.item.truncate", "item_id": "item_x", "content_index": "x", "audio_end_ms": 0},
        {"type": "conversation.item.truncate", "item_id": "item_x", "content_index": "x", "audio_end_ms": 0},
        None,
        "invalid_type",
        "content_index",
    ),
    (
        "audio is not a string",
        {"type": "input_audio_buffer.append", "audio": 5},
        {"type": "input_audio_buffer.append", "audio": 5},
        {"type": "audio_chunk", "audio_base64": 5},
        "invalid_type",
        None,
    ),
    (
        "audio is missing",
        {"type": "input_audio_buffer.append"},
        {"type": "input_audio_buffer.append"},
        {"type": "audio_chunk"},
        "missing_required_parameter",
        None,
    ),
    (
        "instructions are not a string",
        {"type": "session.update", "session": {"type": "realtime", "instructions": 5}},
        {"type": "session.update", "session": {"instructions": 5}},
        {"type": "prepare", "system_prompt": 5},
        "invalid_type",
        None,
    ),
    (
        "a response option has the wrong type",
        {"type": "response.create", "response": {"instructions": ["be", "brief"]}},
        {"type": "response.create", "response": {"instructions": ["be", "brief"]}},
        None,
        "invalid_type",
        "response.instructions",
    ),
    (
        "an item id is missing",
        {"type": "conversation.item.delete"},
        {"type": "conversation.item.delete"},
        None,
        "missing_required_parameter",
        "item_id",
    ),
    ("the frame is not JSON", "{nope", "{nope", "{nope", "invalid_json", None),
]


@pytest.mark.parametrize(("what", "rt_event", "native_event", "demo_event", "code", "param"), SAME_BAD_FIELD)
async def test_the_same_bad_field_gets_the_same_code_everywhere(
    server: ServerProcess,
    clients: tuple[JsonClient, NativeClient, JsonClient],
    what: str,
    rt_event: Any,
    native_event: Any,
    demo_event: Any,
    code: str,
    param: str | None,
) -> None:
    rt, nat, demo = clients
    for c, event, endpoint in ((rt, rt_event, "realtime"), (nat, native_event, "duplex")):
        seen = len(_error_lines(server))
        n = len(c.events)
        await c.ws.send(event if isinstance(event, str) else json.dumps(event))
        err = (await c.wait_for("error", start=n))["error"]
        assert err["code"] == code, (what, endpoint, err)
        if param is not None:
            assert err["param"] == param, (what, endpoint, err)
        line = _log_line(server, seen)
        assert line["code"] == code and line["endpoint"] == endpoint and line["session_id"], line
        etype = event["type"] if isinstance(event, dict) else None
        assert line.get("event_type") == etype, line
    if demo_event is not None:
        seen = len(_error_lines(server))
        n = len(demo.events)
        await demo.send(demo_event)
        err = await demo.wait_for("error", start=n)
        assert set(err) == {"type", "error"} and isinstance(err["error"], str)  # the demo's shape
        line = _log_line(server, seen)
        assert line["code"] == code and line["endpoint"] == "bridge", (what, line)
    # Every connection is still alive and answers.
    await rt.ask({"type": "input_audio_buffer.clear"}, "input_audio_buffer.cleared")
    n = len(nat.events)
    await nat.send({"type": "session.get"})
    await nat.wait_for("session.snapshot", start=n)


async def test_null_optional_fields_mean_not_set(clients: tuple[JsonClient, NativeClient, JsonClient]) -> None:
    rt, nat, _ = clients
    s = (
        await rt.ask(
            {"type": "session.update", "session": {"type": "realtime", "instructions": "Be brief."}}, "session.updated"
        )
    )["session"]
    # What LiveKit's generate_reply() and other clients send: null for "not set".
    nulls = {
        "type": "realtime",
        "instructions": None,
        "output_modalities": None,
        "model": None,
        "tool_choice": None,
        "audio": {
            "input": {"format": None, "turn_detection": None},
            "output": {"voice": None, "speed": None, "format": None},
        },
    }
    after = (await rt.ask({"type": "session.update", "session": nulls}, "session.updated"))["session"]
    assert after["instructions"] == "Be brief." and after["output_modalities"] == s["output_modalities"]
    assert after["audio"]["input"]["format"] == s["audio"]["input"]["format"]
    assert after["audio"]["input"]["turn_detection"] is None  # here null means something: manual turns
    n = len(rt.events)
    await rt.send(
        {
            "type": "response.create",
            "response": {
                "instructions": None,
                "output_modalities": None,
                "voice": None,
                "conversation": None,
                "metadata": None,
                "tool_choice": None,
                "max_output_tokens": None,
                "audio": {"output": {"voice": None}},
            },
        }
    )
    done = await rt.wait_for(lambda e: e["type"] in ("response.done", "error"), start=n)
    assert done["type"] == "response.done" and done["response"]["status"] == "completed", done
    # The native protocol reads the same way.
    n = len(nat.events)
    await nat.send({"type": "session.update", "session": {"instructions": "Hi.", "overlap": {"short_ack_ms": 900}}})
    await nat.wait_for("session.updated", start=n)
    n = len(nat.events)
    await nat.send(
        {"type": "session.update", "session": {"instructions": None, "vad": None, "overlap": {"short_ack_ms": None}}}
    )
    got = await nat.wait_for(lambda e: e["type"] in ("session.updated", "error"), start=n)
    assert got["type"] == "session.updated", got
    assert got["session"]["instructions"] == "Hi." and got["session"]["overlap"]["short_ack_ms"] == 900
    n = len(nat.events)
    await nat.send({"type": "response.create", "response": {"instructions": None, "output_modalities": None}})
    assert (await nat.wait_for(lambda e: e["type"] in ("response.created", "error"), start=n))[
        "type"
    ] == "response.created"
    await nat.wait_for("response.done", start=n)


async def test_a_host_error_is_logged_once_with_the_event_that_caused_it(
    server: ServerProcess, clients: tuple[JsonClient, NativeClient, JsonClient]
) -> None:
    rt, nat, _ = clients
    # Found by the session host, not the adapter: nothing to cancel. No event_id was sent,
    # yet the log names the event type, and the client sees no id of ours.
    for c, endpoint in ((rt, "realtime"), (nat, "duplex")):
        seen = len(_error_lines(server))
        n = len(c.events)
        await c.send({"type": "response.cancel"})
        err = (await c.wait_for("error", start=n))["error"]
        assert err["code"] == "response_cancel_not_active" and err["event_id"] is None, err
        line = _log_line(server, seen)
        assert line["code"] == "response_cancel_not_active" and line["origin"] == "host", line
        assert line["event_type"] == "response.cancel" and line["endpoint"] == endpoint and line["session_id"], line
    # With the client's own event id, it comes back on the error.
    n = len(rt.events)
    await rt.send({"type": "response.cancel", "event_id": "evt_mine"})
    assert (await rt.wait_for("error", start=n))["error"]["event_id"] == "evt_mine"
