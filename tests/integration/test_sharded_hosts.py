"""Two session hosts (shards) over tcp, each with two stage0 and two stage1 replicas, one
adapter routing sessions by id: spread, a killed replica re-binds only its own sessions,
and admission refuses clearly only when every host is full."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest

from duplexd.bus.shards import owner
from tests.cluster import Cluster
from tests.harness import NativeClient, free_port, tone
from tests.integration.test_replicas import next_turn_completes

pytestmark = pytest.mark.timeout(240)


def _hosts() -> list[dict[str, str]]:
    return [
        {"control": f"tcp://127.0.0.1:{free_port()}", "data": f"tcp://127.0.0.1:{free_port()}"} for _ in range(2)
    ]


def _start(c: Cluster, stage0: int, stage1: int) -> None:
    for shard in (0, 1):
        c.start("host", f"host-{shard}", args=("--shard", str(shard)))
    for shard in (0, 1):
        for i in range(stage0):
            c.start("stage0", f"stage0-{shard}{'ab'[i]}", args=("--shard", str(shard)))
        for i in range(stage1):
            c.start("stage1", f"stage1-{shard}{'ab'[i]}", args=("--shard", str(shard)))
    c.start("adapter", "adapter")
    c.wait_health(
        lambda code, body: code == 200 and sum(r["role"] == "stage0" for r in body["roles"]) == 2 * stage0,
        timeout_s=60,
    )


def opened(c: Cluster, host: str) -> dict[str, str]:
    """session id -> stage0 identity, from a host's "session opened" lines."""
    out = {}
    for line in c.roles[host].logs().splitlines():
        if '"session opened"' in line:
            rec = json.loads(line)
            out[rec["session_id"]] = rec["stage0"]
    return out


async def start_turn(cl: NativeClient) -> None:
    """A turn whose response is sending audio when this returns."""
    await cl.stream(tone(300))
    await cl.send({"type": "input_audio_buffer.commit"})
    await cl.send({"type": "response.create"})
    rid = (await cl.wait_for("response.created"))["response"]["id"]
    await cl.wait_for(lambda e: e["type"] == "audio" and e["response_id"] == rid, within_s=30)


def identity_of(c: Cluster, name: str) -> str:
    _, body = c.health()
    return str(next(r["identity"] for r in body["roles"] if r["pid"] == c.roles[name].pid))


@pytest.fixture
def shards() -> Iterator[tuple[Cluster, list[dict[str, str]]]]:
    hosts = _hosts()
    c = Cluster(
        sections={
            "bus": {"hosts": hosts},
            "host": {"vad": "energy"},
            "engines.scripted": {"reply_ms": 4000, "out_chunk_ms": 40},
            "stage1": {"max_lead_ms": 300},
        }
    )
    try:
        _start(c, 2, 2)
        yield c, hosts
    except BaseException:
        print(c.logs())
        raise
    finally:
        c.stop()


async def test_sessions_spread_over_hosts_and_replicas_and_a_kill_touches_only_its_own(
    shards: tuple[Cluster, list[dict[str, str]]],
) -> None:
    c, hosts = shards
    names = [h["control"] for h in hosts]
    sessions: list[tuple[NativeClient, str]] = []
    # Open until each host holds two (the hash decides where; at most 12 tries in practice).
    while min(len(opened(c, "host-0")), len(opened(c, "host-1"))) < 2 and len(sessions) < 16:
        cl = await NativeClient.connect(c)  # type: ignore[arg-type]
        await cl.send({"type": "session.update", "session": {"turn_mode": "manual"}})
        await cl.wait_for("session.updated")
        sessions.append((cl, str(cl.of("session.created")[0]["session"]["id"])))
    # Every one speaking at once when the replica dies.
    await asyncio.gather(*(start_turn(cl) for cl, _ in sessions))
    on = {sid: (0 if sid in opened(c, "host-0") else 1) for _, sid in sessions}
    # Every session is on its owner by rendezvous hash (all hosts had room).
    assert all(on[sid] == owner(sid, names) for _, sid in sessions)
    assert all(sid in opened(c, f"host-{on[sid]}") for _, sid in sessions)
    # Within each host, least-loaded binding: its sessions split evenly over its two stage0s.
    for shard in (0, 1):
        per = [list(opened(c, f"host-{shard}").values()).count(identity_of(c, f"stage0-{shard}{x}")) for x in "ab"]
        assert abs(per[0] - per[1]) <= 1 and sum(per) == len(opened(c, f"host-{shard}")), per
    # Kill the stage0 of host 0 that serves sessions.
    s0 = opened(c, "host-0")
    dead = "stage0-0a" if identity_of(c, "stage0-0a") in s0.values() else "stage0-0b"
    dead_id = identity_of(c, dead)
    c.kill(dead)
    victims = [(cl, sid) for cl, sid in sessions if s0.get(sid) == dead_id]
    others = [(cl, sid) for cl, sid in sessions if s0.get(sid) != dead_id]
    assert victims and any(on[sid] == 1 for _, sid in others)
    for cl, _ in victims:
        assert (await cl.wait_for("response.done", within_s=15))["response"]["status"] == "failed"
    for cl, _ in others:
        assert (await cl.wait_for("response.done", within_s=30))["response"]["status"] == "completed"
    await asyncio.gather(*(next_turn_completes(cl) for cl, _ in sessions))
    for cl, _ in victims:
        assert len(cl.of("error")) == 1, cl.of("error")
        assert [e["response"]["status"] for e in cl.of("response.done")] == ["failed", "completed"]
    for cl, _ in others:
        assert cl.of("error") == []
        assert [e["response"]["status"] for e in cl.of("response.done")] == ["completed", "completed"]
    rebound = [json.loads(ln) for ln in c.roles["host-0"].logs().splitlines() if '"session re-bound"' in ln]
    assert sorted(r["session_id"] for r in rebound) == sorted(sid for _, sid in victims)
    assert '"session re-bound"' not in c.roles["host-1"].logs()
    for cl, _ in sessions:
        await cl.close()


async def test_admission_refuses_only_when_every_host_is_full() -> None:
    sections: dict[str, dict[str, Any]] = {
        "bus": {"hosts": _hosts()},
        "host": {"vad": "energy"},
        "stage0": {"max_sessions": 1},
    }
    c = Cluster(sections=sections)
    try:
        _start(c, 1, 1)
        first = await NativeClient.connect(c)  # type: ignore[arg-type]
        sid1 = first.of("session.created")[0]["session"]["id"]
        # Once the adapter knows that host is full, the next session goes to the other one.
        c.wait_health(lambda code, body: body.get("available") == 1)
        second = await NativeClient.connect(c)  # type: ignore[arg-type]
        sid2 = second.of("session.created")[0]["session"]["id"]
        assert {sid1 in opened(c, "host-0"), sid2 in opened(c, "host-0")} == {True, False}
        c.wait_health(lambda code, body: body.get("available") == 0)
        # Both full: refused at once, clearly, and told to come back later.
        ws = await _refused(c)
        assert ws["code"] == "capacity_exceeded" and ws["close"] == 1013, ws
        # A session ends: room again, a new session is admitted.
        await first.close()
        c.wait_health(lambda code, body: body.get("available") == 1)
        third = await NativeClient.connect(c)  # type: ignore[arg-type]
        assert third.of("session.created")
        await second.close()
        await third.close()
    except BaseException:
        print(c.logs())
        raise
    finally:
        c.stop()


async def _refused(c: Cluster) -> dict[str, Any]:
    import websockets

    ws = await websockets.connect(f"ws://{c.base}/v1/duplex", max_size=None)
    events = []
    try:
        async for frame in ws:
            if isinstance(frame, str):
                events.append(json.loads(frame))
    except websockets.ConnectionClosed:
        pass
    errors = [e for e in events if e["type"] == "error"]
    assert len(errors) == 1, events
    assert not any(e["type"] == "session.created" for e in events)
    return {"code": errors[0]["error"]["code"], "close": ws.close_code}
