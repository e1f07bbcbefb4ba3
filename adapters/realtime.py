"""``/v1/realtime``: the OpenAI Realtime websocket protocol, GA and beta dialects.

A connection speaks beta when it sends ``OpenAI-Beta: realtime=v1`` (what the ``openai``
SDK's ``client.beta.realtime.connect`` does) or offers the ``openai-beta.realtime-v1``
subprotocol; otherwise GA. Query parameters: ``model`` (echoed in the session) and
``duplex=1`` (start in model-driven full-duplex turn mode).

Client events map onto :class:`SessionLink` commands; bus session events map onto the
Realtime server-event sequence. The bus reports a response as ResponseCreated, AudioOut
or TextOut deltas and one ResponseDone; the handler derives the Realtime framing around
them: ``response.output_item.added`` + ``conversation.item.added`` +
``response.content_part.added`` before the first delta, and the ``.done`` cascade
(audio, transcript, content part, output item, conversation item) before
``response.done``. The session link's egress fence guarantees no audio of a response
reaches the client after its ``response.done``.

The session object mapping lives in :mod:`realtime_session`, event names and the
response object in :mod:`realtime_events`. docs/realtime-conformance.md lists every
Realtime event and what this server does with it.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import msgspec
import numpy as np
from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers

from duplexd.adapters.audio import (
    AudioFormat,
    AudioFormatError,
    OutputResampler,
    b64decode,
    b64encode,
    encode,
)
from duplexd.adapters.protocol import JSONObject, Listener, ProtocolHandler, shared_event
from duplexd.adapters.realtime_events import BETA_NAMES, GA_NAMES, render_response
from duplexd.adapters.realtime_session import (
    apply_update,
    initial_settings,
    parse_item,
    render_item,
    render_session,
    response_options,
)
from duplexd.adapters.validation import ClientError, opt_str, req_int, req_obj, req_str, required, unknown
from duplexd.bus.audio_format import OUTPUT_RATE
from duplexd.bus.messages import (
    AdapterEvent,
    AudioOut,
    ErrorEvent,
    InputTranscript,
    Item,
    ItemAdded,
    ItemDeleted,
    ItemDone,
    ItemRetrieved,
    ResponseCreated,
    ResponseDone,
    ResponseInfo,
    ResponseStatus,
    SessionOpened,
    SessionUpdated,
    TextOut,
    TurnMode,
)

# Parameters each client event may carry besides ``type`` and ``event_id``.
CLIENT_EVENTS: dict[str, frozenset[str]] = {
    "session.update": frozenset({"session"}),
    "input_audio_buffer.append": frozenset({"audio"}),
    "input_audio_buffer.commit": frozenset(),
    "input_audio_buffer.clear": frozenset(),
    "conversation.item.create": frozenset({"item", "previous_item_id"}),
    "conversation.item.truncate": frozenset({"item_id", "content_index", "audio_end_ms"}),
    "conversation.item.delete": frozenset({"item_id"}),
    "conversation.item.retrieve": frozenset({"item_id"}),
    "response.create": frozenset({"response"}),
    "response.cancel": frozenset({"response_id"}),
    "output_audio_buffer.clear": frozenset(),
}

BETA_SUBPROTOCOL = "openai-beta.realtime-v1"
_BIG_B64 = 256 * 1024  # base64 longer than this is decoded off the event loop
_SLICE_BYTES = 96_000  # large appends enter the session in slices, yielding between them
_INTERNAL = "duplexd_clear_"  # event-id prefix of the cancel output_audio_buffer.clear sends


def is_beta(headers: Headers) -> bool:
    """Whether the upgrade request asks for the beta dialect."""
    flags = headers.get("OpenAI-Beta", "").replace(" ", "").lower().split(",")
    if "realtime=v1" in flags:
        return True
    for proto in headers.get_all("Sec-WebSocket-Protocol"):
        if BETA_SUBPROTOCOL in (p.strip() for p in proto.split(",")):
            return True
    return False


@dataclass
class _Response:
    """What the handler tracks of a response between response.created and response.done."""

    id: str
    item_id: str
    audio: bool
    in_history: bool
    previous_item_id: str | None
    resampler: OutputResampler | None
    opened: bool = False  # output_item.added sent
    text: list[str] = field(default_factory=list)  # transcript / text deltas sent
    audio_chunks: int = 0
    item: Item | None = None  # the final item (ItemDone), emitted with the .done cascade
    done_previous_item_id: str | None = None


class RealtimeHandler(ProtocolHandler):
    """One ``/v1/realtime`` connection (see module docstring)."""

    endpoint = "realtime"

    def __init__(self, ws: ServerConnection, server: Listener) -> None:
        super().__init__(ws, server)
        request = ws.request
        query = parse_qs(urlsplit(request.path).query) if request is not None else {}
        self.beta = request is not None and is_beta(request.headers)
        self.names = BETA_NAMES if self.beta else GA_NAMES
        if query.get("duplex", [""])[0].lower() in ("1", "true", "yes"):
            self.config = msgspec.structs.replace(self.config, turn_mode=TurnMode.DUPLEX)
        self.settings = initial_settings(self.config, query.get("model", [""])[0])
        self.conversation_id = f"conv_{uuid.uuid4().hex[:20]}"
        self._responses: dict[str, _Response] = {}
        self._last_response = ""
        self._tail_item: str | None = None  # last item of the conversation, as far as we saw
        self._user_audio_ms: dict[str, int] = {}
        self._internal_ids: dict[str, None] = {}  # cancels sent for output_audio_buffer.clear

    # ------------------------------------------------------------------ plumbing
    async def on_open(self) -> None:
        pass  # greeted on SessionOpened, once the host has the session

    def session_object(self) -> dict[str, Any]:
        sid = self.session.session_id if self.session else ""
        return render_session(sid, self.settings, self.config, self.beta)

    # ------------------------------------------------------------------ client → server
    async def on_text(self, event: JSONObject, event_id: str) -> None:
        assert self.session is not None
        etype: str = event["type"]
        allowed = CLIENT_EVENTS.get(etype)
        if allowed is None:
            raise ClientError(
                "unknown_event",
                f"unknown or unsupported event type {etype!r}; supported: {', '.join(CLIENT_EVENTS)}",
                param="type",
            )
        for key in event:
            if key not in allowed and key not in ("type", "event_id"):
                raise unknown(key)
        eid = event_id
        s = self.session
        match etype:
            case "session.update":
                self._session_update(required(event, "session"), eid)
            case "input_audio_buffer.append":
                await self._append(req_str(event, "audio"))
            case "input_audio_buffer.commit":
                self.flush_audio()
                s.commit(eid)
            case "input_audio_buffer.clear":
                self.set_input_format(self.input_format)  # drop the resampler's partial input too
                s.clear(eid)
            case "conversation.item.create":
                item = parse_item(req_obj(event, "item"), f"item_{uuid.uuid4().hex[:20]}")
                s.item_create(item, opt_str(event, "previous_item_id"), eid)
            case "conversation.item.truncate":
                s.truncate(
                    req_str(event, "item_id", nonempty=True),
                    req_int(event, "audio_end_ms", lo=0),
                    req_int(event, "content_index", lo=0),
                    eid,
                )
            case "conversation.item.delete":
                s.item_delete(req_str(event, "item_id", nonempty=True), eid)
            case "conversation.item.retrieve":
                s.item_retrieve(req_str(event, "item_id", nonempty=True), eid)
            case "response.create":
                s.create_response(response_options(event.get("response"), self.settings), eid)
            case "response.cancel":
                s.cancel(opt_str(event, "response_id") or "", eid)
            case "output_audio_buffer.clear":
                await self._output_clear()

    def _session_update(self, patch: object, event_id: str) -> None:
        assert self.session is not None
        settings, config = apply_update(self.settings, self.config, patch)  # raises before changing anything
        if settings.input_format != self.input_format:
            self.flush_audio()  # audio already appended keeps its format
            self.set_input_format(settings.input_format)
        self.settings, self.config = settings, config
        self.session.update(config, event_id)

    async def _append(self, audio: str) -> None:
        limit = self.server.max_audio_bytes
        if len(audio) // 4 * 3 - 2 > limit:  # refuse before decoding: no time spent on it
            raise ClientError(
                "audio_too_large",
                f"audio of about {len(audio) // 4 * 3} bytes exceeds the {limit}-byte limit of one append",
                param="audio",
            )
        raw = await asyncio.to_thread(b64decode, audio) if len(audio) > _BIG_B64 else b64decode(audio)
        if len(raw) > limit:
            raise ClientError(
                "audio_too_large", f"audio of {len(raw)} bytes exceeds the {limit}-byte limit", param="audio"
            )
        width = self.input_format.bytes_per_sample
        if len(raw) % width:
            raise AudioFormatError(
                "invalid_audio_length",
                f"{self.input_format.encoding} audio must be a whole number of {width}-byte samples; "
                f"got {len(raw)} bytes",
            )
        view = memoryview(raw)
        for start in range(0, len(raw), _SLICE_BYTES):
            if start:
                await asyncio.sleep(0)  # a long append must not stall other sessions
            self.push_audio(view[start : start + _SLICE_BYTES])

    async def _output_clear(self) -> None:
        """Stop the assistant's audio now (cancel if a response runs); never an error."""
        assert self.session is not None
        rid = self._active_response
        if rid:
            internal = f"{_INTERNAL}{uuid.uuid4().hex[:12]}"
            self._internal_ids[internal] = None
            if len(self._internal_ids) > 32:  # a cancel that succeeded never gets an error back
                self._internal_ids.pop(next(iter(self._internal_ids)))
            self.session.cancel(rid, internal)
        await self.send_json({"type": "output_audio_buffer.cleared", "response_id": rid or self._last_response or None})

    # ------------------------------------------------------------------ server → client
    def swallow_error(self, msg: ErrorEvent) -> bool:
        if msg.event_id in self._internal_ids:
            del self._internal_ids[msg.event_id]  # output_audio_buffer.clear raced the response's end
            return True
        return False

    async def on_event(self, msg: AdapterEvent) -> None:
        payload = shared_event(msg)
        if payload is not None:
            await self.send_json(payload)
            return
        match msg:
            case AudioOut():
                await self._audio(msg)
            case TextOut():
                await self._text(msg)
            case SessionOpened():
                await self.send_json({"type": "session.created", "session": self.session_object()})
                await self.send_json(
                    {
                        "type": "conversation.created",
                        "conversation": {"id": self.conversation_id, "object": "realtime.conversation"},
                    }
                )
            case SessionUpdated():
                await self.send_json({"type": "session.updated", "session": self.session_object()})
            case ItemAdded():
                await self._item_added(msg.item, msg.previous_item_id)
            case ItemDone():
                await self._item_done(msg.item, msg.previous_item_id)
            case InputTranscript():
                await self._input_transcript(msg)
            case ResponseCreated():
                await self._created(msg)
            case ResponseDone():
                await self._done(msg.response)
            case ItemDeleted():
                if msg.item_id == self._tail_item:
                    self._tail_item = None
                await self.send_json({"type": "conversation.item.deleted", "item_id": msg.item_id})
            case ItemRetrieved():
                await self.send_json({"type": "conversation.item.retrieved", "item": render_item(msg.item, self.beta)})
            case _:
                pass  # decisions, epoch advances, snapshots: native-protocol only

    async def _item_added(self, item: Item, previous_item_id: str | None) -> None:
        if item.role == "user" and item.audio_ms:
            self._user_audio_ms[item.id] = item.audio_ms
            if len(self._user_audio_ms) > 256:
                self._user_audio_ms.pop(next(iter(self._user_audio_ms)))
        if previous_item_id == self._tail_item:
            self._tail_item = item.id
        await self.send_json(
            {"type": self.names.item_added, "previous_item_id": previous_item_id, "item": render_item(item, self.beta)}
        )

    async def _item_done(self, item: Item, previous_item_id: str | None) -> None:
        for r in self._responses.values():
            if r.item_id == item.id:  # the assistant item: part of the response's .done cascade
                r.item, r.done_previous_item_id = item, previous_item_id
                return
        if self.names.item_done:
            await self.send_json(
                {
                    "type": self.names.item_done,
                    "previous_item_id": previous_item_id,
                    "item": render_item(item, self.beta),
                }
            )

    async def _input_transcript(self, msg: InputTranscript) -> None:
        if self.settings.transcription is None:
            return  # Realtime sends transcripts only when input transcription is configured
        seconds = self._user_audio_ms.get(msg.item_id, 0) / 1000
        await self.send_json(
            {
                "type": "conversation.item.input_audio_transcription.completed",
                "item_id": msg.item_id,
                "content_index": 0,
                "transcript": msg.transcript,
                "usage": {"type": "duration", "seconds": seconds},
            }
        )

    # ------------------------------------------------------------------ responses
    async def _created(self, msg: ResponseCreated) -> None:
        info = msg.response
        out_rate = self.settings.output_format.rate
        self._responses[info.id] = _Response(
            id=info.id,
            item_id=msg.item.id,
            audio="audio" in info.modalities,
            in_history=info.conversation != "none",
            previous_item_id=self._tail_item,
            resampler=OutputResampler(out_rate) if out_rate != OUTPUT_RATE else None,
        )
        await self.send_json({"type": "response.created", "response": self._response_object(info)})
        # duplexd enforces no rate limits: the list is empty (docs/realtime-conformance.md).
        await self.send_json({"type": "rate_limits.updated", "rate_limits": []})

    def _response_object(self, info: ResponseInfo, r: _Response | None = None) -> dict[str, Any]:
        transcript = "".join(r.text).strip() if r else ""
        return render_response(
            info,
            self.settings,
            self.config,
            self.beta,
            self.conversation_id,
            transcript,
            r.audio_chunks if r else 0,
        )

    def _part(self, r: _Response, text: str = "") -> dict[str, Any]:
        return {"type": "audio", "transcript": text} if r.audio else {"type": "text", "text": text}

    def _where(self, r: _Response) -> dict[str, Any]:
        return {"response_id": r.id, "item_id": r.item_id, "output_index": 0, "content_index": 0}

    async def _open(self, r: _Response) -> None:
        """The framing before a response's first delta."""
        r.opened = True
        item = {
            "id": r.item_id,
            "object": "realtime.item",
            "type": "message",
            "status": "in_progress",
            "role": "assistant",
            "content": [],
        }
        await self.send_json(
            {"type": "response.output_item.added", "response_id": r.id, "output_index": 0, "item": item}
        )
        if r.in_history:
            await self.send_json({"type": self.names.item_added, "previous_item_id": r.previous_item_id, "item": item})
            self._tail_item = r.item_id
        w = self._where(r)
        await self.send_json({"type": "response.content_part.added", **w, "part": self._part(r)})

    async def _audio(self, msg: AudioOut) -> None:
        r = self._responses.get(msg.response_id)
        if r is None:
            return  # not a response this connection knows (already done)
        if not r.opened:
            await self._open(r)
        if msg.pcm.size and r.audio:
            data = encode(np.asarray(msg.pcm), self.settings.output_format, r.resampler)
            r.audio_chunks += 1
            if data:
                await self.send_json({"type": self.names.audio_delta, **self._where(r), "delta": b64encode(data)})
        if msg.text:
            await self._text_delta(r, msg.text)

    async def _text(self, msg: TextOut) -> None:
        r = self._responses.get(msg.response_id)
        if r is None or not msg.delta:
            return
        if not r.opened:
            await self._open(r)
        await self._text_delta(r, msg.delta)

    async def _text_delta(self, r: _Response, delta: str) -> None:
        if not r.text:
            delta = delta.lstrip()  # engines space-separate their units; the transcript starts clean
            if not delta:
                return
        r.text.append(delta)
        name = self.names.transcript_delta if r.audio else self.names.text_delta
        await self.send_json({"type": name, **self._where(r), "delta": delta})

    async def _done(self, info: ResponseInfo) -> None:
        r = self._responses.pop(info.id, None)
        if r is None:  # pragma: no cover - a done without a created: render it anyway
            await self.send_json({"type": "response.done", "response": self._response_object(info)})
            return
        item = r.item or (info.output[0] if info.output else None)
        if item is not None and not r.opened:
            await self._open(r)
        if r.opened:
            await self._close_content(r, info, item)
        self._last_response = info.id
        await self.send_json({"type": "response.done", "response": self._response_object(info, r)})

    async def _close_content(self, r: _Response, info: ResponseInfo, item: Item | None) -> None:
        """The .done cascade: audio, transcript (or text), content part, output item."""
        w = self._where(r)
        if r.audio and r.resampler is not None and info.status == ResponseStatus.COMPLETED:
            tail = r.resampler.flush()
            if tail.size:
                # Already at the client rate: encode without resampling (rate == OUTPUT_RATE skips it).
                pcm = np.round(np.clip(tail, -1.0, 32767 / 32768) * 32768.0).astype(np.int16)
                fmt = AudioFormat(self.settings.output_format.encoding, OUTPUT_RATE)
                await self.send_json({"type": self.names.audio_delta, **w, "delta": b64encode(encode(pcm, fmt))})
        text = "".join(r.text).strip()
        if r.audio:
            await self.send_json({"type": self.names.audio_done, **w})
            await self.send_json({"type": self.names.transcript_done, **w, "transcript": text})
        else:
            await self.send_json({"type": self.names.text_done, **w, "text": text})
        await self.send_json({"type": "response.content_part.done", **w, "part": self._part(r, text)})
        if item is not None:
            rendered = render_item(item, self.beta)
        else:  # cancelled before any output reached history: close the item as incomplete
            rendered = {
                "id": r.item_id,
                "object": "realtime.item",
                "type": "message",
                "status": "incomplete",
                "role": "assistant",
                "content": [self._part(r, text)],
            }
        await self.send_json(
            {"type": "response.output_item.done", "response_id": r.id, "output_index": 0, "item": rendered}
        )
        if self.names.item_done and item is not None and r.in_history:
            await self.send_json(
                {
                    "type": self.names.item_done,
                    "previous_item_id": r.done_previous_item_id or r.previous_item_id,
                    "item": rendered,
                }
            )
