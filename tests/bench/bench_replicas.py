"""Sessions served at real time with 1, 2 and 4 stage replicas (scripted engine).

Each replica pair (one stage0, one stage1 process) runs the scripted engine with a model
step of ``STEP_MS`` that batches at most ``MAX_BATCH`` sessions: 2 x 100 ms / 50 ms = 4
sessions at real time per stage0, the capacity a replica's model would have on its GPU. The
step is a sleep, not CPU work, so replicas on this 2-core machine scale as replicas on
separate GPUs would; what the bench measures is whether the session host, binding and
the bus keep up as replicas are added.

For each replica count, N duplex sessions stream silence at real time for ``SECONDS``;
they count as served at real time when the p95 decision latency (last frame of a chunk
sent -> its ``response.listen``) is below ``LATENCY_S`` for every session. N climbs in
steps of one replica's worth until that fails; the table gives the largest N that passed.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np

from tests.bench.table import print_table
from tests.cluster import Cluster
from tests.harness import NativeClient, silence

STEP_MS = 50.0
MAX_BATCH = 2
PER_REPLICA = 4  # 2 sessions per 50 ms step, 2 steps per 100 ms chunk
SECONDS = 3.0
FRAME_MS = 100  # one model chunk per frame: keeps the client's own CPU out of the way
LATENCY_S = 0.25
REPLICAS = (1, 2, 4)


class _Timed(NativeClient):
    async def add(self, event: dict[str, Any]) -> None:
        event["_at"] = time.monotonic()
        await super().add(event)


async def _stream(cl: _Timed, start_seq: int) -> list[float]:
    frame = silence(FRAME_MS)
    sent: dict[int, float] = {}
    t0 = time.monotonic()
    n = int(SECONDS * 1000 / FRAME_MS)
    for i in range(n + 1):
        await asyncio.sleep(max(0.0, t0 + i * FRAME_MS / 1000 - time.monotonic()))
        await cl.send_audio(frame)
        # The resampler holds a few samples back: chunk i - 1 is complete once frame i is in.
        if i > 0:
            sent[start_seq + i - 1] = time.monotonic()
    last = max(sent)
    try:
        await cl.wait_for(lambda e: e["type"] == "response.listen" and e["chunk_seq"] == last, within_s=20)
    except AssertionError:
        return [float("inf")]
    got = {e["chunk_seq"]: e["_at"] for e in cl.events if e["type"] == "response.listen"}
    return [got.get(s, float("inf")) - t for s, t in sent.items()]


async def _trial(c: Cluster, n: int) -> float:
    """The worst session's p95 decision latency with ``n`` sessions at once (s)."""
    clients = [await _Timed.connect(c) for _ in range(n)]  # type: ignore[arg-type]
    try:
        lat = await asyncio.gather(*(_stream(cl, 0) for cl in clients))
        return max(float(np.percentile(x, 95)) for x in lat)
    finally:
        for cl in clients:
            await cl.close()


def _run(replicas: int) -> tuple[int, float]:
    c = Cluster(
        sections={
            "host": {"vad": "energy"},
            "session": {"turn_mode": "duplex"},
            "engines.scripted": {"think_step_cost_ms": STEP_MS},
            "stage0": {"max_batch": MAX_BATCH},
        }
    )
    try:
        c.start("host", "host")
        for i in range(replicas):
            c.start("stage0", f"stage0-{i}")
            c.start("stage1", f"stage1-{i}")
        c.start("adapter", "adapter")
        c.wait_health(lambda code, body: code == 200 and sum(r["role"] == "stage0" for r in body["roles"]) == replicas)
        best, best_p95 = 0, 0.0
        n = replicas * 2
        while n <= replicas * PER_REPLICA * 2:
            p95 = asyncio.run(_trial(c, n))
            if p95 > LATENCY_S:
                break
            best, best_p95 = n, p95
            n += replicas
        return best, best_p95
    finally:
        c.stop()


def main() -> None:
    rows = []
    base = 0
    for r in REPLICAS:
        n, p95 = _run(r)
        base = base or n
        rows.append(
            [
                str(r),
                str(n),
                str(r * PER_REPLICA),
                f"{n / base:.2f}x" if base else "-",
                f"{p95 * 1000:.0f}",
            ]
        )
    print_table(
        f"Sessions at real time by stage replicas (scripted engine, {STEP_MS:.0f} ms step, batch {MAX_BATCH}; "
        f"p95 decision latency < {LATENCY_S * 1000:.0f} ms)",
        ["replicas", "sessions", "model capacity", "vs 1 replica", "worst p95 ms"],
        rows,
    )


if __name__ == "__main__":
    main()
