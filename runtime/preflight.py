"""Checks ``duplexd serve`` makes before it starts any process, and the run dir it owns.

A second server must never disturb a running one: its ports are tried first, and the run
dir (config file, notify socket, bus sockets) is private to one instance, locked while it
runs and removed when it exits. Each failure is one line (:class:`StartupError`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import socket
import tempfile
from pathlib import Path

from duplexd.actors.engines.registry import missing_requirements
from duplexd.runtime.config import Config

# A role exits with this when restarting it cannot help (port in use, engine not installed,
# model files missing): the supervisor stops instead of restarting (sysexits EX_CONFIG;
# the systemd units list it in RestartPreventExitStatus).
EXIT_NO_RESTART = 78


# Room left for "/duplexd-PORT-xxxxxxxx/control.sock" within a unix socket path.
MAX_BASE_CHARS = 60


class StartupError(RuntimeError):
    """Why the server cannot start, in one line."""


def check_port_free(host: str, port: int, what: str = "server.port") -> None:
    """Bind (and release) every address ``host`` resolves to, as the adapter will."""
    if port == 0:
        return  # the kernel picks a free one
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StartupError(f"cannot resolve server.host {host!r}: {exc.strerror}") from None
    for family, kind, proto, _, addr in {(i[0], i[1], i[2], i[3], i[4]) for i in infos}:
        with socket.socket(family, kind, proto) as s:
            # The same options asyncio uses, so "free" here means the adapter can bind too.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                s.bind(addr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise StartupError(
                        f"port {port} on {host} is already in use ({what}); is another duplexd running? "
                        f"Choose another port with --port (or `make run PORT=...`)"
                    ) from None
                raise StartupError(f"cannot bind {host}:{port} ({what}): {exc.strerror}") from None


def check(cfg: Config) -> None:
    """Everything that would make a role fail at once: engine packages, busy ports."""
    missing = missing_requirements(cfg.engine.name, cfg.engines)
    if missing is not None:
        raise StartupError(missing)
    check_port_free(cfg.server.host, cfg.server.port)
    if cfg.server.bridge_port:
        check_port_free(cfg.server.host, cfg.server.bridge_port, "server.bridge_port")


def runtime_base() -> Path:
    return Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir())


class RunDir:
    """The instance's private directory (mode 0700), locked while the instance runs.

    Without ``bus.run_dir`` a fresh directory is made and removed on exit; with it, the
    directory is used as given, and only the files this instance made are removed.
    """

    LOCK = "duplexd.lock"

    def __init__(self, configured: str, port: int) -> None:
        self.configured = configured
        self.port = port
        self.path = Path(configured) if configured else Path()
        self.owned = not configured
        self._lock_fd: int | None = None
        self._made: list[Path] = []

    def acquire(self) -> Path:
        if self.owned:
            base = runtime_base()
            if len(str(base)) > MAX_BASE_CHARS:
                base = Path("/tmp")  # a unix socket path must fit in 108 bytes
            self.path = Path(tempfile.mkdtemp(prefix=f"duplexd-{self.port}-", dir=base))
        else:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock = self.path / self.LOCK
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise StartupError(
                f"run dir {self.path} is in use by another duplexd (pid {holder}); "
                "give each instance its own bus.run_dir (or leave it empty for a private one)"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd
        return self.path

    def private_file(self, name: str, data: bytes) -> Path:
        """Write ``name`` readable by this user only (0600), created afresh."""
        path = self.path / name
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        self._made.append(path)
        return path

    def made(self, path: Path) -> None:
        self._made.append(path)

    def release(self) -> None:
        """Remove what this instance made (all of it, if the directory is its own)."""
        if self._lock_fd is None:
            return
        if self.owned:
            shutil.rmtree(self.path, ignore_errors=True)
        else:
            for p in [*self._made, self.path / "control.sock", self.path / "data.sock", self.path / self.LOCK]:
                with contextlib.suppress(OSError):
                    p.unlink()
            with contextlib.suppress(OSError):
                self.path.rmdir()  # only if nothing else lives there
        os.close(self._lock_fd)
        self._lock_fd = None
