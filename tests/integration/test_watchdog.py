"""The watchdog over real processes.

Each role runs as ``duplexd run ROLE`` (as under systemd) with ``$NOTIFY_SOCKET`` on a real
datagram socket of this test and ``$WATCHDOG_USEC`` set: READY=1 comes after the role's
handshake with the host, WATCHDOG=1 pings come while its loop turns, and none come while a
model step holds the loop; the host does not mistake that step for a dead peer (heartbeats
come from a thread). Under ``duplexd serve`` the supervisor is the watchdog: a loop stuck
longer than ``watchdog_s`` is killed and restarted, and the restart shows in /metrics.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.harness import REPO, NativeClient, ServerProcess, free_port, tone, write_config

pytestmark = pytest.mark.timeout(120)

WATCHDOG_USEC = 400_000  # pings every 0.1 s
STEP_S = 2.0  # one thinker step holds stage0's loop this long


@dataclass
class NotifyListener:
    """A datagram socket like systemd's notify socket: every message with its arrival time."""

    path: Path
    messages: list[tuple[float, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(self.path))
        self._sock.settimeout(0.05)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(4096)
            except TimeoutError:
                continue
            now = time.monotonic()
            self.messages += [(now, line) for line in data.decode().split("\n") if line]

    def times(self, what: str) -> list[float]:
        return [t for t, m in list(self.messages) if m == what]

    def wait(self, what: str, timeout_s: float = 60.0) -> float:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if t := self.times(what):
                return t[0]
            time.sleep(0.02)
        raise AssertionError(f"no {what} on {self.path.name}: {self.messages[-5:]}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sock.close()


@dataclass
class Roles:
    """The four roles as separate ``duplexd run`` processes, each with its notify socket."""

    dir: Path
    port: int
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    notify: dict[str, NotifyListener] = field(default_factory=dict)

    def start(self, role: str) -> None:
        self.notify[role] = NotifyListener(self.dir / f"notify-{role}.sock")
        env = dict(os.environ, NOTIFY_SOCKET=str(self.notify[role].path), WATCHDOG_USEC=str(WATCHDOG_USEC))
        env.pop("WATCHDOG_PID", None)
        log = (self.dir / f"{role}.log").open("wb")
        cmd = [sys.executable, "-m", "duplexd.runtime.cli", "run", role, "--config", str(self.dir / "config.toml")]
        self.procs[role] = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)

    def log(self, role: str) -> str:
        return (self.dir / f"{role}.log").read_text(errors="replace")

    def stop(self) -> None:
        for role in ("adapter", "host", "stage1", "stage0"):
            p = self.procs.get(role)
            if p is not None and p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        for n in self.notify.values():
            n.close()


@pytest.fixture
def roles() -> Iterator[Roles]:
    with tempfile.TemporaryDirectory(prefix="dx-wd-") as d:
        r = Roles(Path(d), free_port())
        write_config(
            Path(d) / "config.toml",
            {
                "server": {"port": r.port},
                "bus": {"run_dir": f"{d}/run"},
                "engine": {"name": "scripted"},
                "engines.scripted": {"reply_ms": 1000, "think_step_cost_ms": STEP_S * 1000},
                "host": {"vad": "energy"},
            },
        )
        try:
            yield r
        finally:
            r.stop()


def _gaps(times: list[float], start: float, end: float) -> float:
    """The longest stretch without a ping between ``start`` and ``end``."""
    inside = [start] + [t for t in times if start < t < end] + [end]
    return max(b - a for a, b in zip(inside, inside[1:], strict=False))


async def test_ready_after_the_handshake_pings_while_healthy_none_while_a_step_holds_the_loop(roles: Roles) -> None:
    roles.start("stage0")
    # No host yet: the handshake cannot finish, so no READY (but the wait itself pings,
    # well inside the period, from its first ping on: start-up time is not counted).
    first = await asyncio.to_thread(roles.notify["stage0"].wait, "WATCHDOG=1")
    await asyncio.sleep(1.5)
    assert roles.notify["stage0"].times("READY=1") == []
    assert _gaps(roles.notify["stage0"].times("WATCHDOG=1"), first, time.monotonic()) < WATCHDOG_USEC / 1e6
    roles.start("host")
    host_ready = await asyncio.to_thread(roles.notify["host"].wait, "READY=1")
    stage0_ready = await asyncio.to_thread(roles.notify["stage0"].wait, "READY=1")
    assert stage0_ready > host_ready  # READY=1 only once the host answered its hello
    for role in ("stage1", "adapter"):
        roles.start(role)
        await asyncio.to_thread(roles.notify[role].wait, "READY=1")
    # Healthy: every role pings, well inside the period.
    t0 = time.monotonic()
    await asyncio.sleep(1.0)
    for role in ("host", "stage0", "stage1", "adapter"):
        pings = roles.notify[role].times("WATCHDOG=1")
        assert _gaps(pings, t0, time.monotonic()) < WATCHDOG_USEC / 1e6, role

    # A model step holds stage0's loop for 2 s: no pings from it meanwhile, and nobody calls
    # it dead (its heartbeats come from another thread).
    server = ServerProcess(port=roles.port)
    c = await NativeClient.connect(server)
    await c.send({"type": "session.update", "session": {"turn_mode": "manual"}})
    await c.wait_for("session.updated")
    t_step = time.monotonic()
    await c.stream(tone(200), frame_ms=200)
    await c.send({"type": "input_audio_buffer.commit"})
    await c.wait_for("input_audio_buffer.committed")
    await asyncio.sleep(STEP_S + 1.0)
    gap = _gaps(roles.notify["stage0"].times("WATCHDOG=1"), t_step, time.monotonic())
    print(f"\n[watchdog] longest stage0 ping gap during a {STEP_S:.1f} s step: {gap:.2f} s")
    assert gap >= STEP_S * 0.8
    assert _gaps(roles.notify["host"].times("WATCHDOG=1"), t_step, time.monotonic()) < WATCHDOG_USEC / 1e6
    assert "peer dead" not in roles.log("host")
    assert not c.of("error"), c.of("error")
    await c.close()


def _metrics(server: ServerProcess) -> str:
    with urllib.request.urlopen(f"http://{server.base}/metrics", timeout=5) as r:
        return r.read().decode()


async def test_supervisor_kills_a_stuck_role_and_restarts_it() -> None:
    sections = {
        "engines.scripted": {"reply_ms": 1000, "think_step_cost_ms": 6000},
        "host": {"vad": "energy"},
        "supervisor": {"watchdog_s": 1.5},
    }
    with ServerProcess(sections=sections) as server:
        pid = server.role_pid("stage0")
        c = await NativeClient.connect(server)
        await c.send({"type": "session.update", "session": {"turn_mode": "manual"}})
        await c.wait_for("session.updated")
        await c.stream(tone(200), frame_ms=200)
        await c.send({"type": "input_audio_buffer.commit"})
        await c.send({"type": "response.create"})
        # The 6 s step outlasts the 1.5 s watchdog: killed, so the session hears of it. Before
        # the kill the stuck stage may refuse input it cannot read (an 'overloaded' error:
        # true, and nothing else may come).
        await c.wait_for(lambda e: e["type"] == "error" and e["error"]["code"] == "stage_unavailable", within_s=15)
        assert {e["error"]["code"] for e in c.of("error")} <= {"stage_unavailable", "overloaded"}, c.of("error")
        assert "role hung (no watchdog ping); killing it" in server.logs()
        deadline = time.monotonic() + 30
        while True:
            code, body = server.health()
            pids = [r["pid"] for r in body.get("roles", []) if r["role"] == "stage0"]
            if code == 200 and pids and pids[0] != pid:
                break
            assert time.monotonic() < deadline, body
            await asyncio.sleep(0.1)
        series = 'duplexd_role_restarts_total{identity="'
        deadline = time.monotonic() + 10
        while not [x for x in _metrics(server).splitlines() if x.startswith(series) and 'role="stage0"' in x]:
            assert time.monotonic() < deadline, "the restart never showed in /metrics"
            await asyncio.sleep(0.2)
        line = next(x for x in _metrics(server).splitlines() if x.startswith(series) and 'role="stage0"' in x)
        assert line.endswith(" 1.0"), line
        await c.close()
