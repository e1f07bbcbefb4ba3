"""MiniCPM-o demo bridge end to end: a client that behaves like the demo's gateway.

The gateway polls ``GET /health``, picks an ``idle`` worker, opens
``/ws/duplex?session_id=…``, sends ``prepare`` and then one 1 s float32 16 kHz chunk per
second. These tests do exactly that against the real server processes and check what
the demo frontend relies on: exactly one ``result`` per chunk, in order, at the input's
pace, each carrying 1 s of 24 kHz float32 audio except the turn-final one. The scripted
engine marks every 40 ms of its output (``decode_chunk``), so the tests can tell which
response every sample of every result belongs to.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import websockets

from duplexd.actors.engines.scripted import MARKER, response_tag
from tests.e2e.conftest import BRIDGE_REPLY_MS, BridgeServer
from tests.harness import silence, tone

pytestmark = pytest.mark.timeout(90)

RATE_IN, RATE_OUT = 16000, 24000
REPLY_FRAMES = BRIDGE_REPLY_MS // 40
REPLY_1 = "This is scripted reply number 1, spoken as a steady tone."
SPEECH = tone(1000, RATE_IN)  # energy above the scripted engine's speech_rms
QUIET = silence(1000, RATE_IN)


Connect = Callable[[str], Awaitable["DemoClient"]]


def health(bridge: BridgeServer) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{bridge.base}/health", timeout=5) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("application/json")
        return json.loads(r.read())


async def released(bridge: BridgeServer, within_s: float = 3.0) -> dict[str, Any]:
    """Poll like the gateway until the worker reports idle after a session ended."""
    for _ in range(int(within_s / 0.05)):
        h = health(bridge)
        if h["worker_status"] == "idle":
            break
        await asyncio.sleep(0.05)
    return h


def b64f32(x: np.ndarray) -> str:
    return base64.b64encode(x.astype("<f4").tobytes()).decode()


def markers(pcm: np.ndarray) -> list[tuple[int, int, int]]:
    """Every scripted chunk marker in a float32 result (wherever padding put it)."""
    q = np.round(pcm * 32768).astype(np.int64)
    at = np.flatnonzero(q[:-3] == MARKER)
    return [(int(q[i + 1]), int(q[i + 2]), int(q[i + 3])) for i in at]


@dataclass
class Result:
    msg: dict[str, Any]
    pcm: np.ndarray
    at: float  # monotonic receive time


class DemoClient:
    """What the demo gateway does with one worker socket (frames forwarded unchanged)."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.messages: list[dict[str, Any]] = []
        self.results: list[Result] = []
        self.sent_at: list[float] = []
        self.closed = asyncio.Event()
        self._new = asyncio.Event()
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def connect(cls, bridge: BridgeServer, session_id: str) -> DemoClient:
        ws = await websockets.connect(f"ws://{bridge.base}/ws/duplex?session_id={session_id}", max_size=None)
        return cls(ws)

    async def _read(self) -> None:
        try:
            async for frame in self.ws:
                msg = json.loads(frame)
                if msg.get("type") == "result":
                    pcm = np.frombuffer(base64.b64decode(msg["audio_data"]), dtype="<f4")
                    self.results.append(Result(msg, pcm, time.monotonic()))
                self.messages.append(msg)
                self._new.set()
        except websockets.ConnectionClosed:
            pass
        finally:
            self.closed.set()
            self._new.set()

    async def wait(self, mtype: str, start: int = 0, within_s: float = 10.0) -> dict[str, Any]:
        async with asyncio.timeout(within_s):
            while True:
                for m in self.messages[start:]:
                    if m.get("type") == mtype:
                        return m
                if self.closed.is_set():
                    raise ConnectionError(f"closed while waiting for {mtype}: {self.messages[-3:]}")
                self._new.clear()
                await self._new.wait()

    async def wait_results(self, n: int, within_s: float = 10.0) -> None:
        """Until ``n`` results have arrived in all."""
        async with asyncio.timeout(within_s):
            while True:
                self._new.clear()  # before the check: a result arriving after it sets it again
                if len(self.results) >= n or self.closed.is_set():
                    return
                await self._new.wait()

    async def send(self, msg: dict[str, Any] | str) -> None:
        await self.ws.send(msg if isinstance(msg, str) else json.dumps(msg))

    async def prepare(self, force_listen_count: int = 1, **config: Any) -> dict[str, Any]:
        n = len(self.messages)
        await self.send(
            {
                "type": "prepare",
                "system_prompt": "You are a helpful assistant.",
                "config": {"force_listen_count": force_listen_count, "chunk_ms": 1000, "sample_rate": 16000, **config},
            }
        )
        return await self.wait("prepared", start=n)

    async def chunk(self, pcm: np.ndarray, **extra: Any) -> None:
        self.sent_at.append(time.monotonic())
        await self.send({"type": "audio_chunk", "audio_base64": b64f32(pcm), **extra})

    async def play(self, chunks: list[np.ndarray], forced: tuple[int, ...] = ()) -> list[Result]:
        """Send one chunk per second, like the frontend's recorder; wait for every result."""
        first = len(self.results)
        start = time.monotonic()
        for i, pcm in enumerate(chunks):
            await asyncio.sleep(max(0.0, start + i - time.monotonic()))
            await self.chunk(pcm, **({"force_listen": True} if i in forced else {}))
        await self.wait_results(first + len(chunks))
        return self.results[first:]

    async def close(self) -> None:
        await self.ws.close()
        with contextlib.suppress(Exception):
            await self._reader


@pytest.fixture
async def demo(bridge_server: BridgeServer) -> AsyncIterator[Connect]:
    """Opens demo sockets and always closes them, so a failed test never holds the worker."""
    opened: list[DemoClient] = []

    async def connect(session_id: str) -> DemoClient:
        c = await DemoClient.connect(bridge_server, session_id)
        opened.append(c)
        return c

    yield connect
    for c in opened:
        await c.close()
    await released(bridge_server)


def assert_result_shape(r: Result) -> None:
    m = r.msg
    for key, kind in [
        ("is_listen", bool),
        ("text", str),
        ("audio_data", str),
        ("end_of_turn", bool),
        ("current_time", int),
        ("cost_llm_ms", float),
        ("cost_tts_prep_ms", float),
        ("cost_tts_ms", float),
        ("cost_token2wav_ms", float),
        ("cost_all_ms", float),
        ("server_send_ts", float),
        ("wall_clock_ms", float),
        ("kv_cache_length", int),
    ]:
        assert isinstance(m.get(key), kind), (key, m.get(key))
    assert np.all(np.isfinite(r.pcm)) and np.abs(r.pcm).max(initial=0) <= 1.0


def test_health_in_the_demo_worker_shape(bridge_server: BridgeServer) -> None:
    h = health(bridge_server)
    assert h["status"] == "healthy" and h["worker_status"] == "idle" and h["model_loaded"] is True
    assert h["current_session_id"] is None and h["gpu_id"] == 0
    for key, kind in [("total_requests", int), ("avg_inference_time_ms", float), ("kv_cache_length", int)]:
        assert isinstance(h[key], kind)
    with pytest.raises(urllib.error.HTTPError) as e404:
        urllib.request.urlopen(f"http://{bridge_server.base}/nope", timeout=5)
    assert e404.value.code == 404
    with pytest.raises(urllib.error.HTTPError) as e426:
        urllib.request.urlopen(f"http://{bridge_server.base}/ws/duplex", timeout=5)
    assert e426.value.code == 426


async def test_gateway_session_one_paced_result_per_chunk(bridge_server: BridgeServer, demo: Connect) -> None:
    before = health(bridge_server)
    assert before["worker_status"] == "idle"  # the gateway only picks idle workers
    c = await demo("gw_sess_1")
    prepared = await c.prepare(force_listen_count=1)
    assert prepared["prompt_length"] == len("You are a helpful assistant.")
    busy = health(bridge_server)
    assert busy["worker_status"] == "duplex_active" and busy["current_session_id"].endswith("gw_sess_1")
    # A second duplex socket while this one holds the worker: closed with 1013, like the demo.
    other = await websockets.connect(f"ws://{bridge_server.base}/ws/duplex?session_id=gw_sess_2")
    with pytest.raises(websockets.ConnectionClosed):
        await asyncio.wait_for(other.recv(), 5)
    assert other.close_code == 1013

    # silence (forced listen), 1 s of speech, then silence: the model answers 2.4 s of audio.
    chunks = [QUIET, SPEECH, QUIET, QUIET, QUIET, QUIET, QUIET]
    results = await c.play(chunks)
    # Exactly one result per chunk, nothing extra: results leave in order, so once the next
    # chunk's result is here, any extra one for these chunks would have come before it.
    await c.chunk(QUIET)
    await c.wait_results(len(chunks) + 1)
    assert [r.msg["current_time"] for r in c.results] == list(range(len(chunks) + 1))
    for r in results:
        assert_result_shape(r)
    assert [r.msg["current_time"] for r in results] == list(range(len(chunks)))
    # At pace: each result comes after its chunk, about when the next one is sent at the
    # latest (a result waits at most one chunk for speech audio), and never in bunches.
    for i, r in enumerate(results):
        assert c.sent_at[i] < r.at < c.sent_at[i] + 1.2, (i, r.at - c.sent_at[i])
    gaps = [b.at - a.at for a, b in zip(results, results[1:], strict=False)]
    assert all(0.3 < g < 1.7 for g in gaps), gaps
    listen = [r.msg["is_listen"] for r in results]
    assert listen == [True, True, False, False, False, True, True]
    # Listens are 1 s of silence; speak results 1 s each, only the turn-final one shorter.
    sizes = [r.pcm.size for r in results]
    assert sizes == [RATE_OUT, RATE_OUT, RATE_OUT, RATE_OUT, RATE_OUT * 4 // 10, RATE_OUT, RATE_OUT]
    assert [r.msg["end_of_turn"] for r in results] == [False, False, False, False, True, False, False]
    for i in (0, 1, 5, 6):
        assert not results[i].pcm.any() and results[i].msg["text"] == ""
    # Every sample of the reply arrives, in order, once, all of one response.
    rid = results[2].msg["response_id"]
    got = [m for r in results[2:5] for m in markers(r.pcm)]
    assert got == [(response_tag(rid), i, REPLY_FRAMES) for i in range(REPLY_FRAMES)]
    assert "".join(r.msg["text"] for r in results[2:5]) == REPLY_1
    assert all(r.msg["n_tokens"] == len(r.msg["text"].split()) for r in results)

    n = len(c.messages)
    await c.send({"type": "stop"})
    await c.wait("stopped", start=n)
    await asyncio.wait_for(c.closed.wait(), 5)
    assert c.ws.close_code == 1000
    await c.close()
    after = await released(bridge_server)
    assert after["worker_status"] == "idle" and after["current_session_id"] is None
    assert after["total_requests"] >= before["total_requests"] + len(chunks)
    assert after["avg_inference_time_ms"] > 0


async def test_barge_in_force_listen_and_controls(bridge_server: BridgeServer, demo: Connect) -> None:
    c = await demo("gw_sess_3")
    await c.prepare(force_listen_count=1)
    # Before anything is heard: every bad message is an error event, the socket stays.
    bad: list[tuple[Any, str]] = [
        ("{not json", "invalid JSON"),
        ({"type": "warp_drive"}, "Unknown message type"),
        ({"type": "audio_chunk"}, "audio_base64"),
        ({"type": "audio_chunk", "audio_base64": "%%%"}, "base64"),
        ({"type": "audio_chunk", "audio_base64": base64.b64encode(b"\x00\x00\x80").decode()}, "4-byte"),
        ({"type": "prepare", "config": {"sample_rate": 12345}}, "sample_rate"),
    ]
    for msg, text in bad:
        n = len(c.messages)
        await c.send(msg)
        err = await c.wait("error", start=n)
        assert set(err) == {"type", "error"} and text in err["error"], (msg, err)

    # speech, silence (the model speaks), then the user talks over it: it yields at once.
    results = await c.play([QUIET, SPEECH, QUIET, SPEECH, SPEECH, QUIET, QUIET, QUIET])
    assert [r.msg["current_time"] for r in results] == list(range(8))
    assert [r.msg["is_listen"] for r in results] == [True, True, False, True, True, False, False, False]
    rid1 = results[2].msg["response_id"]
    assert results[2].pcm.size == RATE_OUT and not results[2].msg["end_of_turn"]
    # The result where the user barged in is a listen that closes the cut turn.
    assert results[3].msg["end_of_turn"] is True and not results[3].pcm.any()
    tag1 = response_tag(rid1)
    cut = [m[1] for r in results[2:3] for m in markers(r.pcm)]
    assert cut == list(range(len(cut))) and 0 < len(cut) < REPLY_FRAMES
    assert [m for r in results[3:] for m in markers(r.pcm) if m[0] == tag1] == []  # zero stale audio
    # The overlap was the user's next turn: a new reply, from its first sample.
    rid2 = results[5].msg["response_id"]
    assert rid2 not in (None, rid1)
    got2 = [m for r in results[5:] for m in markers(r.pcm)]
    assert got2 == [(response_tag(rid2), i, REPLY_FRAMES) for i in range(REPLY_FRAMES)]
    assert [r.pcm.size for r in results[5:]] == [RATE_OUT, RATE_OUT, RATE_OUT * 4 // 10]

    # pause / resume: audio while paused is refused, the worker shows paused.
    n = len(c.messages)
    await c.send({"type": "pause"})
    assert (await c.wait("paused", start=n))["timeout"] == 60.0
    assert health(bridge_server)["worker_status"] == "duplex_paused"
    n = len(c.messages)
    await c.chunk(QUIET)
    c.sent_at.pop()
    assert "paused" in (await c.wait("error", start=n))["error"]
    n = len(c.messages)
    await c.send({"type": "resume"})
    await c.wait("resumed", start=n)
    assert health(bridge_server)["worker_status"] == "duplex_active"

    # force_listen (the frontend's interrupt): the reply stops in that very result.
    results = await c.play([SPEECH, QUIET, QUIET, QUIET], forced=(2,))
    assert [r.msg["current_time"] for r in results] == [8, 9, 10, 11]
    assert [r.msg["is_listen"] for r in results] == [True, False, True, True]
    rid3 = results[1].msg["response_id"]
    assert results[2].msg["end_of_turn"] is True and not results[2].pcm.any()
    assert [m for r in results[2:] for m in markers(r.pcm) if m[0] == response_tag(rid3)] == []
    await c.close()
    assert (await released(bridge_server))["worker_status"] == "idle"


async def test_reprepare_restarts_and_pause_timeout_releases_the_worker(
    bridge_server: BridgeServer, demo: Connect
) -> None:
    c = await demo("gw_sess_4")
    n = len(c.messages)
    await c.chunk(QUIET)
    assert "prepare" in (await c.wait("error", start=n))["error"]  # nothing before prepare
    c.sent_at.clear()
    await c.prepare(force_listen_count=0)
    first = await c.play([QUIET, QUIET])
    await c.prepare(force_listen_count=0)
    again = await c.play([QUIET])
    assert [r.msg["current_time"] for r in first + again] == [0, 1, 0]
    n = len(c.messages)
    await c.send({"type": "pause", "timeout": 0.3})
    await c.wait("paused", start=n)
    timeout = await c.wait("timeout", start=n, within_s=5)
    assert "timeout" in timeout["reason"].lower()
    await asyncio.wait_for(c.closed.wait(), 5)
    assert c.ws.close_code == 1000
    await c.close()
    assert (await released(bridge_server))["worker_status"] == "idle"


async def test_a_barge_in_is_answered_without_more_input(demo: Connect) -> None:
    """Stage0's answers for the chunks a barge-in cut short are never shown as decisions;
    the host's ChunksAnswered tells the bridge they are in, so the barge-in chunk's result
    leaves at once instead of waiting for the next chunk's decisions (or a timeout)."""
    c = await demo("gw_sess_5")
    await c.prepare(force_listen_count=1)
    results = await c.play([QUIET, SPEECH, QUIET])
    assert [r.msg["is_listen"] for r in results] == [True, True, False]  # the model is speaking
    await c.chunk(SPEECH)  # the user talks over it; no further input follows
    await c.wait_results(4, within_s=3.0)  # well inside the bridge's 5 s give-up timeout
    cut = c.results[3].msg
    assert cut["current_time"] == 3 and cut["is_listen"] is True and cut["end_of_turn"] is True
    await c.close()
