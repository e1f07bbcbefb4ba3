"""Fairness inside a stage0 replica: one session bursting 10x real time does not raise the
p99 decision latency of sessions streaming at real time beyond a justified bound.

The replica steps one session per 25 ms step (max_batch 1, a model that cannot batch):
40 chunks/s in all, room for three sessions at real time (30 chunks/s). Two steady
sessions stream at real time; the third offers 100 chunks/s. With real-time shares
(actors/fair_share.py) the burster is served like a real-time session and its excess
waits in its own queue; a steady chunk waits at most for the step in progress, one step
of each other session whose head is due no later, and its own: 4 x 25 ms. The burster's
traffic itself (500 frames/s through the adapter and the host) costs CPU on this shared
2-core machine, which no scheduler removes: 100 ms more. So the bound is the baseline p99
(the same two sessions without the burster) plus 200 ms. Serving
chunks first come, first served instead would put every steady chunk behind the
burster's backlog, which grows by 60 chunks a second.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import numpy as np
import pytest

from tests.cluster import Cluster
from tests.harness import NativeClient, silence

pytestmark = pytest.mark.timeout(180)

STEP_MS = 25.0
CHUNK_MS = 100  # the scripted engine's chunk
FRAME_MS = 20
CPU_ALLOWANCE_S = 0.1  # the burster's own traffic on a shared 2-core machine (see above)


@pytest.fixture
def slow_replica() -> Iterator[Cluster]:
    c = Cluster(
        sections={
            "host": {"vad": "energy"},
            "engines.scripted": {"think_step_cost_ms": STEP_MS},
            "stage0": {"max_batch": 1},
            "session": {"turn_mode": "duplex"},
        }
    )
    try:
        for role in ("host", "stage0", "stage1", "adapter"):
            c.start(role, role)
        c.wait_health(lambda code, body: code == 200)
        yield c
    except BaseException:
        print(c.logs())
        raise
    finally:
        c.stop()


class Stamped(NativeClient):
    """Records when each event arrived, and counts the frames it sent."""

    frames_sent = 0

    async def add(self, event: dict) -> None:  # type: ignore[override]
        event["_at"] = time.monotonic()
        await super().add(event)


async def steady(cl: Stamped, seconds: float) -> list[float]:
    """Stream silence at real time; the latency (s) of each chunk's decision, from the send
    of the frame that completed the chunk to its response.listen. The last chunk of the
    phase is left out: the resampler holds a few samples of it until the next frame."""
    per_chunk = CHUNK_MS // FRAME_MS
    frame = silence(FRAME_MS)
    sent_at: dict[int, float] = {}
    t0 = time.monotonic()
    for i in range(int(seconds * 1000 / FRAME_MS)):
        await asyncio.sleep(max(0.0, t0 + i * FRAME_MS / 1000 - time.monotonic()))
        await cl.send_audio(frame)
        cl.frames_sent += 1
        if cl.frames_sent % per_chunk == 0:
            sent_at[cl.frames_sent // per_chunk - 1] = time.monotonic()
    last = max(sent_at)
    del sent_at[last]
    await cl.wait_for(lambda e: e["type"] == "response.listen" and e["chunk_seq"] == last - 1, within_s=60)
    got = {e["chunk_seq"]: e["_at"] for e in cl.events if e["type"] == "response.listen"}
    return [got[s] - t for s, t in sent_at.items()]


async def burst(cl: NativeClient, seconds: float, factor: float = 10.0) -> None:
    frame = silence(FRAME_MS)
    t0 = time.monotonic()
    n = int(seconds * factor * 1000 / FRAME_MS)
    for i in range(n):
        await asyncio.sleep(max(0.0, t0 + i * FRAME_MS / 1000 / factor - time.monotonic()))
        await cl.send_audio(frame)


async def test_a_burster_does_not_starve_steady_sessions(slow_replica: Cluster) -> None:
    c = slow_replica
    a = await Stamped.connect(c)  # type: ignore[arg-type]
    b = await Stamped.connect(c)  # type: ignore[arg-type]
    base = await asyncio.gather(steady(a, 3.0), steady(b, 3.0))
    base_p99 = float(np.percentile(base[0] + base[1], 99))
    burster = await Stamped.connect(c)  # type: ignore[arg-type]
    loaded = await asyncio.gather(steady(a, 4.0), steady(b, 4.0), burst(burster, 4.0))
    p99 = float(np.percentile(loaded[0] + loaded[1], 99))
    bound = base_p99 + 4 * STEP_MS / 1000 + CPU_ALLOWANCE_S
    print(f"steady p99: alone {base_p99 * 1000:.0f} ms, beside a 10x burster {p99 * 1000:.0f} ms "
          f"(bound {bound * 1000:.0f} ms)")
    assert p99 <= bound, (base_p99, p99)
    # The burster was really served too (it gets what the steady sessions leave).
    assert len(burster.of("response.listen")) > 20
    for cl in (a, b, burster):
        await cl.close()
