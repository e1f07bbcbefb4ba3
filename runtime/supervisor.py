"""``duplexd serve``: the four roles as child processes on one machine.

Children are real processes (``python -m duplexd.runtime.cli run ROLE``). They report
readiness with sd_notify to a datagram socket the supervisor owns, exactly as they do
under systemd. A child that dies is restarted, at most ``restart_max`` times within
``restart_window_s``; beyond that the supervisor stops everything and exits non-zero.
SIGINT/SIGTERM stop the roles in dependency order: adapter (drains clients), host,
stages. Children get SIGTERM if the supervisor itself dies (PR_SET_PDEATHSIG).

It is also their watchdog, as systemd is under the units (``WatchdogSec=``): each child
gets ``WATCHDOG_USEC`` and pings ``WATCHDOG=1`` from its main loop; a ready child silent for
``watchdog_s`` is stuck (a step that never returns, a frozen process) and is killed, then
restarted like any crash. A restarted child is told how often (``DUPLEXD_ROLE_RESTARTS``) and
reports it as ``duplexd_role_restarts_total`` in its own metrics.

Before any child starts, :meth:`Supervisor.prepare` checks the ports and the engine's
packages and takes a private, locked run dir (see preflight.py), so a second server
fails in one line and never touches a running one. A role that exits with
``EXIT_NO_RESTART`` (its port is taken, its engine cannot load) is not restarted.
The children's config file holds no secrets: those travel in their environment.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from duplexd.bus.log import get_logger, log
from duplexd.runtime import sdnotify
from duplexd.runtime import secrets as config_secrets
from duplexd.runtime.config import Config, dump_json
from duplexd.runtime.preflight import EXIT_NO_RESTART, RunDir, StartupError, check
from duplexd.runtime.watchdog import Watchdog

_log = get_logger("duplexd.supervisor")

START_ORDER = ("host", "stage0", "stage1", "adapter")
RESTARTS_ENV = "DUPLEXD_ROLE_RESTARTS"  # a child's environment: how often its role was restarted
STOP_ORDER = ("adapter", "host", "stage1", "stage0")
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass(slots=True)
class Child:
    role: str
    proc: subprocess.Popen[bytes] | None = None
    ready: bool = False
    restarts: deque[float] = field(default_factory=deque)
    total_restarts: int = 0
    last_ping: float = 0.0  # the last WATCHDOG=1 (or READY=1)


class Supervisor:
    """Starts, watches, restarts and stops the four roles (see module docstring)."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self._run = RunDir(cfg.bus.run_dir, cfg.server.port)
        self.run_dir = Path()
        self.children = {r: Child(r) for r in START_ORDER}
        self._stop = False
        self._all_ready_logged = False
        self._notify: socket.socket | None = None
        self._secret_env: dict[str, str] = {}
        self._config_path: Path | None = None

    def prepare(self) -> None:
        """Check ports and engine, take the run dir, write the children's config.

        Raises :class:`~duplexd.runtime.preflight.StartupError` (one line) before anything
        is started or written outside the new run dir.
        """
        check(self.cfg)
        self.run_dir = self._run.acquire()
        try:
            # The children all use this run dir; the file holds no secret (0600 regardless).
            bus = msgspec.structs.replace(self.cfg.bus, run_dir=str(self.run_dir))
            cfg = msgspec.structs.replace(self.cfg, bus=bus)
            try:
                cfg.addresses().prepare()  # e.g. a socket path too long: say so now, not in a restart loop
            except ValueError as exc:
                raise StartupError(f"bus: {exc}; set a shorter bus.run_dir") from None
            public, secrets = config_secrets.split(cfg)
            self._secret_env = config_secrets.to_env(secrets)
            self._config_path = self._run.private_file("effective-config.json", dump_json(public))
        except BaseException:
            self._run.release()
            raise

    def _open_notify(self) -> str:
        path = self.run_dir / "notify.sock"
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        s.bind(str(path))
        s.setblocking(False)
        self._notify = s
        self._run.made(path)
        return str(path)

    def _spawn(self, child: Child, config_path: Path, notify_path: str) -> None:
        env = dict(os.environ, NOTIFY_SOCKET=notify_path, PYTHONUNBUFFERED="1", **self._secret_env)
        env.pop("WATCHDOG_PID", None)  # (ours, from systemd, if any: not the child's)
        env.pop("WATCHDOG_USEC", None)
        if self.cfg.supervisor.watchdog_s > 0:
            env["WATCHDOG_USEC"] = str(int(self.cfg.supervisor.watchdog_s * 1e6))
        env[RESTARTS_ENV] = str(child.total_restarts)
        cmd = [sys.executable, "-m", "duplexd.runtime.cli", "run", child.role, "--config", str(config_path)]
        # Own process group: a terminal's Ctrl-C reaches only us, and we stop the roles in order.
        child.proc = subprocess.Popen(cmd, env=env, preexec_fn=_die_with_parent, process_group=0)  # noqa: PLW1509
        child.ready = False
        log(_log, logging.INFO, "started role", child=child.role, child_pid=child.proc.pid)

    def _read_notices(self) -> None:
        assert self._notify is not None
        while True:
            try:
                data, anc, _, _ = self._notify.recvmsg(4096, socket.CMSG_SPACE(12))
            except BlockingIOError:
                return
            pid = None
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("iII", payload[:12])[0]
            lines = data.split(b"\n")
            for c in self.children.values():
                if c.proc is None or c.proc.pid != pid:
                    continue
                if b"WATCHDOG=1" in lines or b"READY=1" in lines:
                    c.last_ping = time.monotonic()
                if b"READY=1" in lines and not c.ready:
                    c.ready = True
                    log(_log, logging.INFO, "role ready", child=c.role, child_pid=pid)

    def _all_ready(self) -> bool:
        return all(c.ready for c in self.children.values())

    def _on_exit(self, child: Child, config_path: Path, notify_path: str) -> bool:
        """A child exited on its own: restart it, or give up (returns False)."""
        assert child.proc is not None
        code = child.proc.returncode
        if code == EXIT_NO_RESTART:
            log(
                _log,
                logging.CRITICAL,
                "role cannot start (see its error above); not restarting it",
                child=child.role,
                exit_code=code,
            )
            return False
        now = time.monotonic()
        window = self.cfg.supervisor.restart_window_s
        while child.restarts and now - child.restarts[0] > window:
            child.restarts.popleft()
        if len(child.restarts) >= self.cfg.supervisor.restart_max:
            log(
                _log,
                logging.CRITICAL,
                "role keeps dying; giving up",
                child=child.role,
                exit_code=code,
                restarts=len(child.restarts),
                window_s=window,
            )
            return False
        child.restarts.append(now)
        child.total_restarts += 1
        log(_log, logging.ERROR, "role died; restarting", child=child.role, exit_code=code, restart=len(child.restarts))
        self._spawn(child, config_path, notify_path)
        return True

    def run(self) -> int:
        if self._config_path is None:
            self.prepare()
        config_path = self._config_path
        assert config_path is not None
        try:
            return self._run_children(config_path)
        finally:
            self._run.release()

    def _run_children(self, config_path: Path) -> int:
        notify_path = self._open_notify()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        for role in START_ORDER:
            self._spawn(self.children[role], config_path, notify_path)
        started = time.monotonic()
        code = 0
        watchdog = Watchdog()  # ours, when systemd runs `duplexd serve` with WatchdogSec=
        try:
            while not self._stop:
                watchdog.ping()
                self._read_notices()
                self._kill_hung()
                if not self._all_ready_logged and self._all_ready():
                    self._all_ready_logged = True
                    s = self.cfg.server
                    log(
                        _log,
                        logging.INFO,
                        f"duplexd ready on http://{s.host}:{s.port}",
                        pids={r: c.proc.pid for r, c in self.children.items() if c.proc},
                    )
                    sdnotify.ready("all roles ready")
                if not self._all_ready_logged and time.monotonic() - started > self.cfg.supervisor.start_timeout_s:
                    log(
                        _log,
                        logging.CRITICAL,
                        "roles did not become ready in time",
                        waiting=[r for r, c in self.children.items() if not c.ready],
                    )
                    code = 1
                    break
                for child in self.children.values():
                    exited = child.proc is not None and child.proc.poll() is not None
                    if exited and not self._stop and not self._on_exit(child, config_path, notify_path):
                        code = 1
                        self._stop = True
                        break
                time.sleep(0.05)
        finally:
            self._shutdown()
        return code

    def _kill_hung(self) -> None:
        """A ready child whose main loop stopped pinging is stuck: kill it (it is restarted
        like any crash, within the restart intensity)."""
        limit = self.cfg.supervisor.watchdog_s
        if limit <= 0:
            return
        now = time.monotonic()
        for c in self.children.values():
            if c.proc is None or not c.ready or c.proc.poll() is not None or now - c.last_ping <= limit:
                continue
            log(
                _log,
                logging.ERROR,
                "role hung (no watchdog ping); killing it",
                child=c.role,
                child_pid=c.proc.pid,
                silent_s=round(now - c.last_ping, 1),
            )
            c.proc.kill()
            c.ready = False

    def _on_signal(self, signum: int, frame: object) -> None:
        self._stop = True

    def _shutdown(self) -> None:
        sdnotify.stopping()
        log(_log, logging.INFO, "stopping roles")
        budget = self.cfg.supervisor.stop_timeout_s
        for role in STOP_ORDER:
            proc = self.children[role].proc
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=budget)
            except subprocess.TimeoutExpired:
                log(_log, logging.ERROR, "role did not stop; killing it", child=role, child_pid=proc.pid)
                proc.kill()
                proc.wait()
        if self._notify is not None:
            self._notify.close()
        log(_log, logging.INFO, "stopped")
