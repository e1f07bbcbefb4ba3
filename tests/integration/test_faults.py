"""Every role killed (SIGKILL) and hung (SIGSTOP) mid-response, two sessions each, over the
real processes with the default liveness settings (heartbeats every 0.1 s from a thread,
0.75 s timeout).

Stage0, stage1 and the host: each affected session gets an ``error`` and exactly one
terminal ``response.done`` (failed) within 1 s of the fault. A stage fault leaves the
sessions open: they keep their committed history and the next response works once the
stage is back (restarted by the supervisor, or resumed). A host fault ends them with a
reason (close 1011) and new sessions work once it is back. The adapter is the clients'
connection itself: killed, its sockets drop at once; stopped, the host declares it dead
within 1 s and frees its sessions, and once it resumes its clients get the error, the
terminal event and the close. The measured times are printed (pytest -s).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from typing import Any

import pytest

from tests.harness import NativeClient, ServerProcess, tone

pytestmark = pytest.mark.timeout(120)

LIMIT_S = 1.0
SECTIONS: dict[str, dict[str, Any]] = {
    "engines.scripted": {"reply_ms": 4000, "out_chunk_ms": 40},
    "stage1": {"max_lead_ms": 300},
    "host": {"vad": "energy"},
    "supervisor": {"restart_max": 3, "restart_window_s": 5.0},
}


async def _manual(server: ServerProcess) -> NativeClient:
    c = await NativeClient.connect(server)
    await c.send({"type": "session.update", "session": {"turn_mode": "manual"}})
    await c.wait_for("session.updated")
    return c


async def _start_turn(c: NativeClient) -> str:
    start = len(c.events)
    await c.stream(tone(300), frame_ms=100)
    await c.send({"type": "input_audio_buffer.commit"})
    await c.send({"type": "response.create"})
    rid: str = (await c.wait_for("response.created", start=start))["response"]["id"]
    await c.wait_for(lambda e: e["type"] == "audio" and e["response_id"] == rid, start=start)
    return rid


async def _mid_response(server: ServerProcess) -> list[tuple[NativeClient, str]]:
    clients = [await _manual(server) for _ in range(2)]
    return [(c, await _start_turn(c)) for c in clients]


async def _full_turn(c: NativeClient) -> dict[str, Any]:
    start = len(c.events)
    await c.stream(tone(300), frame_ms=100)
    await c.send({"type": "input_audio_buffer.commit"})
    await c.send({"type": "response.create"})
    done: dict[str, Any] = await c.wait_for("response.done", start=start, within_s=20)
    return done


async def _failed_within(c: NativeClient, rid: str, t0: float, code: str) -> float:
    """The session's error and its one terminal event for ``rid``; returns seconds after ``t0``."""
    done = await c.wait_for(lambda e: e["type"] == "response.done" and e["response"]["id"] == rid, within_s=10)
    assert done["response"]["status"] == "failed", done["response"]
    i = c.events.index(done)
    errors = [e for e in c.events[:i] if e["type"] == "error" and e["error"]["code"] == code]
    assert errors, [e["type"] for e in c.events[-10:]]
    assert len([e for e in c.events if e["type"] == "response.done" and e["response"]["id"] == rid]) == 1
    return c.time_of(done) - t0


def _wait_health(server: ServerProcess, ok: bool, timeout_s: float = 30.0) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        try:
            code, _ = server.health()
        except OSError:
            code = 0
        if (code == 200) == ok:
            return time.monotonic() - t0
        time.sleep(0.05)
    raise AssertionError(f"/health never became {'200' if ok else 'non-200'}: {server.health()}")


def _report(what: str, seconds: list[float]) -> None:
    print(f"\n[fault] {what}: " + ", ".join(f"{s:.3f} s" for s in seconds))


def _history(c: NativeClient) -> list[str]:
    return [i["id"] for i in c.of("session.snapshot")[-1]["snapshot"]["history"]]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["kill", "stop"])
@pytest.mark.parametrize("role", ["stage0", "stage1"])
async def test_stage_fault_fails_the_responses_within_a_second_and_the_sessions_go_on(
    role: str, sig: signal.Signals
) -> None:
    with ServerProcess(sections=SECTIONS) as server:
        pairs = await _mid_response(server)
        for c, _ in pairs:
            await c.send({"type": "session.get"})
            await c.wait_for("session.snapshot")
        before = [_history(c) for c, _ in pairs]
        pid = server.role_pid(role)
        t0 = time.monotonic()
        os.kill(pid, sig)
        try:
            took = [await _failed_within(c, rid, t0, "stage_unavailable") for c, rid in pairs]
            _report(f"{role} {sig.name}: error + response.done failed after", took)
            assert max(took) < LIMIT_S
            assert server.health()[0] == 503  # the adapter knew first
        finally:
            if sig == signal.SIGSTOP:
                os.kill(pid, signal.SIGCONT)  # the same process rejoins (a new connection)
        _wait_health(server, ok=True)
        if sig == signal.SIGKILL:
            assert server.role_pid(role) != pid
        else:
            assert server.role_pid(role) == pid
        for (c, _), hist in zip(pairs, before, strict=True):
            assert (await _full_turn(c))["response"]["status"] == "completed"
            await c.send({"type": "session.get"})
            n = len(hist)
            await c.wait_for(lambda e, n=n: e["type"] == "session.snapshot" and len(e["snapshot"]["history"]) > n)
            assert _history(c)[: len(hist)] == hist  # the committed history survived the fault
            await c.close()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["kill", "stop"])
async def test_host_fault_ends_sessions_with_their_terminal_events_and_the_service_recovers(
    sig: signal.Signals,
) -> None:
    with ServerProcess(sections=SECTIONS) as server:
        pairs = await _mid_response(server)
        pid = server.role_pid("host")
        t0 = time.monotonic()
        os.kill(pid, sig)
        try:
            took = [await _failed_within(c, rid, t0, "server_unavailable") for c, rid in pairs]
            for c, _ in pairs:
                await c.wait_closed(within_s=5)
                assert c.ws.close_code == 1011 and "session host" in c.ws.close_reason
            unhealthy = time.monotonic() - t0
            assert server.health()[0] == 503  # not 200 during the outage
            _report(f"host {sig.name}: error + response.done failed after", took)
            _report(f"host {sig.name}: /health 503 by", [unhealthy])
            assert max(took) < LIMIT_S
        finally:
            if sig == signal.SIGSTOP:
                os.kill(pid, signal.SIGCONT)
        _wait_health(server, ok=True)
        c2 = await _manual(server)
        assert (await _full_turn(c2))["response"]["status"] == "completed"
        await c2.close()


def _log_time(server: ServerProcess, pattern: str, since_wall: float) -> float | None:
    """Wall-clock time of the first log line matching ``pattern`` written after ``since_wall``."""
    for line in server.logs().splitlines():
        if not re.search(pattern, line):
            continue
        ts = json.loads(line)["ts"]  # 2026-01-01T00:00:00.123Z
        t = time.mktime(time.strptime(ts[:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone + int(ts[20:23]) / 1000
        if t >= since_wall - 0.01:
            return t
    return None


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["kill", "stop"])
async def test_adapter_fault_frees_its_sessions_within_a_second_and_the_service_recovers(sig: signal.Signals) -> None:
    with ServerProcess(sections=SECTIONS) as server:
        pairs = await _mid_response(server)
        pid = server.role_pid("adapter")
        wall0, t0 = time.time(), time.monotonic()
        os.kill(pid, sig)
        try:
            if sig == signal.SIGKILL:
                for c, _ in pairs:
                    await c.wait_closed(within_s=5)
                dropped = [c.closed_at - t0 for c, _ in pairs if c.closed_at is not None]
                _report("adapter SIGKILL: client sockets dropped after", dropped)
                assert max(dropped) < LIMIT_S
            deadline = time.monotonic() + 5
            while (seen := _log_time(server, r'"msg": "peer dead".*"peer_role": "adapter"', wall0)) is None:
                assert time.monotonic() < deadline, "the host never declared the adapter dead"
                await asyncio.sleep(0.05)
            closed = _log_time(server, r'"msg": "session closed"', wall0)
            assert closed is not None
            _report(f"adapter {sig.name}: host declared it dead / freed its sessions", [seen - wall0, closed - wall0])
            assert closed - wall0 < LIMIT_S + 0.05  # (log timestamps: whole milliseconds)
        finally:
            if sig == signal.SIGSTOP:
                os.kill(pid, signal.SIGCONT)
        if sig == signal.SIGSTOP:
            # Resumed, it learns the host forgot it: its clients get the error, the terminal
            # event of their response, and the close, with the reason.
            for c, rid in pairs:
                done = await c.wait_for(lambda e, rid=rid: e["type"] == "response.done" and e["response"]["id"] == rid)
                assert done["response"]["status"] == "failed"
                await c.wait_closed(within_s=5)
                assert c.ws.close_code == 1011
        _wait_health(server, ok=True)
        c2 = await _manual(server)
        assert (await _full_turn(c2))["response"]["status"] == "completed"
        await c2.close()
