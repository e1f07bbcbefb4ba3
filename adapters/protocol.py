"""What every websocket protocol handler shares: the connection loop, JSON in/out,
error events, config merging, and the session link.

A handler subclass maps its client events onto :class:`SessionLink` commands and bus
session events onto its server events. Nothing a client sends can end the loop except
closing the socket: malformed JSON, unknown events and bad fields become error events.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
import logging
import uuid
from typing import TYPE_CHECKING, Any

import msgspec
import numpy as np
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from duplexd.adapters.audio import AudioFormat, AudioFormatError, InputResampler, decode
from duplexd.adapters.link import SessionLink, SessionUnavailable
from duplexd.bus.log import get_logger, log
from duplexd.bus.messages import (
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
from duplexd.bus.sockets import Backpressure

if TYPE_CHECKING:
    from duplexd.adapters.server import AdapterServer

_log = get_logger(__name__)


class ClientError(Exception):
    """A client event we reject; becomes an error event, the connection stays."""

    def __init__(self, code: str, message: str, param: str = "", type_: str = "invalid_request_error"):
        super().__init__(message)
        self.code = code
        self.param = param
        self.type = type_


def new_event_id() -> str:
    return f"event_{uuid.uuid4().hex[:20]}"


def merge_config(current: SessionConfig, patch: dict[str, Any]) -> SessionConfig:
    """``current`` with the fields of ``patch`` changed (nested structs merge too)."""
    base = msgspec.to_builtins(current)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    try:
        return msgspec.convert(base, SessionConfig)
    except msgspec.ValidationError as exc:
        raise ClientError("invalid_value", f"invalid session settings: {exc}", param="session") from exc


class ProtocolHandler(abc.ABC):
    """One websocket connection speaking one protocol."""

    endpoint = "ws"

    def __init__(self, ws: ServerConnection, server: AdapterServer) -> None:
        self.ws = ws
        self.server = server
        self.session: SessionLink | None = None
        self.config: SessionConfig = server.default_session
        self.input_format = AudioFormat()
        self._resampler: InputResampler | None = None
        self._closing = False
        self._active_response = ""

    # ------------------------------------------------------------------ to implement
    @abc.abstractmethod
    async def on_open(self) -> None:
        """Session opened: greet the client (session.created...)."""

    @abc.abstractmethod
    async def on_text(self, event: dict[str, Any]) -> None:
        """One parsed client JSON event."""

    async def on_binary(self, data: bytes) -> None:
        raise ClientError("binary_not_supported", "this endpoint takes JSON text frames only")

    @abc.abstractmethod
    async def on_event(self, msg: Any) -> None:
        """One bus session event (already epoch-fenced)."""

    def error_payload(self, code: str, message: str, type_: str, param: str, event_id: str) -> dict[str, Any]:
        """The error event: Realtime's shape, which the native protocol shares."""
        return {
            "type": "error",
            "error": {
                "type": type_,
                "code": code,
                "message": message,
                "param": param or None,
                "event_id": event_id or None,
            },
        }

    # ------------------------------------------------------------------ plumbing
    def session_id(self) -> str:
        return f"sess_{uuid.uuid4().hex[:20]}"

    async def run(self) -> None:
        CONNECTIONS.labels(endpoint=self.endpoint).inc()
        try:
            try:
                self.session = self.server.link.open(self.session_id(), self.config, self._on_bus_event)
            except SessionUnavailable as exc:
                await self.send_error("server_unavailable", str(exc), "server_error")
                await self.ws.close(1013, "server not ready")
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
            if self.session is not None:
                await self.session.close("client disconnected")

    async def _dispatch(self, frame: str | bytes) -> None:
        event_id = ""
        try:
            if isinstance(frame, bytes):
                await self.on_binary(frame)
                return
            try:
                # A multi-megabyte frame would stall every connection while it parses.
                event = json.loads(frame) if len(frame) < 1 << 20 else await asyncio.to_thread(json.loads, frame)
            except json.JSONDecodeError as exc:
                raise ClientError("invalid_json", f"could not parse JSON: {exc.msg} at position {exc.pos}") from exc
            if not isinstance(event, dict):
                raise ClientError("invalid_event", "each event must be a JSON object")
            event_id = event.get("event_id") or ""
            if not isinstance(event_id, str):
                event_id = ""
            if not isinstance(event.get("type"), str):
                raise ClientError("missing_required_parameter", "missing required parameter 'type'", param="type")
            await self.on_text(event)
        except ClientError as exc:
            await self.send_error(exc.code, str(exc), exc.type, exc.param, event_id)
        except AudioFormatError as exc:
            await self.send_error(exc.code, str(exc), "invalid_request_error", "audio", event_id)
        except SessionUnavailable as exc:
            await self.send_error("session_unavailable", str(exc), "server_error", "", event_id)
        except Backpressure:
            # The bus queue toward the host is full: say so instead of buffering without bound.
            await self.send_error(
                "overloaded",
                "the server is overloaded; this event was dropped, retry later",
                "server_error",
                "",
                event_id,
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
            )
            await self.send_error("server_error", f"internal error: {type(exc).__name__}", "server_error", "", event_id)

    async def _on_bus_event(self, msg: Any) -> None:
        try:
            if isinstance(msg, ErrorEvent):
                CLIENT_ERRORS.labels(code=msg.code).inc()
            elif isinstance(msg, ResponseCreated):
                self._active_response = msg.response.id
            elif isinstance(msg, ResponseDone):
                self._active_response = ""
            await self.on_event(msg)
            if isinstance(msg, SessionClosed) or (isinstance(msg, ErrorEvent) and msg.fatal):
                self._closing = True
                await self.ws.close(1011 if isinstance(msg, ErrorEvent) else 1000, msg_reason(msg))
        except ConnectionClosed:
            pass

    def busy(self) -> bool:
        """A response is in flight (drain waits for it)."""
        return bool(self._active_response)

    async def send_json(self, payload: dict[str, Any]) -> None:
        payload.setdefault("event_id", new_event_id())
        await self.ws.send(json.dumps(payload, separators=(",", ":")))

    async def send_error(
        self, code: str, message: str, type_: str = "invalid_request_error", param: str = "", event_id: str = ""
    ) -> None:
        CLIENT_ERRORS.labels(code=code).inc()
        with contextlib.suppress(ConnectionClosed):
            await self.send_json(self.error_payload(code, message, type_, param, event_id))

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
            self._resampler = InputResampler(self.input_format.rate, rate)
        native = self._resampler.push(pcm)
        if native.size or force:
            self.session.audio(np.ascontiguousarray(native, dtype=np.float32), force=force)
        return pcm.size

    def flush_audio(self) -> None:
        """Push the resampler's tail before a commit."""
        if self._resampler is not None and self.session is not None:
            tail = self._resampler.flush()
            if tail.size:
                self.session.audio(tail.astype(np.float32, copy=False))


def shared_event(msg: Any) -> dict[str, Any] | None:
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


def msg_reason(msg: Any) -> str:
    text = getattr(msg, "reason", "") or getattr(msg, "message", "")
    return text[:120]


async def cancel_task(task: asyncio.Task[Any] | None) -> None:
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
