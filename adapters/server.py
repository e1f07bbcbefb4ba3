"""The adapter process's listeners: websocket routes plus plain HTTP answers.

:class:`WebsocketServer` is what every listener shares: routes to protocol handlers, the
API-key check, the upgrade check, refusing new connections during a graceful shutdown
(SIGTERM drain), and closing connections with 1001 at its end. :class:`AdapterServer` is
the main port:

  ws   /v1/realtime   OpenAI Realtime protocol (GA; beta with ``OpenAI-Beta: realtime=v1``)
  ws   /v1/duplex     native duplex protocol
  GET  /health        JSON, 200 only when all four roles are ready
  GET  /metrics       Prometheus exposition of every role
  GET  /              static browser demo

The MiniCPM-o demo bridge (:mod:`duplexd.adapters.bridge`) is a second one on its own port.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import msgspec
from prometheus_client import CollectorRegistry
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response

from duplexd.adapters.http import WEB_DIR, json_response, metrics_response, static_response
from duplexd.adapters.native import NativeHandler
from duplexd.adapters.protocol import CLOSE_TIMEOUT_S, HandlerFactory, ProtocolHandler
from duplexd.adapters.realtime import RealtimeHandler
from duplexd.adapters.sharded_link import AnyLink
from duplexd.bus.log import get_logger, log
from duplexd.bus.messages import PROTOCOL_VERSION, Role, SessionConfig
from duplexd.bus.metrics import RemoteCollector, snapshot, tag
from duplexd.bus.resample import ResamplerMode

_log = get_logger(__name__)

_UNAUTHORIZED = {
    "error": {"type": "invalid_request_error", "code": "invalid_api_key", "message": "invalid or missing API key"}
}


class ServerSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[server]``: the public side of the adapter."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: list[str] = []
    api_key_file: str = ""
    allow_insecure_bind: bool = False  # serve a non-loopback address without API keys
    max_message_bytes: int = 0  # websocket frame limit (larger closes with 1009); 0 = what max_audio_bytes needs
    max_audio_bytes: int = 15 * 1024 * 1024  # one append's decoded audio (larger: error event)
    # Client → engine rate conversion: low_latency holds nothing back (a chunk completes on
    # the frame that completes it); high_quality is soxr HQ (holds up to ~30 ms a push).
    input_resampler: ResamplerMode = "low_latency"
    drain_timeout_s: float = 10.0
    ping_interval_s: float = 10.0  # websocket keepalive ping; a peer silent ping_timeout_s after it is cut
    ping_timeout_s: float = 10.0  # (a half-open TCP connection is found within interval + timeout)
    slow_client_audio_ms: int = 5000  # a client with this much assistant audio waiting unread is cut (1008)
    slow_client_events: int = 2000  # ... or this many events
    bridge_port: int = 0  # MiniCPM-o demo bridge port (0: off)
    web_dir: str = ""  # override the bundled browser demo


# Above the largest append: its JSON, and room for an append a little too large to still get
# the audio_too_large error event (a frame above the limit can only close the socket, 1009).
_FRAME_SLACK = 1024 * 1024
# The kernel's send buffer per client connection, fixed (no autotuning to megabytes): what a
# client that stops reading can leave unread there stays small (Linux doubles it: ~1 s of
# base64 pcm16 at 24 kHz, still ten times the stream's rate at 100 ms RTT), so the
# slow-client bound in the adapter sees it soon and its client_too_slow error is not stuck
# behind seconds of audio.
CLIENT_SNDBUF = 32 * 1024


def frame_limit(settings: ServerSettings) -> int:
    """The websocket frame limit: ``max_message_bytes``, or (0) about what the largest
    acceptable append needs: ``max_audio_bytes`` as base64 plus 1 MiB. A bigger frame could
    only be refused after the server had read (and paid memory for) all of it."""
    if settings.max_message_bytes > 0:
        return settings.max_message_bytes
    return -(-settings.max_audio_bytes // 3) * 4 + _FRAME_SLACK


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def load_api_keys(settings: ServerSettings) -> list[str]:
    keys = [k for k in settings.api_keys if k]
    if settings.api_key_file:
        text = Path(settings.api_key_file).read_text()
        # A comment may be indented: strip first, then look for '#'.
        keys += [k for k in (line.strip() for line in text.splitlines()) if k and not k.startswith("#")]
    return keys


def check_bind(settings: ServerSettings) -> None:
    """Refuse to expose an unauthenticated server beyond this machine unless told to."""
    if not is_loopback(settings.host) and not load_api_keys(settings) and not settings.allow_insecure_bind:
        raise ValueError(
            f"refusing to bind {settings.host}: no API keys configured. Set server.api_keys or "
            "server.api_key_file, or server.allow_insecure_bind = true to serve without authentication."
        )


def request_authorized(request: Request, api_keys: list[str]) -> bool:
    """Whether the request carries one of ``api_keys`` (always, when there are none):
    ``Authorization: Bearer KEY``, the browser subprotocol ``openai-insecure-api-key.KEY``,
    or ``?api_key=KEY``."""
    if not api_keys:
        return True
    offered: list[str] = []
    auth = request.headers.get("Authorization", "")
    if auth.lower().startswith("bearer "):
        offered.append(auth[7:].strip())
    for proto in request.headers.get_all("Sec-WebSocket-Protocol"):
        for p in (x.strip() for x in proto.split(",")):
            if p.startswith("openai-insecure-api-key."):
                offered.append(p.removeprefix("openai-insecure-api-key."))
    offered += parse_qs(urlsplit(request.path).query).get("api_key", [])
    return any(hmac.compare_digest(o, k) for o in offered for k in api_keys)


async def serve_ws(
    handler: Callable[[ServerConnection], Any],
    host: str,
    port: int,
    settings: ServerSettings,
    process_request: Callable[[ServerConnection, Request], Any],
    select_subprotocol: Callable[[ServerConnection, Any], Any] | None = None,
) -> Server:
    """A websockets server with the adapter's limits, shared by every listener."""
    return await serve(
        handler,
        host,
        port,
        process_request=process_request,
        select_subprotocol=select_subprotocol,
        max_size=frame_limit(settings),
        max_queue=64,
        compression=None,  # audio does not deflate; compression only adds latency
        ping_interval=settings.ping_interval_s or None,
        ping_timeout=settings.ping_timeout_s or None,
        # A peer that stops answering (half-open TCP, ping timeout) will not answer the
        # closing handshake either: abort soon instead of holding it 10 s (the default).
        close_timeout=CLOSE_TIMEOUT_S,
    )


class WebsocketServer:
    """One listening port: websocket routes to protocol handlers, plain HTTP beside them."""

    name = "adapter"

    def __init__(
        self, settings: ServerSettings, link: AnyLink, default_session: SessionConfig, host: str, port: int
    ) -> None:
        self.settings = settings
        self.link = link
        self.default_session = default_session
        self.host = host
        self.port = port
        self.max_audio_bytes = settings.max_audio_bytes
        self.input_resampler: ResamplerMode = settings.input_resampler
        self.api_keys = load_api_keys(settings)
        self.routes: dict[str, HandlerFactory] = {}
        self.draining = False  # SIGTERM drain: no new connections
        self.bound_port = 0
        self._server: Server | None = None
        self.handlers: set[ProtocolHandler] = set()

    # ------------------------------------------------------------------ HTTP
    def authorized(self, request: Request) -> bool:
        return request_authorized(request, self.api_keys)

    def http(self, path: str, request: Request) -> Response | None:
        """A plain HTTP answer for ``path`` (not a websocket route), or None for 404."""
        return None

    async def process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path.rstrip("/") or "/"
        if path in self.routes:
            if request.headers.get("Upgrade", "").lower() != "websocket":
                return json_response(426, {"error": f"{path} is a websocket endpoint"})
            if not self.authorized(request):
                return json_response(401, _UNAUTHORIZED)
            if self.draining:
                return json_response(503, {"error": "server is shutting down"})
            return None
        answer = self.http(path, request)
        return answer if answer is not None else json_response(404, {"error": f"no route {path}"})

    def select_subprotocol(self, conn: ServerConnection, offered: Sequence[str]) -> str | None:
        return None

    # ------------------------------------------------------------------ websocket
    def route(self, conn: ServerConnection) -> HandlerFactory | None:
        assert conn.request is not None
        return self.routes.get(urlsplit(conn.request.path).path.rstrip("/"))

    async def serve_handler(self, handler: ProtocolHandler) -> None:
        """Run one connection's handler (a listener may admit connections first)."""
        await handler.run()

    async def handle(self, conn: ServerConnection) -> None:
        factory = self.route(conn)
        if factory is None:  # pragma: no cover - process_request filtered it
            await conn.close(1008, "no such endpoint")
            return
        sock = conn.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, CLIENT_SNDBUF)
        handler = factory(conn, self)
        self.handlers.add(handler)
        try:
            await self.serve_handler(handler)
        finally:
            self.handlers.discard(handler)

    async def start(self) -> None:
        self._server = await serve_ws(
            self.handle,
            self.host,
            self.port,
            self.settings,
            self.process_request,
            select_subprotocol=self.select_subprotocol,
        )
        self.bound_port = next(iter(self._server.sockets)).getsockname()[1]
        log(_log, logging.INFO, f"{self.name} listening", host=self.host, port=self.bound_port)

    async def drain(self, timeout_s: float | None = None) -> None:
        """SIGTERM drain: stop taking connections; let active responses end (at most
        ``timeout_s``); then close every connection with 1001 and stop listening."""
        self.draining = True
        timeout_s = self.settings.drain_timeout_s if timeout_s is None else timeout_s
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while any(h.busy() for h in self.handlers) and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)  # responses end through the bus; poll the handlers' state
        # Out of time: every response still running ends now, visibly: an error, its
        # terminal response.done (failed) and the close (1001), in that order.
        cut = [h for h in self.handlers if h.busy()]
        for h in cut:
            h.end_session("server_shutting_down", "the server is shutting down; the response was cut")
        end = loop.time() + CLOSE_TIMEOUT_S
        while any(h.busy() for h in cut) and loop.time() < end:  # noqa: ASYNC110
            await asyncio.sleep(0.02)  # the terminal events leave through each session's writer
        for h in list(self.handlers):
            with contextlib.suppress(Exception):
                await h.close_ws(1001, "server shutting down")
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


class AdapterServer(WebsocketServer):
    """The main port: Realtime and native websockets, health, metrics, browser demo."""

    def __init__(self, settings: ServerSettings, link: AnyLink, default_session: SessionConfig) -> None:
        super().__init__(settings, link, default_session, settings.host, settings.port)
        self.web_dir = Path(settings.web_dir) if settings.web_dir else WEB_DIR
        self.remote_metrics = RemoteCollector()
        self._metrics_registry = CollectorRegistry(auto_describe=False)
        self._metrics_registry.register(self.remote_metrics)
        self.routes["/v1/duplex"] = NativeHandler
        self.routes["/v1/realtime"] = RealtimeHandler

    # ------------------------------------------------------------------ HTTP
    def health(self) -> tuple[int, dict[str, Any]]:
        from duplexd.adapters.native import full as full_builtins

        status = self.link.status
        roles: list[dict[str, Any]] = [
            {
                "role": Role.ADAPTER.value,
                "identity": self.link.identity,
                "pid": os.getpid(),
                "state": "ready",
                "protocol_version": PROTOCOL_VERSION,
                "host": socket.gethostname(),
            }
        ]
        if status is not None:
            # Every role with its protocol version (the wire form omits it when it is the default).
            roles += [{**msgspec.to_builtins(r), "protocol_version": r.protocol_version} for r in status.roles]
        ok = self.link.ready() and not self.draining
        engine = status.engine if status else None
        # A backend the engine relies on that is down (e.g. the chat endpoint): the server
        # runs (200) but every reply will fail, so it is "degraded" and says why.
        warnings = [f"{b.name} {b.url}: {b.detail}" for b in (engine.backends if engine else ()) if not b.ok]
        state = "ok" if ok else ("draining" if self.draining or (status and status.draining) else "starting")
        body = {
            "status": "degraded" if ok and warnings else state,
            "protocol_version": PROTOCOL_VERSION,
            "roles": roles,
            "sessions": status.sessions if status else 0,
            # Admission: sessions the ready stages take in all, and how many more now (-1: no limit).
            "capacity": status.capacity if status else 0,
            "available": status.available if status else 0,
            "engine": full_builtins(engine) if engine else None,
            "warnings": warnings,
        }
        return (200 if ok else 503), body

    def http(self, path: str, request: Request) -> Response | None:
        if path == "/health":
            code, body = self.health()
            return json_response(code, body)
        if path == "/metrics":
            if not self.authorized(request):
                return json_response(401, {"error": "invalid or missing API key"})
            own = tag(snapshot(), Role.ADAPTER.value, self.link.identity)
            remote = self.link.status.metrics if self.link.status is not None else ()
            self.remote_metrics.update((*own, *remote))
            return metrics_response(self._metrics_registry)
        return static_response(request.path, self.web_dir)

    def select_subprotocol(self, conn: ServerConnection, offered: Sequence[str]) -> str | None:
        # Browsers offering "realtime" (plus the key/beta markers) need one echoed back.
        return "realtime" if "realtime" in offered else None
