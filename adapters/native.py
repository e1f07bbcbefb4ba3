"""``/v1/duplex``: the native duplex protocol (documented in docs/native-protocol.md).

Close to Realtime so clients can move between them, plus what duplex needs to be
visible: a listen/speak decision per input chunk, epochs on output audio, epoch
advances (flush your jitter buffer), playback acks answered with the committed history,
and the session snapshot.

Binary frames carry audio both ways. Client → server: byte 0 is the kind (0x01 audio,
0x02 audio that always interrupts), the rest pcm in the session's input format.
Server → client: byte 0 = 0x81, bytes 1-2 = big-endian header length N, then N bytes
of JSON header ``{response_id, item_id, epoch, seq, start_ms, end_of_turn, text}``, then
pcm16 LE at 24 kHz.

Session settings use the protocol-neutral :class:`SessionConfig` names (``turn_mode``,
``vad``, ``overlap``, ``commit_policy``, ``force_listen_count``...) and accept the
Realtime spellings too (``turn_detection``, ``modalities``, ``audio.input.format``...),
read by the same translator as ``/v1/realtime`` (:mod:`realtime_session`), so a Realtime
client's ``session.update``, ``response.create`` and items work here unchanged and a bad
field gets the same error on both endpoints.
"""

from __future__ import annotations

import enum
import json
import struct
import uuid
from typing import Any

import msgspec
from websockets.asyncio.server import ServerConnection

from duplexd.adapters.audio import G711_RATE, PCM16_OUT, SUPPORTED_RATES, AudioFormat, b64decode, b64encode, encode
from duplexd.adapters.protocol import JSONObject, Listener, ProtocolHandler, shared_event
from duplexd.adapters.realtime_session import (
    RealtimeSettings,
    apply_update,
    initial_settings,
    parse_item,
    response_options,
)
from duplexd.adapters.validation import (
    ClientError,
    bad,
    convert,
    only,
    opt_bool,
    opt_int,
    opt_str,
    optional,
    req_int,
    req_obj,
    req_str,
    required,
    set_fields,
    want_choice,
    want_int,
    want_obj,
)
from duplexd.bus.audio_format import OUTPUT_ENCODING, OUTPUT_RATE
from duplexd.bus.messages import (
    Action,
    AdapterEvent,
    AudioOut,
    Decision,
    EngineInfo,
    EpochAdvance,
    InputTranscript,
    ItemAdded,
    ItemDeleted,
    ItemDone,
    ItemRetrieved,
    PlaybackCommitted,
    ResponseCreated,
    ResponseDone,
    SessionClosed,
    SessionConfig,
    SessionOpened,
    SessionUpdated,
    Snapshot,
    TextOut,
    TurnMode,
)

AUDIO_IN = 0x01
AUDIO_IN_FORCE = 0x02
AUDIO_OUT = 0x81
_HDR = struct.Struct(">BH")


def pack_audio_out(header: dict[str, Any], pcm: bytes) -> bytes:
    h = json.dumps(header, separators=(",", ":")).encode()
    return _HDR.pack(AUDIO_OUT, len(h)) + h + pcm


def unpack_audio_out(frame: bytes) -> tuple[dict[str, Any], bytes]:
    kind, n = _HDR.unpack_from(frame)
    if kind != AUDIO_OUT:
        raise ValueError(f"not an audio-out frame (kind {kind:#x})")
    return json.loads(frame[3 : 3 + n]), frame[3 + n :]


def full(obj: Any) -> Any:
    """JSON-ready builtins of a bus struct *with* its default values.

    Wire structs are ``omit_defaults`` (compact on the bus); a client must see every
    field (an epoch of 0, an empty cursor, an item's status) without knowing defaults.
    """
    if isinstance(obj, msgspec.Struct):
        return {f: full(getattr(obj, f)) for f in obj.__struct_fields__}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, tuple | list):
        return [full(x) for x in obj]
    if isinstance(obj, dict):
        return {k: full(v) for k, v in obj.items()}
    return obj


# Realtime ``input_audio_format`` strings (beta and GA spellings) → our format.
_FORMAT_NAMES = {
    "pcm16": PCM16_OUT,
    "audio/pcm": PCM16_OUT,
    "g711_ulaw": AudioFormat("pcmu", G711_RATE),
    "audio/pcmu": AudioFormat("pcmu", G711_RATE),
    "pcmu": AudioFormat("pcmu", G711_RATE),
    "g711_alaw": AudioFormat("pcma", G711_RATE),
    "audio/pcma": AudioFormat("pcma", G711_RATE),
    "pcma": AudioFormat("pcma", G711_RATE),
    "float32": AudioFormat("float32", OUTPUT_RATE),
}
_DUPLEX_KEYS = ("force_listen_count", "listen_prob_scale")
# Session fields in this protocol's own spelling (SessionConfig names the Realtime session
# does not have); every other field is read by the Realtime translator.
_NATIVE_FIELDS = frozenset(
    {"turn_mode", "vad", "overlap", "commit_policy", "force_listen_count", "listen_prob_scale", "continuation_cap_ms"}
)
# Read-only fields of the session object a client may echo back.
_READ_ONLY = frozenset({"id", "object", "epoch", "output_audio_format", "type"})
# Item fields this protocol renders that a client may echo back.
_ITEM_READ_ONLY = frozenset({"audio_ms"})


def turn_detection_of(config: SessionConfig) -> JSONObject | None:
    """The Realtime-style ``turn_detection`` view of a session's turn mode."""
    if config.turn_mode == TurnMode.MANUAL:
        return None
    if config.turn_mode == TurnMode.DUPLEX:
        return {"type": "duplex", **{k: getattr(config, k) for k in _DUPLEX_KEYS}}
    return {"type": "server_vad", **full(config.vad)}


def merge_native(current: SessionConfig, patch: JSONObject) -> SessionConfig:
    """``current`` with the native-spelled fields of ``patch`` changed (nested structs merge)."""
    base = msgspec.to_builtins(current)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **set_fields(value)}
        else:
            base[key] = value
    result: SessionConfig = convert(base, SessionConfig, "session")
    return result


def apply_native_update(
    config: SessionConfig, input_format: AudioFormat, patch: object
) -> tuple[SessionConfig, AudioFormat, str | None]:
    """A native ``session.update``'s ``session`` → (new config, input format, new audio
    transport or None). Realtime spellings go through the Realtime translator, so both
    endpoints read them alike; nothing is applied unless everything is valid."""
    native: JSONObject = {}
    realtime: JSONObject = {}
    fmt = input_format
    transport: str | None = None
    for key, value in want_obj(patch, "session").items():
        if key in _READ_ONLY:
            continue
        if key == "audio_transport":
            if value is not None:
                transport = want_choice(value, "session.audio_transport", ("binary", "json"))
        elif key == "input_audio_format" and value is not None and not (isinstance(value, dict) and "type" in value):
            fmt = native_format(value)  # {encoding, rate} or a format name (a GA {type, rate}: below)
        elif key in _NATIVE_FIELDS:
            if value is not None:  # null: not set
                native[key] = value
        else:
            realtime[key] = value  # the translator knows what null means for each
    settings = initial_settings(config, "")
    settings.input_format = fmt
    settings, config = apply_update(settings, config, realtime, keep_vad=True)
    return merge_native(config, native), settings.input_format, transport


class NativeHandler(ProtocolHandler):
    """One ``/v1/duplex`` connection."""

    endpoint = "duplex"

    def __init__(self, ws: ServerConnection, server: Listener) -> None:
        super().__init__(ws, server)
        self.audio_transport = "binary"  # or "json": base64 deltas, for clients without binary frames
        self.epoch = 0

    # ------------------------------------------------------------------ session object
    def session_object(self) -> JSONObject:
        s: JSONObject = full(self.config)
        s["object"] = "duplex.session"
        s["turn_detection"] = turn_detection_of(self.config)
        s["input_audio_format"] = {"encoding": self.input_format.encoding, "rate": self.input_format.rate}
        s["output_audio_format"] = {"encoding": OUTPUT_ENCODING, "rate": OUTPUT_RATE}
        s["audio_transport"] = self.audio_transport
        s["id"] = self.session.session_id if self.session else ""
        s["epoch"] = self.epoch
        return s

    # ------------------------------------------------------------------ client → server
    async def on_binary(self, data: bytes) -> None:
        if not data:
            raise ClientError("invalid_audio_frame", "empty binary frame")
        kind = data[0]
        if kind not in (AUDIO_IN, AUDIO_IN_FORCE):
            raise ClientError(
                "invalid_audio_frame",
                f"binary frame kind {kind:#04x} unknown: use 0x01 (audio) or 0x02 (interrupting audio)",
            )
        self.push_audio(memoryview(data)[1:], force=kind == AUDIO_IN_FORCE)

    async def on_text(self, event: JSONObject, event_id: str) -> None:
        assert self.session is not None
        etype: str = event["type"]
        eid = event_id
        s = self.session
        match etype:
            case "session.update":
                self._session_update(required(event, "session"), eid)
            case "session.get":
                s.request_snapshot(eid)
            case "session.close":
                await self.ws.close(1000, "client closed the session")
            case "input_audio_buffer.append":
                self.push_audio(b64decode(req_str(event, "audio")), force=bool(opt_bool(event, "force")))
            case "input_audio_buffer.commit":
                self.flush_audio()
                s.commit(eid)
            case "input_audio_buffer.clear":
                s.clear(eid)
            case "input.interrupt":
                self.flush_audio()
                s.cancel(opt_str(event, "response_id") or "", eid)
            case "response.create":
                s.create_response(response_options(optional(event, "response"), RealtimeSettings()), eid)
            case "response.cancel":
                s.cancel(opt_str(event, "response_id") or "", eid)
            case "playback.ack":
                played = req_int(event, "played_ms", lo=0)
                rid, iid = req_str(event, "response_id", nonempty=True), req_str(event, "item_id", nonempty=True)
                s.ack(rid, iid, played, eid)
            case "conversation.item.create":
                item = parse_item(req_obj(event, "item"), f"item_{uuid.uuid4().hex[:20]}", _ITEM_READ_ONLY)
                s.item_create(item, opt_str(event, "previous_item_id"), eid)
            case "conversation.item.truncate":
                s.truncate(
                    req_str(event, "item_id", nonempty=True),
                    req_int(event, "audio_end_ms", lo=0),
                    opt_int(event, "content_index", lo=0) or 0,
                    eid,
                )
            case "conversation.item.delete":
                s.item_delete(req_str(event, "item_id", nonempty=True), eid)
            case "conversation.item.retrieve":
                s.item_retrieve(req_str(event, "item_id", nonempty=True), eid)
            case _:
                raise ClientError("unknown_event", f"unknown event type {etype!r}", param="type")

    def _session_update(self, patch: object, event_id: str) -> None:
        config, fmt, transport = apply_native_update(self.config, self.input_format, patch)
        # Validated as a whole: nothing was applied unless everything is valid.
        if fmt != self.input_format:
            self.flush_audio()  # audio already sent keeps its format
            self.set_input_format(fmt)
        if transport is not None:
            self.audio_transport = transport
        self.config = config
        assert self.session is not None
        self.session.update(config, event_id)

    # ------------------------------------------------------------------ server → client
    def error_payload(
        self, code: str, message: str, type_: str, param: str, event_id: str | None, response_id: str
    ) -> JSONObject:
        payload = super().error_payload(code, message, type_, param, event_id, response_id)
        payload["error"]["response_id"] = response_id or None
        return payload

    async def on_event(self, msg: AdapterEvent) -> None:
        self.epoch = max(self.epoch, msg.epoch)
        payload = shared_event(msg)
        if payload is not None:
            await self.send_json(payload)
            return
        match msg:
            case AudioOut():
                await self._audio(msg)
            case Decision():
                await self.send_json(
                    {
                        "type": "response.speak" if msg.action == Action.SPEAK else "response.listen",
                        "chunk_seq": msg.chunk_seq,
                        "listen_prob": round(msg.listen_prob, 4),
                        "text": msg.text,
                        "end_of_turn": msg.end_of_turn,
                        "response_id": msg.response_id or None,
                        "epoch": msg.epoch,
                        "cost_ms": round(msg.cost_ms, 3),
                    }
                )
            case SessionOpened():
                await self.send_json(
                    {"type": "session.created", "session": self.session_object(), "engine": engine_object(msg.engine)}
                )
            case SessionUpdated(event_id=eid):
                await self.send_json(
                    {
                        "type": "session.updated",
                        "session": self.session_object(),
                        "client_event_id": self.client_event_id(eid),
                    }
                )
            case ItemAdded():
                await self.send_json(
                    {
                        "type": "conversation.item.added",
                        "item": full(msg.item),
                        "previous_item_id": msg.previous_item_id,
                    }
                )
            case ItemDone():
                await self.send_json(
                    {
                        "type": "conversation.item.done",
                        "item": full(msg.item),
                        "previous_item_id": msg.previous_item_id,
                    }
                )
            case InputTranscript():
                await self.send_json(
                    {
                        "type": "conversation.item.input_audio_transcription.completed",
                        "item_id": msg.item_id,
                        "content_index": 0,
                        "transcript": msg.transcript,
                    }
                )
            case ResponseCreated():
                await self.send_json(
                    {
                        "type": "response.created",
                        "response": full(msg.response),
                        "item": full(msg.item),
                        "epoch": msg.epoch,
                    }
                )
            case TextOut():
                await self.send_json(
                    {
                        "type": "response.output_text.delta",
                        "response_id": msg.response_id,
                        "item_id": msg.item_id,
                        "delta": msg.delta,
                        "epoch": msg.epoch,
                    }
                )
            case ResponseDone():
                await self.send_json(
                    {
                        "type": "response.done",
                        "response": full(msg.response),
                        "transcript": msg.transcript,
                        "epoch": msg.epoch,
                    }
                )
            case ItemDeleted():
                await self.send_json({"type": "conversation.item.deleted", "item_id": msg.item_id})
            case ItemRetrieved():
                await self.send_json({"type": "conversation.item.retrieved", "item": full(msg.item)})
            case PlaybackCommitted():
                await self.send_json(
                    {
                        "type": "playback.committed",
                        "response_id": msg.response_id,
                        "item_id": msg.item_id,
                        "played_ms": msg.played_ms,
                        "history": full(msg.history),
                        "client_event_id": self.client_event_id(msg.event_id),
                    }
                )
            case Snapshot():
                await self.send_json(
                    {
                        "type": "session.snapshot",
                        "snapshot": full(msg.snapshot),
                        "client_event_id": self.client_event_id(msg.event_id),
                    }
                )
            case SessionClosed():
                await self.send_json({"type": "session.closed", "reason": msg.reason})
            case EpochAdvance():
                # Output of older epochs is void: the client flushes its playback buffer.
                await self.send_json({"type": "epoch.advanced", "epoch": msg.epoch, "reason": msg.reason})

    async def _audio(self, msg: AudioOut) -> None:
        header = {
            "response_id": msg.response_id,
            "item_id": msg.item_id,
            "epoch": msg.epoch,
            "seq": msg.seq,
            "start_ms": msg.start_ms,
            "end_of_turn": msg.end_of_turn,
            "text": msg.text,
        }
        pcm = encode(msg.pcm, PCM16_OUT)
        if self.audio_transport == "binary":
            await self.ws.send(pack_audio_out(header, pcm))
        else:
            await self.send_json({"type": "response.output_audio.delta", **header, "delta": b64encode(pcm)})


# ---------------------------------------------------------------------- field helpers
def engine_object(engine: EngineInfo) -> JSONObject:
    """The engine as ``session.created`` shows it: its native input format and the wire's
    output rate (every engine's audio reaches the adapter at the bus output format)."""
    return {**full(engine), "output_rate": OUTPUT_RATE}


def native_format(fmt: object) -> AudioFormat:
    """``input_audio_format``: ``{encoding, rate}`` or a format name."""
    param = "session.input_audio_format"
    if isinstance(fmt, str):
        if fmt not in _FORMAT_NAMES:
            raise bad(param, f"unsupported audio format {fmt!r}; one of {sorted(_FORMAT_NAMES)}")
        return _FORMAT_NAMES[fmt]
    obj = want_obj(fmt, param)
    only(obj, {"encoding", "rate"}, param)
    enc = want_choice(obj.get("encoding", "pcm16"), f"{param}.encoding", ("pcm16", "float32", "pcmu", "pcma"))
    rate = want_int(obj.get("rate", OUTPUT_RATE), f"{param}.rate")
    if rate not in SUPPORTED_RATES:
        raise bad(f"{param}.rate", f"unsupported rate {rate}; one of {SUPPORTED_RATES}")
    return AudioFormat(enc, rate)
