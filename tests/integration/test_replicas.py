"""Stage replicas as real processes over tcp: sessions spread over them, a killed replica's
sessions re-bind (one error and one failed response each) and the others never notice."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.cluster import Cluster
from tests.harness import NativeClient, free_port, tone

pytestmark = pytest.mark.timeout(180)


def tcp_bus() -> dict[str, Any]:
    return {"control": f"tcp://127.0.0.1:{free_port()}", "data": f"tcp://127.0.0.1:{free_port()}"}


@pytest.fixture
def replicas() -> Iterator[Cluster]:
    c = Cluster(
        sections={
            "bus": tcp_bus(),
            "host": {"vad": "energy"},
            "engines.scripted": {"reply_ms": 4000, "out_chunk_ms": 40},
            "stage1": {"max_lead_ms": 300},
        }
    )
    try:
        c.start("host", "host")
        for name in ("stage0-a", "stage0-b"):
            c.start("stage0", name)
        for name in ("stage1-a", "stage1-b"):
            c.start("stage1", name)
        c.start("adapter", "adapter")
        c.wait_health(lambda code, body: code == 200 and sum(r["role"] == "stage1" for r in body["roles"]) == 2)
        yield c
    except BaseException:
        print(c.logs())
        raise
    finally:
        c.stop()


def bindings(c: Cluster, host: str = "host") -> dict[str, tuple[str, str]]:
    """session id -> (stage0 identity, stage1 identity), from the host's "session opened" lines."""
    out: dict[str, tuple[str, str]] = {}
    for line in c.roles[host].logs().splitlines():
        if '"session opened"' in line:
            rec = json.loads(line)
            out[rec["session_id"]] = (rec["stage0"], rec["stage1"])
    return out


def identity_of(c: Cluster, name: str) -> str:
    pid = c.roles[name].pid
    _, body = c.health()
    return str(next(r["identity"] for r in body["roles"] if r["pid"] == pid))


async def open_speaking(c: Any, n: int) -> list[tuple[NativeClient, str]]:
    """``n`` sessions, each with a response that is sending audio."""
    out = []
    for _ in range(n):
        cl = await NativeClient.connect(c)
        await cl.send({"type": "session.update", "session": {"turn_mode": "manual"}})
        await cl.wait_for("session.updated")
        out.append((cl, str(cl.of("session.created")[0]["session"]["id"])))
    for cl, _ in out:
        await cl.stream(tone(300))
        await cl.send({"type": "input_audio_buffer.commit"})
        await cl.send({"type": "response.create"})
    for cl, _ in out:
        rid = (await cl.wait_for("response.created"))["response"]["id"]
        await cl.wait_for(lambda e, rid=rid: e["type"] == "audio" and e["response_id"] == rid, within_s=30)
    return out


async def next_turn_completes(cl: NativeClient) -> None:
    start = len(cl.events)
    await cl.stream(tone(300))
    await cl.send({"type": "input_audio_buffer.commit"})
    await cl.send({"type": "response.create"})
    done = await cl.wait_for("response.done", within_s=30, start=start)
    assert done["response"]["status"] == "completed", done
    assert any(f.header["response_id"] == done["response"]["id"] for f in cl.audio)


async def test_sessions_spread_and_a_killed_replica_rebinds_only_its_sessions(replicas: Cluster) -> None:
    c = replicas
    sessions = await open_speaking(c, 4)
    bound = bindings(c)
    s0a, s0b = identity_of(c, "stage0-a"), identity_of(c, "stage0-b")
    # Least-loaded binding: two sessions on each stage0 and on each stage1.
    assert sorted(b[0] for b in bound.values()) == sorted([s0a, s0a, s0b, s0b])
    assert len({b[1] for b in bound.values()}) == 2
    c.kill("stage0-a")
    victims = [(cl, sid) for cl, sid in sessions if bound[sid][0] == s0a]
    others = [(cl, sid) for cl, sid in sessions if bound[sid][0] != s0a]
    for cl, _ in victims:
        done = await cl.wait_for("response.done", within_s=15)
        assert done["response"]["status"] == "failed", done
    for cl, _ in others:
        done = await cl.wait_for("response.done", within_s=30)
        assert done["response"]["status"] == "completed", done
    await asyncio.gather(*(next_turn_completes(cl) for cl, _ in sessions))
    # One error and one failed response per re-bound session; nothing at all for the others.
    for cl, _ in victims:
        assert len(cl.of("error")) == 1, cl.of("error")
        assert [e["response"]["status"] for e in cl.of("response.done")] == ["failed", "completed"]
    for cl, _ in others:
        assert cl.of("error") == []
        assert [e["response"]["status"] for e in cl.of("response.done")] == ["completed", "completed"]
    # The host re-bound exactly the victims, onto the surviving stage0.
    rebound = [json.loads(ln) for ln in c.roles["host"].logs().splitlines() if '"session re-bound"' in ln]
    assert sorted(r["session_id"] for r in rebound) == sorted(sid for _, sid in victims)
    assert {r["stage"] for r in rebound} == {s0b}
    # Each replica announces its load: /health shows where the sessions are now.
    _, body = c.health()
    stage0s = {r["identity"]: (r.get("sessions"), r.get("load")) for r in body["roles"] if r["role"] == "stage0"}
    assert stage0s == {s0b: (4, 4)}
    for cl, _ in sessions:
        await cl.close()
