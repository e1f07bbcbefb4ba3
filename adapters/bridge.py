"""MiniCPM-o demo bridge: duplexd looks like one worker of the official MiniCPM-o demo.

The demo's gateway polls ``GET /health`` on each worker and hands a duplex session to
the first ``idle`` one; it then forwards the browser's frames unchanged to
``WS /ws/duplex?session_id=…``. This module serves exactly that surface on its own
port (``[server] bridge_port``) from the adapter process, so the demo frontend and
gateway work against duplexd without changes:

* ``prepare {system_prompt, config {force_listen_count, listen_prob_scale, chunk_ms,
  sample_rate, ...}}`` opens a session in ``duplex`` turn mode → ``prepared``.
* ``audio_chunk {audio_base64: float32 LE mono 16 kHz (1 s), force_listen?}`` → exactly
  one ``result`` per chunk, in order: ``is_listen``, ``text``, ``audio_data`` (base64
  float32 24 kHz, as long as the input chunk: silence on listens, speak audio
  left-padded with silence, only the turn-final result shorter), ``end_of_turn``,
  ``current_time`` (chunk index), ``cost_*_ms``, ``server_send_ts``, ``wall_clock_ms``.
* ``pause`` → ``paused {timeout}`` (``timeout`` then close when it runs out),
  ``resume`` → ``resumed``, ``stop`` → ``stopped`` and close; errors are
  ``{type: "error", error: "text"}`` and the connection stays.
* A second duplex socket while one is active is closed with 1013 (worker busy).

How one result is made. The session actor splits the input into engine chunks (e.g.
100 ms), so a 1 s demo chunk gets several stage0 decisions, and assistant audio comes
separately, paced, as AudioOut. A demo chunk's result is due once every engine chunk
it completed has been answered: a ``Decision`` for chunk ``s`` answers every chunk up to
``s`` (stage0 answers in order). Decisions of an epoch that a barge-in ended are never
shown; the session snapshot's ``chunk_results`` count then says how far stage0 got.
Its audio is then taken from the head of the assistant audio queue: up to one chunk's
length of the response being spoken (waiting for it at most until the next chunk is
due), so results keep the pace of the input and never mix two responses. Audio of a
cancelled response is dropped the moment the epoch advances: none of it is sent later.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import msgspec
import numpy as np
from websockets.asyncio.server import Server, ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from duplexd.adapters.audio import (
    SUPPORTED_RATES,
    AudioFormat,
    AudioFormatError,
    InputResampler,
    b64decode,
    b64encode,
    decode,
)
from duplexd.adapters.http import json_response
from duplexd.adapters.link import HostLink, SessionLink, SessionUnavailable
from duplexd.adapters.server import ServerSettings, load_api_keys, request_authorized, serve_ws
from duplexd.bus.log import get_logger, log
from duplexd.bus.messages import (
    Action,
    AudioOut,
    Decision,
    EpochAdvance,
    ErrorEvent,
    ResponseCreated,
    ResponseDone,
    ResponseStatus,
    SessionClosed,
    SessionConfig,
    SessionOpened,
    Snapshot,
    TurnMode,
)
from duplexd.bus.metrics import CLIENT_ERRORS, CONNECTIONS

_log = get_logger(__name__)

OUTPUT_RATE = 24000
_SESSION_ID_RE = re.compile(r"[^A-Za-z0-9_\-]")


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
    snapshot_poll_s: float = 0.3  # unanswered engine chunks this long: ask the host how far stage0 got
    resolve_timeout_s: float = 5.0  # give up waiting for a chunk's decisions (stage0 lost)
    open_timeout_s: float = 10.0


@dataclass(slots=True)
class _Chunk:
    """One demo input chunk waiting for its result."""

    index: int
    received_at: float
    first_seq: int  # engine chunks [first_seq, end_seq) completed by this chunk
    end_seq: int
    out_samples: int  # 24 kHz samples its result carries
    force_listen: bool
    cost_llm_ms: float = 0.0
    speak_decisions: int = 0


@dataclass(slots=True)
class _Turn:
    """Assistant audio of one response, queued for results."""

    response_id: str
    epoch: int
    segments: deque[tuple[np.ndarray, str]] = field(default_factory=deque)
    available: int = 0  # samples queued
    delivered: int = 0  # samples already sent in results
    ended: bool = False  # no more audio will come
    cancelled: bool = False
    finished: bool = False  # its turn-final result was sent

    def add(self, pcm: np.ndarray, text: str) -> None:
        if self.cancelled:
            return
        self.segments.append((pcm, text))
        self.available += pcm.size

    def take(self, n: int) -> tuple[np.ndarray, str]:
        parts: list[np.ndarray] = []
        texts: list[str] = []
        need = n
        while need > 0 and self.segments:
            pcm, text = self.segments.popleft()
            if pcm.size > need:
                # The words go with the part where the chunk starts.
                self.segments.appendleft((pcm[need:], ""))
                pcm = pcm[:need]
            parts.append(pcm)
            texts.append(text)
            need -= pcm.size
        out = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)
        self.available -= out.size
        self.delivered += out.size
        return out, "".join(texts)

    def drop(self) -> None:
        self.cancelled = True
        self.ended = True
        self.segments.clear()
        self.available = 0


class BridgeServer:
    """``GET /health`` + ``WS /ws/duplex`` on ``[server] bridge_port`` (one session at a time)."""

    def __init__(
        self,
        settings: ServerSettings,
        link: HostLink,
        default_session: SessionConfig,
        options: BridgeOptions | None = None,
    ) -> None:
        self.settings = settings
        self.link = link
        self.default_session = default_session
        self.options = options or BridgeOptions()
        self.api_keys = load_api_keys(settings)
        self.active: DemoSession | None = None
        self.draining = False
        self.total_requests = 0  # audio chunks answered
        self.total_inference_ms = 0.0
        self.sessions_served = 0
        self.bound_port = 0
        self._server: Server | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    # ------------------------------------------------------------------ HTTP
    def worker_status(self) -> str:
        if self.active is not None:
            return WorkerStatus.DUPLEX_PAUSED if self.active.paused else WorkerStatus.DUPLEX_ACTIVE
        if self.draining:
            return WorkerStatus.ERROR
        if not self.link.ready():
            return WorkerStatus.LOADING
        return WorkerStatus.IDLE

    def health(self) -> dict[str, Any]:
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
        }

    def authorized(self, request: Request) -> bool:
        return request_authorized(request, self.api_keys)

    async def process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path.rstrip("/") or "/"
        if path == "/health":
            return json_response(200, self.health())
        if path == "/ws/duplex":
            if request.headers.get("Upgrade", "").lower() != "websocket":
                return json_response(426, {"error": "/ws/duplex is a websocket endpoint"})
            if not self.authorized(request):
                return json_response(401, {"error": "invalid or missing API key"})
            return None
        return json_response(404, {"error": f"no route {path}"})

    # ------------------------------------------------------------------ websocket
    async def handle(self, conn: ServerConnection) -> None:
        assert conn.request is not None
        query = parse_qs(urlsplit(conn.request.path).query)
        client_sid = _SESSION_ID_RE.sub("_", (query.get("session_id") or [""])[0])[:64]
        if self.draining:
            await conn.close(1001, "server shutting down")
            return
        if not self.link.ready():
            await conn.close(1013, "Worker not ready")
            return
        if self.active is not None:
            # Like the demo worker: give a session that is just ending a moment to clean up.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.options.busy_wait_s):
                    await self._idle.wait()
        if self.active is not None:
            await conn.close(1013, f"Worker busy: {self.worker_status()}")
            return
        session = DemoSession(self, conn, client_sid)
        self.active = session
        self._idle.clear()
        self.sessions_served += 1
        CONNECTIONS.labels(endpoint="bridge").inc()
        try:
            await session.run()
        finally:
            CONNECTIONS.labels(endpoint="bridge").dec()
            if self.active is session:
                self.active = None
                self._idle.set()

    async def start(self) -> None:
        s = self.settings
        self._server = await serve_ws(self.handle, s.host, s.bridge_port, s, self.process_request)
        self.bound_port = next(iter(self._server.sockets)).getsockname()[1]
        log(_log, logging.INFO, "demo bridge listening", host=s.host, port=self.bound_port)

    async def drain(self) -> None:
        """Refuse new sessions, close the active one (1001), stop listening."""
        self.draining = True
        if self.active is not None:
            with contextlib.suppress(Exception):
                await self.active.ws.close(1001, "server shutting down")
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


class DemoSession:
    """One ``/ws/duplex`` socket mapped onto one duplex-mode session."""

    def __init__(self, bridge: BridgeServer, ws: ServerConnection, client_sid: str) -> None:
        self.bridge = bridge
        self.ws = ws
        self.client_sid = client_sid
        stamp = time.strftime("%Y%m%d_%H%M%S")
        self.display_id = f"{stamp}_{client_sid}" if client_sid else f"{stamp}_duplex"
        self.paused = False
        self.link: SessionLink | None = None
        self._opened = asyncio.Event()
        self._changed = asyncio.Event()
        self._pending: deque[_Chunk] = deque()
        self._turns: deque[_Turn] = deque()
        self._resampler: InputResampler | None = None
        self._in_rate = 16000
        self._samples_in = 0  # engine-rate samples pushed this session
        self._next_index = 0
        self._resolved = -1  # every engine chunk up to this seq has been answered
        self._snapshot_at = 0.0  # when the last snapshot was requested (0: none in flight)
        self._interrupted = False  # a response that had been heard was cut: tell the next result
        self._emitter: asyncio.Task[None] | None = None
        self._pause_task: asyncio.Task[None] | None = None
        self._send_lock = asyncio.Lock()
        self._closing = False

    # ------------------------------------------------------------------ connection
    async def run(self) -> None:
        log(_log, logging.INFO, "demo duplex connected", client_session_id=self.client_sid)
        self._emitter = asyncio.get_running_loop().create_task(self._emit_loop(), name="bridge-emitter")
        try:
            async for frame in self.ws:
                if self._closing:
                    break
                await self._dispatch(frame)
        except ConnectionClosed:
            pass
        finally:
            self._closing = True
            for task in (self._emitter, self._pause_task):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
            await self._close_link("demo socket closed")
            log(_log, logging.INFO, "demo duplex ended", client_session_id=self.client_sid)

    async def _close_link(self, reason: str) -> None:
        if self.link is not None:
            link, self.link = self.link, None
            await link.close(reason)

    async def send(self, payload: dict[str, Any]) -> None:
        async with self._send_lock:
            with contextlib.suppress(ConnectionClosed):
                await self.ws.send(json.dumps(payload, separators=(",", ":")))

    async def error(self, text: str, code: str = "bridge_error") -> None:
        CLIENT_ERRORS.labels(code=code).inc()
        await self.send({"type": "error", "error": text})

    async def _dispatch(self, frame: str | bytes) -> None:
        if isinstance(frame, bytes):
            await self.error("binary frames are not part of this protocol: send JSON text", "binary_not_supported")
            return
        try:
            msg = json.loads(frame)
        except json.JSONDecodeError as exc:
            await self.error(f"invalid JSON: {exc.msg} at position {exc.pos}", "invalid_json")
            return
        if not isinstance(msg, dict):
            await self.error("each message must be a JSON object", "invalid_event")
            return
        mtype = msg.get("type", "")
        try:
            match mtype:
                case "prepare":
                    await self._prepare(msg)
                case "audio_chunk":
                    await self._audio_chunk(msg)
                case "pause":
                    await self._pause(msg)
                case "resume":
                    await self._resume()
                case "stop":
                    await self._stop()
                case "interrupt":  # deprecated in the demo (use force_listen); still honoured
                    self._cancel_active()
                    for t in self._turns:
                        self._cut(t)
                    await self.send({"type": "interrupted"})
                case _:
                    await self.error(f"Unknown message type: {mtype}", "unknown_event")
        except _BadRequest as exc:
            await self.error(str(exc), exc.code)
        except AudioFormatError as exc:
            await self.error(str(exc), exc.code)
        except SessionUnavailable as exc:
            await self.error(f"session unavailable: {exc}", "session_unavailable")
        except ConnectionClosed:
            raise
        except Exception as exc:  # a bug of ours: report it, keep the connection
            log(_log, logging.ERROR, "bridge message failed", exc_info=True, client_session_id=self.client_sid)
            await self.error(f"internal error: {type(exc).__name__}", "server_error")

    # ------------------------------------------------------------------ client messages
    async def _prepare(self, msg: dict[str, Any]) -> None:
        cfg = msg.get("config") or {}
        if not isinstance(cfg, dict):
            raise _BadRequest("config must be an object")
        prompt = msg.get("system_prompt")
        if prompt is None:
            prompt = "You are a helpful assistant."
        if not isinstance(prompt, str):
            raise _BadRequest("system_prompt must be a string")
        rate = _num(cfg, "sample_rate", 16000, int)
        if rate not in SUPPORTED_RATES:
            raise _BadRequest(f"config.sample_rate {rate} is not supported; one of {list(SUPPORTED_RATES)}")
        chunk_ms = _num(cfg, "chunk_ms", 1000, int)
        if not 100 <= chunk_ms <= 10000:
            raise _BadRequest("config.chunk_ms must be between 100 and 10000")
        flc = _num(cfg, "force_listen_count", 3, int)
        scale = _num(cfg, "listen_prob_scale", 1.0, float)
        if flc < 0 or scale < 0:
            raise _BadRequest("config.force_listen_count and config.listen_prob_scale must be >= 0")
        engine = self.bridge.link.engine
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
        if "temperature" in cfg:
            changes["temperature"] = _num(cfg, "temperature", 0.8, float)
        config = msgspec.structs.replace(self.bridge.default_session, **changes)
        # A new prepare starts a new conversation, as the demo worker resets its model.
        self._reset()
        await self._close_link("re-prepared")
        self._in_rate = rate
        self._opened.clear()
        sid = f"demo_{self.client_sid or 'duplex'}_{uuid.uuid4().hex[:12]}"
        self.link = self.bridge.link.open(sid, config, self._on_event)
        try:
            async with asyncio.timeout(self.bridge.options.open_timeout_s):
                await self._opened.wait()
        except TimeoutError as exc:
            await self._close_link("open timed out")
            raise SessionUnavailable("the session host did not open the session in time") from exc
        log(_log, logging.INFO, "demo duplex prepared", session_id=sid, force_listen=flc, chunk_ms=chunk_ms)
        await self.send({"type": "prepared", "prompt_length": len(prompt), "session_id": self.display_id})

    def _reset(self) -> None:
        self._pending.clear()
        self._turns.clear()
        self._resampler = None
        self._samples_in = 0
        self._next_index = 0
        self._resolved = -1
        self._snapshot_at = 0.0
        self._interrupted = False
        self._notify()

    async def _audio_chunk(self, msg: dict[str, Any]) -> None:
        link = self.link
        if link is None:
            raise _BadRequest("Not prepared yet: send prepare first")
        if self.paused:
            raise _BadRequest("Worker is paused")
        data = msg.get("audio_base64")
        if not isinstance(data, str) or not data:
            raise _BadRequest("Missing audio_base64")
        raw = b64decode(data)
        if len(raw) > self.bridge.settings.max_audio_bytes:
            raise _BadRequest(f"audio chunk of {len(raw)} bytes exceeds the limit")
        pcm = decode(raw, AudioFormat("float32", self._in_rate))
        if pcm.size == 0:
            raise _BadRequest("empty audio chunk")
        engine = link.engine
        assert engine is not None
        if self._resampler is None:
            self._resampler = InputResampler(self._in_rate, engine.input_rate)
        native = np.ascontiguousarray(self._resampler.push(pcm), dtype=np.float32)
        force = bool(msg.get("force_listen", False))
        now = time.monotonic()
        # A forced listen is the user taking the floor: it cuts the assistant (the force flag).
        link.audio(native, force=force)
        first = self._samples_in // engine.chunk_samples
        self._samples_in += native.size
        chunk = _Chunk(
            index=self._next_index,
            received_at=now,
            first_seq=first,
            end_seq=self._samples_in // engine.chunk_samples,
            out_samples=round(pcm.size * OUTPUT_RATE / self._in_rate),
            force_listen=force,
        )
        self._next_index += 1
        self._pending.append(chunk)
        self._notify()

    async def _pause(self, msg: dict[str, Any]) -> None:
        timeout = msg.get("timeout", self.bridge.options.pause_timeout_s)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
            raise _BadRequest("timeout must be a positive number of seconds")
        self.paused = True
        if self._pause_task is not None:
            self._pause_task.cancel()
        self._pause_task = asyncio.get_running_loop().create_task(self._pause_watchdog(float(timeout)))
        await self.send({"type": "paused", "timeout": timeout})

    async def _pause_watchdog(self, limit_s: float) -> None:
        await asyncio.sleep(limit_s)
        log(_log, logging.WARNING, "demo duplex pause timed out", client_session_id=self.client_sid)
        await self.send({"type": "timeout", "reason": f"Pause timeout ({limit_s:g}s)"})
        self._closing = True
        await self.ws.close(1000, "Pause timeout")

    async def _resume(self) -> None:
        self.paused = False
        if self._pause_task is not None:
            self._pause_task.cancel()
            self._pause_task = None
        await self.send({"type": "resumed"})

    async def _stop(self) -> None:
        self._cancel_active()
        self._pending.clear()
        for t in self._turns:
            t.drop()
        self._closing = True
        await self.send({"type": "stopped"})
        await self.ws.close(1000, "stopped")

    def _cancel_active(self) -> None:
        """Cut the response being generated, if any (a listen follows)."""
        if self.link is not None and any(not t.ended for t in self._turns):
            self.link.cancel()

    # ------------------------------------------------------------------ session events
    def _notify(self) -> None:
        self._changed.set()

    async def _on_event(self, msg: Any) -> None:
        match msg:
            case SessionOpened():
                self._opened.set()
            case Decision(chunk_seq=seq):
                self._resolved = max(self._resolved, seq)
                for c in self._pending:
                    if c.first_seq <= seq < c.end_seq:
                        c.cost_llm_ms += msg.cost_ms
                        c.speak_decisions += msg.action == Action.SPEAK
                        break
            case Snapshot(snapshot=snap):
                # Stage0 answers in order: chunks [0, chunk_results) are all answered.
                self._resolved = max(self._resolved, snap.chunk_results - 1)
                self._snapshot_at = 0.0
            case ResponseCreated(response=resp):
                turn = _Turn(resp.id, msg.epoch)
                if self.link is not None and msg.epoch < self.link.epoch:
                    turn.drop()  # cancelled before we heard of it
                self._turns.append(turn)
            case AudioOut():
                turn = self._turn(msg.response_id)
                if turn is not None:
                    turn.add(np.asarray(msg.pcm, dtype=np.float32) / 32768.0, msg.text)
                    turn.ended = turn.ended or msg.end_of_turn
            case ResponseDone(response=resp):
                turn = self._turn(resp.id)
                if turn is not None:
                    if resp.status in (ResponseStatus.CANCELLED, ResponseStatus.FAILED):
                        self._cut(turn)
                    turn.ended = True
            case EpochAdvance(epoch=epoch):
                # Output of older epochs is void (barge-in, cancel): drop what is queued, even
                # of a response the host already finished but the client has not heard yet.
                for t in self._turns:
                    if t.epoch < epoch:
                        self._cut(t)
            case ErrorEvent():
                await self.error(msg.message, msg.code)
                if msg.fatal:
                    self._closing = True
                    await self.ws.close(1011, msg.message[:120])
            case SessionClosed():
                self._closing = True
                await self.ws.close(1000, msg.reason[:120] or "session closed")
            case _:
                pass
        self._notify()

    def _turn(self, response_id: str) -> _Turn | None:
        return next((t for t in self._turns if t.response_id == response_id), None)

    def _cut(self, turn: _Turn) -> None:
        if turn.delivered and not turn.cancelled:
            self._interrupted = True
        turn.drop()

    # ------------------------------------------------------------------ results
    async def _wait(self, limit_s: float) -> None:
        """Until the next session event (or ``limit_s``)."""
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, limit_s)):
                await self._changed.wait()

    async def _emit_loop(self) -> None:
        opts = self.bridge.options
        while True:
            while not self._pending:
                await self._wait(3600)
            chunk = self._pending[0]
            # 1. Every engine chunk this demo chunk completed has been decided.
            while self._pending and self._pending[0] is chunk and self._resolved < chunk.end_seq - 1:
                now = time.monotonic()
                if now - chunk.received_at > opts.resolve_timeout_s:
                    log(_log, logging.WARNING, "stage0 decisions missing; answering listen", chunk=chunk.index)
                    break
                waited = now - max(chunk.received_at, self._snapshot_at)
                if self.link is not None and waited >= opts.snapshot_poll_s and self._snapshot_at == 0.0:
                    # Decisions of an epoch a barge-in ended are never shown: ask how far stage0 got.
                    self._snapshot_at = now
                    with contextlib.suppress(SessionUnavailable):
                        self.link.request_snapshot()
                elif self._snapshot_at and now - self._snapshot_at > 1.0:
                    self._snapshot_at = 0.0  # the answer got lost (session closing): ask again
                await self._wait(opts.snapshot_poll_s / 2)
            if not self._pending or self._pending[0] is not chunk:
                continue  # re-prepared or stopped meanwhile
            # 2. Its audio: one chunk's length of the response being spoken, if any.
            try:
                result = await self._compose(chunk)
            except Exception as exc:  # a bug of ours: the chunk still gets an answer
                log(_log, logging.ERROR, "bridge result failed", exc_info=True, chunk=chunk.index)
                if self._pending and self._pending[0] is chunk:
                    self._pending.popleft()
                await self.error(f"internal error: {type(exc).__name__}", "server_error")
                continue
            if not self._pending or self._pending[0] is not chunk:
                continue
            self._pending.popleft()
            await self.send(result)
            self.bridge.total_requests += 1
            self.bridge.total_inference_ms += result["wall_clock_ms"]

    def _head_turn(self) -> _Turn | None:
        while self._turns:
            t = self._turns[0]
            if t.cancelled or t.finished or (t.ended and t.available == 0 and t.delivered == 0):
                self._turns.popleft()  # done, cut, or a response that never had audio
                continue
            return t
        return None

    async def _compose(self, chunk: _Chunk) -> dict[str, Any]:
        n = chunk.out_samples
        if chunk.force_listen:
            # The user holds the floor for this chunk ("force listen" in the demo): nothing
            # queued plays, and a reply the model started meanwhile is withdrawn too.
            self._cancel_active()
            for t in self._turns:
                self._cut(t)
        turn = self._head_turn()
        waited_from = time.monotonic()
        if turn is not None:
            # Wait for a full chunk of audio (or the turn's end), but not past the time the
            # next input chunk is due: results keep the input's pace.
            due = chunk.received_at + n / OUTPUT_RATE
            while not (turn.cancelled or turn.ended or turn.available > n) and time.monotonic() < due:
                await self._wait(due - time.monotonic())
            if turn.cancelled:
                turn = None
        tts_wait_ms = (time.monotonic() - waited_from) * 1000
        if turn is None:
            pcm = np.zeros(n, dtype=np.float32)
            text = ""
            is_listen = True
            end_of_turn, self._interrupted = self._interrupted, False
            response_id = None
        else:
            starts = turn.delivered == 0
            pcm, text = turn.take(n)
            if starts:
                text = text.lstrip()  # a reply's first words, not a continuation
            end_of_turn = turn.finished = turn.ended and turn.available == 0
            if pcm.size < n and not end_of_turn:
                # The demo frontend plays every result as one chunk: pad at the front.
                pcm = np.concatenate((np.zeros(n - pcm.size, dtype=np.float32), pcm))
            is_listen = False
            response_id = turn.response_id
        wall_ms = (time.monotonic() - chunk.received_at) * 1000
        return {
            "type": "result",
            "is_listen": is_listen,
            "text": text,
            "audio_data": b64encode(pcm.astype("<f4", copy=False)),
            "end_of_turn": end_of_turn,
            "current_time": chunk.index,
            "cost_llm_ms": round(chunk.cost_llm_ms, 3),
            "cost_tts_prep_ms": 0.0,
            "cost_tts_ms": round(tts_wait_ms, 3),
            "cost_token2wav_ms": 0.0,
            "cost_all_ms": round(wall_ms, 3),
            "n_tokens": len(text.split()),
            "n_tts_tokens": 0,
            "server_send_ts": time.time(),
            "wall_clock_ms": round(wall_ms, 1),
            "kv_cache_length": 0,
            "response_id": response_id,
        }


class _BadRequest(Exception):
    def __init__(self, message: str, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.code = code


def _num(cfg: dict[str, Any], key: str, default: Any, kind: type) -> Any:
    v = cfg.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise _BadRequest(f"config.{key} must be a number")
    return kind(v)
