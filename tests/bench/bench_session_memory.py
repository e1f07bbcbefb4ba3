"""Is memory returned after sessions close? Rounds of Realtime sessions opened and closed.

The real server runs (scripted engine, Silero server VAD: each session's detector holds a
Silero context). Each round opens ``SESSIONS`` Realtime sessions at once, streams a little
audio into each (so its VAD runs), closes them all and waits until the host has forgotten
them; the session host's RSS is read after every round. With the contexts pooled the host
stays at the first round's peak; unpooled, each round left ~250 MB behind.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time

import websockets

from tests.bench.table import print_table
from tests.harness import ServerProcess, pcm16, silence

SESSIONS = 100
ROUNDS = 4


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


async def _one(base: str, audio: str) -> None:
    async with websockets.connect(f"ws://{base}/v1/realtime", max_size=None) as ws:
        while json.loads(await ws.recv())["type"] != "session.created":
            pass
        for _ in range(3):
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": audio}))
        await ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
        while json.loads(await ws.recv())["type"] != "input_audio_buffer.cleared":
            pass


async def _run() -> list[list[str]]:
    audio = base64.b64encode(pcm16(silence(200))).decode()
    with ServerProcess(sections={"host": {"vad": "silero"}}) as server:
        host = server.role_pid("host")
        base_sessions = server.health()[1]["sessions"]
        rows = [["before", f"{_rss_mb(host):.0f}", ""]]
        first = None
        for r in range(ROUNDS):
            t0 = time.perf_counter()
            await asyncio.gather(*(_one(server.base, audio) for _ in range(SESSIONS)))
            deadline = time.monotonic() + 30
            while server.health()[1]["sessions"] != base_sessions and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
            mb = _rss_mb(host)
            first = mb if first is None else first
            rows.append([f"after round {r + 1}", f"{mb:.0f}", f"{mb - first:+.0f} ({time.perf_counter() - t0:.1f} s)"])
    return rows


def main() -> None:
    rows = asyncio.run(_run())
    print_table(
        f"session host RSS over rounds of {SESSIONS} Realtime sessions (Silero VAD), opened and closed",
        ["when", "host RSS MB", "vs round 1"],
        rows,
    )


if __name__ == "__main__":
    main()
