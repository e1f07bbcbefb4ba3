"""Slow and dead clients over real processes: a client that does not read is cut after a
bound of queued audio (error ``client_too_slow`` when it can still read it, close 1008),
the adapter's memory stays bounded, and a peer that stops answering pings (half-open TCP)
is cut by the keepalive."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import time
import urllib.request
from typing import Any

import pytest
import websockets

from tests.harness import ServerProcess, pcm16, tone

pytestmark = pytest.mark.timeout(120)

NON_READERS = 10
RUN_S = 20.0


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _metric(server: ServerProcess, series: str) -> float:
    with urllib.request.urlopen(f"http://{server.base}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(series + " "):
                return float(line.split()[-1])
    return 0.0


def _tiny_socket(port: int) -> socket.socket:
    """A client socket with a tiny receive buffer: when it stops reading, the server's
    writes back up at once instead of filling megabytes of kernel buffers first."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    return s


TURN = [
    {"type": "session.update", "session": {"turn_detection": None}},
    {"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm16(tone(300))).decode()},
    {"type": "input_audio_buffer.commit"},
    {"type": "response.create"},
]


async def _non_reader(server: ServerProcess) -> websockets.ClientConnection:
    """Asks for a long reply, then never reads (max_queue=1: the library stops reading too)."""
    ws = await websockets.connect(
        f"ws://{server.base}/v1/realtime", sock=_tiny_socket(server.port), max_queue=1, ping_interval=None
    )
    for e in TURN:
        await ws.send(json.dumps(e))
    return ws


@pytest.fixture(scope="module")
def server() -> Any:
    s = ServerProcess(
        sections={
            "engines.scripted": {"reply_ms": 120000, "out_chunk_ms": 40},
            "stage1": {"max_lead_ms": 1500},
            "host": {"vad": "energy"},
            # Pings far apart here: the clients below are cut for not reading, not for silence.
            "server": {"slow_client_audio_ms": 5000, "ping_interval_s": 60, "ping_timeout_s": 60},
        }
    )
    with s:
        yield s


async def test_clients_that_do_not_read_are_cut_and_memory_stays_bounded(server: ServerProcess) -> None:
    adapter = server.role_pid("adapter")
    base_sessions = server.health()[1]["sessions"]
    clients = [await _non_reader(server) for _ in range(NON_READERS)]
    await asyncio.sleep(2.0)
    rss0 = _rss_mb(adapter)
    samples = []
    t0 = time.monotonic()
    while time.monotonic() - t0 < RUN_S:
        await asyncio.sleep(1.0)
        samples.append(_rss_mb(adapter))
    growth = max(samples) - rss0
    print(f"\n[slow clients] adapter RSS {rss0:.1f} MB -> max {max(samples):.1f} MB over {RUN_S:.0f} s "
          f"with {NON_READERS} non-reading clients (each reply 120 s of audio): +{growth:.1f} MB")
    # Unbounded, each would hold ~25 chunks/s of audio events: about +12 MB by now.
    assert growth < 6.0
    series = f'duplexd_slow_clients_closed_total{{identity="{_adapter_identity(server)}",role="adapter"}}'
    assert _metric(server, series) >= NON_READERS
    deadline = time.monotonic() + 10
    while server.health()[1]["sessions"] != base_sessions:  # the host closed them all
        assert time.monotonic() < deadline, server.health()[1]
        await asyncio.sleep(0.1)
    for ws in clients:
        ws.transport.abort()


def _adapter_identity(server: ServerProcess) -> str:
    return next(r["identity"] for r in server.health()[1]["roles"] if r["role"] == "adapter")


async def test_a_slow_reader_is_told_why_and_closed_with_1008(server: ServerProcess) -> None:
    ws = await websockets.connect(f"ws://{server.base}/v1/realtime", sock=_tiny_socket(server.port), max_queue=4)
    for e in TURN:
        await ws.send(json.dumps(e))
    seen: list[dict[str, Any]] = []
    try:
        async with asyncio.timeout(40):
            while True:
                seen.append(json.loads(await ws.recv()))
                await asyncio.sleep(0.1)  # 10 events a second: the reply makes 25
    except websockets.ConnectionClosed:
        pass
    errors = [e for e in seen if e["type"] == "error"]
    assert errors and errors[-1]["error"]["code"] == "client_too_slow", [e["type"] for e in seen[-5:]]
    assert ws.close_code == 1008


async def test_a_peer_that_stops_answering_pings_is_cut_by_the_keepalive() -> None:
    """Half-open TCP seen from the server: the peer answers nothing, not even pings."""
    with ServerProcess(sections={"server": {"ping_interval_s": 0.5, "ping_timeout_s": 0.5}}) as server:
        await _silent_peer(server)


async def _silent_peer(server: ServerProcess) -> None:
    base_sessions = server.health()[1]["sessions"]
    s = socket.create_connection(("127.0.0.1", server.port))
    key = base64.b64encode(b"0123456789abcdef").decode()
    s.sendall(
        (
            f"GET /v1/realtime HTTP/1.1\r\nHost: {server.base}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    assert b"101" in s.recv(200).split(b"\r\n")[0]
    t0 = time.monotonic()
    deadline = t0 + 15
    while server.health()[1]["sessions"] == base_sessions:  # it opened
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    while server.health()[1]["sessions"] != base_sessions:  # cut: ping 0.5 s + timeout 0.5 s
        assert time.monotonic() < deadline, "the keepalive never cut the silent peer"
        await asyncio.sleep(0.05)
    took = time.monotonic() - t0
    print(f"\n[slow clients] silent peer cut by the keepalive after {took:.2f} s (ping every 0.5 s, timeout 0.5 s)")
    assert took < 5.0
    s.close()
