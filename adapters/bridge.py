"""MiniCPM-o demo bridge: duplexd looks like one worker of the official MiniCPM-o demo.

The demo's gateway polls ``GET /health`` on each worker and hands a duplex session to
the first ``idle`` one; it then forwards the browser's frames unchanged to
``WS /ws/duplex?session_id=…``. This module serves exactly that surface on its own
port (``[server] bridge_port``) from the adapter process, on the same connection loop and
server surface as the other protocols (:mod:`protocol`, :mod:`server`), so the demo
frontend and gateway work against duplexd without changes:

* ``prepare {system_prompt, config {force_listen_count, listen_prob_scale, chunk_ms,
  sample_rate, ...}}`` opens a session in ``duplex`` turn mode → ``prepared``.
* ``audio_chunk {audio_base64: float32 LE mono 16 kHz (1 s), force_listen?}`` → exactly
  one ``result`` per chunk, in order (:mod:`bridge_results`): ``is_listen``, ``text``,
  ``audio_data`` (base64 float32 24 kHz, as long as the input chunk: silence on listens,
  speak audio left-padded with silence, only the turn-final result shorter),
  ``end_of_turn``, ``current_time`` (chunk index), ``cost_*_ms``, ``server_send_ts``,
  ``wall_clock_ms``.
* ``pause`` → ``paused {timeout}`` (``timeout`` then close when it runs out),
  ``resume`` → ``resumed``, ``stop`` → ``stopped`` and close; errors are
  ``{type: "error", error: "text"}`` and the connection stays.
* A second duplex socket while one is active is closed with 1013 (worker busy).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import msgspec
import numpy as np
from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request, Response

from duplexd.adapters.audio import SUPPORTED_RATES, AudioFormat, InputResampler, b64decode, decode
from duplexd.adapters.bridge_results import DemoChunk, Result, ResultPacer
from duplexd.adapters.http import json_response
from duplexd.adapters.link import SessionUnavailable
from duplexd.adapters.protocol import JSONObject, Listener, ProtocolHandler
from duplexd.adapters.server import ServerSettings, WebsocketServer
from duplexd.adapters.sharded_link import AnyLink
from duplexd.adapters.validation import (
    ClientError,
    bad,
    opt_bool,
    opt_obj,
    opt_str,
    optional,
    req_str,
    want_num,
)
from duplexd.bus.audio_format import OUTPUT_RATE
from duplexd.bus.log import get_logger, log
from duplexd.bus.messages import AdapterEvent, SessionClosed, SessionConfig, SessionOpened, TurnMode

_log = get_logger(__name__)

_SESSION_ID_RE = re.compile(r"[^A-Za-z0-9_\-]")
DEFAULT_PROMPT = "You are a helpful assistant."


class WorkerStatus:
    """The demo worker's ``worker_status`` values (the gateway maps exactly these)."""

    LOADING = "loading"
    IDLE = "idle"
    DUPLEX_ACTIVE = "duplex_active"
    DUPLEX_PAUSED = "duplex_paused"
    ERROR = "error"


@dataclass(slots=True)
class BridgeOptions:
    """Timing knobs (defaults match the demo worker; tests shorten some)."""

    pause_timeout_s: float = 60.0  # a paused session is released after this long
    busy_wait_s: float = 1.0  # a new socket waits this long for the previous session to end
    resolve_timeout_s: float = 5.0  # give up waiting for a chunk's stage0 answers
    open_timeout_s: float = 10.0


class BridgeServer(WebsocketServer):
    """``GET /health`` + ``WS /ws/duplex`` on ``[server] bridge_port`` (one session at a time)."""

    name = "demo bridge"

    def __init__(
        self,
        settings: ServerSettings,
        link: AnyLink,
        default_session: SessionConfig,
        options: BridgeOptions | None = None,
    ) -> None:
        super().__init__(settings, link, default_session, settings.host, settings.bridge_port)
        self.options = options or BridgeOptions()
        self.routes["/ws/duplex"] = DemoHandler
        self.active: DemoHandler | None = None
        self.total_requests = 0  # audio chunks answered
        self.total_inference_ms = 0.0
        self._idle = asyncio.Event()
        self._idle.set()

    # ------------------------------------------------------------------ HTTP
    def at_capacity(self) -> bool:
        """Admission would refuse a new session: the server's sessions (on any endpoint)
        fill what its stages take."""
        status = self.link.status
        return status is not None and status.available == 0

    def worker_status(self) -> str:
        if self.active is not None:
            return WorkerStatus.DUPLEX_PAUSED if self.active.paused else WorkerStatus.DUPLEX_ACTIVE
        if self.draining:
            return WorkerStatus.ERROR
        if not self.link.ready():
            return WorkerStatus.LOADING
        if self.at_capacity():
            # Busy with other sessions: the gateway must not hand us one. The demo's statuses
            # have no "busy" of their own; duplex_active is the one every gateway skips.
            return WorkerStatus.DUPLEX_ACTIVE
        return WorkerStatus.IDLE

    def health(self) -> JSONObject:
        """The demo worker's health body (gateway picks workers by ``worker_status``)."""
        loaded = self.link.ready()
        avg = self.total_inference_ms / self.total_requests if self.total_requests else 0.0
        return {
            "status": "healthy" if loaded else "initializing",
            "worker_status": self.worker_status(),
            "gpu_id": 0,
            "model_loaded": loaded,
            "current_session_id": self.active.display_id if self.active else None,
            "total_requests": self.total_requests,
            "avg_inference_time_ms": round(avg, 3),
            "kv_cache_length": 0,
            "engine": self.link.engine.name if self.link.engine else None,
            "at_capacity": self.at_capacity(),
        }

    def http(self, path: str, request: Request) -> Response | None:
        return json_response(200, self.health()) if path == "/health" else None

    # ------------------------------------------------------------------ websocket
    async def serve_handler(self, handler: ProtocolHandler) -> None:
        assert isinstance(handler, DemoHandler)
        if not self.link.ready():
            await handler.ws.close(1013, "Worker not ready")
            return
        if self.active is not None:
            # Like the demo worker: give a session that is just ending a moment to clean up.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.options.busy_wait_s):
                    await self._idle.wait()
        if self.active is not None:
            await handler.ws.close(1013, f"Worker busy: {self.worker_status()}")
            return
        if self.at_capacity():
            await handler.ws.close(1013, "Worker busy: the server is at capacity")
            return
        self.active = handler
        self._idle.clear()
        try:
            await handler.run()
        finally:
            if self.active is handler:
                self.active = None
                self._idle.set()


class DemoHandler(ProtocolHandler):
    """One ``/ws/duplex`` socket mapped onto one duplex-mode session (opened on prepare)."""

    endpoint = "bridge"
    open_on_connect = False
    stamp_event_ids = False  # the demo's messages carry no event ids

    def __init__(self, ws: ServerConnection, server: Listener) -> None:
        super().__init__(ws, server)
        assert isinstance(server, BridgeServer)
        self.bridge = server
        query = parse_qs(urlsplit(ws.request.path).query) if ws.request is not None else {}
        self.client_sid = _SESSION_ID_RE.sub("_", (query.get("session_id") or [""])[0])[:64]
        stamp = time.strftime("%Y%m%d_%H%M%S")
        self.display_id = f"{stamp}_{self.client_sid}" if self.client_sid else f"{stamp}_duplex"
        self.paused = False
        self._opened = asyncio.Event()
        self._open_refused = False
        self._in_rate = 16000
        self._samples_in = 0  # engine-rate samples pushed this session
        self._next_index = 0
        self.pacer = ResultPacer(
            self._deliver,
            self._report,
            self._cancel_active,
            lambda: self.session.epoch if self.session else 0,
            server.options.resolve_timeout_s,
        )
        self._emitter: asyncio.Task[None] | None = None
        self._pause_task: asyncio.Task[None] | None = None
        self._send_lock = asyncio.Lock()

    # ------------------------------------------------------------------ connection
    def error_payload(
        self, code: str, message: str, type_: str, param: str, event_id: str | None, response_id: str
    ) -> JSONObject:
        return {"type": "error", "error": message}  # the demo's error shape

    async def send_json(self, payload: JSONObject) -> None:
        async with self._send_lock:  # the emitter and the message loop both send
            await super().send_json(payload)

    async def on_open(self) -> None:
        log(_log, logging.INFO, "demo duplex connected", client_session_id=self.client_sid)
        self._emitter = asyncio.get_running_loop().create_task(self.pacer.run(), name="bridge-emitter")

    async def on_close(self) -> None:
        self._closing = True
        for task in (self._emitter, self._pause_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        log(_log, logging.INFO, "demo duplex ended", client_session_id=self.client_sid)

    async def _deliver(self, result: Result) -> None:
        with contextlib.suppress(Exception):
            await self.send_json(result)
        self.bridge.total_requests += 1
        self.bridge.total_inference_ms += result["wall_clock_ms"]

    async def _report(self, code: str, message: str) -> None:
        await self.send_error(code, message, "server_error")

    # ------------------------------------------------------------------ client messages
    async def on_text(self, event: JSONObject, event_id: str) -> None:
        mtype = event["type"]
        match mtype:
            case "prepare":
                await self._prepare(event)
            case "audio_chunk":
                self._audio_chunk(event)
            case "pause":
                await self._pause(event)
            case "resume":
                await self._resume()
            case "stop":
                await self._stop()
            case "interrupt":  # deprecated in the demo (use force_listen); still honoured
                self._cancel_active()
                self.pacer.cut_all()
                await self.send_json({"type": "interrupted"})
            case _:
                raise ClientError("unknown_event", f"Unknown message type: {mtype}", param="type")

    async def _prepare(self, msg: JSONObject) -> None:
        cfg = opt_obj(msg, "config") or {}
        prompt = opt_str(msg, "system_prompt")
        prompt = DEFAULT_PROMPT if prompt is None else prompt
        rate = _config_int(cfg, "sample_rate", 16000)
        if rate not in SUPPORTED_RATES:
            supported = list(SUPPORTED_RATES)
            raise bad("config.sample_rate", f"config.sample_rate {rate} is not supported; one of {supported}")
        chunk_ms = _config_int(cfg, "chunk_ms", 1000)
        if not 100 <= chunk_ms <= 10000:
            raise bad("config.chunk_ms", "config.chunk_ms must be between 100 and 10000")
        flc = _config_int(cfg, "force_listen_count", 3)
        scale = _config_num(cfg, "listen_prob_scale", 1.0)
        if flc < 0 or scale < 0:
            raise bad("config", "config.force_listen_count and config.listen_prob_scale must be >= 0")
        engine = self.server.link.engine
        if engine is None:
            raise SessionUnavailable("the model is not ready")
        # The demo counts forced listens in its own chunks; the session counts engine chunks.
        engine_chunk_ms = engine.chunk_samples * 1000 / engine.input_rate
        changes: dict[str, Any] = {
            "turn_mode": TurnMode.DUPLEX,
            "instructions": prompt,
            "force_listen_count": math.ceil(flc * chunk_ms / engine_chunk_ms),
            "listen_prob_scale": scale,
        }
        if optional(cfg, "temperature") is not None:
            changes["temperature"] = _config_num(cfg, "temperature", 0.8)
        config = msgspec.structs.replace(self.server.default_session, **changes)
        # A new prepare starts a new conversation, as the demo worker resets its model.
        self.pacer.reset()
        self._samples_in = 0
        self._next_index = 0
        self.set_input_format(AudioFormat("float32", rate))
        await self.close_session("re-prepared")
        self._in_rate = rate
        self._opened.clear()
        sid = f"demo_{self.client_sid or 'duplex'}_{uuid.uuid4().hex[:12]}"
        self.open_session(sid, config)
        try:
            async with asyncio.timeout(self.bridge.options.open_timeout_s):
                await self._opened.wait()
        except TimeoutError as exc:
            await self.close_session("open timed out")
            raise SessionUnavailable("the session host did not open the session in time") from exc
        if self._open_refused:
            return  # admission said no: the error is out, the socket is closing
        log(_log, logging.INFO, "demo duplex prepared", session_id=sid, force_listen=flc, chunk_ms=chunk_ms)
        await self.send_json({"type": "prepared", "prompt_length": len(prompt), "session_id": self.display_id})

    def _audio_chunk(self, msg: JSONObject) -> None:
        link = self.session
        if link is None:
            raise ClientError("not_prepared", "Not prepared yet: send prepare first")
        if self.paused:
            raise ClientError("session_paused", "Worker is paused: send resume first")
        raw = b64decode(req_str(msg, "audio_base64", nonempty=True))
        if len(raw) > self.server.max_audio_bytes:
            raise ClientError("audio_too_large", f"audio chunk of {len(raw)} bytes exceeds the limit", "audio_base64")
        pcm = decode(raw, self.input_format)
        if pcm.size == 0:
            raise bad("audio_base64", "empty audio chunk")
        engine = link.engine
        assert engine is not None
        if self._resampler is None:
            self._resampler = InputResampler(self._in_rate, engine.input_rate, self.server.input_resampler)
        native = np.ascontiguousarray(self._resampler.push(pcm), dtype=np.float32)
        force = bool(opt_bool(msg, "force_listen"))
        now = time.monotonic()
        # A forced listen is the user taking the floor: it cuts the assistant (the force flag).
        link.audio(native, force=force)
        first = self._samples_in // engine.chunk_samples
        self._samples_in += native.size
        self.pacer.add_chunk(
            DemoChunk(
                index=self._next_index,
                received_at=now,
                first_seq=first,
                end_seq=self._samples_in // engine.chunk_samples,
                out_samples=round(pcm.size * OUTPUT_RATE / self._in_rate),
                force_listen=force,
            )
        )
        self._next_index += 1

    async def _pause(self, msg: JSONObject) -> None:
        timeout = optional(msg, "timeout")
        limit = self.bridge.options.pause_timeout_s if timeout is None else want_num(timeout, "timeout")
        if limit <= 0:
            raise bad("timeout", "timeout must be a positive number of seconds")
        self.paused = True
        if self._pause_task is not None:
            self._pause_task.cancel()
        self._pause_task = asyncio.get_running_loop().create_task(self._pause_watchdog(limit))
        await self.send_json({"type": "paused", "timeout": timeout if timeout is not None else limit})

    async def _pause_watchdog(self, limit_s: float) -> None:
        await asyncio.sleep(limit_s)
        log(_log, logging.WARNING, "demo duplex pause timed out", client_session_id=self.client_sid)
        await self.send_json({"type": "timeout", "reason": f"Pause timeout ({limit_s:g}s)"})
        self._closing = True
        await self.ws.close(1000, "Pause timeout")

    async def _resume(self) -> None:
        self.paused = False
        if self._pause_task is not None:
            self._pause_task.cancel()
            self._pause_task = None
        await self.send_json({"type": "resumed"})

    async def _stop(self) -> None:
        self._cancel_active()
        self.pacer.stop()
        self._closing = True
        await self.send_json({"type": "stopped"})
        await self.ws.close(1000, "stopped")

    def _cancel_active(self) -> None:
        """Cut the response being generated, if any (a listen follows)."""
        if self.session is not None and self.pacer.generating():
            self.session.cancel()

    # ------------------------------------------------------------------ session events
    async def on_event(self, msg: AdapterEvent) -> None:
        if isinstance(msg, SessionOpened):
            self._opened.set()
        elif isinstance(msg, SessionClosed) and not self._opened.is_set():
            self._open_refused = True  # (its error went out; the socket closes next, 1013)
            self._opened.set()
        self.pacer.on_event(msg)


def _config_int(cfg: JSONObject, key: str, default: int) -> int:
    v = optional(cfg, key)
    return default if v is None else int(want_num(v, f"config.{key}"))


def _config_num(cfg: JSONObject, key: str, default: float) -> float:
    v = optional(cfg, key)
    return default if v is None else want_num(v, f"config.{key}")
