"""Soak: many real-time Realtime sessions with random barge-ins, for minutes.

Not part of ``make bench`` or CI (it runs for ten minutes by default):

    .venv/bin/python -m tests.bench.soak [--sessions 50] [--minutes 10] [--json build/soak.json]

The real server runs (four processes, scripted engine, energy server VAD). Each session
streams microphone audio paced in real time (100 ms frames): a tone utterance of 0.4-1.2 s,
then silence; the server VAD ends the turn and the reply (2 s of audio) starts. In half of
the turns the client talks over the reply after a random 0.1-1.5 s (a barge-in: the server
cancels it); in the other half it listens to the end. Checked and reported:

- stale audio: any ``response.output_audio.delta`` of a response after its ``response.done``
  (must be 0);
- lost terminal events: a ``response.created`` without its ``response.done`` once the run
  has drained (must be 0), and duplicate ``response.done`` (must be 0);
- errors by code (a session that gets ``overloaded`` or ``client_too_slow`` is a failure);
- RSS of every role, sampled every 5 s: the least-squares slope in MB per minute over the
  second half of the run (after warm-up), which must be flat.

Results go to the JSON file and a printed table.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import random
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import websockets

from tests.bench.table import percentiles, print_table
from tests.harness import ServerProcess, pcm16, silence, tone

FRAME_MS = 100
REPLY_MS = 2000


@dataclass
class SessionStats:
    created: set[str] = field(default_factory=set)
    done: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    stale_deltas: int = 0
    deltas: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    turns: int = 0
    barge_ins: int = 0
    closed_early: str = ""
    first_audio_s: list[float] = field(default_factory=list)


def _b64(x: np.ndarray) -> str:
    return base64.b64encode(pcm16(x)).decode()


SPEECH = _b64(tone(FRAME_MS, amp=0.3))
QUIET = _b64(silence(FRAME_MS))


async def _session(base: str, rng: random.Random, stop_at: float, st: SessionStats) -> None:
    ws = await websockets.connect(f"ws://{base}/v1/realtime", max_size=None)
    playing: dict[str, bool] = {"on": False}
    speech_end = {"t": 0.0}
    turn_done = asyncio.Event()

    async def reader() -> None:
        try:
            async for frame in ws:
                e = json.loads(frame)
                t = e["type"]
                if t == "response.created":
                    st.created.add(e["response"]["id"])
                elif t == "response.output_audio.delta":
                    st.deltas += 1
                    if st.done[e["response_id"]]:
                        st.stale_deltas += 1
                    if not playing["on"]:
                        playing["on"] = True
                        if speech_end["t"]:
                            st.first_audio_s.append(time.monotonic() - speech_end["t"])
                            speech_end["t"] = 0.0
                elif t == "response.done":
                    r = e["response"]
                    st.done[r["id"]] += 1
                    st.statuses[r["status"]] += 1
                    playing["on"] = False
                    turn_done.set()
                elif t == "error":
                    st.errors[e["error"]["code"]] += 1
        except websockets.ConnectionClosed as exc:
            st.closed_early = f"{exc.rcvd.code if exc.rcvd else None}"

    task = asyncio.get_running_loop().create_task(reader())
    next_at = time.monotonic()

    async def frames(n: int, b64: str) -> None:
        nonlocal next_at
        for _ in range(n):
            next_at += FRAME_MS / 1000
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": b64}))

    try:
        while time.monotonic() < stop_at and not st.closed_early:
            st.turns += 1
            turn_done.clear()
            await frames(rng.randint(4, 12), SPEECH)
            speech_end["t"] = time.monotonic()
            await frames(6, QUIET)  # 600 ms: the server VAD (500 ms) ends the turn
            if rng.random() < 0.5:
                # Barge in while the reply plays (once it has started), after a random time.
                waited = 0
                while not playing["on"] and waited < 40:
                    await frames(1, QUIET)
                    waited += 1
                await frames(rng.randint(1, 15), QUIET)
                if playing["on"]:
                    st.barge_ins += 1
                # The barge-in is the start of the next turn's utterance (loop continues).
            else:
                waited = 0
                while not turn_done.is_set() and waited < 60:
                    await frames(1, QUIET)
                    waited += 1
        await frames(10, QUIET)  # let the last turn finish
    finally:
        await asyncio.sleep(REPLY_MS / 1000 + 1.0)  # drain: every created response must end
        await ws.close()
        await task


def _rss(server: ServerProcess) -> dict[str, float]:
    out = {}
    for r in server.health()[1].get("roles", []):
        try:
            with open(f"/proc/{r['pid']}/status") as f:
                kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
            out[r["role"]] = kb / 1024
        except (OSError, StopIteration):
            pass
    return out


def _metrics(server: ServerProcess) -> str:
    with urllib.request.urlopen(f"http://{server.base}/metrics", timeout=5) as r:
        return str(r.read().decode())


def _slope_mb_per_min(samples: list[tuple[float, float]]) -> float:
    if len(samples) < 3:
        return float("nan")
    t = np.array([s[0] for s in samples]) / 60
    y = np.array([s[1] for s in samples])
    return float(np.polyfit(t, y, 1)[0])


async def _run(n: int, minutes: float, seed: int) -> dict[str, Any]:
    sections = {
        "engines.scripted": {"reply_ms": REPLY_MS, "out_chunk_ms": 40},
        "stage1": {"max_lead_ms": 300},
        "host": {"vad": "energy", "max_sessions": n + 10},
    }
    with ServerProcess(sections=sections) as server:
        rng = random.Random(seed)
        stats = [SessionStats() for _ in range(n)]
        t0 = time.monotonic()
        stop_at = t0 + minutes * 60
        rss: dict[str, list[tuple[float, float]]] = {}
        tasks = []
        for i in range(n):
            tasks.append(asyncio.ensure_future(_session(server.base, random.Random(rng.random()), stop_at, stats[i])))
            await asyncio.sleep(0.05)  # ramp up over a few seconds
        while not all(t.done() for t in tasks):
            now = time.monotonic() - t0
            for role, mb in (await asyncio.to_thread(_rss, server)).items():
                rss.setdefault(role, []).append((now, mb))
            await asyncio.wait(tasks, timeout=5.0)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        metrics = await asyncio.to_thread(_metrics, server)
    half = minutes * 60 / 2
    created = sum(len(s.created) for s in stats)
    lost = sum(len(s.created - set(s.done)) for s in stats)
    dup = sum(sum(v - 1 for v in s.done.values() if v > 1) for s in stats)
    errors: Counter[str] = Counter()
    for s in stats:
        errors.update(s.errors)
    statuses: Counter[str] = Counter()
    for s in stats:
        statuses.update(s.statuses)
    first = [x for s in stats for x in s.first_audio_s]
    stale_host = sum(
        float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("duplexd_stale_dropped_total{")
    )
    return {
        "sessions": n,
        "minutes": minutes,
        "seed": seed,
        "turns": sum(s.turns for s in stats),
        "barge_ins": sum(s.barge_ins for s in stats),
        "responses_created": created,
        "responses_by_status": dict(statuses),
        "audio_deltas": sum(s.deltas for s in stats),
        "stale_audio_deltas": sum(s.stale_deltas for s in stats),
        "lost_terminal_events": lost,
        "duplicate_terminal_events": dup,
        "errors": dict(errors),
        "sessions_closed_early": sum(bool(s.closed_early) for s in stats),
        "session_exceptions": [repr(r) for r in results if isinstance(r, BaseException)],
        "stale_dropped_in_server": stale_host,
        "speech_end_to_first_audio_s": dict(zip(("p50", "p95", "p99"), percentiles(first, 50, 95, 99), strict=True))
        if first
        else {},
        "rss_mb": {
            role: {
                "start": s[0][1],
                "end": s[-1][1],
                "max": max(v for _, v in s),
                "slope_mb_per_min_second_half": _slope_mb_per_min([x for x in s if x[0] >= half]),
            }
            for role, s in rss.items()
        },
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=50)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=15)
    ap.add_argument("--json", default="build/soak.json")
    a = ap.parse_args(argv)
    res = asyncio.run(_run(a.sessions, a.minutes, a.seed))
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(res, indent=2))
    rows = [
        ["sessions x minutes", f"{res['sessions']} x {res['minutes']:g}"],
        ["turns / barge-ins", f"{res['turns']} / {res['barge_ins']}"],
        ["responses created", str(res["responses_created"])],
        ["responses by status", json.dumps(res["responses_by_status"])],
        ["stale audio deltas (must be 0)", str(res["stale_audio_deltas"])],
        ["lost terminal events (must be 0)", str(res["lost_terminal_events"])],
        ["duplicate terminal events (must be 0)", str(res["duplicate_terminal_events"])],
        ["errors", json.dumps(res["errors"])],
        ["sessions closed early", str(res["sessions_closed_early"])],
        ["stale audio dropped in the server", f"{res['stale_dropped_in_server']:.0f}"],
        ["speech end -> first audio (p50/p95/p99 s)", " / ".join(
            f"{v:.3f}" for v in res["speech_end_to_first_audio_s"].values())],
    ]
    for role, r in sorted(res["rss_mb"].items()):
        rows.append([f"RSS {role} MB (start/end/max, slope MB/min)",
                     f"{r['start']:.0f} / {r['end']:.0f} / {r['max']:.0f}, {r['slope_mb_per_min_second_half']:+.2f}"])
    print_table("soak: real-time Realtime sessions with random barge-ins", ["measure", "value"], rows)
    print(f"(json: {a.json})")


if __name__ == "__main__":
    main()
