"""The Realtime session/response/item mapping (adapters/realtime_session.py, realtime_events.py)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.datastructures import Headers

from duplexd.adapters.audio import AudioFormat
from duplexd.adapters.realtime import is_beta
from duplexd.adapters.realtime_events import render_response, status_details, usage
from duplexd.adapters.realtime_session import (
    EAGERNESS_SILENCE_MS,
    RealtimeSettings,
    apply_update,
    initial_settings,
    parse_format,
    parse_item,
    render_item,
    render_session,
    response_options,
)
from duplexd.adapters.validation import ClientError
from duplexd.bus.messages import (
    ContentPart,
    Item,
    ResponseInfo,
    ResponseStatus,
    SessionConfig,
    TurnMode,
    Usage,
    VadParams,
)

BASE = SessionConfig()


def start() -> tuple[RealtimeSettings, SessionConfig]:
    return initial_settings(BASE, "gpt-realtime"), BASE


def err(session: Any) -> ClientError:
    st, cfg = start()
    with pytest.raises(ClientError) as info:
        apply_update(st, cfg, session)
    return info.value


# ---------------------------------------------------------------------- session.update
def test_ga_partial_update_changes_only_what_is_sent() -> None:
    st, cfg = start()
    st2, cfg2 = apply_update(st, cfg, {"type": "realtime", "instructions": "Be brief."})
    assert cfg2.instructions == "Be brief." and cfg2.vad == cfg.vad and cfg2.turn_mode == TurnMode.SERVER_VAD
    st3, cfg3 = apply_update(
        st2,
        cfg2,
        {
            "audio": {
                "input": {"format": {"type": "audio/pcmu"}, "turn_detection": {"type": "server_vad", "threshold": 0.7}},
                "output": {"voice": "marin", "speed": 1.2, "format": {"type": "audio/pcma"}},
            },
            "output_modalities": ["text"],
            "max_output_tokens": 200,
        },
    )
    assert cfg3.instructions == "Be brief."  # kept from before
    assert cfg3.vad == VadParams(threshold=0.7) and cfg3.voice == "marin"
    assert cfg3.output_modalities == ("text",) and cfg3.max_output_tokens == 200
    assert st3.input_format == AudioFormat("pcmu", 8000) and st3.output_format == AudioFormat("pcma", 8000)
    assert st3.speed == 1.2
    # A partial turn_detection (no type) updates the current server_vad in place.
    _, cfg4 = apply_update(st3, cfg3, {"audio": {"input": {"turn_detection": {"silence_duration_ms": 300}}}})
    assert cfg4.vad.threshold == 0.7 and cfg4.vad.silence_duration_ms == 300


def test_beta_flat_update_and_render() -> None:
    st, cfg = start()
    st2, cfg2 = apply_update(
        st,
        cfg,
        {
            "modalities": ["audio", "text"],
            "voice": "alloy",
            "input_audio_format": "g711_ulaw",
            "output_audio_format": "g711_alaw",
            "turn_detection": None,
            "temperature": 0.7,
            "max_response_output_tokens": "inf",
            "input_audio_transcription": {"model": "whisper-1"},
        },
    )
    assert cfg2.turn_mode == TurnMode.MANUAL and cfg2.voice == "alloy" and cfg2.temperature == 0.7
    assert cfg2.output_modalities == ("audio",) and cfg2.max_output_tokens == 0
    s = render_session("sess_1", st2, cfg2, beta=True)
    assert s["input_audio_format"] == "g711_ulaw" and s["output_audio_format"] == "g711_alaw"
    assert s["turn_detection"] is None and s["modalities"] == ["audio", "text"]
    assert s["max_response_output_tokens"] == "inf" and s["input_audio_transcription"] == {"model": "whisper-1"}
    ga = render_session("sess_1", st2, cfg2, beta=False)
    assert ga["audio"]["input"]["format"] == {"type": "audio/pcmu"} and ga["audio"]["input"]["turn_detection"] is None
    assert ga["audio"]["output"] == {"format": {"type": "audio/pcma"}, "voice": "alloy", "speed": 1.0}


@pytest.mark.parametrize("eagerness", ["low", "medium", "high", "auto"])
def test_semantic_vad_maps_eagerness_onto_server_vad_silence(eagerness: str) -> None:
    st, cfg = start()
    td = {"type": "semantic_vad", "eagerness": eagerness, "interrupt_response": False}
    st2, cfg2 = apply_update(st, cfg, {"audio": {"input": {"turn_detection": td}}})
    assert cfg2.turn_mode == TurnMode.SERVER_VAD
    assert cfg2.vad.silence_duration_ms == EAGERNESS_SILENCE_MS[eagerness]
    assert cfg2.vad.interrupt_response is False and cfg2.vad.create_response is True
    shown = render_session("s", st2, cfg2, beta=False)["audio"]["input"]["turn_detection"]
    assert shown == {
        "type": "semantic_vad",
        "eagerness": eagerness,
        "create_response": True,
        "interrupt_response": False,
    }


def test_eagerness_order_and_kind_switch_resets_defaults() -> None:
    assert EAGERNESS_SILENCE_MS["low"] > EAGERNESS_SILENCE_MS["medium"] > EAGERNESS_SILENCE_MS["high"]
    st, cfg = start()
    st, cfg = apply_update(
        st, cfg, {"turn_detection": {"type": "server_vad", "threshold": 0.9, "idle_timeout_ms": 5000}}
    )
    st, cfg = apply_update(st, cfg, {"turn_detection": {"type": "semantic_vad"}})
    assert cfg.vad.threshold == 0.5 and cfg.vad.idle_timeout_ms == 0 and st.eagerness == "auto"
    st, cfg = apply_update(st, cfg, {"turn_detection": {"type": "duplex"}})
    assert cfg.turn_mode == TurnMode.DUPLEX
    assert render_session("s", st, cfg, beta=True)["turn_detection"] == {"type": "duplex"}


@pytest.mark.parametrize("beta", [False, True])
def test_echoing_the_rendered_session_back_changes_nothing(beta: bool) -> None:
    """Clients often send back the session object they were given."""
    st, cfg = start()
    st, cfg = apply_update(
        st, cfg, {"instructions": "x", "voice": "ash", "turn_detection": {"type": "server_vad", "threshold": 0.6}}
    )
    shown = render_session("sess_1", st, cfg, beta)
    st2, cfg2 = apply_update(st, cfg, copy.deepcopy(shown))
    assert render_session("sess_1", st2, cfg2, beta) == shown and cfg2 == cfg


@pytest.mark.parametrize(
    ("session", "code", "param"),
    [
        ({"colour": "red"}, "unknown_parameter", "session.colour"),
        ({"type": "transcription"}, "unsupported_parameter", "session.type"),
        ({"type": "chat"}, "invalid_value", "session.type"),
        ({"instructions": 3}, "invalid_type", "session.instructions"),
        ({"output_modalities": []}, "invalid_value", "session.output_modalities"),
        ({"output_modalities": ["video"]}, "invalid_value", "session.output_modalities"),
        ({"tools": [{"type": "function", "name": "f"}]}, "unsupported_parameter", "session.tools"),
        ({"tool_choice": "required"}, "unsupported_parameter", "session.tool_choice"),
        ({"temperature": 5}, "invalid_value", "session.temperature"),
        ({"max_output_tokens": 0}, "invalid_value", "session.max_output_tokens"),
        ({"audio": {"middle": {}}}, "unknown_parameter", "session.audio.middle"),
        ({"audio": {"input": {"format": {"type": "audio/pcm", "rate": 11025}}}}, "invalid_value", None),
        ({"audio": {"input": {"format": {"type": "audio/pcmu", "rate": 16000}}}}, "invalid_value", None),
        ({"audio": {"input": {"format": {"type": "audio/opus"}}}}, "invalid_value", None),
        ({"input_audio_format": "mp3"}, "invalid_value", "session.input_audio_format"),
        ({"turn_detection": {"type": "server_vad", "threshold": 2}}, "invalid_value", None),
        ({"turn_detection": {"type": "server_vad", "create_response": "yes"}}, "invalid_type", None),
        ({"turn_detection": {"type": "semantic_vad", "eagerness": "eager"}}, "invalid_value", None),
        ({"turn_detection": {"type": "server_vad", "speed": 1}}, "unknown_parameter", None),
        ({"turn_detection": {"type": "psychic"}}, "invalid_value", "session.turn_detection.type"),
        ("not an object", "invalid_type", "session"),
    ],
)
def test_invalid_session_fields_are_named(session: Any, code: str, param: str | None) -> None:
    e = err(session)
    assert e.code == code and str(e)
    if param is not None:
        assert e.param == param


def test_a_rejected_update_changes_nothing() -> None:
    st, cfg = start()
    before = copy.deepcopy(st)
    with pytest.raises(ClientError):
        apply_update(st, cfg, {"instructions": "new", "input_audio_format": "g711_ulaw", "bogus": 1})
    assert st == before and cfg == BASE


def test_partial_turn_detection_without_type_needs_a_vad_kind() -> None:
    st, cfg = apply_update(*start(), {"turn_detection": None})
    with pytest.raises(ClientError) as info:
        apply_update(st, cfg, {"turn_detection": {"threshold": 0.4}})
    assert info.value.code == "missing_required_parameter"


def test_initial_settings_follow_the_turn_mode() -> None:
    assert initial_settings(SessionConfig(turn_mode=TurnMode.DUPLEX), "").turn_type == "duplex"
    assert initial_settings(SessionConfig(turn_mode=TurnMode.MANUAL), "m").model == "m"


def test_formats_both_shapes() -> None:
    assert parse_format("pcm16", "p") == AudioFormat("pcm16", 24000)
    assert parse_format({"type": "audio/pcm"}, "p") == AudioFormat("pcm16", 24000)
    assert parse_format({"type": "audio/pcm", "rate": 16000}, "p") == AudioFormat("pcm16", 16000)
    assert parse_format("g711_alaw", "p") == AudioFormat("pcma", 8000)
    assert parse_format({"type": "audio/pcmu", "rate": 8000}, "p") == AudioFormat("pcmu", 8000)


# ---------------------------------------------------------------------- response.create
def test_response_options_both_shapes() -> None:
    st, _ = start()
    ga = response_options(
        {
            "output_modalities": ["text"],
            "instructions": "Whisper.",
            "audio": {"output": {"voice": "cedar", "format": {"type": "audio/pcm", "rate": 24000}}},
            "max_output_tokens": "inf",
            "metadata": {"topic": "x"},
            "conversation": "none",
            "tool_choice": "auto",
        },
        st,
    )
    assert ga.output_modalities == ("text",) and ga.instructions == "Whisper." and ga.voice == "cedar"
    assert ga.max_output_tokens is None and ga.metadata == {"topic": "x"} and ga.conversation == "none"
    beta = response_options({"modalities": ["audio", "text"], "voice": "alloy", "max_response_output_tokens": 5}, st)
    assert beta.output_modalities == ("audio",) and beta.voice == "alloy" and beta.max_output_tokens == 5
    assert response_options(None, st).output_modalities is None


@pytest.mark.parametrize(
    ("response", "code"),
    [
        ({"input": [{"type": "item_reference", "id": "x"}]}, "unsupported_parameter"),
        ({"tools": [{"type": "function"}]}, "unsupported_parameter"),
        ({"output_audio_format": "g711_ulaw"}, "unsupported_parameter"),
        ({"conversation": "other"}, "invalid_value"),
        ({"metadata": {"k": 1}}, "invalid_value"),
        ({"colour": "red"}, "unknown_parameter"),
        ("text", "invalid_type"),
    ],
)
def test_invalid_response_options(response: Any, code: str) -> None:
    with pytest.raises(ClientError) as info:
        response_options(response, start()[0])
    assert info.value.code == code


# ---------------------------------------------------------------------- items
def test_items_parse_and_render_per_dialect() -> None:
    user = parse_item({"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}, "item_a")
    assert user == Item(id="item_a", role="user", content=(ContentPart(type="input_text", text="hi"),))
    beta_assistant = parse_item({"id": "item_b", "role": "assistant", "content": [{"type": "text", "text": "yo"}]}, "x")
    assert beta_assistant.content[0].type == "output_text" and beta_assistant.id == "item_b"
    assert render_item(beta_assistant, beta=False)["content"] == [{"type": "output_text", "text": "yo"}]
    assert render_item(beta_assistant, beta=True)["content"] == [{"type": "text", "text": "yo"}]
    spoken = Item(id="i", role="assistant", content=(ContentPart(type="output_audio", transcript="ok"),))
    assert render_item(spoken, beta=True)["content"] == [{"type": "audio", "transcript": "ok"}]
    assert render_item(spoken, beta=False) == {
        "id": "i",
        "object": "realtime.item",
        "type": "message",
        "status": "completed",
        "role": "assistant",
        "content": [{"type": "output_audio", "transcript": "ok"}],
    }


@pytest.mark.parametrize(
    ("item", "code"),
    [
        ({"type": "function_call", "name": "f"}, "unsupported_parameter"),
        ({"type": "message", "content": []}, "missing_required_parameter"),
        ({"role": "robot", "content": []}, "invalid_value"),
        ({"role": "user", "content": [{"type": "output_text", "text": "x"}]}, "invalid_value"),
        ({"role": "user", "content": [{"type": "input_audio", "audio": "AAAA"}]}, "unsupported_parameter"),
        ({"role": "user", "content": "hi"}, "invalid_type"),
        ({"role": "user", "content": [], "extra": 1}, "unknown_parameter"),
    ],
)
def test_invalid_items(item: dict[str, Any], code: str) -> None:
    with pytest.raises(ClientError) as info:
        parse_item(item, "item_x")
    assert info.value.code == code


# ---------------------------------------------------------------------- responses and dialect
def test_status_details_and_usage() -> None:
    done = ResponseInfo(id="r", status=ResponseStatus.COMPLETED, usage=Usage(input_chunks=7))
    assert status_details(done) is None
    cancelled = ResponseInfo(id="r", status=ResponseStatus.CANCELLED, reason="turn_detected")
    assert status_details(cancelled) == {"type": "cancelled", "reason": "turn_detected"}
    failed = ResponseInfo(id="r", status=ResponseStatus.FAILED, error_code="stage_unavailable", error_message="down")
    assert status_details(failed) == {
        "type": "failed",
        "error": {"type": "server_error", "code": "stage_unavailable", "message": "down"},
    }
    u = usage(done, "three short words", audio_chunks=5)
    assert u is not None and u["input_tokens"] == 7 and u["output_tokens"] == 8 and u["total_tokens"] == 15
    assert usage(ResponseInfo(id="r", status=ResponseStatus.IN_PROGRESS), "", 0) is None
    st, cfg = start()
    text = ResponseInfo(id="r", status=ResponseStatus.COMPLETED, modalities=("text",), conversation="none")
    ga = render_response(text, st, cfg, beta=False, conversation_id="conv_1")
    assert ga["output_modalities"] == ["text"] and ga["conversation_id"] is None and ga["max_output_tokens"] == "inf"
    beta = render_response(done, st, cfg, beta=True, conversation_id="conv_1")
    assert beta["modalities"] == ["audio", "text"] and beta["output_audio_format"] == "pcm16"
    assert beta["conversation_id"] == "conv_1"


def test_dialect_from_header_or_subprotocol() -> None:
    assert is_beta(Headers({"OpenAI-Beta": "realtime=v1"}))
    assert is_beta(Headers({"openai-beta": "assistants=v2, realtime=v1"}))
    assert is_beta(Headers({"Sec-WebSocket-Protocol": "realtime, openai-beta.realtime-v1"}))
    assert not is_beta(Headers({"Sec-WebSocket-Protocol": "realtime"}))
    assert not is_beta(Headers({"Authorization": "Bearer x"}))


# ---------------------------------------------------------------------- any JSON: a clear error or a valid result
_KEYS = st.sampled_from(
    [
        "type",
        "audio",
        "input",
        "output",
        "format",
        "rate",
        "turn_detection",
        "threshold",
        "silence_duration_ms",
        "eagerness",
        "voice",
        "modalities",
        "output_modalities",
        "instructions",
        "max_output_tokens",
        "tools",
        "role",
        "content",
        "text",
        "metadata",
        "conversation",
        "idle_timeout_ms",
        "speed",
        "bogus",
    ]
)
_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(-5, 70_000)
    | st.floats(-3, 3)
    | st.sampled_from(
        [
            "realtime",
            "server_vad",
            "semantic_vad",
            "duplex",
            "audio/pcm",
            "audio/pcmu",
            "pcm16",
            "high",
            "audio",
            "text",
            "user",
            "assistant",
            "input_text",
            "none",
            "inf",
            "",
        ]
    )
)
_JSON = st.recursive(
    _LEAVES, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_KEYS, inner, max_size=4), max_leaves=12
)


@settings(max_examples=400, deadline=None)
@given(_JSON)
def test_any_json_gives_a_client_error_or_a_valid_result(value: Any) -> None:
    st_, cfg = start()
    for call in (
        lambda: apply_update(st_, cfg, value),
        lambda: response_options(value, st_),
        lambda: parse_item(value, "item_h"),
    ):
        try:
            out = call()
        except ClientError as e:
            assert e.code and str(e)
            continue
        if isinstance(out, tuple):  # a session update that validated renders in both dialects
            render_session("s", out[0], out[1], beta=False)
            render_session("s", out[0], out[1], beta=True)


# ---------------------------------------------------------------------- null: "not set"
def test_null_session_fields_leave_the_session_as_it_is() -> None:
    st, cfg = apply_update(*start(), {"instructions": "Be brief.", "voice": "cedar", "output_modalities": ["text"]})
    nulls = {
        "type": None,
        "model": None,
        "instructions": None,
        "output_modalities": None,
        "voice": None,
        "temperature": None,
        "speed": None,
        "tool_choice": None,
        "input_audio_format": None,
        "audio": {"input": {"format": None}, "output": {"voice": None, "speed": None, "format": None}},
    }
    st2, cfg2 = apply_update(st, cfg, nulls)
    assert (st2, cfg2) == (st, cfg)
    # Where null means something, it still does: no turn detection is manual turns.
    _, cfg3 = apply_update(st, cfg, {"audio": {"input": {"turn_detection": None}}})
    assert cfg3.turn_mode == TurnMode.MANUAL
    # A null inside turn_detection is not set either (idle_timeout_ms: null stays "off").
    _, cfg4 = apply_update(
        st, cfg, {"turn_detection": {"type": "server_vad", "threshold": None, "idle_timeout_ms": None}}
    )
    assert cfg4.vad.threshold == cfg.vad.threshold and cfg4.vad.idle_timeout_ms == 0


def test_null_response_options_are_the_session_defaults() -> None:
    st, _ = start()
    opts = response_options(
        {
            "instructions": None,  # LiveKit's generate_reply()
            "output_modalities": None,
            "modalities": None,
            "voice": None,
            "conversation": None,
            "metadata": None,
            "tool_choice": None,
            "temperature": None,
            "max_output_tokens": None,
            "output_audio_format": None,
            "audio": {"output": {"voice": None, "format": None}},
        },
        st,
    )
    assert opts == response_options({}, st) == response_options(None, st)


def test_null_item_fields_are_not_set() -> None:
    item = parse_item({"type": None, "id": None, "status": None, "role": "user", "content": None}, "item_new")
    assert item.id == "item_new" and item.type == "message" and item.status == "completed" and item.content == ()
