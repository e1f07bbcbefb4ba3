"""``/v1/duplex`` end to end: a plain ``websockets`` client against the real server processes.

The scripted engine marks every 40 ms output chunk with its response's tag and its
sequence number (``decode_chunk``), so these tests can say exactly which response every
audio byte the client received belongs to: "zero stale frames" is checked on the waveform.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import numpy as np
import pytest

from duplexd.actors.engines.scripted import decode_chunk, response_tag
from tests.e2e.conftest import NATIVE_REPLY_MS
from tests.harness import NativeClient, ServerProcess, silence, tone

pytestmark = pytest.mark.timeout(60)

FRAMES = NATIVE_REPLY_MS // 40  # 40 ms output chunks per scripted reply
REPLY_1 = "This is scripted reply number 1, spoken as a steady tone."


async def _connect(server: ServerProcess, session: dict[str, Any]) -> NativeClient:
    c = await NativeClient.connect(server)
    await c.send({"type": "session.update", "session": session})
    await c.wait_for("session.updated")
    return c


def _after(c: NativeClient, event: dict[str, Any]) -> int:
    return c.events.index(event)


async def test_session_created_shows_every_setting_and_knob(native_server: ServerProcess) -> None:
    c = await NativeClient.connect(native_server)
    s = c.of("session.created")[0]["session"]
    # Defaults are shown, not omitted: a client never has to know them.
    assert s["turn_mode"] == "server_vad" and s["turn_detection"]["type"] == "server_vad"
    assert s["epoch"] == 0 and s["id"].startswith("sess_")
    assert s["overlap"] == {"short_ack_ms": 450, "silence_rms": 0.003}
    assert s["vad"]["silence_duration_ms"] == 500 and s["vad"]["interrupt_response"] is True
    assert s["commit_policy"] == "commit_all_on_done"
    assert s["force_listen_count"] == 3 and s["listen_prob_scale"] == 1.0
    assert s["input_audio_format"] == {"encoding": "pcm16", "rate": 24000}
    assert s["output_audio_format"] == {"encoding": "pcm16", "rate": 24000}
    assert c.of("session.created")[0]["engine"]["name"] == "scripted"
    await c.close()


async def test_every_turn_mode_and_overlap_knob_is_settable(native_server: ServerProcess) -> None:
    c = await NativeClient.connect(native_server)

    async def update(session: dict[str, Any]) -> dict[str, Any]:
        n = len(c.events)
        await c.send({"type": "session.update", "session": session})
        ev = await c.wait_for(lambda e: e["type"] in ("session.updated", "error"), start=n)
        assert ev["type"] == "session.updated", ev
        return ev["session"]

    s = await update(
        {
            "turn_mode": "manual",
            "overlap": {"short_ack_ms": 300, "silence_rms": 0.01},
            "vad": {"threshold": 0.6, "silence_duration_ms": 250, "prefix_padding_ms": 100, "idle_timeout_ms": 5000},
            "commit_policy": "ack_only",
            "force_listen_count": 5,
            "listen_prob_scale": 1.5,
            "continuation_cap_ms": 4000,
            "instructions": "Be brief.",
        }
    )
    assert s["turn_mode"] == "manual" and s["turn_detection"] is None
    assert s["overlap"] == {"short_ack_ms": 300, "silence_rms": 0.01}
    assert s["vad"]["threshold"] == 0.6 and s["vad"]["silence_duration_ms"] == 250
    assert s["vad"]["idle_timeout_ms"] == 5000 and s["vad"]["create_response"] is True  # merged, not replaced
    assert s["commit_policy"] == "ack_only" and s["force_listen_count"] == 5 and s["listen_prob_scale"] == 1.5
    assert s["continuation_cap_ms"] == 4000 and s["instructions"] == "Be brief."
    # Realtime spellings: turn_detection (beta, flat) and audio.input.turn_detection (GA).
    s = await update({"turn_detection": {"type": "server_vad", "silence_duration_ms": 400, "create_response": False}})
    assert s["turn_mode"] == "server_vad" and s["vad"]["silence_duration_ms"] == 400
    assert s["vad"]["create_response"] is False and s["vad"]["threshold"] == 0.6
    s = await update({"turn_detection": {"type": "duplex", "force_listen_count": 2, "listen_prob_scale": 0.5}})
    assert s["turn_mode"] == "duplex" and s["force_listen_count"] == 2 and s["listen_prob_scale"] == 0.5
    assert s["turn_detection"] == {"type": "duplex", "force_listen_count": 2, "listen_prob_scale": 0.5}
    s = await update({"audio": {"input": {"turn_detection": None, "format": {"type": "audio/pcmu"}}}})
    assert s["turn_mode"] == "manual" and s["input_audio_format"] == {"encoding": "pcmu", "rate": 8000}
    s = await update({"input_audio_format": "pcm16", "modalities": ["text"]})
    assert s["input_audio_format"] == {"encoding": "pcm16", "rate": 24000} and s["output_modalities"] == ["text"]
    snap_n = len(c.events)
    await c.send({"type": "session.get", "event_id": "evt_get"})
    snap = await c.wait_for("session.snapshot", start=snap_n)
    assert snap["snapshot"]["turn_mode"] == "manual" and snap["client_event_id"] == "evt_get"
    # It names the processes serving the session (the ones /health lists).
    _, health = await asyncio.to_thread(native_server.health)
    pids = {r["role"]: r["identity"] for r in health["roles"]}
    assert (snap["snapshot"]["stage0"], snap["snapshot"]["stage1"]) == (pids["stage0"], pids["stage1"])
    assert snap["snapshot"]["barge_ins"] == 0 and snap["snapshot"]["chunks_lost"] == 0

    # Bad settings are rejected as a whole: an error event, nothing changed, session alive.
    for bad, param in [
        ({"overlap": {"short_ack_ms": "long"}}, "session.overlap.short_ack_ms"),
        ({"overlap": {"no_such_knob": 1}}, "session.overlap.no_such_knob"),
        ({"turn_detection": {"type": "psychic"}}, "session.turn_detection.type"),
        ({"turn_detection": {"type": "server_vad", "bogus": 1}}, "session.turn_detection.bogus"),
        ({"turn_mode": "full_auto", "commit_policy": "ack_only"}, "session.turn_mode"),
        ({"input_audio_format": {"encoding": "mp3"}}, "session.input_audio_format.encoding"),
        ({"audio_transport": "carrier_pigeon"}, "session.audio_transport"),
    ]:
        n = len(c.events)
        await c.send({"type": "session.update", "session": bad, "event_id": "evt_bad"})
        err = await c.wait_for(lambda e: e["type"] in ("session.updated", "error"), start=n)
        assert err["type"] == "error", (bad, err)
        assert err["error"]["param"] == param and err["error"]["event_id"] == "evt_bad", err
    s = await update({})
    assert s["turn_mode"] == "manual" and s["commit_policy"] == "ack_only"
    assert s["overlap"]["short_ack_ms"] == 300 and s["audio_transport"] == "binary"
    await c.close()


async def test_full_turn_server_vad_decisions_audio_tags_and_done(native_server: ServerProcess) -> None:
    c = await _connect(native_server, {"turn_detection": {"type": "server_vad", "silence_duration_ms": 300}})
    await c.stream(np.concatenate([tone(800), silence(600)]))
    done = await c.wait_for("response.done")
    created = c.of("response.created")[0]
    rid, item_id = created["response"]["id"], created["item"]["id"]
    epoch = created["epoch"]
    assert done["response"]["id"] == rid and done["response"]["status"] == "completed"
    assert done["transcript"] == REPLY_1
    order = [e["type"] for e in c.events if not e["type"].startswith(("audio", "response.listen", "response.speak"))]
    expected = [
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
        "response.created",
        "response.done",
    ]
    assert [t for t in order if t in expected] == expected
    # One decision per engine chunk, in order, none repeated; the utterance is listened to.
    decisions = [e for e in c.events if e["type"] in ("response.listen", "response.speak")]
    seqs = [d["chunk_seq"] for d in decisions]
    assert seqs == sorted(set(seqs)) and seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    speaks = c.of("response.speak")
    assert len(speaks) == 1 and speaks[0]["response_id"] == rid and speaks[0]["end_of_turn"]
    assert speaks[0]["text"] == REPLY_1 and 0 <= speaks[0]["listen_prob"] <= 1
    assert all(d["epoch"] == epoch for d in decisions)
    heard = await c.wait_for("conversation.item.input_audio_transcription.completed")
    assert heard["transcript"].startswith("scripted user turn")
    # Every frame tagged: response, item, epoch, seq, start_ms; end_of_turn on the last only.
    frames = [f for f in c.audio if f.header["response_id"] == rid]
    assert len(frames) == FRAMES
    assert all(f.header["item_id"] == item_id and f.header["epoch"] == epoch for f in frames)
    assert [f.header["end_of_turn"] for f in frames] == [False] * (FRAMES - 1) + [True]
    assert [f.header["start_ms"] for f in frames] == [40 * i for i in range(FRAMES)]
    assert [f.marker for f in frames] == [(response_tag(rid), i, FRAMES) for i in range(FRAMES)]
    assert "".join(f.header["text"] for f in frames).strip() == REPLY_1
    assert _after(c, done) > max(f.received_after for f in frames)
    await c.close()


async def test_barge_in_flushes_with_zero_stale_frames(native_server: ServerProcess) -> None:
    c = await _connect(
        native_server,
        {
            "turn_detection": {"type": "server_vad", "silence_duration_ms": 300},
            "overlap": {"short_ack_ms": 200},
        },
    )
    await c.stream(np.concatenate([tone(600), silence(400)]))
    created = await c.wait_for("response.created")
    rid = created["response"]["id"]
    await c.wait_for(lambda e: e["type"] == "audio" and e["response_id"] == rid)
    # The user talks over the reply, in real time: sustained speech barges in.
    talk = asyncio.get_running_loop().create_task(c.stream(tone(700, freq=330), realtime=1.0))
    adv = await c.wait_for("epoch.advanced")
    done = await c.wait_for("response.done")
    await talk
    assert adv["epoch"] == created["epoch"] + 1 and adv["reason"] == "turn_detected"
    assert done["response"]["id"] == rid and done["response"]["status"] == "cancelled"
    assert done["response"]["reason"] == "turn_detected"
    assert _after(c, adv) < _after(c, done)
    # The overlap became the next user turn: it is answered in full, in the new epoch.
    await c.stream(silence(500))
    created2 = await c.wait_for(lambda e: e["type"] == "response.created" and e["response"]["id"] != rid)
    rid2 = created2["response"]["id"]
    done2 = await c.wait_for(lambda e: e["type"] == "response.done" and e["response"]["id"] == rid2)
    assert done2["response"]["status"] == "completed" and created2["epoch"] == adv["epoch"]
    await asyncio.sleep(0.8)  # until the client has played it all: new speech is a new turn

    tag = response_tag(rid)
    cut_at = _after(c, adv)
    stale = [
        f for f in c.audio if f.received_after > cut_at and (f.header["epoch"] < adv["epoch"] or f.marker[0] == tag)
    ]
    assert stale == []
    before = [f.marker[1] for f in c.audio if f.marker[0] == tag]
    assert 0 < len(before) < FRAMES and before == list(range(len(before)))  # cut short, nothing missing
    second = [f.marker for f in c.audio if f.header["response_id"] == rid2]
    assert second == [(response_tag(rid2), i, FRAMES) for i in range(FRAMES)]

    # The force flag (binary kind 0x02) interrupts at once, whatever the overlap knobs say.
    await c.send({"type": "session.update", "session": {"overlap": {"short_ack_ms": 5000}}})
    await c.stream(np.concatenate([tone(600), silence(400)]))
    created3 = await c.wait_for(lambda e: e["type"] == "response.created" and e["response"]["id"] not in (rid, rid2))
    rid3 = created3["response"]["id"]
    await c.wait_for(lambda e: e["type"] == "audio" and e["response_id"] == rid3)
    await c.ws.send(b"\x02")  # a bare force flag, no audio: what the browser's Interrupt sends
    adv3 = await c.wait_for(lambda e: e["type"] == "epoch.advanced" and e["epoch"] > adv["epoch"])
    done3 = await c.wait_for(lambda e: e["type"] == "response.done" and e["response"]["id"] == rid3)
    assert done3["response"]["status"] == "cancelled" and _after(c, adv3) < _after(c, done3)
    # A round trip through the session host: whatever it forwarded before has arrived, and
    # audio of the cancelled response reaching it later is fenced there.
    n = len(c.events)
    await c.send({"type": "session.get"})
    await c.wait_for("session.snapshot", start=n)
    tag3 = response_tag(rid3)
    late = [f for f in c.audio if f.received_after > _after(c, adv3) and f.marker[0] == tag3]
    assert late == []
    got3 = [f.marker[1] for f in c.audio if f.marker[0] == tag3]
    assert 0 < len(got3) < FRAMES and got3 == list(range(len(got3)))
    await c.close()


async def test_playback_ack_commits_only_what_was_played(native_server: ServerProcess) -> None:
    c = await _connect(native_server, {"turn_mode": "manual", "commit_policy": "ack_only"})
    await c.stream(tone(500))
    await c.send({"type": "input_audio_buffer.commit"})
    await c.send({"type": "response.create"})
    created = await c.wait_for("response.created")
    rid, item_id = created["response"]["id"], created["item"]["id"]
    await c.wait_for(lambda e: e["type"] == "audio" and e["response_id"] == rid and e["start_ms"] >= 400)
    # The client has played 400 ms so far: it says so while the reply is still coming.
    await c.send({"type": "playback.ack", "response_id": rid, "item_id": item_id, "played_ms": 400, "event_id": "a1"})
    ack1 = await c.wait_for("playback.committed")
    assert ack1["played_ms"] == 400 and ack1["client_event_id"] == "a1"
    # The reply is not committed yet (it may be listed as in progress, as Realtime does).
    assert [i["role"] for i in ack1["history"] if i["status"] != "in_progress"] == ["user"]
    done = await c.wait_for("response.done")
    assert done["response"]["status"] == "completed" and done["transcript"] == REPLY_1
    (out,) = done["response"]["output"]
    assert out["audio_ms"] == 400  # ack_only: the item holds what was played at the end
    # Later it reports 900 ms played: history grows to exactly that, with the words heard.
    n = len(c.events)
    await c.send({"type": "playback.ack", "response_id": rid, "item_id": item_id, "played_ms": 900})
    ack2 = await c.wait_for("playback.committed", start=n)
    assistant = [i for i in ack2["history"] if i["role"] == "assistant"]
    assert len(assistant) == 1 and assistant[0]["id"] == item_id and assistant[0]["audio_ms"] == 900
    heard = assistant[0]["content"][0]["transcript"]
    assert heard and REPLY_1.startswith(heard) and len(heard) < len(REPLY_1)
    # An ack never shrinks history; one beyond what was generated is clamped to it.
    n = len(c.events)
    await c.send({"type": "playback.ack", "response_id": rid, "item_id": item_id, "played_ms": 100})
    assert (await c.wait_for("playback.committed", start=n))["played_ms"] == 900
    n = len(c.events)
    await c.send({"type": "session.get"})
    snap = (await c.wait_for("session.snapshot", start=n))["snapshot"]
    assert snap["epoch"] == created["epoch"] and snap["turn_mode"] == "manual"
    assert snap["turn_state"] in ("idle", "assistant_playing")
    assert snap["cursor"] == {
        "generated_ms": NATIVE_REPLY_MS,
        "sent_ms": NATIVE_REPLY_MS,
        "played_ms": 900,
        "committed_ms": 900,
    }
    assert [i["audio_ms"] for i in snap["history"] if i["role"] == "assistant"] == [900]
    # Bad acks: an error each, the session keeps working.
    for bad, code in [
        ({"response_id": rid, "item_id": "item_nope", "played_ms": 10}, "item_not_found"),
        ({"response_id": rid, "item_id": item_id, "played_ms": -5}, "invalid_value"),
        ({"response_id": rid, "item_id": item_id}, "missing_required_parameter"),
    ]:
        n = len(c.events)
        await c.send({"type": "playback.ack", **bad})
        assert (await c.wait_for("error", start=n))["error"]["code"] == code
    n = len(c.events)
    await c.stream(tone(300))
    await c.send({"type": "input_audio_buffer.commit"})
    await c.send({"type": "response.create"})
    assert (await c.wait_for("response.done", start=n))["response"]["status"] == "completed"
    await c.close()


async def test_commit_all_on_done_commits_the_whole_reply(native_server: ServerProcess) -> None:
    c = await _connect(native_server, {"turn_mode": "manual"})
    await c.stream(tone(300))
    await c.send({"type": "input_audio_buffer.commit"})
    await c.send({"type": "response.create"})
    done = await c.wait_for("response.done")
    item_id = done["response"]["output"][0]["id"]
    await c.send({"type": "playback.ack", "response_id": done["response"]["id"], "item_id": item_id, "played_ms": 300})
    ack = await c.wait_for("playback.committed")
    assistant = [i for i in ack["history"] if i["role"] == "assistant"]
    assert assistant[0]["audio_ms"] == NATIVE_REPLY_MS and assistant[0]["content"][0]["transcript"] == REPLY_1
    await c.close()


async def test_duplex_mode_decides_every_chunk_and_speaks(native_server: ServerProcess) -> None:
    c = await _connect(native_server, {"turn_detection": {"type": "duplex", "force_listen_count": 2}})
    # 300 ms silence (forced listens), ~500 ms speech, then silence: the model takes the turn.
    # (The input resampler shifts audio ~1 ms later: the tone ends 10 ms short of a chunk
    # boundary so no chunk holds a sliver of it.)
    await c.stream(np.concatenate([silence(300), tone(490), silence(410)]))
    done = await c.wait_for("response.done")
    assert done["response"]["status"] == "completed"
    decisions = [e for e in c.events if e["type"] in ("response.listen", "response.speak")]
    # 1.2 s of input = 12 engine chunks of 100 ms: one decision each, in order.
    assert [d["chunk_seq"] for d in decisions] == list(range(len(decisions))) and len(decisions) >= 11
    kinds = [d["type"].removeprefix("response.") for d in decisions]
    assert kinds == ["listen"] * 8 + ["speak"] + ["listen"] * (len(decisions) - 9)
    speak = c.of("response.speak")[0]
    assert speak["listen_prob"] < 0.5 and speak["text"] == REPLY_1
    # The speak decision opens the response (the model took the turn on its own).
    after_speak = [e for e in c.events[_after(c, speak) + 1 :] if e["type"] not in ("audio", "response.listen")]
    assert after_speak[0]["type"] == "response.created"
    assert after_speak[0]["response"]["id"] == done["response"]["id"]
    heard = await c.wait_for("conversation.item.input_audio_transcription.completed")
    assert heard["transcript"] == "scripted user turn, 500 ms of speech"
    assert len([f for f in c.audio if f.header["response_id"] == done["response"]["id"]]) == FRAMES
    await c.close()


async def test_json_audio_transport_for_clients_without_binary_frames(native_server: ServerProcess) -> None:
    c = await _connect(native_server, {"turn_mode": "manual", "audio_transport": "json"})
    await c.append_b64(tone(300))
    await c.send({"type": "input_audio_buffer.commit"})
    await c.send({"type": "response.create"})
    done = await c.wait_for("response.done")
    rid = done["response"]["id"]
    deltas = c.of("response.output_audio.delta")
    assert c.audio == [] and len(deltas) == FRAMES
    assert all(d["response_id"] == rid and d["epoch"] == done["epoch"] for d in deltas)
    assert [d["end_of_turn"] for d in deltas][-2:] == [False, True]
    markers = [decode_chunk(np.frombuffer(base64.b64decode(d["delta"]), dtype="<i2")) for d in deltas]
    assert markers == [(response_tag(rid), i, FRAMES) for i in range(FRAMES)]
    await c.close()
