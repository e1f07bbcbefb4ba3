"""Test harness for deployments of separately started roles (what systemd runs per host).

``Cluster`` starts each role as its own ``duplexd run ROLE`` process with its own config
file, optionally inside a network namespace, waits for its sd_notify READY (the test owns
the notify socket, as systemd does), and stops everything at the end. ``NetnsPair`` makes
a network namespace joined to the test's one by a veth pair, so bus traffic between the
two really crosses an interface; it is removed again on exit.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.harness import REPO, free_port, toml_value


def _toml(v: Any) -> str:
    """toml_value plus inline tables (``[bus] hosts``)."""
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return toml_value(v)


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> None:
    lines: list[str] = []
    for name, values in sections.items():
        lines += [f"[{name}]", *(f"{k} = {_toml(v)}" for k, v in values.items()), ""]
    path.write_text("\n".join(lines))


@dataclass
class Role:
    """One started role process."""

    name: str
    role: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    ready: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def deep_merge(a: dict[str, dict[str, Any]], b: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out = {k: dict(v) for k, v in a.items()}
    for k, v in b.items():
        out.setdefault(k, {}).update(v)
    return out


@dataclass
class Cluster:
    """Roles started one by one from per-role config sections (see module docstring)."""

    sections: dict[str, dict[str, Any]] = field(default_factory=dict)
    port: int = 0
    tmp: tempfile.TemporaryDirectory[str] | None = None
    roles: dict[str, Role] = field(default_factory=dict)
    _notify: socket.socket | None = None

    def __post_init__(self) -> None:
        self.port = self.port or free_port()
        self.tmp = tempfile.TemporaryDirectory(prefix="dxc-")
        self.dir = Path(self.tmp.name)
        self.notify_path = self.dir / "notify.sock"
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        s.bind(str(self.notify_path))
        s.setblocking(False)
        self._notify = s

    @property
    def base(self) -> str:
        return f"127.0.0.1:{self.port}"

    def config(self, name: str, extra: dict[str, dict[str, Any]] | None = None) -> Path:
        sections = deep_merge(self.sections, extra or {})
        sections.setdefault("server", {}).setdefault("port", self.port)
        sections.setdefault("bus", {}).setdefault("run_dir", str(self.dir / "run"))
        sections.setdefault("engine", {}).setdefault("name", "scripted")
        sections.setdefault("logging", {}).setdefault("level", "INFO")
        path = self.dir / f"{name}.toml"
        write_config(path, sections)
        return path

    def start(
        self,
        role: str,
        name: str | None = None,
        extra: dict[str, dict[str, Any]] | None = None,
        netns: str | None = None,
        args: tuple[str, ...] = (),
        wait: bool = True,
        timeout_s: float = 60.0,
    ) -> Role:
        name = name or f"{role}-{len(self.roles)}"
        cfg = self.config(name, extra)
        log_path = self.dir / f"{name}.log"
        cmd = [sys.executable, "-m", "duplexd.runtime.cli", "run", role, "--config", str(cfg), *args]
        if netns is not None:
            cmd = ["ip", "netns", "exec", netns, *cmd]
        env = dict(os.environ, NOTIFY_SOCKET=str(self.notify_path), PYTHONUNBUFFERED="1")
        with log_path.open("wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        r = self.roles[name] = Role(name, role, proc, log_path)
        if wait:
            self.wait_ready(r, timeout_s)
        return r

    def _read_notices(self) -> None:
        assert self._notify is not None
        while True:
            try:
                data, anc, _, _ = self._notify.recvmsg(4096, socket.CMSG_SPACE(12))
            except BlockingIOError:
                return
            pid = next(
                (
                    struct.unpack("iII", p[:12])[0]
                    for lvl, kind, p in anc
                    if lvl == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS
                ),
                None,
            )
            if b"READY=1" in data.split(b"\n"):
                for r in self.roles.values():
                    if r.pid == pid:
                        r.ready = True

    def wait_ready(self, r: Role, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._read_notices()
            if r.ready:
                return
            if r.proc.poll() is not None:
                raise RuntimeError(f"{r.name} exited with {r.proc.returncode}:\n{r.logs()[-3000:]}")
            time.sleep(0.05)
        raise TimeoutError(f"{r.name} not ready within {timeout_s} s:\n{r.logs()[-3000:]}")

    def health(self, port: int | None = None) -> tuple[int, dict[str, Any]]:
        url = f"http://127.0.0.1:{port or self.port}/health"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def wait_health(self, pred: Any, timeout_s: float = 30.0, port: int | None = None) -> dict[str, Any]:
        """The adapter's /health body once ``pred(code, body)`` holds."""
        deadline = time.monotonic() + timeout_s
        last: Any = None
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                code, body = self.health(port)
                last = (code, body)
                if pred(code, body):
                    return body
            time.sleep(0.1)
        raise AssertionError(f"health never matched: {last}")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        r = self.roles[name]
        if r.proc.poll() is None:
            r.proc.send_signal(sig)
            r.proc.wait(timeout=30)

    def logs(self) -> str:
        return "\n".join(f"===== {r.name}\n{r.logs()[-3000:]}" for r in self.roles.values())

    def stop(self) -> None:
        # Adapters first (they drain clients), then hosts, then stages: as the supervisor does.
        order = {"adapter": 0, "host": 1, "stage1": 2, "stage0": 3}
        for r in sorted(self.roles.values(), key=lambda r: order.get(r.role, 9)):
            if r.proc.poll() is None:
                r.proc.send_signal(signal.SIGTERM)
                try:
                    r.proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    r.proc.kill()
                    r.proc.wait()
        if self._notify is not None:
            self._notify.close()
        if self.tmp is not None:
            self.tmp.cleanup()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def netns_unavailable() -> str | None:
    """Why network namespaces cannot be made here (None: they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_SYS_ADMIN, CAP_NET_ADMIN)"
    probe = f"dxprobe{uuid.uuid4().hex[:6]}"
    try:
        subprocess.run(["ip", "netns", "add", probe], check=True, capture_output=True, timeout=10)
    except FileNotFoundError:
        return "the ip command (iproute2) is not installed"
    except subprocess.CalledProcessError as exc:
        return f"ip netns add is not permitted here: {exc.stderr.decode(errors='replace').strip()}"
    subprocess.run(["ip", "netns", "del", probe], check=False, capture_output=True, timeout=10)
    return None


class NetnsPair:
    """A new network namespace and a veth pair to it: ``outer_ip`` on the test's side,
    ``inner_ip`` inside. Both are removed on exit (the namespace takes its veth end along)."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.name = f"dx{tag}"
        self._outer = f"dxo{tag}"
        self._inner = f"dxi{tag}"
        # A random /30 in 10.200-249.x: tests running at once do not collide.
        n = int(tag, 16)
        self._prefix = f"10.{200 + n % 50}.{(n >> 8) % 256}"
        self.outer_ip = f"{self._prefix}.1"
        self.inner_ip = f"{self._prefix}.2"

    def _ip(self, *args: str, netns: bool = False) -> None:
        cmd = ["ip", "netns", "exec", self.name, "ip", *args] if netns else ["ip", *args]
        subprocess.run(cmd, check=True, capture_output=True, timeout=10)

    def __enter__(self) -> NetnsPair:
        self._ip("netns", "add", self.name)
        try:
            self._ip("link", "add", self._outer, "type", "veth", "peer", "name", self._inner)
            self._ip("link", "set", self._inner, "netns", self.name)
            self._ip("addr", "add", f"{self.outer_ip}/30", "dev", self._outer)
            self._ip("link", "set", self._outer, "up")
            self._ip("addr", "add", f"{self.inner_ip}/30", "dev", self._inner, netns=True)
            self._ip("link", "set", self._inner, "up", netns=True)
            self._ip("link", "set", "lo", "up", netns=True)
        except BaseException:
            self.__exit__()
            raise
        return self

    def rx_bytes(self) -> int:
        """Bytes received on the namespace's side of the veth (traffic that crossed it)."""
        out = subprocess.run(
            ["ip", "netns", "exec", self.name, "cat", f"/sys/class/net/{self._inner}/statistics/rx_bytes"],
            check=True,
            capture_output=True,
            timeout=10,
        )
        return int(out.stdout)

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["ip", "link", "del", self._outer], check=False, capture_output=True, timeout=10)
        subprocess.run(["ip", "netns", "del", self.name], check=False, capture_output=True, timeout=10)
