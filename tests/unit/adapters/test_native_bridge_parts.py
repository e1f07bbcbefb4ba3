"""Pure parts of the native protocol and the demo bridge (the e2e suites cover the wiring)."""

from __future__ import annotations

import numpy as np
import pytest

from duplexd.adapters.audio import AudioFormat
from duplexd.adapters.bridge_results import AssistantTurn
from duplexd.adapters.native import apply_native_update, full, pack_audio_out, turn_detection_of, unpack_audio_out
from duplexd.adapters.validation import ClientError
from duplexd.bus.messages import PlaybackCursor, SessionConfig, SessionSnapshot, TurnMode, TurnState


def test_audio_frame_round_trip_and_layout() -> None:
    header = {"response_id": "resp_1", "item_id": "item_1", "epoch": 3, "seq": 7, "end_of_turn": True, "text": "hé"}
    pcm = np.arange(-5, 5, dtype="<i2").tobytes()
    frame = pack_audio_out(header, pcm)
    assert frame[0] == 0x81 and int.from_bytes(frame[1:3], "big") == len(frame) - 3 - len(pcm)
    assert unpack_audio_out(frame) == (header, pcm)
    with pytest.raises(ValueError, match="not an audio-out frame"):
        unpack_audio_out(b"\x01\x00\x02{}")


def test_full_keeps_defaults_that_the_wire_omits() -> None:
    snap = SessionSnapshot("s", 0, TurnState.IDLE, TurnMode.DUPLEX)
    out = full(snap)
    assert out["epoch"] == 0 and out["turn_state"] == "idle" and out["turn_mode"] == "duplex"
    assert (
        out["cursor"] == full(PlaybackCursor()) == {"generated_ms": 0, "sent_ms": 0, "played_ms": 0, "committed_ms": 0}
    )
    assert out["history"] == [] and out["response"] is None


@pytest.mark.parametrize(
    ("patch", "mode", "check"),
    [
        ({"turn_detection": None}, "manual", {}),
        ({"turn_detection": {"type": "server_vad", "threshold": 0.7}}, "server_vad", {"vad.threshold": 0.7}),
        ({"turn_detection": {"type": "duplex", "force_listen_count": 0}}, "duplex", {"force_listen_count": 0}),
        (
            {"audio": {"input": {"turn_detection": {"type": "duplex"}}, "output": {"voice": "joe"}}},
            "duplex",
            {"voice": "joe"},
        ),
        ({"modalities": ["text"]}, "server_vad", {"output_modalities": ("text",)}),
        (
            {"max_response_output_tokens": "inf", "tools": [], "input_audio_transcription": {"model": "x"}},
            "server_vad",
            {"max_output_tokens": 0},
        ),
        ({"max_output_tokens": 40}, "server_vad", {"max_output_tokens": 40}),
        ({"turn_mode": "duplex", "overlap": {"short_ack_ms": 900}}, "duplex", {"overlap.short_ack_ms": 900}),
        (
            {"turn_detection": {"type": "semantic_vad", "eagerness": "high"}},
            "server_vad",
            {"vad.silence_duration_ms": 400},
        ),
        ({"instructions": None, "voice": None, "vad": None}, "server_vad", {"instructions": ""}),
    ],
)
def test_realtime_spellings_map_onto_session_fields(patch: dict, mode: str, check: dict) -> None:
    cfg, fmt, _ = apply_native_update(SessionConfig(), AudioFormat(), patch)
    assert cfg.turn_mode.value == mode
    for path, want in check.items():
        obj = cfg
        for part in path.split("."):
            obj = getattr(obj, part)
        assert obj == want
    # The view clients see round-trips to the same mode.
    td = turn_detection_of(cfg)
    assert (td is None) == (mode == "manual") and (td is None or td["type"] == mode)


def test_realtime_spellings_reject_what_they_cannot_mean() -> None:
    for patch, code, param in [
        ({"turn_detection": "server_vad"}, "invalid_type", "session.turn_detection"),
        ({"turn_detection": {"type": "psychic"}}, "invalid_value", "session.turn_detection.type"),
        ({"turn_detection": {"type": "server_vad", "eagerness": "high"}}, "unknown_parameter", None),
        ({"audio": {"input": {"format": {"type": "audio/mp3"}}}}, "invalid_value", "session.audio.input.format.type"),
        ({"audio": []}, "invalid_type", "session.audio"),
        ({"force_listen_count": "3"}, "invalid_type", "session.force_listen_count"),
        ({"overlap": {"short_ack_ms": "soon"}}, "invalid_type", "session.overlap.short_ack_ms"),
        ({"overlap": {"colour": 1}}, "unknown_parameter", "session.overlap.colour"),
        ({"turn_mode": "telepathy"}, "invalid_value", "session.turn_mode"),
        ({"input_audio_format": {"encoding": "mp3"}}, "invalid_value", "session.input_audio_format.encoding"),
    ]:
        with pytest.raises(ClientError) as exc:
            apply_native_update(SessionConfig(), AudioFormat(), patch)
        assert exc.value.code == code, (patch, exc.value.code, str(exc.value))
        if param is not None:
            assert exc.value.param == param, (patch, exc.value.param)


def test_native_input_formats_and_a_voice_change_keeps_the_format() -> None:
    mulaw = AudioFormat("pcmu", 8000)
    _, fmt, _ = apply_native_update(SessionConfig(), AudioFormat(), {"input_audio_format": "g711_ulaw"})
    assert fmt == mulaw
    _, fmt, _ = apply_native_update(SessionConfig(), mulaw, {"audio": {"output": {"voice": "joe"}}})
    assert fmt == mulaw
    f32 = {"input_audio_format": {"encoding": "float32", "rate": 16000}, "audio_transport": "json"}
    _, fmt, transport = apply_native_update(SessionConfig(), mulaw, f32)
    assert fmt == AudioFormat("float32", 16000) and transport == "json"
    _, fmt, _ = apply_native_update(SessionConfig(), mulaw, {"audio": {"input": {"format": {"type": "audio/pcm"}}}})
    assert fmt == AudioFormat("pcm16", 24000)


def test_turn_take_splits_chunks_and_keeps_words_with_their_start() -> None:
    t = AssistantTurn("resp_1", 0)
    t.add(np.ones(600, np.float32), " one")
    t.add(np.full(600, 2, np.float32), " two")
    pcm, text = t.take(1000)
    assert pcm.size == 1000 and text == " one two" and t.available == 200 and t.delivered == 1000
    assert pcm[599] == 1 and pcm[600] == 2
    pcm, text = t.take(1000)
    assert pcm.size == 200 and text == "" and t.available == 0  # the rest of "two" carries no new words
    t.drop()
    t.add(np.ones(10, np.float32), "late")  # audio of a cut turn is never queued again
    assert t.available == 0 and t.cancelled and t.ended
