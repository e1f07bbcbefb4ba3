"""Admission control over real processes: the N+1-th session is refused at once, with one
error code and close 1013 on every protocol; the first N are unaffected; capacity and load
show in /health, the bridge's /health and /metrics."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import websockets

from tests.harness import NativeClient, RealtimeClient, ServerProcess, free_port, tone

pytestmark = pytest.mark.timeout(90)

N = 3
REPLY_CHUNKS = 50  # 2000 ms of 40 ms chunks


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    s = ServerProcess(
        sections={
            "server": {"bridge_port": free_port()},
            "host": {"vad": "energy", "max_sessions": N},
            "engines.scripted": {"reply_ms": 2000, "out_chunk_ms": 40},
            "stage1": {"max_lead_ms": 300},
        }
    )
    with s:
        yield s


def _get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _metrics(server: ServerProcess) -> str:
    with urllib.request.urlopen(f"http://{server.base}/metrics", timeout=5) as r:
        return r.read().decode()


def _bridge(server: ServerProcess) -> str:
    return f"127.0.0.1:{server.sections['server']['bridge_port']}"


async def _refused(url: str) -> tuple[list[dict[str, Any]], int | None]:
    """Everything a connection gets before the server closes it, and the close code."""
    ws = await websockets.connect(url, max_size=None)
    events = []
    try:
        async with asyncio.timeout(10):
            async for frame in ws:
                events.append(json.loads(frame))
    except websockets.ConnectionClosed:
        pass
    return events, ws.close_code


async def _wait_available(server: ServerProcess, n: int) -> dict[str, Any]:
    for _ in range(100):
        code, body = server.health()
        if body.get("available") == n:
            return body
        await asyncio.sleep(0.05)
    raise AssertionError(f"available never became {n}: {server.health()}")


async def test_the_n_plus_first_session_is_refused_and_the_first_n_are_unaffected(server: ServerProcess) -> None:
    body = await _wait_available(server, N)
    assert body["capacity"] == N
    held = [await RealtimeClient.connect(server) for _ in range(N)]
    for c in held:
        await c.send({"type": "session.update", "session": {"turn_detection": None}})
        await c.wait_for("session.updated")
    creates = [await c.manual_turn(tone(300), "held") for c in held]
    await _wait_available(server, 0)

    # One refusal on every protocol: error capacity_exceeded, then close 1013.
    events, code = await _refused(f"ws://{server.base}/v1/realtime")
    assert code == 1013, events
    assert [e["type"] for e in events] == ["error"]
    assert events[0]["error"]["code"] == "capacity_exceeded"
    assert f"maximum of {N} sessions" in events[0]["error"]["message"]
    events, code = await _refused(f"ws://{server.base}/v1/duplex")
    assert code == 1013 and [e["error"]["code"] for e in events if e["type"] == "error"] == ["capacity_exceeded"]
    assert "session.created" not in [e["type"] for e in events]
    # The demo bridge says busy, and turns a socket away like a busy demo worker.
    code, bridge_health = _get(f"http://{_bridge(server)}/health")
    assert code == 200 and bridge_health["at_capacity"] is True
    assert bridge_health["worker_status"] == "duplex_active"
    events, code = await _refused(f"ws://{_bridge(server)}/ws/duplex")
    assert code == 1013 and events == []
    # Capacity and load, for operators.
    code, health = server.health()
    assert code == 200 and health["sessions"] == N and health["capacity"] == N and health["available"] == 0
    expected = [
        'duplexd_admissions_refused_total{identity="host",limit="node",role="host"} 2.0',
        'duplexd_sessions_available{identity="host",role="host"} 0.0',
        f'duplexd_session_capacity{{identity="host",role="host"}} {N}.0',
    ]
    for _ in range(50):  # the host's metrics travel with its status broadcasts (every 2 s at most)
        text = await asyncio.to_thread(_metrics, server)
        if all(x in text for x in expected):
            break
        await asyncio.sleep(0.2)
    assert [x for x in expected if x not in text] == []

    # The first N never noticed: every reply complete, every chunk there.
    for c, create in zip(held, creates, strict=True):
        done = await c.wait_for("response.done", within_s=20)
        assert done["response"]["status"] == "completed"
        assert not [e for e in c.of("error") if e["error"]["event_id"] == create]
        assert len(c.of("response.output_audio.delta")) == REPLY_CHUNKS
    # A slot frees when a session ends; the next session gets it.
    await held[0].close()
    await _wait_available(server, 1)
    again = await NativeClient.connect(server)
    assert again.of("session.created")
    await again.close()
    for c in held[1:]:
        await c.close()
