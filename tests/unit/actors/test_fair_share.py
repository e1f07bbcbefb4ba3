"""The stage0 batch pick: a session bursting 10x real time cannot starve steady ones."""

from __future__ import annotations

from collections import deque

from duplexd.actors.fair_share import FairShare

CHUNK_S = 0.1


def _simulate(pick_fair: bool, seconds: float = 20.0, step_s: float = 0.03, max_batch: int = 1) -> dict[str, float]:
    """A replica stepping ``max_batch`` sessions every ``step_s``: two steady sessions at real
    time, one at 10x. Returns the worst wait (arrival to step end) of each steady session."""
    fair = FairShare()
    queues: dict[str, deque[float]] = {s: deque() for s in ("a", "b", "burst")}
    for s in queues:
        fair.open(s)
    period = {"a": CHUNK_S, "b": CHUNK_S, "burst": CHUNK_S / 10}
    next_at = {"a": 0.0, "b": 0.05, "burst": 0.0}
    worst = {"a": 0.0, "b": 0.0}
    t = 0.0
    while t < seconds:
        for s, q in queues.items():
            while next_at[s] <= t:
                q.append(next_at[s])
                fair.arrived(s, next_at[s], CHUNK_S)
                next_at[s] += period[s]
        waiting = [s for s, q in queues.items() if q]
        if pick_fair:
            chosen = fair.pick(waiting, max_batch)
        else:  # first come, first served: the oldest queued chunk first
            chosen = sorted(waiting, key=lambda s: queues[s][0])[:max_batch]
        t += step_s
        for s in chosen:
            arrived = queues[s].popleft()
            fair.served(s)
            if s in worst:
                worst[s] = max(worst[s], t - arrived)
    return worst


def test_steady_sessions_wait_at_most_about_two_steps_beside_a_burster() -> None:
    worst = _simulate(pick_fair=True)
    # The bound of fair_share.py: the step running at arrival plus its own step, and one
    # more step when both steady chunks arrive within one step (max_batch 1).
    assert max(worst.values()) <= 3 * 0.03 + 1e-9, worst


def test_first_come_first_served_lets_the_burster_starve_them() -> None:
    # The same load served by arrival: the steady sessions queue behind the burst.
    worst = _simulate(pick_fair=False)
    assert max(worst.values()) > 1.0, worst


def test_pick_keeps_order_and_prefers_earliest_heads() -> None:
    f = FairShare()
    for s in ("x", "y", "z"):
        f.open(s)
    for i in range(10):
        f.arrived("x", 0.0 + i * 0.01, CHUNK_S)  # bursting: tags 0.1 .. 1.0
    assert f.pick(["x", "y", "z"], 1) == ["x"]  # its first chunk is within its share
    for _ in range(3):
        f.served("x")  # x got 300 ms of audio stepped by t = 0.2: ahead of real time
    f.arrived("y", 0.2, CHUNK_S)
    f.arrived("z", 0.2, CHUNK_S)
    assert f.pick(["x", "y", "z"], 2) == ["y", "z"]
    f.served("y")
    f.served("z")
    assert f.pick(["x"], 1) == ["x"]
    f.close("x")
    assert f.head("x") == float("inf")
