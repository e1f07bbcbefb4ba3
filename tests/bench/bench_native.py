"""Client-visible latency of ``/v1/duplex`` and of the MiniCPM-o demo bridge.

Real server processes (scripted engine, zero model cost), a client on the same machine:
what remains is duplexd's own overhead. Measured:

* native turn: ``response.create`` sent → first assistant audio frame received;
* native barge-in: a force frame (``0x02``) sent → ``epoch.advanced`` received (the moment
  a client flushes its playback) and → ``response.done`` (cancelled); stale bytes: audio
  of the cancelled response that still arrives after ``epoch.advanced`` (must be 0);
* bridge: a 1 s ``audio_chunk`` sent → its ``result`` received, for listen chunks (the
  model's decisions only) — the part of the demo's 1 s pacing budget duplexd uses.

Ratios are against the budget each must fit: one 20 ms audio frame for the barge-in flush
(the client should stop within a frame), one 100 ms model chunk for the first audio, one
1 s demo chunk for a bridge result.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time

import websockets

from tests.bench.table import percentiles, print_table
from tests.harness import REPO, NativeClient, ServerProcess, free_port, silence, tone

TURNS = 20
BRIDGE_CHUNKS = 40
RESULTS = REPO / "bench-results"


async def _native(server: ServerProcess, turns: int = TURNS) -> tuple[list[float], list[float], list[float], int]:
    c = await NativeClient.connect(server)
    await c.send({"type": "session.update", "session": {"turn_mode": "manual"}})
    await c.wait_for("session.updated")
    first_audio, flush, done = [], [], []
    stale = 0
    for _ in range(turns):
        await c.stream(tone(200))
        await c.send({"type": "input_audio_buffer.commit"})
        n = len(c.events)
        t0 = time.perf_counter()
        await c.send({"type": "response.create"})
        frame = await c.wait_for("audio", start=n)
        first_audio.append((time.perf_counter() - t0) * 1000)
        n = len(c.events)
        t1 = time.perf_counter()
        await c.ws.send(b"\x02")
        adv = await c.wait_for("epoch.advanced", start=n)
        flush.append((time.perf_counter() - t1) * 1000)
        await c.wait_for(
            lambda e, rid=frame["response_id"]: e["type"] == "response.done" and e["response"]["id"] == rid, start=n
        )
        done.append((time.perf_counter() - t1) * 1000)
        await asyncio.sleep(0.05)  # whatever was still in flight has arrived by now
        after = c.events.index(adv)
        stale += sum(e["bytes"] for e in c.events[after:]
                     if e["type"] == "audio" and e["response_id"] == frame["response_id"])
    await c.close()
    return first_audio, flush, done, stale


async def _bridge(port: int) -> list[float]:
    quiet = base64.b64encode(silence(1000, 16000).astype("<f4").tobytes()).decode()
    lat: list[float] = []
    async with websockets.connect(f"ws://127.0.0.1:{port}/ws/duplex?session_id=bench", max_size=None) as ws:
        await ws.send(json.dumps({"type": "prepare", "system_prompt": "bench", "config": {"force_listen_count": 0}}))
        assert json.loads(await ws.recv())["type"] == "prepared"
        for _ in range(BRIDGE_CHUNKS):
            t0 = time.perf_counter()
            await ws.send(json.dumps({"type": "audio_chunk", "audio_base64": quiet}))
            msg = json.loads(await ws.recv())
            assert msg["type"] == "result" and msg["is_listen"]
            lat.append((time.perf_counter() - t0) * 1000)
    return lat


def _row(name: str, values: list[float], budget_ms: float) -> list[str]:
    p50, p95, p99 = percentiles(values, 50, 95, 99)
    return [
        name,
        str(len(values)),
        f"{p50:.1f}",
        f"{p95:.1f}",
        f"{p99:.1f}",
        f"{budget_ms:g}",
        f"{p50 / budget_ms:.3f}",
    ]


def main(quick: bool = False) -> dict[str, object]:
    port = free_port()
    server = ServerProcess(
        sections={
            "server": {"bridge_port": port},
            "engines.scripted": {"reply_ms": 2000},
            "host": {"vad": "energy"},
        }
    )
    with server:
        first_audio, flush, done, stale = asyncio.run(_native(server, 5 if quick else TURNS))
        bridge = asyncio.run(_bridge(port)) if not quick else []
    rows = [
        _row("native: response.create -> first audio frame", first_audio, 100),
        _row("native: force frame -> epoch.advanced", flush, 20),
        _row("native: force frame -> response.done", done, 20),
    ]
    if bridge:
        rows.append(_row("bridge: audio_chunk -> result (listen)", bridge, 1000))
    print_table(
        "client-visible latency, scripted engine (ms); ratio = p50 / budget",
        ["path", "n", "p50", "p95", "p99", "budget", "ratio"],
        rows,
    )
    print(f"stale bytes after epoch.advanced over {len(flush)} cancels: {stale}", flush=True)
    out = {"rows": rows, "cancels": len(flush), "stale_bytes": stale,
           "cancel_to_done_p50_ms": percentiles(done, 50)[0]}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / ("native-quick.json" if quick else "native.json")).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
