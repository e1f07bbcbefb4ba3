"""The Realtime session object, both dialects, mapped to and from :class:`SessionConfig`.

OpenAI Realtime has two session shapes. GA nests audio settings
(``audio.input.format``, ``audio.input.turn_detection``, ``audio.output.voice``...);
the beta is flat (``input_audio_format``, ``turn_detection``, ``voice``, ``modalities``...).
A ``session.update`` may use either shape on either dialect and carries only the
fields that change; the server answers with the full session in the dialect the
connection speaks. Settings the model stages need live in the bus
:class:`SessionConfig`; settings only the adapter needs (wire audio formats, model
name, pass-through fields) live in :class:`RealtimeSettings`.

Turn detection: ``server_vad`` maps 1:1 onto the host's server VAD. ``semantic_vad``
maps onto server VAD with a silence duration chosen by ``eagerness``
(:data:`EAGERNESS_SILENCE_MS`: low 1600 ms, medium/auto 800 ms, high 400 ms, the 4:2:1
ratio of OpenAI's 8/4/2 s maximum waits). ``null`` is manual turns; ``{"type":
"duplex"}`` (a duplexd extension, also ``?duplex=1``) is model-driven full duplex.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import msgspec

from duplexd.adapters.audio import G711_RATE, SUPPORTED_RATES, AudioFormat
from duplexd.adapters.validation import (
    bad,
    missing,
    unknown,
    unsupported,
    want_bool,
    want_int,
    want_num,
    want_obj,
    want_str,
)
from duplexd.bus.audio_format import OUTPUT_RATE
from duplexd.bus.messages import ContentPart, Item, ResponseOptions, SessionConfig, TurnMode, VadParams

EAGERNESS_SILENCE_MS = {"low": 1600, "medium": 800, "auto": 800, "high": 400}

_GA_FORMAT = {"pcm16": "audio/pcm", "pcmu": "audio/pcmu", "pcma": "audio/pcma"}
_BETA_FORMAT = {"pcm16": "pcm16", "pcmu": "g711_ulaw", "pcma": "g711_alaw"}
_FROM_BETA_FORMAT = {v: k for k, v in _BETA_FORMAT.items()}
_FROM_GA_FORMAT = {v: k for k, v in _GA_FORMAT.items()}

# Read-only fields a client may echo back from session.created: accepted, ignored.
_READ_ONLY = frozenset({"id", "object", "expires_at", "client_secret"})
# Session fields where ``null`` means something (off, manual turns, unlimited); for every
# other field ``null`` is "not set": the update leaves it as it is.
_NULL_MEANS = frozenset(
    {
        "turn_detection",
        "input_audio_transcription",
        "input_audio_noise_reduction",
        "max_output_tokens",
        "max_response_output_tokens",
        "tools",
        "tracing",
        "prompt",
        "include",
    }
)
_AUDIO_NULL_MEANS = frozenset({("input", "turn_detection"), ("input", "transcription"), ("input", "noise_reduction")})


# ---------------------------------------------------------------------- Realtime value shapes
def max_tokens(value: Any, param: str) -> int:
    """``int`` 1..4096 or ``"inf"`` (→ 0, unlimited)."""
    if value == "inf" or value is None:
        return 0
    return want_int(value, param, 1, 4096)


def modalities(value: Any, param: str) -> tuple[str, ...]:
    """GA ``["audio"]``/``["text"]``; beta ``["audio", "text"]``/``["text"]``. Audio
    output always comes with its transcript, so any list naming audio means audio."""
    if not isinstance(value, list) or not value or not all(v in ("audio", "text") for v in value):
        raise bad(param, f"'{param}' must be a non-empty list of 'audio' and 'text'")
    return ("audio",) if "audio" in value else ("text",)


def parse_format(value: Any, param: str) -> AudioFormat:
    """GA ``{type, rate}`` or beta string → :class:`AudioFormat`."""
    if isinstance(value, str):
        enc = _FROM_BETA_FORMAT.get(value) or _FROM_GA_FORMAT.get(value)
        if enc is None:
            raise bad(param, f"unsupported audio format {value!r}; use pcm16, g711_ulaw or g711_alaw")
        return AudioFormat(enc, OUTPUT_RATE if enc == "pcm16" else G711_RATE)
    fmt = want_obj(value, param)
    for key in fmt:
        if key not in ("type", "rate"):
            raise unknown(f"{param}.{key}")
    kind = fmt.get("type", "audio/pcm")
    enc = _FROM_GA_FORMAT.get(kind) if isinstance(kind, str) else None
    if enc is None:
        raise bad(f"{param}.type", f"unsupported audio format {kind!r}; use audio/pcm, audio/pcmu or audio/pcma")
    if enc == "pcm16":
        rate = fmt.get("rate", OUTPUT_RATE)
        if rate not in SUPPORTED_RATES:
            raise bad(f"{param}.rate", f"unsupported sample rate {rate!r}; one of {list(SUPPORTED_RATES)}")
        return AudioFormat("pcm16", int(rate))
    rate = fmt.get("rate", G711_RATE)
    if rate != G711_RATE:
        raise bad(f"{param}.rate", f"{kind} is 8000 Hz; got {rate!r}")
    return AudioFormat(enc, G711_RATE)


def render_format(fmt: AudioFormat, beta: bool) -> Any:
    if beta:
        return _BETA_FORMAT[fmt.encoding]
    if fmt.encoding == "pcm16":
        return {"type": "audio/pcm", "rate": fmt.rate}
    return {"type": _GA_FORMAT[fmt.encoding]}


# ---------------------------------------------------------------------- session state
@dataclass
class RealtimeSettings:
    """Session fields only the adapter needs (the rest is the bus SessionConfig)."""

    model: str = "duplexd"
    input_format: AudioFormat = field(default_factory=AudioFormat)
    output_format: AudioFormat = field(default_factory=AudioFormat)
    turn_type: str = "server_vad"  # server_vad | semantic_vad | none | duplex
    eagerness: str = "auto"
    speed: float = 1.0
    transcription: dict[str, Any] | None = None  # input transcription on: emit .completed events
    noise_reduction: dict[str, Any] | None = None
    tool_choice: str = "auto"
    tracing: Any = None
    truncation: Any = "auto"
    include: list[str] | None = None


def initial_settings(config: SessionConfig, model: str) -> RealtimeSettings:
    kind = {TurnMode.SERVER_VAD: "server_vad", TurnMode.MANUAL: "none", TurnMode.DUPLEX: "duplex"}[config.turn_mode]
    return RealtimeSettings(model=model or "duplexd", turn_type=kind)


@dataclass
class _Patch:
    """What one session.update changes, built fully before anything is applied."""

    settings: RealtimeSettings
    config: dict[str, Any]  # SessionConfig field → new value
    keep_vad: bool = False  # VAD settings persist across turn kinds (the native session shows them)

    def vad(self, base: SessionConfig) -> VadParams:
        vad: VadParams = self.config.get("vad", base.vad)
        return vad


def apply_update(
    settings: RealtimeSettings, config: SessionConfig, session: Any, keep_vad: bool = False
) -> tuple[RealtimeSettings, SessionConfig]:
    """The new (settings, config) after ``session`` (either shape); raises
    :class:`ClientError` and changes nothing when any field is invalid. By Realtime's rule a
    switch to another turn detection kind starts from its defaults; ``keep_vad`` keeps the
    session's VAD settings instead."""
    patch = _Patch(copy.deepcopy(settings), {}, keep_vad)
    for key, value in want_obj(session, "session").items():
        _apply_field(patch, config, key, value)
    return patch.settings, msgspec.structs.replace(config, **patch.config)


def _apply_field(p: _Patch, config: SessionConfig, key: str, value: Any) -> None:
    param = f"session.{key}"
    st, cfg = p.settings, p.config
    if value is None and key not in _NULL_MEANS:
        return  # null: not set
    match key:
        case "type":
            if value == "transcription":
                raise unsupported(param, "transcription-only sessions are not served; use type 'realtime'")
            if value != "realtime":
                raise bad(param, f"session.type must be 'realtime'; got {value!r}")
        case _ if key in _READ_ONLY:
            pass
        case "model":
            st.model = want_str(value, param)
        case "instructions":
            cfg["instructions"] = want_str(value, param)
        case "output_modalities" | "modalities":
            cfg["output_modalities"] = modalities(value, param)
        case "voice":
            cfg["voice"] = _voice(value, param)
        case "audio":
            _apply_audio(p, config, want_obj(value, param))
        case "input_audio_format":
            st.input_format = parse_format(value, param)
        case "output_audio_format":
            st.output_format = parse_format(value, param)
        case "turn_detection":
            _apply_turn_detection(p, config, value, param)
        case "input_audio_transcription":
            st.transcription = None if value is None else want_obj(value, param)
        case "input_audio_noise_reduction":
            st.noise_reduction = None if value is None else want_obj(value, param)
        case "temperature":
            cfg["temperature"] = want_num(value, param, 0.0, 2.0)
        case "max_output_tokens" | "max_response_output_tokens":
            cfg["max_output_tokens"] = max_tokens(value, param)
        case "speed":
            st.speed = want_num(value, param, 0.25, 1.5)
        case "tools":
            if value not in (None, []):
                raise unsupported(param, "the models served here do not call functions or MCP tools")
        case "tool_choice":
            if value not in ("auto", "none"):
                raise unsupported(param, "only 'auto' and 'none' (there are no tools to require)")
            st.tool_choice = value
        case "tracing":
            st.tracing = value
        case "truncation":
            st.truncation = value
        case "prompt":
            if value is not None:
                raise unsupported(param, "stored prompts live on OpenAI's platform")
        case "include":
            if value is not None and not isinstance(value, list):
                raise bad(param, "'session.include' must be a list", "invalid_type")
            st.include = value
        case _:
            raise unknown(param)


def _voice(value: Any, param: str) -> str:
    if isinstance(value, dict) and isinstance(value.get("id"), str):
        voice: str = value["id"]  # GA custom voice {"id": ...}
        return voice
    return want_str(value, param)


def _apply_audio(p: _Patch, config: SessionConfig, audio: dict[str, Any]) -> None:
    st = p.settings
    for side, value in audio.items():
        param = f"session.audio.{side}"
        if side not in ("input", "output"):
            raise unknown(param)
        if value is None:
            continue
        for key, v in want_obj(value, param).items():
            kp = f"{param}.{key}"
            if v is None and (side, key) not in _AUDIO_NULL_MEANS:
                continue
            match side, key:
                case "input", "format":
                    st.input_format = parse_format(v, kp)
                case "input", "turn_detection":
                    _apply_turn_detection(p, config, v, kp)
                case "input", "transcription":
                    st.transcription = None if v is None else want_obj(v, kp)
                case "input", "noise_reduction":
                    st.noise_reduction = None if v is None else want_obj(v, kp)
                case "output", "format":
                    st.output_format = parse_format(v, kp)
                case "output", "voice":
                    p.config["voice"] = _voice(v, kp)
                case "output", "speed":
                    st.speed = want_num(v, kp, 0.25, 1.5)
                case _:
                    raise unknown(kp)


def _apply_turn_detection(p: _Patch, config: SessionConfig, value: Any, param: str) -> None:
    st, cfg = p.settings, p.config
    if value is None:
        st.turn_type = "none"
        cfg["turn_mode"] = TurnMode.MANUAL
        return
    # null inside means "not set", except idle_timeout_ms where null is off.
    td = {k: v for k, v in want_obj(value, param).items() if v is not None or k == "idle_timeout_ms"}
    kind = td.get("type", st.turn_type if st.turn_type in ("server_vad", "semantic_vad") else None)
    if kind is None:
        raise missing(f"{param}.type")
    # A partial update of the same kind keeps the other fields; a new kind starts from defaults.
    base = VadParams() if kind != st.turn_type and not p.keep_vad else p.vad(config)
    vad: dict[str, Any] = {f: getattr(base, f) for f in base.__struct_fields__}
    if kind == "server_vad":
        for key, v in td.items():
            kp = f"{param}.{key}"
            match key:
                case "type":
                    pass
                case "threshold":
                    vad["threshold"] = want_num(v, kp, 0.0, 1.0)
                case "prefix_padding_ms":
                    vad["prefix_padding_ms"] = want_int(v, kp, 0, 10_000)
                case "silence_duration_ms":
                    vad["silence_duration_ms"] = want_int(v, kp, 1, 60_000)
                case "create_response" | "interrupt_response":
                    vad[key] = want_bool(v, kp)
                case "idle_timeout_ms":
                    vad["idle_timeout_ms"] = 0 if v is None else want_int(v, kp, 1_000, 30_000)
                case _:
                    raise unknown(kp)
        cfg["turn_mode"] = TurnMode.SERVER_VAD
    elif kind == "semantic_vad":
        eager = st.eagerness if kind == st.turn_type else "auto"
        for key, v in td.items():
            kp = f"{param}.{key}"
            match key:
                case "type":
                    pass
                case "eagerness":
                    if v not in EAGERNESS_SILENCE_MS:
                        raise bad(kp, f"eagerness must be one of low, medium, high, auto; got {v!r}")
                    eager = v
                case "create_response" | "interrupt_response":
                    vad[key] = want_bool(v, kp)
                case _:
                    raise unknown(kp)
        st.eagerness = eager
        vad["silence_duration_ms"] = EAGERNESS_SILENCE_MS[eager]
        vad["idle_timeout_ms"] = 0
        cfg["turn_mode"] = TurnMode.SERVER_VAD
    elif kind == "duplex":
        # duplexd's extension: the model decides; its two knobs may ride along.
        for key, v in td.items():
            kp = f"{param}.{key}"
            match key:
                case "type":
                    pass
                case "force_listen_count":
                    cfg["force_listen_count"] = want_int(v, kp, 0, 1000)
                case "listen_prob_scale":
                    cfg["listen_prob_scale"] = want_num(v, kp, 0.0, 100.0)
                case _:
                    raise unknown(kp)
        cfg["turn_mode"] = TurnMode.DUPLEX
    else:
        raise bad(f"{param}.type", f"turn_detection.type must be server_vad, semantic_vad or duplex; got {kind!r}")
    st.turn_type = kind
    cfg["vad"] = VadParams(**vad)


def render_turn_detection(settings: RealtimeSettings, config: SessionConfig, beta: bool) -> dict[str, Any] | None:
    v = config.vad
    match settings.turn_type:
        case "none":
            return None
        case "duplex":
            return {"type": "duplex"}
        case "semantic_vad":
            return {
                "type": "semantic_vad",
                "eagerness": settings.eagerness,
                "create_response": v.create_response,
                "interrupt_response": v.interrupt_response,
            }
    td: dict[str, Any] = {
        "type": "server_vad",
        "threshold": v.threshold,
        "prefix_padding_ms": v.prefix_padding_ms,
        "silence_duration_ms": v.silence_duration_ms,
        "create_response": v.create_response,
        "interrupt_response": v.interrupt_response,
    }
    if not beta:
        td["idle_timeout_ms"] = v.idle_timeout_ms or None
    return td


def render_session(session_id: str, settings: RealtimeSettings, config: SessionConfig, beta: bool) -> dict[str, Any]:
    """The full session object in the connection's dialect."""
    st = settings
    voice = config.voice or None
    limit: int | str = config.max_output_tokens or "inf"
    td = render_turn_detection(st, config, beta)
    if beta:
        return {
            "id": session_id,
            "object": "realtime.session",
            "model": st.model,
            "modalities": ["audio", "text"] if "audio" in config.output_modalities else ["text"],
            "instructions": config.instructions,
            "voice": voice,
            "input_audio_format": render_format(st.input_format, True),
            "output_audio_format": render_format(st.output_format, True),
            "input_audio_transcription": st.transcription,
            "input_audio_noise_reduction": st.noise_reduction,
            "turn_detection": td,
            "tools": [],
            "tool_choice": st.tool_choice,
            "temperature": config.temperature,
            "max_response_output_tokens": limit,
            "speed": st.speed,
            "tracing": st.tracing,
        }
    return {
        "type": "realtime",
        "object": "realtime.session",
        "id": session_id,
        "model": st.model,
        "output_modalities": list(config.output_modalities),
        "instructions": config.instructions,
        "audio": {
            "input": {
                "format": render_format(st.input_format, False),
                "transcription": st.transcription,
                "noise_reduction": st.noise_reduction,
                "turn_detection": td,
            },
            "output": {"format": render_format(st.output_format, False), "voice": voice, "speed": st.speed},
        },
        "tools": [],
        "tool_choice": st.tool_choice,
        "max_output_tokens": limit,
        "tracing": st.tracing,
        "truncation": st.truncation,
        "prompt": None,
        "include": st.include,
    }


# ---------------------------------------------------------------------- response.create
def response_options(value: Any, settings: RealtimeSettings) -> ResponseOptions:
    """``response.create``'s ``response`` (either shape) → per-response overrides."""
    if value is None:
        return ResponseOptions()
    r = want_obj(value, "response")
    out: dict[str, Any] = {}
    for key, v in r.items():
        param = f"response.{key}"
        if v is None:
            continue  # null: not set, the session's setting applies
        match key:
            case "instructions":
                out["instructions"] = want_str(v, param)
            case "output_modalities" | "modalities":
                out["output_modalities"] = modalities(v, param)
            case "voice":
                out["voice"] = _voice(v, param)
            case "max_output_tokens" | "max_response_output_tokens":
                out["max_output_tokens"] = max_tokens(v, param) or None
            case "metadata":
                out["metadata"] = _metadata(v, param)
            case "conversation":
                if v not in ("auto", "none"):
                    raise bad(param, "response.conversation must be 'auto' or 'none'")
                out["conversation"] = v
            case "audio":
                for side, sv in want_obj(v, param).items():
                    if side != "output":
                        raise unknown(f"{param}.{side}")
                    if sv is None:
                        continue
                    for k2, v2 in want_obj(sv, f"{param}.output").items():
                        kp = f"{param}.output.{k2}"
                        if v2 is None:
                            continue
                        if k2 == "voice":
                            out["voice"] = _voice(v2, kp)
                        elif k2 == "format":
                            _same_output_format(v2, kp, settings)
                        else:
                            raise unknown(kp)
            case "output_audio_format":
                _same_output_format(v, param, settings)
            case "temperature":
                want_num(v, param, 0.0, 2.0)  # validated; sampling temperature is per session here
            case "input":
                if v not in (None, []):
                    raise unsupported(param, "out-of-band input items; the response always uses the conversation")
            case "tools":
                if v not in (None, []):
                    raise unsupported(param, "the models served here do not call functions or MCP tools")
            case "tool_choice":
                if v not in ("auto", "none"):
                    raise unsupported(param, "only 'auto' and 'none' (there are no tools to require)")
            case "prompt":
                if v is not None:
                    raise unsupported(param, "stored prompts live on OpenAI's platform")
            case _:
                raise unknown(param)
    return ResponseOptions(**out)


def _same_output_format(value: Any, param: str, settings: RealtimeSettings) -> None:
    if parse_format(value, param) != settings.output_format:
        raise unsupported(param, "a per-response output format; set it on the session with session.update")


def _metadata(value: Any, param: str) -> dict[str, str] | None:
    if value is None:
        return None
    md = want_obj(value, param)
    if len(md) > 16 or not all(isinstance(k, str) and isinstance(v, str) for k, v in md.items()):
        raise bad(param, "metadata is at most 16 string keys with string values")
    return dict(md)


# ---------------------------------------------------------------------- conversation items
_PART_TYPES = {
    # (role, wire type) → stored type
    ("user", "input_text"): "input_text",
    ("user", "input_audio"): "input_audio",
    ("system", "input_text"): "input_text",
    ("assistant", "output_text"): "output_text",
    ("assistant", "text"): "output_text",  # beta
    ("assistant", "output_audio"): "output_audio",
    ("assistant", "audio"): "output_audio",  # beta
}


_ITEM_KEYS = frozenset({"id", "type", "object", "status", "role", "content"})


def parse_item(value: Any, new_id: str, extra_keys: frozenset[str] = frozenset()) -> Item:
    """``conversation.item.create``'s ``item`` (GA or beta) → a bus :class:`Item`.
    ``extra_keys``: read-only fields a protocol renders on items (ignored when echoed back)."""
    obj = {k: v for k, v in want_obj(value, "item").items() if v is not None}  # null: not set
    kind = obj.get("type", "message")
    if kind != "message":
        raise unsupported("item.type", f"items of type {kind!r}; only 'message' items are kept")
    role = obj.get("role")
    if role is None:
        raise missing("item.role")
    if role not in ("user", "assistant", "system"):
        raise bad("item.role", "item.role must be 'user', 'assistant' or 'system'")
    for key in obj:
        if key not in _ITEM_KEYS and key not in extra_keys:
            raise unknown(f"item.{key}")
    item_id = obj.get("id") or new_id
    if not isinstance(item_id, str) or len(item_id) > 64:
        raise bad("item.id", "item.id must be a string of at most 64 characters")
    content = obj.get("content", [])
    if not isinstance(content, list):
        raise bad("item.content", "item.content must be a list", "invalid_type")
    parts: list[ContentPart] = []
    for i, raw in enumerate(content):
        pp = f"item.content[{i}]"
        part = want_obj(raw, pp)
        ptype = part.get("type")
        stored = _PART_TYPES.get((role, ptype)) if isinstance(ptype, str) else None
        if stored is None:
            raise bad(f"{pp}.type", f"content type {part.get('type')!r} is not valid for a {role} message")
        if part.get("audio"):
            raise unsupported(f"{pp}.audio", "audio bytes in items; stream them with input_audio_buffer.append")
        text = part.get("text")
        transcript = part.get("transcript")
        if text is not None:
            want_str(text, f"{pp}.text")
        if transcript is not None:
            want_str(transcript, f"{pp}.transcript")
        parts.append(ContentPart(type=stored, text=text, transcript=transcript))
    status = obj.get("status", "completed")
    if status not in ("completed", "incomplete", "in_progress"):
        raise bad("item.status", "item.status must be completed, incomplete or in_progress")
    return Item(id=item_id, role=role, type="message", status=status, content=tuple(parts))


def render_part(part: ContentPart, beta: bool) -> dict[str, Any]:
    kind = part.type
    if beta:
        kind = {"output_audio": "audio", "output_text": "text"}.get(kind, kind)
    out: dict[str, Any] = {"type": kind}
    if part.type in ("input_text", "output_text", "text"):
        out["text"] = part.text or ""
    else:
        out["transcript"] = part.transcript
    return out


def render_item(item: Item, beta: bool) -> dict[str, Any]:
    return {
        "id": item.id,
        "object": "realtime.item",
        "type": item.type,
        "status": item.status,
        "role": item.role,
        "content": [render_part(p, beta) for p in item.content],
    }
