"""Failure handling over real processes: restart intensity, drain, bad peers, metrics.
Killed and hung roles: test_faults.py; the watchdog: test_watchdog.py."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import urllib.request

import msgspec
import pytest
import zmq

from duplexd.bus.messages import PROTOCOL_VERSION, Hello, Refused, Role
from tests.harness import NativeClient, RealtimeClient, ServerProcess, tone

pytestmark = pytest.mark.timeout(90)

FAST_FAILURE = {
    "bus": {"heartbeat_interval_s": 0.2, "heartbeat_timeout_s": 1.5},
    "engines.scripted": {"reply_ms": 3000},
    "stage1": {"max_lead_ms": 300},
    "supervisor": {"restart_max": 3, "restart_window_s": 5.0},
}


async def _manual(server: ServerProcess) -> NativeClient:
    c = await NativeClient.connect(server)
    await c.send({"type": "session.update", "session": {"turn_mode": "manual"}})
    await c.wait_for("session.updated")
    return c


async def _start_turn(c: NativeClient) -> str:
    start = len(c.events)
    await c.stream(tone(300))
    await c.send({"type": "input_audio_buffer.commit"})
    await c.send({"type": "response.create"})
    created = await c.wait_for("response.created", start=start)
    return created["response"]["id"]


async def _full_turn(c: NativeClient) -> dict:
    start = len(c.events)
    await _start_turn(c)
    return await c.wait_for("response.done", start=start, within_s=20)


def _wait_new_pid(server: ServerProcess, role: str, old: int, timeout_s: float = 30) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        code, body = server.health()
        pids = [r["pid"] for r in body.get("roles", []) if r["role"] == role]
        if code == 200 and len(pids) == 1 and pids[0] != old:
            return pids[0]
        time.sleep(0.1)
    raise TimeoutError(f"{role} was not restarted: {server.health()}")


def test_supervisor_gives_up_when_a_role_keeps_dying() -> None:
    sections = {**FAST_FAILURE, "supervisor": {"restart_max": 2, "restart_window_s": 60.0}}
    server = ServerProcess(sections=sections).start()
    try:
        for _ in range(3):
            pid = server.role_pid("stage1")
            os.kill(pid, signal.SIGKILL)
            if _ < 2:
                _wait_new_pid(server, "stage1", pid)
        assert server.proc is not None
        assert server.proc.wait(timeout=30) == 1
        critical = [line for line in server.logs().splitlines() if '"level": "critical"' in line]
        assert len(critical) == 1 and "role keeps dying; giving up" in critical[0]  # one clear line
        # A clean stop: every other role was stopped, none left behind.
        for line in server.logs().splitlines():
            if '"msg": "started role"' in line:
                pid = int(line.split('"child_pid": ')[1].split("}")[0].split(",")[0])
                with pytest.raises(ProcessLookupError):
                    os.kill(pid, 0)
    finally:
        server.stop()


async def test_sigterm_drains_active_response_then_exits_zero() -> None:
    server = ServerProcess(sections=FAST_FAILURE).start()
    try:
        c = await _manual(server)
        rid = await _start_turn(c)
        await c.wait_for(lambda e: e["type"] == "audio" and e["response_id"] == rid)
        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)
        done = await c.wait_for("response.done", within_s=15)
        assert done["response"]["status"] == "completed"  # drained, not cut off
        await c.wait_closed(within_s=15)
        assert c.ws.close_code == 1001
        assert await asyncio.to_thread(server.proc.wait, 30) == 0
    finally:
        server.stop()


async def test_sigterm_drain_timeout_ends_the_response_visibly() -> None:
    """A response longer than the drain timeout still gets its terminal event: an error,
    response.done (failed), then the close 1001; the server exits 0."""
    sections = {**FAST_FAILURE, "engines.scripted": {"reply_ms": 20000}, "server": {"drain_timeout_s": 0.5}}
    server = ServerProcess(sections=sections).start()
    try:
        c = await _manual(server)
        rid = await _start_turn(c)
        await c.wait_for(lambda e: e["type"] == "audio" and e["response_id"] == rid)
        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)
        done = await c.wait_for("response.done", within_s=15)
        assert done["response"]["id"] == rid and done["response"]["status"] == "failed"
        err = [e for e in c.events[: c.events.index(done)] if e["type"] == "error"]
        assert err and err[-1]["error"]["code"] == "server_shutting_down"
        await c.wait_closed(within_s=15)
        assert c.ws.close_code == 1001
        assert len(c.of("response.done")) == 1
        assert await asyncio.to_thread(server.proc.wait, 30) == 0
    finally:
        server.stop()


def test_peer_with_another_protocol_version_is_refused_and_garbage_is_survived(
    scripted_server: ServerProcess,
) -> None:
    ctl_addr = f"ipc://{_run_dir(scripted_server)}/control.sock"
    bad_frames = 'duplexd_bus_bad_frames_total{identity="host",role="host"}'
    before = _sample(_metrics(scripted_server), bad_frames)
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.IDENTITY, b"stranger")
    s.connect(ctl_addr)
    try:
        s.send(b"\xc1\xc1 not a message")  # garbage first: the host must shrug it off
        s.send(msgspec.msgpack.encode(Hello(Role.STAGE0, "stranger", 1, PROTOCOL_VERSION + 98)))
        assert s.poll(5000)
        reply = msgspec.msgpack.decode(s.recv(), type=Refused)
        assert "protocol version" in reply.reason
    finally:
        s.close(0)
        ctx.term()
    code, body = scripted_server.health()
    assert code == 200 and len(body["roles"]) == 4  # the stranger was not admitted
    # The garbage frame was counted (the counter exists from start-up at 0: wait for it to move).
    deadline = time.monotonic() + 10
    while _sample(_metrics(scripted_server), bad_frames) < before + 1:
        assert time.monotonic() < deadline, f"the bad frame never reached {bad_frames}"
        time.sleep(0.2)


async def test_metrics_cover_every_role(scripted_server: ServerProcess) -> None:
    c = await _manual(scripted_server)
    assert (await _full_turn(c))["response"]["status"] == "completed"
    await c.close()
    deadline = time.monotonic() + 10
    while True:
        text = await asyncio.to_thread(_metrics, scripted_server)
        roles = {r for r in ("adapter", "host", "stage0", "stage1") if f'role="{r}"' in text}
        # Stages and the host ship their metrics every couple of seconds: wait for the turn's
        # steps and its completed response to show (one snapshot may lag the other).
        if (
            len(roles) == 4
            and 'duplexd_stage_step_seconds_count{identity="stage1' in text
            and 'duplexd_responses_total{identity="host",role="host",status="completed"}' in text
        ):
            break
        assert time.monotonic() < deadline, text[-2000:]
        await asyncio.sleep(0.3)
    assert "# TYPE duplexd_stage_step_seconds histogram" in text
    assert 'duplexd_responses_total{identity="host",role="host",status="completed"}' in text
    assert 'duplexd_sessions{identity="host",role="host"}' in text
    # One exposition: every family's metadata appears once (Prometheus rejects duplicates).
    help_lines = [line for line in text.splitlines() if line.startswith("# HELP")]
    assert len(help_lines) == len(set(help_lines))


async def test_operator_metrics(scripted_server: ServerProcess) -> None:
    """What an operator graphs: process CPU/RSS of every role, connections by protocol,
    queue depths, per-stage step time, end of speech to first audio."""
    conns = 'duplexd_ws_connections{{endpoint="{}",identity="{}",role="adapter"}}'
    adapter = next(r["identity"] for r in scripted_server.health()[1]["roles"] if r["role"] == "adapter")
    before = await asyncio.to_thread(_metrics, scripted_server)
    eos_series = 'duplexd_speech_end_to_first_audio_seconds_count{identity="host",role="host"}'
    done_series = 'duplexd_responses_total{identity="host",role="host",status="completed"}'
    # Both from one host snapshot (it ships every couple of seconds, so it may lag): whatever
    # turns it already counts, the end-of-speech histogram counts them too.
    eos, done = _sample(before, eos_series), _sample(before, done_series)
    c = await _manual(scripted_server)
    rt = await RealtimeClient.connect(scripted_server)
    assert (await _full_turn(c))["response"]["status"] == "completed"
    deadline = time.monotonic() + 10
    while True:
        text = await asyncio.to_thread(_metrics, scripted_server)
        rss = {
            r: _sample(text, f'process_resident_memory_bytes{{identity="{i}",role="{r}"}}')
            for r, i in ((x["role"], x["identity"]) for x in scripted_server.health()[1]["roles"])
        }
        if all(v > 0 for v in rss.values()) and _sample(text, done_series) >= done + 1:
            break
        assert time.monotonic() < deadline, rss
        await asyncio.sleep(0.3)
    assert len(rss) == 4 and all(v > 10e6 for v in rss.values()), rss
    assert "process_cpu_seconds_total{" in text
    for endpoint in ("duplex", "realtime"):  # the native protocol and the Realtime one
        series = conns.format(endpoint, adapter)
        assert _sample(text, series) >= _sample(before, series) + 1, endpoint
    for queue in ("host_adapter_backlog", "adapter_egress", "stage0_input", "stage_held"):
        assert f'queue="{queue}"' in text, queue
    assert _sample(text, eos_series) - eos >= _sample(text, done_series) - done  # one per answered turn
    assert 'duplexd_stage_step_seconds_count{identity="stage1' in text
    await rt.close()
    await c.close()


def _metrics(server: ServerProcess) -> str:
    with urllib.request.urlopen(f"http://{server.base}/metrics", timeout=5) as r:
        return r.read().decode()


def _sample(text: str, series: str) -> float:
    """The value of one exposition line (``series`` with its labels), 0 when absent."""
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0


def _run_dir(server: ServerProcess) -> str:
    assert server.tmp is not None
    return f"{server.tmp.name}/run"
