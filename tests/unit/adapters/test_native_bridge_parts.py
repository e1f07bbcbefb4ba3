"""Pure parts of the native protocol and the demo bridge (the e2e suites cover the wiring)."""

from __future__ import annotations

import numpy as np
import pytest

from duplexd.adapters.bridge import _Turn
from duplexd.adapters.native import full, pack_audio_out, translate_realtime, turn_detection_of, unpack_audio_out
from duplexd.adapters.protocol import ClientError, merge_config
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
    ],
)
def test_realtime_spellings_map_onto_session_fields(patch: dict, mode: str, check: dict) -> None:
    cfg = merge_config(SessionConfig(), translate_realtime(patch))
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
    for patch, param in [
        ({"turn_detection": "server_vad"}, "turn_detection"),
        ({"turn_detection": {"type": "semantic_vad"}}, "turn_detection.type"),
        ({"turn_detection": {"type": "server_vad", "eagerness": "high"}}, "turn_detection.eagerness"),
        ({"audio": {"input": {"format": {"type": "audio/mp3"}}}}, "audio.input.format.type"),
        ({"audio": []}, "audio"),
    ]:
        with pytest.raises(ClientError) as exc:
            translate_realtime(patch)
        assert exc.value.param == param


def test_turn_take_splits_chunks_and_keeps_words_with_their_start() -> None:
    t = _Turn("resp_1", 0)
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
