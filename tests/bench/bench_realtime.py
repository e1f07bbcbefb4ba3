"""How long a huge ``input_audio_buffer.append`` stalls the adapter's event loop.

The real server runs (four processes, scripted engine). A probe connection sends an
event the adapter answers by itself (an unknown event type → ``error``) every 5 ms and
times each answer, while a second connection sends one large append. The adapter's
loop serves every connection, so the probe's worst answer time is the stall that large
append causes for everyone else.

Cases: idle; a 15.5 MiB append (refused by size before any decoding; the largest frame below
the 21 MiB frame limit); a 10 MiB append
that is accepted (decoded off the loop, then fed to the session in slices). The "inline"
column is what the loop would block for if the same append were decoded and converted
in one go on it (base64 decode + pcm16 → float32 + resample, measured here in-process):
the ratio shows what the off-loop decode and slicing save. The "framing" column is a
lower bound of the part no handler can avoid: the websockets library reassembles,
unmasks and UTF-8-decodes the whole text frame on the loop before any handler sees it
(unmask with the library's own C ``apply_mask`` + decode + ``json.loads``, measured
in-process); the rest of the stall is the library reading the frame off the socket.
On a shared 2-core machine the max column is noisy: compare rows of one run.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import multiprocessing as mp
import time
from typing import Any

import numpy as np
import soxr
import websockets
from websockets.speedups import apply_mask

from tests.bench.table import percentiles, print_table
from tests.harness import ServerProcess

PROBE_EVERY_S = 0.005


async def _probe(ws: websockets.ClientConnection, stop: asyncio.Event, out: list[float]) -> None:
    msg = json.dumps({"type": "bench.probe"})
    while not stop.is_set():
        t0 = time.perf_counter()
        await ws.send(msg)
        while True:
            e = json.loads(await ws.recv())
            if e["type"] == "error" and e["error"]["code"] == "unknown_event":
                break
        out.append((time.perf_counter() - t0) * 1000)
        await asyncio.sleep(PROBE_EVERY_S)


def _send_big(url: str, payload: str, go: Any, result: Any) -> None:
    """In its own process, so the client's own work on a huge frame (encoding, masking)
    does not stall the probe's loop: only the server's stall is measured."""

    async def run() -> None:
        async with websockets.connect(url, max_size=None) as big:
            while json.loads(await big.recv())["type"] != "conversation.created":
                pass
            await big.send(json.dumps({"type": "session.update", "session": {"turn_detection": None}}))
            while json.loads(await big.recv())["type"] != "session.updated":
                pass
            result.send("ready")
            await asyncio.to_thread(go.wait)
            t0 = time.perf_counter()
            await big.send(payload)
            try:
                async with asyncio.timeout(2.0):
                    while json.loads(await big.recv())["type"] != "error":
                        pass
                result.send((time.perf_counter() - t0) * 1000)
            except TimeoutError:
                result.send(float("nan"))  # accepted: no answer is the answer

    asyncio.run(run())


async def _case(server: ServerProcess, payload: str | None) -> tuple[list[float], float]:
    """Probe answer times (ms) while another process sends ``payload`` (an append
    event); and how long that sender waited for the adapter's error (nan: accepted)."""
    url = f"ws://{server.base}/v1/realtime"
    ctx = mp.get_context("fork")
    go = ctx.Event()
    here, there = ctx.Pipe()
    sender = ctx.Process(target=_send_big, args=(url, payload, go, there)) if payload else None
    if sender is not None:
        sender.start()
        assert await asyncio.to_thread(here.recv) == "ready"
    async with websockets.connect(url, max_size=None) as probe:
        while json.loads(await probe.recv())["type"] != "conversation.created":
            pass
        times: list[float] = []
        stop = asyncio.Event()
        task = asyncio.get_running_loop().create_task(_probe(probe, stop, times))
        await asyncio.sleep(0.3)
        verdict = 0.0
        if sender is not None:
            go.set()
            verdict = await asyncio.to_thread(here.recv)
            sender.join()
        await asyncio.sleep(0.5)
        stop.set()
        await task
        return times, verdict


def _inline_ms(raw_b64: str, rounds: int = 3) -> float:
    """What decoding the append in one go on the loop would cost."""
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        raw = base64.b64decode(raw_b64, validate=True)
        x = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
        soxr.resample(x, 24000, 16000)
        best = min(best, (time.perf_counter() - t0) * 1000)
    return best


def _framing_ms(payload: str, rounds: int = 3) -> float:
    data = payload.encode()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        apply_mask(data, b"\x01\x02\x03\x04")
        json.loads(data.decode())
        best = min(best, (time.perf_counter() - t0) * 1000)
    return best


def main() -> None:
    rng = np.random.default_rng(7)
    huge = base64.b64encode(rng.integers(-3000, 3000, 31 * 256 * 1024, dtype=np.int16).tobytes()).decode()
    big_ok = base64.b64encode(rng.integers(-3000, 3000, 5 * 1024 * 1024, dtype=np.int16).tobytes()).decode()
    cases = {
        "idle": None,
        "15.5 MiB append (refused)": json.dumps({"type": "input_audio_buffer.append", "audio": huge}),
        "10 MiB append (accepted)": json.dumps({"type": "input_audio_buffer.append", "audio": big_ok}),
    }
    inline = {
        "idle": 0.0,
        "15.5 MiB append (refused)": _inline_ms(huge),
        "10 MiB append (accepted)": _inline_ms(big_ok),
    }
    framing = {name: _framing_ms(p) if p else 0.0 for name, p in cases.items()}
    rows: list[list[str]] = []
    with ServerProcess(sections={"session": {"turn_mode": "manual"}}) as server:

        async def run() -> None:
            for name, payload in cases.items():
                times, verdict = await _case(server, payload)
                p50, p99 = percentiles(times, 50, 99)
                worst = max(times)
                ratio = f"{inline[name] / worst:.1f}x" if inline[name] else "-"
                rows.append(
                    [
                        name,
                        str(len(times)),
                        f"{p50:.2f}",
                        f"{p99:.2f}",
                        f"{worst:.1f}",
                        f"{verdict:.0f}" if verdict and not math.isnan(verdict) else "-",
                        f"{framing[name]:.0f}" if framing[name] else "-",
                        f"{inline[name]:.0f}" if inline[name] else "-",
                        ratio,
                    ]
                )

        asyncio.run(run())
    print_table(
        "Adapter event-loop stall during one large Realtime append (probe answer time on another connection, ms)",
        ["case", "probes", "p50", "p99", "max", "error after", "framing", "inline decode", "inline / max"],
        rows,
    )


if __name__ == "__main__":
    main()
