"""Rendezvous hashing of session ids onto session hosts."""

from __future__ import annotations

from collections import Counter

from duplexd.bus.shards import owner, ranked

HOSTS = ["tcp://10.0.0.5:7001", "tcp://10.0.0.6:7001", "tcp://10.0.0.7:7001"]


def test_owner_is_stable_and_spreads_sessions() -> None:
    ids = [f"sess_{i:05d}" for i in range(3000)]
    owners = [owner(s, HOSTS) for s in ids]
    assert owners == [owner(s, list(HOSTS)) for s in ids]  # same answer on every adapter
    counts = Counter(owners)
    assert set(counts) == {0, 1, 2}
    assert min(counts.values()) > 850  # ~1000 each


def test_a_dead_host_moves_only_its_own_sessions() -> None:
    ids = [f"sess_{i:05d}" for i in range(2000)]
    before = {s: owner(s, HOSTS) for s in ids}
    after = {s: owner(s, HOSTS, alive=lambda i: i != 1) for s in ids}
    for s in ids:
        if before[s] != 1:
            assert after[s] == before[s]
        else:
            assert after[s] == ranked(s, HOSTS)[1]
    assert owner("x", HOSTS, alive=lambda i: False) is None
