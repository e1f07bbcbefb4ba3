"""Session semantics over the real server (supervisor + four processes), native protocol.

Barge-in and backchannels use the real Silero VAD on real speech (tests/fixtures/speech);
the scripted engine replies with 3 s of marked tone, so every audio byte a client gets can
be traced to its response and chunk (``decode_chunk``): stale audio would be visible.
"""

from __future__ import annotations

import asyncio
import re
import urllib.request
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from duplexd.actors.engines.scripted import response_tag
from tests.harness import NativeClient, ServerProcess, silence, tone

pytestmark = pytest.mark.timeout(90)

SPEECH = Path(__file__).parents[1] / "fixtures" / "speech"
REPLY_CHUNKS = 75  # 3000 ms of 40 ms chunks


def wav(name: str) -> np.ndarray:
    """24 kHz mono float32 real speech."""
    with wave.open(str(SPEECH / f"{name}.wav")) as w:
        return np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    s = ServerProcess(
        sections={
            "host": {"vad": "silero"},
            # 10 ms per thinker step: stage0 answers lag a cancel, so stale results are certain.
            "engines.scripted": {"reply_ms": 3000, "out_chunk_ms": 40, "think_step_cost_ms": 10},
            "stage1": {"max_lead_ms": 500},
        },
        engine="scripted",
    )
    with s:
        yield s


async def session(server: ServerProcess, **patch: Any) -> NativeClient:
    c = await NativeClient.connect(server)
    if patch:
        await c.send({"type": "session.update", "session": patch})
        await c.wait_for("session.updated")
    return c


def is_done(rid: str) -> Any:
    return lambda e: e["type"] == "response.done" and e["response"]["id"] == rid


def audio_of(c: NativeClient, rid: str) -> list[Any]:
    """Frames that carry ``rid``'s marker (the waveform says whose audio it is)."""
    tag = response_tag(rid)
    return [f for f in c.audio if f.marker is not None and f.marker[0] == tag]


async def snapshot(c: NativeClient) -> dict[str, Any]:
    start = len(c.events)
    await c.send({"type": "session.get"})
    return (await c.wait_for("session.snapshot", start=start))["snapshot"]


async def user_turn(c: NativeClient, name: str = "hello") -> str:
    """Real speech at real-time pace, then silence: server VAD commits and a reply starts."""
    start = len(c.events)
    await c.stream(np.concatenate([silence(300), wav(name), silence(800)]), realtime=1.0)
    created = await c.wait_for("response.created", within_s=10, start=start)
    rid = created["response"]["id"]
    await c.wait_for(lambda e: e["type"] == "audio" and e["response_id"] == rid, start=start)
    return rid


async def test_barge_in_with_real_speech_cancels_and_no_stale_audio_follows(server: ServerProcess) -> None:
    c = await session(server, overlap={"short_ack_ms": 400})
    rid = await user_turn(c, "hello")
    mark = len(c.events)
    # The user talks over the reply (1.5 s of speech): sustained speech barges in.
    talk = asyncio.create_task(c.stream(np.concatenate([wav("weather"), silence(900)]), realtime=1.0))
    done = await c.wait_for(is_done(rid), within_s=10, start=mark)
    assert done["response"]["status"] == "cancelled"
    assert done["response"]["reason"] == "turn_detected"
    done_at = c.events.index(done)
    after = c.events[mark:done_at]
    # Announced (speech_started) once past short_ack, and cancelled in the same step: no audio
    # of the reply reaches the client after speech_started (the interruption clients act on).
    started = [e for e in after if e["type"] == "input_audio_buffer.speech_started"]
    assert len(started) == 1
    started_at = c.events.index(started[0])
    assert [e["type"] for e in c.events[started_at:done_at] if e["type"] == "audio"] == []
    adv = [e for e in after if e["type"] == "epoch.advanced"]
    assert [(e["epoch"], e["reason"]) for e in adv] == [(1, "turn_detected")]
    assert done["epoch"] == 1
    await talk
    # The barge-in speech is the user's next turn: committed and answered, at the new epoch.
    created2 = await c.wait_for(
        lambda e: e["type"] == "response.created" and e["response"]["id"] != rid, within_s=10, start=done_at
    )
    rid2 = created2["response"]["id"]
    done2 = await c.wait_for(is_done(rid2), within_s=10, start=done_at)
    assert done2["response"]["status"] == "completed" and created2["epoch"] == 1
    # Zero stale audio: not one byte of the cancelled reply after its response.done.
    stale = [f for f in c.audio if f.received_after > done_at and f.header["response_id"] == rid]
    assert stale == [] and audio_of(c, rid)
    assert all(f.received_after < started_at for f in audio_of(c, rid))
    first = [f.marker[1] for f in audio_of(c, rid)]
    assert first == list(range(len(first))) and 0 < len(first) < REPLY_CHUNKS  # cut short, nothing missing
    assert {f.header["epoch"] for f in audio_of(c, rid)} == {0}
    second = audio_of(c, rid2)
    assert [f.marker[1] for f in second] == list(range(REPLY_CHUNKS)) and {f.header["epoch"] for f in second} == {1}
    snap = await snapshot(c)
    assert snap["epoch"] == 1 and snap["responses"] == 2
    roles = [(it["role"], it.get("status")) for it in snap["history"]]
    assert roles == [
        ("user", "completed"),
        ("assistant", "incomplete"),
        ("user", "completed"),
        ("assistant", "completed"),
    ]
    await c.close()


async def test_backchannel_does_not_cancel_and_the_response_completes(server: ServerProcess) -> None:
    c = await session(server, overlap={"short_ack_ms": 600})
    rid = await user_turn(c, "hello")
    mark = len(c.events)
    mm = wav("weather")[24 * 400 : 24 * 650]  # 250 ms of real speech while the reply plays
    await c.stream(mm[: 24 * 200], realtime=1.0)
    # Heard (Silero is in a speech segment) but not announced: still undecided.
    assert (await snapshot(c))["turn_state"] == "barge_in"
    await c.stream(np.concatenate([mm[24 * 200 :], silence(700)]), realtime=1.0)
    done = await c.wait_for(is_done(rid), within_s=10, start=mark)
    assert done["response"]["status"] == "completed"
    between = [e["type"] for e in c.events[mark : c.events.index(done)]]
    for t in ("input_audio_buffer.speech_started", "input_audio_buffer.committed", "epoch.advanced"):
        assert t not in between
    assert [f.marker[1] for f in audio_of(c, rid)] == list(range(REPLY_CHUNKS))  # every chunk, in order
    snap = await snapshot(c)
    assert [it["role"] for it in snap["history"]] == ["user", "assistant"]  # "mm" is not a turn
    assert snap["epoch"] == 0
    await c.close()


async def test_duplex_the_model_speaks_without_response_create(server: ServerProcess) -> None:
    c = await session(server, turn_mode="duplex")
    await c.stream(np.concatenate([tone(800), silence(1200)]), realtime=1.0)
    created = await c.wait_for("response.created", within_s=10)
    rid = created["response"]["id"]
    done = await c.wait_for(is_done(rid), within_s=10)
    assert done["response"]["status"] == "completed"
    decisions = [e for e in c.events if e["type"] in ("response.listen", "response.speak")]
    assert [e["type"] for e in decisions[:3]] == ["response.listen"] * 3  # force_listen_count
    speaks = [e for e in decisions if e["type"] == "response.speak"]
    assert speaks[0]["response_id"] == rid and speaks[0]["end_of_turn"]
    # The speak that opened the response comes first and names it; then response.created.
    assert c.events.index(speaks[0]) < c.events.index(created)
    # What the model heard entered history as a user item, before its reply.
    user = next(e for e in c.events if e["type"] == "conversation.item.added" and e["item"]["role"] == "user")
    assert "ms of speech" in user["item"]["content"][0]["transcript"]
    assert c.events.index(user) < c.events.index(speaks[0])
    assert [f.marker[1] for f in audio_of(c, rid)] == list(range(REPLY_CHUNKS))
    # Exactly one decision per chunk sent.
    seqs = [e["chunk_seq"] for e in decisions]
    assert len(seqs) == len(set(seqs)) and seqs == sorted(seqs)
    snap = await snapshot(c)
    assert snap["turn_mode"] == "duplex"
    assert snap["chunks_sent"] == snap["chunk_results"] == len(decisions)
    await c.close()


async def test_playback_ack_commits_only_the_played_part(server: ServerProcess) -> None:
    c = await session(server, turn_mode="manual", commit_policy="ack_only")
    await c.stream(tone(500))
    await c.send({"type": "input_audio_buffer.commit"})
    await c.send({"type": "response.create"})
    created = await c.wait_for("response.created")
    rid, item = created["response"]["id"], created["item"]["id"]
    await c.wait_for(lambda e: len(audio_of(c, rid)) >= 25 and e["type"] == "audio")
    await c.send({"type": "playback.ack", "response_id": rid, "item_id": item, "played_ms": 1000})
    ack = await c.wait_for("playback.committed")
    assert ack["played_ms"] == 1000 and ack["item_id"] == item
    done = await c.wait_for(is_done(rid))
    texts = [f.header["text"] for f in audio_of(c, rid)]
    assert len(texts) == REPLY_CHUNKS
    full, heard = "".join(texts).strip(), "".join(texts[:25]).strip()
    assert done["transcript"] == full and heard != full
    out = done["response"]["output"][0]
    assert out["id"] == item and out["audio_ms"] == 1000 and out["content"][0]["transcript"] == heard
    # More played later: history grows to it (37 chunks of 40 ms).
    n = len(c.events)
    await c.send({"type": "playback.ack", "response_id": rid, "item_id": item, "played_ms": 1480})
    ack2 = await c.wait_for("playback.committed", start=n)
    last = ack2["history"][-1]
    assert last["id"] == item and last["audio_ms"] == 1480
    assert last["content"][0]["transcript"] == "".join(texts[:37]).strip()
    snap = await snapshot(c)
    assert snap["cursor"] == {"generated_ms": 3000, "sent_ms": 3000, "played_ms": 1480, "committed_ms": 1480}
    assert snap["history"][-1]["audio_ms"] == 1480
    await c.close()


async def test_truncate_while_playing_then_cancel_keeps_the_played_part(server: ServerProcess) -> None:
    c = await session(server, turn_mode="manual")  # commit_all_on_done: the Realtime default
    await c.stream(tone(300))
    await c.send({"type": "input_audio_buffer.commit"})
    await c.send({"type": "response.create"})
    created = await c.wait_for("response.created")
    rid, item = created["response"]["id"], created["item"]["id"]
    await c.wait_for(lambda e: len(audio_of(c, rid)) >= 10 and e["type"] == "audio")
    # The Realtime barge-in dance: the client stops playback, truncates what it played, cancels.
    await c.send({"type": "conversation.item.truncate", "item_id": item, "content_index": 0, "audio_end_ms": 400})
    await c.wait_for("conversation.item.truncated")
    await c.send({"type": "response.cancel"})
    done = await c.wait_for(is_done(rid))
    assert done["response"]["status"] == "cancelled" and done["response"]["reason"] == "client_cancelled"
    texts = [f.header["text"] for f in audio_of(c, rid)]
    out = done["response"]["output"][0]
    assert out["audio_ms"] == 400 and out["content"][0]["transcript"] == "".join(texts[:10]).strip()
    assert (await snapshot(c))["history"][-1]["audio_ms"] == 400
    await c.close()


def _metric(server: ServerProcess, name: str, **labels: str) -> float:
    with urllib.request.urlopen(f"http://{server.base}/metrics", timeout=2) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"{name}\{{(.*)\}} ([0-9.e+]+)$", line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            total += float(m.group(2))
    return total


async def test_stale_results_are_dropped_and_counted_per_hop(server: ServerProcess) -> None:
    c = await session(server, turn_mode="manual")
    await c.stream(tone(1000))  # 10 chunks for stage0, answered 10 ms apart
    await c.send({"type": "input_audio_buffer.commit"})
    await c.send({"type": "response.create"})
    await c.send({"type": "response.cancel"})  # overtakes them all on the control plane
    created = await c.wait_for("response.created")
    done = await c.wait_for(is_done(created["response"]["id"]))
    assert done["response"]["status"] == "cancelled" and done["epoch"] == 1
    assert not [e for e in c.events if e["type"] == "error"]  # the cancel found what it cancelled
    for _ in range(50):
        snap = await snapshot(c)
        if snap["chunk_results"] == snap["chunks_sent"]:
            break
        await asyncio.sleep(0.05)
    assert snap["chunk_results"] == snap["chunks_sent"] >= 11
    assert snap["dropped_stale"] >= 10  # every answer for the old epoch
    assert not [e for e in c.events if e["type"] in ("response.listen", "response.speak") and e["epoch"] == 0]
    # The host's per-hop counter reaches /metrics (shipped with the cluster status).
    deadline = asyncio.get_running_loop().time() + 8
    while _metric(server, "duplexd_stale_dropped_total", hop="host") < snap["dropped_stale"]:
        assert asyncio.get_running_loop().time() < deadline, "host stale drops never reached /metrics"
        await asyncio.sleep(0.25)
    await c.close()


async def test_health_counts_sessions(server: ServerProcess) -> None:
    async def sessions(n: int) -> None:
        for _ in range(100):
            if server.health()[1]["sessions"] == n:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"/health never reported {n} sessions: {server.health()[1]['sessions']}")

    await sessions(0)
    a, b = await session(server), await session(server)
    await sessions(2)
    await a.close()
    await b.close()
    await sessions(0)
