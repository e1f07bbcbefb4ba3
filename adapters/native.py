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
Realtime spellings too (``turn_detection``, ``modalities``, ``input_audio_format`` as a
string), so a Realtime client's ``session.update`` works here unchanged.
"""

from __future__ import annotations

import enum
import json
import struct
import uuid
from typing import Any

import msgspec

from duplexd.adapters.audio import SUPPORTED_RATES, AudioFormat, b64decode, b64encode, encode
from duplexd.adapters.protocol import ClientError, ProtocolHandler, merge_config, shared_event
from duplexd.bus.messages import (
    Action,
    AudioOut,
    Decision,
    EpochAdvance,
    ErrorEvent,
    InputTranscript,
    Item,
    ItemAdded,
    ItemDeleted,
    ItemDone,
    ItemRetrieved,
    PlaybackCommitted,
    ResponseCreated,
    ResponseDone,
    ResponseOptions,
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
    "pcm16": AudioFormat("pcm16", 24000),
    "audio/pcm": AudioFormat("pcm16", 24000),
    "g711_ulaw": AudioFormat("pcmu", 8000),
    "audio/pcmu": AudioFormat("pcmu", 8000),
    "pcmu": AudioFormat("pcmu", 8000),
    "g711_alaw": AudioFormat("pcma", 8000),
    "audio/pcma": AudioFormat("pcma", 8000),
    "pcma": AudioFormat("pcma", 8000),
    "float32": AudioFormat("float32", 24000),
}
_VAD_KEYS = (
    "threshold",
    "prefix_padding_ms",
    "silence_duration_ms",
    "create_response",
    "interrupt_response",
    "idle_timeout_ms",
)
_DUPLEX_KEYS = ("force_listen_count", "listen_prob_scale")
# Realtime session fields with no meaning here (transcripts are always on, no tools):
# accepted and ignored, so a Realtime client's session.update needs no change.
_REALTIME_ONLY = (
    "model",
    "input_audio_transcription",
    "input_audio_noise_reduction",
    "tools",
    "tool_choice",
    "include",
    "tracing",
    "truncation",
    "prompt",
)


def turn_detection_of(config: SessionConfig) -> dict[str, Any] | None:
    """The Realtime-style ``turn_detection`` view of a session's turn mode."""
    if config.turn_mode == TurnMode.MANUAL:
        return None
    if config.turn_mode == TurnMode.DUPLEX:
        return {"type": "duplex", **{k: getattr(config, k) for k in _DUPLEX_KEYS}}
    return {"type": "server_vad", **full(config.vad)}


def translate_realtime(patch: dict[str, Any]) -> dict[str, Any]:
    """Rewrite Realtime spellings in a ``session.update`` into SessionConfig fields."""
    patch = dict(patch)
    audio = patch.pop("audio", None)
    if audio is not None:  # GA nesting: audio.input.{format, turn_detection}, audio.output.voice
        if not isinstance(audio, dict):
            raise ClientError("invalid_type", "audio must be an object", param="audio")
        inp, out = audio.get("input") or {}, audio.get("output") or {}
        if not isinstance(inp, dict) or not isinstance(out, dict):
            raise ClientError("invalid_type", "audio.input and audio.output must be objects", param="audio")
        if "turn_detection" in inp:
            patch.setdefault("turn_detection", inp["turn_detection"])
        fmt = inp.get("format")
        if isinstance(fmt, dict) and "type" in fmt:
            named = _FORMAT_NAMES.get(fmt["type"])
            if named is None:
                raise ClientError(
                    "invalid_value", f"unsupported audio format {fmt['type']!r}", param="audio.input.format.type"
                )
            patch.setdefault("input_audio_format", {"encoding": named.encoding, "rate": fmt.get("rate", named.rate)})
        if "voice" in out:
            patch.setdefault("voice", out["voice"])
    if "modalities" in patch:
        patch.setdefault("output_modalities", patch.pop("modalities"))
    if "max_response_output_tokens" in patch:
        patch.setdefault("max_output_tokens", patch.pop("max_response_output_tokens"))
    if patch.get("max_output_tokens") == "inf":
        patch["max_output_tokens"] = 0
    for key in _REALTIME_ONLY:
        patch.pop(key, None)
    if "turn_detection" not in patch:
        return patch
    td = patch.pop("turn_detection")
    if td is None:
        patch["turn_mode"] = TurnMode.MANUAL.value
        return patch
    if not isinstance(td, dict):
        raise ClientError("invalid_type", "turn_detection must be an object or null", param="turn_detection")
    kind = td.get("type", "server_vad")
    extra = sorted(set(td) - {"type", *_VAD_KEYS, *_DUPLEX_KEYS})
    if extra:
        raise ClientError(
            "unknown_parameter", f"unknown turn_detection field {extra[0]!r}", param=f"turn_detection.{extra[0]}"
        )
    if kind == "server_vad":
        patch["turn_mode"] = TurnMode.SERVER_VAD.value
        vad = {k: td[k] for k in _VAD_KEYS if k in td}
        if vad:
            patch["vad"] = {**(patch.get("vad") or {}), **vad}
    elif kind == "duplex":
        patch["turn_mode"] = TurnMode.DUPLEX.value
        for k in _DUPLEX_KEYS:
            if k in td:
                patch[k] = td[k]
    else:
        raise ClientError(
            "invalid_value",
            f"turn_detection.type {kind!r} is not supported: use 'server_vad', 'duplex' or turn_detection null",
            param="turn_detection.type",
        )
    return patch


class NativeHandler(ProtocolHandler):
    """One ``/v1/duplex`` connection."""

    endpoint = "duplex"

    def __init__(self, ws: Any, server: Any) -> None:
        super().__init__(ws, server)
        self.audio_transport = "binary"  # or "json": base64 deltas, for clients without binary frames
        self.epoch = 0

    # ------------------------------------------------------------------ session object
    def session_object(self) -> dict[str, Any]:
        s = full(self.config)
        s["object"] = "duplex.session"
        s["turn_detection"] = turn_detection_of(self.config)
        s["input_audio_format"] = {"encoding": self.input_format.encoding, "rate": self.input_format.rate}
        s["output_audio_format"] = {"encoding": "pcm16", "rate": 24000}
        s["audio_transport"] = self.audio_transport
        s["id"] = self.session.session_id if self.session else ""
        s["epoch"] = self.epoch
        return s

    async def on_open(self) -> None:
        pass  # greeted on SessionOpened, when the engine format is known

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

    async def on_text(self, event: dict[str, Any]) -> None:
        assert self.session is not None
        etype: str = event["type"]
        eid = event.get("event_id") or ""
        s = self.session
        match etype:
            case "session.update":
                self._session_update(event.get("session"), eid)
            case "session.get":
                s.request_snapshot(eid)
            case "session.close":
                await self.ws.close(1000, "client closed the session")
            case "input_audio_buffer.append":
                audio = event.get("audio")
                if not isinstance(audio, str):
                    raise ClientError("missing_required_parameter", "missing required parameter 'audio'", param="audio")
                self.push_audio(b64decode(audio), force=bool(event.get("force")))
            case "input_audio_buffer.commit":
                self.flush_audio()
                s.commit(eid)
            case "input_audio_buffer.clear":
                s.clear(eid)
            case "input.interrupt":
                self.flush_audio()
                s.cancel(_opt_str(event, "response_id"), eid)
            case "response.create":
                s.create_response(_response_options(event.get("response")), eid)
            case "response.cancel":
                s.cancel(_opt_str(event, "response_id"), eid)
            case "playback.ack":
                played = _req_int(event, "played_ms")
                if played < 0:
                    raise ClientError("invalid_value", "played_ms must be >= 0", param="played_ms")
                s.ack(_req_str(event, "response_id"), _req_str(event, "item_id"), played, eid)
            case "conversation.item.create":
                item = _item_from(event.get("item"))
                prev = event.get("previous_item_id")
                s.item_create(item, prev if isinstance(prev, str) else None, eid)
            case "conversation.item.truncate":
                s.truncate(
                    _req_str(event, "item_id"),
                    _req_int(event, "audio_end_ms"),
                    int(event.get("content_index") or 0),
                    eid,
                )
            case "conversation.item.delete":
                s.item_delete(_req_str(event, "item_id"), eid)
            case "conversation.item.retrieve":
                s.item_retrieve(_req_str(event, "item_id"), eid)
            case _:
                raise ClientError("unknown_event", f"unknown event type {etype!r}", param="type")

    def _session_update(self, patch: Any, event_id: str) -> None:
        if not isinstance(patch, dict):
            raise ClientError("missing_required_parameter", "missing required parameter 'session'", param="session")
        patch = translate_realtime(patch)
        for key in ("id", "object", "epoch", "output_audio_format", "type"):
            patch.pop(key, None)
        fmt = patch.pop("input_audio_format", None)
        transport = patch.pop("audio_transport", None)
        if transport is not None and transport not in ("binary", "json"):
            raise ClientError("invalid_value", "audio_transport must be 'binary' or 'json'", param="audio_transport")
        new_fmt = _audio_format(fmt) if fmt is not None else None
        config = merge_config(self.config, patch)
        # Validated as a whole: apply nothing unless everything is valid.
        if new_fmt is not None:
            self.set_input_format(new_fmt)
        if transport is not None:
            self.audio_transport = transport
        self.config = config
        assert self.session is not None
        self.session.update(config, event_id)

    # ------------------------------------------------------------------ server → client
    async def on_event(self, msg: Any) -> None:
        self.epoch = max(self.epoch, getattr(msg, "epoch", 0))
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
                    {"type": "session.created", "session": self.session_object(), "engine": full(msg.engine)}
                )
            case SessionUpdated(event_id=eid):
                await self.send_json(
                    {"type": "session.updated", "session": self.session_object(), "client_event_id": eid or None}
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
                        "client_event_id": msg.event_id or None,
                    }
                )
            case Snapshot():
                await self.send_json(
                    {
                        "type": "session.snapshot",
                        "snapshot": full(msg.snapshot),
                        "client_event_id": msg.event_id or None,
                    }
                )
            case ErrorEvent():
                payload = self.error_payload(msg.code, msg.message, msg.type, msg.param, msg.event_id)
                payload["error"]["response_id"] = msg.response_id or None
                await self.send_json(payload)
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
        pcm = encode(msg.pcm, AudioFormat())
        if self.audio_transport == "binary":
            await self.ws.send(pack_audio_out(header, pcm))
        else:
            await self.send_json({"type": "response.output_audio.delta", **header, "delta": b64encode(pcm)})


# ---------------------------------------------------------------------- field helpers
def _req_str(event: dict[str, Any], key: str) -> str:
    v = event.get(key)
    if not isinstance(v, str) or not v:
        raise ClientError("missing_required_parameter", f"missing required parameter '{key}'", param=key)
    return v


def _opt_str(event: dict[str, Any], key: str) -> str:
    v = event.get(key)
    if v is None:
        return ""
    if not isinstance(v, str):
        raise ClientError("invalid_type", f"'{key}' must be a string", param=key)
    return v


def _req_int(event: dict[str, Any], key: str) -> int:
    v = event.get(key)
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ClientError("missing_required_parameter", f"missing or non-numeric parameter '{key}'", param=key)
    return int(v)


def _audio_format(fmt: Any) -> AudioFormat:
    if isinstance(fmt, str) and fmt in _FORMAT_NAMES:
        return _FORMAT_NAMES[fmt]
    if not isinstance(fmt, dict):
        raise ClientError(
            "invalid_value",
            f"input_audio_format must be an object {{encoding, rate}} or one of {sorted(_FORMAT_NAMES)}",
            param="input_audio_format",
        )
    enc = fmt.get("encoding", "pcm16")
    rate = fmt.get("rate", 24000)
    if enc not in ("pcm16", "float32", "pcmu", "pcma"):
        raise ClientError("invalid_value", f"unsupported encoding {enc!r}", param="input_audio_format.encoding")
    if rate not in SUPPORTED_RATES:
        raise ClientError(
            "invalid_value", f"unsupported rate {rate!r}; one of {SUPPORTED_RATES}", param="input_audio_format.rate"
        )
    return AudioFormat(enc, rate)


def _response_options(obj: Any) -> ResponseOptions:
    if obj is None:
        return ResponseOptions()
    if not isinstance(obj, dict):
        raise ClientError("invalid_type", "'response' must be an object", param="response")
    try:
        return msgspec.convert(obj, ResponseOptions)
    except msgspec.ValidationError as exc:
        raise ClientError("invalid_value", f"invalid response options: {exc}", param="response") from exc


def _item_from(obj: Any) -> Item:
    if not isinstance(obj, dict):
        raise ClientError("missing_required_parameter", "missing required parameter 'item'", param="item")
    obj = dict(obj)
    obj.setdefault("id", f"item_{uuid.uuid4().hex[:20]}")
    obj.setdefault("type", "message")
    obj.pop("object", None)
    content = obj.get("content") or []
    if not isinstance(content, list):
        raise ClientError("invalid_type", "item.content must be a list", param="item.content")
    obj["content"] = [
        {k: v for k, v in part.items() if k in ("type", "text", "transcript")}
        for part in content
        if isinstance(part, dict)
    ]
    try:
        return msgspec.convert(obj, Item)
    except msgspec.ValidationError as exc:
        raise ClientError("invalid_value", f"invalid item: {exc}", param="item") from exc
