"""CURVE encryption and authentication of bus links (ZeroMQ's built-in security).

Audio crosses the network when roles run on several machines, so tcp links can be
encrypted and authenticated with CurveZMQ. Keys are ZeroMQ certificate files (what
``duplexd curve-keygen`` and ``zmq.auth.create_certificates`` write): ``NAME.key`` holds
the public key, ``NAME.key_secret`` the public and the secret key.

* The session host (the side that binds) is the CURVE server: it loads its secret
  certificate and accepts only peers whose public certificate is in
  ``authorized_keys_dir``. A ZAP handler (ZeroMQ's authentication protocol, RFC 27)
  in a thread of the host's context says yes or no to each connection; refusals are
  logged with the peer's address and counted.
* Every other process is a CURVE client: its own secret certificate plus the host's
  public certificate (``server_key_file``). Sessions hosts of one deployment share one
  host certificate, so a peer needs a single server key however many hosts it reaches.

A peer with the wrong key never completes the ZeroMQ handshake: it cannot send or
receive one message, and its own handshake times out.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import msgspec
import zmq
import zmq.auth
from zmq.utils import z85

from duplexd.bus.log import get_logger, log
from duplexd.bus.metrics import BUS_PEERS_REFUSED

_log = get_logger(__name__)

ZAP_ENDPOINT: Final = "inproc://zeromq.zap.01"
ZAP_DOMAIN: Final = b"duplexd"
_ZAP_VERSION: Final = b"1.0"


class CurveConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[bus.curve]``: CURVE on every bus link (see module docstring)."""

    enabled: bool = False
    secret_key_file: str = ""  # this process's certificate with its secret key (NAME.key_secret)
    server_key_file: str = ""  # peers: the session hosts' public certificate (NAME.key)
    authorized_keys_dir: str = ""  # hosts: public certificates (*.key) of the peers allowed in

    def problems(self, binds: bool | None = None) -> list[str]:
        """What is missing or unreadable: ``binds`` True checks what a session host needs,
        False what a peer needs, None only the files that are set (config validation)."""
        if not self.enabled:
            return []
        out: list[str] = []
        if not self.secret_key_file:
            out.append("bus.curve.secret_key_file is required when bus.curve.enabled")
        if binds is False and not self.server_key_file:
            out.append("bus.curve.server_key_file is required on peers when bus.curve.enabled")
        if binds is True and not self.authorized_keys_dir:
            out.append("bus.curve.authorized_keys_dir is required on a session host when bus.curve.enabled")
        for key, path, secret in (
            ("secret_key_file", self.secret_key_file, True),
            ("server_key_file", self.server_key_file, False),
        ):
            if path:
                try:
                    _load(path, secret)
                except CurveKeyError as exc:
                    out.append(f"bus.curve.{key}: {exc}")
        if self.authorized_keys_dir and not Path(self.authorized_keys_dir).is_dir():
            out.append(f"bus.curve.authorized_keys_dir: {self.authorized_keys_dir} is not a directory")
        return out


class CurveKeyError(ValueError):
    """A certificate file that is missing, unreadable or lacks the key asked for."""


def _load(path: str, secret: bool) -> tuple[bytes, bytes | None]:
    p = Path(path)
    if not p.is_file():
        raise CurveKeyError(f"{p}: no such certificate file")
    try:
        public, secret_key = zmq.auth.load_certificate(p)
    except (OSError, ValueError) as exc:
        raise CurveKeyError(f"{p}: not a ZeroMQ certificate ({exc})") from exc
    if secret and secret_key is None:
        raise CurveKeyError(f"{p}: holds no secret key (use the NAME.key_secret file)")
    return public, secret_key


def authorized_keys(directory: str) -> set[bytes]:
    """The public keys of every ``*.key`` certificate in ``directory``."""
    keys: set[bytes] = set()
    for p in sorted(Path(directory).glob("*.key")):
        keys.add(_load(str(p), secret=False)[0])
    return keys


def keygen(directory: str, name: str) -> tuple[Path, Path]:
    """Write ``NAME.key`` and ``NAME.key_secret`` (mode 0600) into ``directory``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(d, name)
    Path(secret).chmod(0o600)
    return Path(public), Path(secret)


@dataclass(slots=True)
class ZapStats:
    """What the ZAP handler decided (tests and logs read it)."""

    allowed: int = 0
    refused: int = 0
    last_refused_address: str = ""


class ZapHandler:
    """Answers ZeroMQ's authentication requests for one context: CURVE clients whose
    public key is authorized pass, everything else is refused (RFC 27)."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], allowed: set[bytes]) -> None:
        self.allowed = {z85.decode(k) if len(k) == 40 else k for k in allowed}
        self.stats = ZapStats()
        self._ctx = ctx
        self._sock: zmq.Socket[bytes] = ctx.socket(zmq.REP)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(ZAP_ENDPOINT)  # must exist before a CURVE server socket binds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="duplexd-zap", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        while not self._stop.is_set():
            try:
                if not poller.poll(100):
                    continue
                request = self._sock.recv_multipart()
            except zmq.ZMQError:
                return
            self._sock.send_multipart(self._answer(request))
        with contextlib.suppress(zmq.ZMQError):
            self._sock.close(linger=0)

    def _answer(self, request: list[bytes]) -> list[bytes]:
        # version, request id, domain, address, identity, mechanism, credentials...
        if len(request) < 6 or request[0] != _ZAP_VERSION:
            return [_ZAP_VERSION, request[1] if len(request) > 1 else b"", b"400", b"bad ZAP request", b"", b""]
        request_id, _domain, address, _identity, mechanism = request[1:6]
        credentials = request[6:]
        key = credentials[0] if mechanism == b"CURVE" and credentials else b""
        if key and key in self.allowed:
            self.stats.allowed += 1
            return [_ZAP_VERSION, request_id, b"200", b"OK", z85.encode(key), b""]
        self.stats.refused += 1
        peer = address.decode(errors="replace")
        self.stats.last_refused_address = peer
        reason = "public key not authorized" if key else f"mechanism {mechanism.decode(errors='replace')} refused"
        BUS_PEERS_REFUSED.labels(reason="key" if key else "mechanism").inc()
        log(
            _log,
            logging.WARNING,
            "bus peer refused",
            peer_address=peer,
            reason=reason,
            peer_key=z85.encode(key).decode() if key else "",
        )
        return [_ZAP_VERSION, request_id, b"400", reason.encode(), b"", b""]

    def close(self) -> None:
        """Stop answering (before the context is terminated)."""
        self._stop.set()
        self._thread.join(timeout=1.0)
        with _handlers_lock:
            if _handlers.get(id(self._ctx)) is self:
                del _handlers[id(self._ctx)]


_handlers: dict[int, ZapHandler] = {}
_handlers_lock = threading.Lock()


def _zap_for(ctx: zmq.Context[zmq.Socket[bytes]], cfg: CurveConfig) -> ZapHandler:
    # One handler per context: ZeroMQ sends every ZAP request of a context to one endpoint.
    with _handlers_lock:
        h = _handlers.get(id(ctx))
        if h is None:
            h = _handlers[id(ctx)] = ZapHandler(ctx, authorized_keys(cfg.authorized_keys_dir))
        return h


def zap_handler(ctx: zmq.Context[zmq.Socket[bytes]]) -> ZapHandler | None:
    """The ZAP handler serving ``ctx``, if a CURVE server socket was made in it."""
    return _handlers.get(id(ctx))


def secure_server(sock: zmq.Socket[bytes], ctx: zmq.Context[zmq.Socket[bytes]], cfg: CurveConfig) -> None:
    """Make a socket that will bind a CURVE server (call before ``bind``)."""
    if not cfg.enabled:
        return
    problems = cfg.problems(binds=True)
    if problems:
        raise CurveKeyError("; ".join(problems))
    public, secret = _load(cfg.secret_key_file, secret=True)
    _zap_for(ctx, cfg)
    sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN)
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
    assert secret is not None
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret)


def secure_client(sock: zmq.Socket[bytes], cfg: CurveConfig) -> None:
    """Make a socket that will connect as a CURVE client (call before ``connect``)."""
    if not cfg.enabled:
        return
    problems = cfg.problems(binds=False)
    if problems:
        raise CurveKeyError("; ".join(problems))
    public, secret = _load(cfg.secret_key_file, secret=True)
    server_public, _ = _load(cfg.server_key_file, secret=False)
    assert secret is not None
    sock.setsockopt(zmq.CURVE_SERVERKEY, server_public)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
