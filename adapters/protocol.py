"""What every websocket protocol handler shares: the connection loop, JSON in/out,
error events (one log line each), client event ids, and the session link.

A handler subclass maps its client events onto :class:`SessionLink` commands and bus
session events onto its server events. Nothing a client sends can end the loop except
closing the socket: malformed JSON, unknown events and bad fields become error events.
The Realtime and native handlers open their session when the socket opens; the demo
bridge opens it on its ``prepare`` message (:attr:`ProtocolHandler.open_on_connect`).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from duplexd.adapters.audio import AudioFormat, AudioFormatError, InputResampler, decode
from duplexd.adapters.link import SessionLink, SessionUnavailable
from duplexd.adapters.sharded_link import AnyLink
from duplexd.adapters.validation import ClientError
from duplexd.bus.log import get_logger, log
from duplexd.bus.messages import (
    AdapterEvent,
    CloseCause,
    ErrorEvent,
    IdleTimeout,
    InputCleared,
    InputCommitted,
    ItemTruncated,
    ResponseCreated,
    ResponseDone,
    SessionClosed,
    SessionConfig,
    SpeechStarted,
    SpeechStopped,
)
from duplexd.bus.metrics import CLIENT_ERRORS, CONNECTIONS
from duplexd.bus.resample import ResamplerMode
from duplexd.bus.sockets import Backpressure

_log = get_logger(__name__)

JSONObject = dict[str, Any]

# Client events without an ``event_id`` get one of ours, so an error the host reports for
# the command they caused can still name the event type in the log. Never shown to clients.
AUTO_EVENT_PREFIX = "duplexd_auto_"
_EVENT_TYPES_KEPT = 256

# The websocket close code for each way a session ends (RFC 6455 section 7.4.1).
CLOSE_CODES: dict[CloseCause, int] = {
    CloseCause.NORMAL: 1000,
    CloseCause.REFUSED: 1013,  # try again later
    CloseCause.FAILED: 1011,
    CloseCause.SLOW_CLIENT: 1008,
    CloseCause.SHUTDOWN: 1001,
}
CLOSE_TIMEOUT_S = 2.0  # a close frame that cannot leave in this long: the connection is aborted
SLOW_NOTICE_S = 10.0  # how long a client cut for not reading has to read why (client_too_slow)


class Listener(Protocol):
    """What a handler needs of the server that accepted its connection."""

    link: AnyLink
    default_session: SessionConfig
    max_audio_bytes: int
    input_resampler: ResamplerMode


def new_event_id() -> str:
    return f"event_{uuid.uuid4().hex[:20]}"


class ProtocolHandler(abc.ABC):
    """One websocket connection speaking one protocol."""

    endpoint = "ws"
    open_on_connect = True  # False: the handler opens its session itself (open_session)
    stamp_event_ids = True  # every server event carries a unique event_id

    def __init__(self, ws: ServerConnection, server: Listener) -> None:
        self.ws = ws
        self.server = server
        self.session: SessionLink | None = None
        self.config: SessionConfig = server.default_session
        self.input_format = AudioFormat()
        self._resampler: InputResampler | None = None
        self._closing = False
        self._active_response = ""
        self._event_types: dict[str, str] = {}  # client event id → its type (recent ones)
        self._auto_ids = 0

    # ------------------------------------------------------------------ to implement
    async def on_open(self) -> None:  # noqa: B027 - optional hook
        """The socket is open (and the session, when ``open_on_connect``)."""

    async def on_close(self) -> None:  # noqa: B027 - optional hook
        """The socket ended; the session closes right after."""

    @abc.abstractmethod
    async def on_text(self, event: JSONObject, event_id: str) -> None:
        """One parsed client JSON event; ``event_id`` is the client's or one of ours
        (pass it to session commands; render it with :meth:`client_event_id`)."""

    async def on_binary(self, data: bytes) -> None:
        raise ClientError("binary_not_supported", "this endpoint takes JSON text frames only")

    @abc.abstractmethod
    async def on_event(self, msg: AdapterEvent) -> None:
        """One bus session event (already epoch-fenced); error events are sent by the loop."""

    def error_payload(
        self, code: str, message: str, type_: str, param: str, event_id: str | None, response_id: str
    ) -> JSONObject:
        """The error event: Realtime's shape, which the native protocol shares."""
        return {
            "type": "error",
            "error": {
                "type": type_,
                "code": code,
                "message": message,
                "param": param or None,
                "event_id": event_id,
            },
        }

    def swallow_error(self, msg: ErrorEvent) -> bool:
        """Whether a host error answers something of ours, not the client's (never sent)."""
        return False

    # ------------------------------------------------------------------ plumbing
    def session_id(self) -> str:
        return f"sess_{uuid.uuid4().hex[:20]}"

    def open_session(self, session_id: str, config: SessionConfig) -> SessionLink:
        """Open (or re-open) the session on the host; raises :class:`SessionUnavailable`."""
        self.session = self.server.link.open(session_id, config, self._on_bus_event, self._on_slow_client)
        return self.session

    async def close_session(self, reason: str) -> None:
        if self.session is not None:
            session, self.session = self.session, None
            await session.close(reason)

    async def run(self) -> None:
        CONNECTIONS.labels(endpoint=self.endpoint).inc()
        try:
            if self.open_on_connect:
                try:
                    self.open_session(self.session_id(), self.config)
                except SessionUnavailable as exc:
                    await self.refuse("server_unavailable", str(exc), "server not ready")
                    return
            await self.on_open()
            async for frame in self.ws:
                if self._closing:
                    break
                await self._dispatch(frame)
        except ConnectionClosed:
            pass
        finally:
            CONNECTIONS.labels(endpoint=self.endpoint).dec()
            try:
                await self.on_close()
            finally:
                await self.close_session("client disconnected")

    def _event_ref(self, event: JSONObject, etype: str) -> str:
        eid = event.get("event_id")
        if not isinstance(eid, str) or not eid:
            self._auto_ids += 1
            eid = f"{AUTO_EVENT_PREFIX}{self._auto_ids}"
        self._event_types[eid] = etype
        if len(self._event_types) > _EVENT_TYPES_KEPT:
            self._event_types.pop(next(iter(self._event_types)))
        return eid

    @staticmethod
    def client_event_id(event_id: str) -> str | None:
        """The id to show the client: its own, or None for an event it sent without one."""
        return None if not event_id or event_id.startswith(AUTO_EVENT_PREFIX) else event_id

    async def _dispatch(self, frame: str | bytes) -> None:
        event_id, etype = "", "binary" if isinstance(frame, bytes) else ""
        try:
            if isinstance(frame, bytes):
                await self.on_binary(frame)
                return
            try:
                # A multi-megabyte frame would stall every connection while it parses.
                event = json.loads(frame) if len(frame) < 1 << 20 else await asyncio.to_thread(json.loads, frame)
            except json.JSONDecodeError as exc:
                raise ClientError("invalid_json", f"invalid JSON: {exc.msg} at position {exc.pos}") from exc
            if not isinstance(event, dict):
                raise ClientError("invalid_event", "each event must be a JSON object")
            if isinstance(event.get("event_id"), str):
                event_id = event["event_id"]
            if not isinstance(event.get("type"), str):
                raise ClientError("missing_required_parameter", "Missing required parameter: 'type'.", param="type")
            etype = event["type"]
            event_id = self._event_ref(event, etype)
            await self.on_text(event, event_id)
        except ClientError as exc:
            await self.send_error(exc.code, str(exc), exc.type, exc.param, event_id, event_type=etype)
        except AudioFormatError as exc:
            await self.send_error(exc.code, str(exc), "invalid_request_error", "audio", event_id, event_type=etype)
        except SessionUnavailable as exc:
            await self.send_error("session_unavailable", str(exc), "server_error", "", event_id, event_type=etype)
        except Backpressure:
            # The bus queue toward the host is full: say so instead of buffering without bound.
            await self.send_error(
                "overloaded",
                "the server is overloaded; this event was dropped, retry later",
                "server_error",
                "",
                event_id,
                event_type=etype,
            )
        except ConnectionClosed:
            raise
        except Exception as exc:  # a bug of ours: report it, keep the connection
            log(
                _log,
                logging.ERROR,
                "handler failed",
                exc_info=True,
                session_id=self.session.session_id if self.session else None,
                event_type=etype,
            )
            await self.send_error(
                "server_error", f"internal error: {type(exc).__name__}", "server_error", "", event_id, event_type=etype
            )

    async def _on_bus_event(self, msg: AdapterEvent) -> None:
        try:
            if isinstance(msg, ErrorEvent):
                if not self.swallow_error(msg):
                    await self.send_error(
                        msg.code, msg.message, msg.type, msg.param, msg.event_id, msg.response_id, origin="host"
                    )
            else:
                if isinstance(msg, ResponseCreated):
                    self._active_response = msg.response.id
                elif isinstance(msg, ResponseDone):
                    self._active_response = ""
                await self.on_event(msg)
            if isinstance(msg, SessionClosed) or (isinstance(msg, ErrorEvent) and msg.fatal):
                self._closing = True
                code = CLOSE_CODES[msg.cause] if isinstance(msg, SessionClosed) else 1011
                await self.close_ws(code, msg_reason(msg))
        except ConnectionClosed:
            pass

    async def refuse(self, code: str, message: str, close_reason: str = "") -> None:
        """Not now: one error event, then close 1013 ("try again later")."""
        self._closing = True
        await self.send_error(code, message, "server_error")
        await self.close_ws(CLOSE_CODES[CloseCause.REFUSED], (close_reason or message)[:120])

    async def _on_slow_client(self, reason: str) -> None:
        """The session link cut this client for not reading: say why, if it still can be
        said, and close with 1008 (aborted when even that cannot leave)."""
        self._closing = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SLOW_NOTICE_S):
                await self.send_error("client_too_slow", reason, "server_error")
        await self.close_ws(CLOSE_CODES[CloseCause.SLOW_CLIENT], "client not reading its events")

    async def close_ws(self, code: int, reason: str) -> None:
        """Close with a reason; a peer that does not read gets its TCP connection aborted
        instead of holding the close (and the memory behind it) open."""
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await self.ws.close(code, reason)
        except TimeoutError:
            log(_log, logging.INFO, "close frame could not leave; aborting the connection", endpoint=self.endpoint)
            self.ws.transport.abort()

    def end_session(self, code: str, message: str) -> None:
        """End the session from the adapter's side (a shutdown that cannot wait): error,
        the active response's terminal event, close 1001; the host is told to close it."""
        if self.session is not None:
            self.session.abort(code, message, CloseCause.SHUTDOWN, tell_host=True)

    def busy(self) -> bool:
        """A response is in flight (a graceful shutdown waits for it)."""
        return bool(self._active_response)

    async def send_json(self, payload: JSONObject) -> None:
        if self.stamp_event_ids:
            payload.setdefault("event_id", new_event_id())
        await self.ws.send(json.dumps(payload, separators=(",", ":")))

    async def send_error(
        self,
        code: str,
        message: str,
        type_: str = "invalid_request_error",
        param: str = "",
        event_id: str = "",
        response_id: str = "",
        event_type: str | None = None,
        origin: str = "adapter",
    ) -> None:
        """Send one error event to the client, count it, and log it once (structured)."""
        if event_type is None:
            event_type = self._event_types.get(event_id, "")
        CLIENT_ERRORS.labels(code=code).inc()
        log(
            _log,
            logging.INFO,
            "client error",
            session_id=self.session.session_id if self.session else None,
            response_id=response_id or None,
            endpoint=self.endpoint,
            code=code,
            event_type=event_type or None,
            param=param or None,
            origin=origin,
            error=message,
        )
        with contextlib.suppress(ConnectionClosed):
            await self.send_json(
                self.error_payload(code, message, type_, param, self.client_event_id(event_id), response_id)
            )

    # ------------------------------------------------------------------ audio in
    def set_input_format(self, fmt: AudioFormat) -> None:
        self.input_format = fmt
        self._resampler = None

    def push_audio(self, raw: bytes | memoryview, force: bool = False) -> int:
        """Client bytes in ``input_format`` → engine-native float32 → session. Returns
        the number of client samples taken."""
        if self.session is None:
            raise SessionUnavailable("no session")
        if len(raw) > self.server.max_audio_bytes:
            raise ClientError(
                "audio_too_large",
                f"audio chunk of {len(raw)} bytes exceeds the {self.server.max_audio_bytes}-byte limit",
                param="audio",
            )
        pcm = decode(raw, self.input_format)
        engine = self.session.engine
        rate = engine.input_rate if engine else self.input_format.rate
        if self._resampler is None or self._resampler.out_rate != rate:
            self._resampler = InputResampler(self.input_format.rate, rate, self.server.input_resampler)
        native = self._resampler.push(pcm)
        if native.size or force:
            self.session.audio(np.ascontiguousarray(native, dtype=np.float32), force=force)
        return int(pcm.size)

    def flush_audio(self) -> None:
        """Push the resampler's tail before a commit."""
        if self._resampler is not None and self.session is not None:
            tail = self._resampler.flush()
            if tail.size:
                self.session.audio(tail.astype(np.float32, copy=False))


def shared_event(msg: AdapterEvent) -> JSONObject | None:
    """Server events named and shaped alike in the Realtime and the native protocol
    (``input_audio_buffer.*``, ``conversation.item.truncated``); None for any other."""
    match msg:
        case SpeechStarted():
            return {
                "type": "input_audio_buffer.speech_started",
                "item_id": msg.item_id,
                "audio_start_ms": msg.audio_start_ms,
            }
        case SpeechStopped():
            return {
                "type": "input_audio_buffer.speech_stopped",
                "item_id": msg.item_id,
                "audio_end_ms": msg.audio_end_ms,
            }
        case InputCommitted():
            return {
                "type": "input_audio_buffer.committed",
                "item_id": msg.item_id,
                "previous_item_id": msg.previous_item_id,
            }
        case InputCleared():
            return {"type": "input_audio_buffer.cleared"}
        case IdleTimeout():
            return {
                "type": "input_audio_buffer.timeout_triggered",
                "item_id": msg.item_id,
                "audio_start_ms": msg.audio_start_ms,
                "audio_end_ms": msg.audio_end_ms,
            }
        case ItemTruncated():
            return {
                "type": "conversation.item.truncated",
                "item_id": msg.item_id,
                "content_index": msg.content_index,
                "audio_end_ms": msg.audio_end_ms,
            }
    return None


def msg_reason(msg: SessionClosed | ErrorEvent) -> str:
    text = msg.reason if isinstance(msg, SessionClosed) else msg.message
    return text[:120]


HandlerFactory = Callable[[ServerConnection, Listener], ProtocolHandler]
