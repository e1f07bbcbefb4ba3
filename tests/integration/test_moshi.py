"""The Moshi engine through the real server (supervisor + four processes), native protocol.

Stage0 loads a tiny random Moshi from a checkpoint directory written in the test (real
``from_pretrained`` loading, real tokenizer files) and steps every session in lockstep on
the CPU. The model's turn-taking comes from its own text stream: ``listen_prob_scale``
biases the pad token so that a random model both listens and speaks. Every session
samples from the same seed, so a session's output is a function of its input alone:
batched runs must reproduce the runs of each session alone.
"""

from __future__ import annotations

import asyncio
import json
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import websockets

from tests.harness import NativeClient, ServerProcess, silence

pytest.importorskip("torch")
pytest.importorskip("transformers")

pytestmark = pytest.mark.timeout(180)

SPEECH = Path(__file__).parents[1] / "fixtures" / "speech"
FRAME = 1920  # 80 ms at 24 kHz
FRAMES = 30
MAX_SESSIONS = 2


def wav(name: str) -> np.ndarray:
    with wave.open(str(SPEECH / f"{name}.wav")) as w:
        return np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768


def clip(x: np.ndarray, frames: int = FRAMES) -> np.ndarray:
    x = np.concatenate([x, silence(frames * 80)])
    return x[: frames * FRAME]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    from tests.moshi_tiny import save_tiny

    ckpt = save_tiny(tmp_path_factory.mktemp("moshi") / "tiny")
    s = ServerProcess(
        engine="moshi",
        sections={
            "engines.moshi": {
                "model_path": str(ckpt),
                "device": "cpu",
                "cpu_threads": 1,
                "max_sessions": MAX_SESSIONS,
                "context_frames": 64,
                "seed": 1234,
                "speech_rms": 1e9,  # random codec audio is loud noise: turns follow the text stream
                "hangover_frames": 2,
                # waits for a late session instead of feeding it silence: the batched runs
                # below must see exactly the input of the solo runs, however busy the machine
                "tick_grace_ms": 5000.0,
            },
            "stage1": {"max_lead_ms": 0},
            "host": {"vad": "energy"},
        },
    )
    with s:
        yield s


async def duplex(server: ServerProcess, **patch: Any) -> NativeClient:
    c = await NativeClient.connect(server)
    await c.send({"type": "session.update", "session": {"turn_mode": "duplex", "listen_prob_scale": 30.0, **patch}})
    await c.wait_for("session.updated")
    return c


def decisions(c: NativeClient) -> list[dict[str, Any]]:
    return [e for e in c.events if e["type"] in ("response.listen", "response.speak")]


async def all_decided(c: NativeClient, n: int, within_s: float = 60.0) -> list[dict[str, Any]]:
    await c.wait_for(lambda e: len(decisions(c)) >= n, within_s=within_s)
    return decisions(c)


async def all_heard(c: NativeClient, n: int) -> None:
    """The first ``n`` chunks are decided and the audio of every speak among them has
    arrived (stage1 delivers it after the decision: one 80 ms frame per speak)."""
    got = await all_decided(c, n)
    speaks = sum(e["type"] == "response.speak" for e in got[:n])
    await c.wait_for(lambda e: sum(f.pcm.size for f in c.audio) >= speaks * FRAME)


def trace(c: NativeClient) -> list[tuple[int, str, str]]:
    """Per chunk: (chunk_seq, decision, text)."""
    return [(e["chunk_seq"], e["type"], e.get("text", "")) for e in decisions(c)]


def audio(c: NativeClient) -> np.ndarray:
    return np.concatenate([f.pcm for f in c.audio]) if c.audio else np.zeros(0, np.int16)


async def solo(server: ServerProcess, x: np.ndarray) -> tuple[list, np.ndarray]:
    c = await duplex(server)
    await c.stream(x, frame_ms=80)
    await all_heard(c, len(x) // FRAME)
    tr, pcm = trace(c), audio(c)
    await c.close()
    return tr, pcm


async def test_full_duplex_exchange(server: ServerProcess) -> None:
    c = await duplex(server)
    x = clip(wav("hello"), 40)
    await c.stream(x, frame_ms=20)
    got = await all_decided(c, 40)
    assert [e["chunk_seq"] for e in got] == list(range(40))  # one decision per chunk, in order
    assert [e["type"] for e in got[:3]] == ["response.listen"] * 3  # force_listen_count
    speaks = [e for e in got if e["type"] == "response.speak"]
    listens = [e for e in got if e["type"] == "response.listen"]
    assert speaks and len(listens) > 3  # the model both talks and listens
    # The model opened its responses itself (no response.create), each ended by a listen.
    created = [e for e in c.events if e["type"] == "response.created"]
    assert created and {e["response_id"] for e in speaks} == {e["response"]["id"] for e in created}
    done = {}
    for r in created:
        rid = r["response"]["id"]
        if any(e["type"] == "response.listen" and e["chunk_seq"] > max(
            s["chunk_seq"] for s in speaks if s["response_id"] == rid
        ) for e in got):
            d = await c.wait_for(lambda e, rid=rid: e["type"] == "response.done" and e["response"]["id"] == rid)
            done[rid] = d
    assert done and all(d["response"]["status"] == "completed" for d in done.values())
    for rid, d in done.items():
        mine = [s for s in speaks if s["response_id"] == rid]
        frames = [f for f in c.audio if f.header["response_id"] == rid]
        # one 80 ms frame of 24 kHz audio per speaking chunk, and its words as transcript
        assert [f.pcm.size for f in frames if f.pcm.size] == [FRAME] * len(mine)
        assert d["transcript"] == "".join(s["text"] for s in mine) == "".join(f.header["text"] for f in frames)
        assert d["transcript"].strip() and all(w.startswith("w") for w in d["transcript"].split())
        assert any(np.abs(f.pcm).max() > 0 for f in frames)  # the codec's audio, not silence
    await c.close()


async def test_cancel_advances_the_epoch_and_no_audio_of_it_follows(server: ServerProcess) -> None:
    c = await duplex(server, listen_prob_scale=1.0)  # the random model talks nearly all the time
    x = clip(wav("weather"), 50)
    send = asyncio.create_task(c.stream(x, frame_ms=80, realtime=4.0))
    created = await c.wait_for("response.created", within_s=30)
    rid = created["response"]["id"]
    await c.wait_for(lambda e: e["type"] == "audio" and e["response_id"] == rid)
    await c.send({"type": "response.cancel"})
    done = await c.wait_for(lambda e: e["type"] == "response.done" and e["response"]["id"] == rid)
    assert done["response"]["status"] == "cancelled"
    at = c.events.index(done)
    adv = [e for e in c.events[:at] if e["type"] == "epoch.advanced"]
    assert adv and adv[-1]["epoch"] == 1
    await send
    # (results of chunks sent before the cancel are stale: the host shows no decision for them)
    await c.wait_for(lambda e: e["type"].startswith("response.") and e.get("chunk_seq") == 49, within_s=60)
    assert not [f for f in c.audio if f.received_after > at and f.header["response_id"] == rid]
    assert all(f.header["epoch"] >= 1 for f in c.audio if f.received_after > at)
    await c.close()


async def test_two_sessions_batched_give_what_each_gives_alone(server: ServerProcess) -> None:
    xa, xb = clip(wav("hello")), clip(wav("weather"))
    alone_a, alone_b = await solo(server, xa), await solo(server, xb)
    assert alone_a[0] != alone_b[0]  # different input, different output: the check below can fail
    a, b = await duplex(server), await duplex(server)
    # Real-time microphones, each at its own pace: every step must wait for both.
    await asyncio.gather(a.stream(xa, frame_ms=20, realtime=1.0), b.stream(xb, frame_ms=20, realtime=1.0))
    await all_heard(a, FRAMES)
    await all_heard(b, FRAMES)
    for c, (tr, pcm) in ((a, alone_a), (b, alone_b)):
        assert trace(c) == tr
        got = audio(c)
        assert got.size == pcm.size
        assert np.max(np.abs(got.astype(np.int32) - pcm.astype(np.int32)), initial=0) <= 2  # pcm16 rounding
    await a.close()
    await b.close()


async def test_a_session_closing_mid_batch_does_not_disturb_the_other(server: ServerProcess) -> None:
    xa, xb = clip(wav("weather")), clip(wav("hello"))
    alone_a = await solo(server, xa)
    a, b = await duplex(server), await duplex(server)
    await b.stream(xb[: 12 * FRAME], frame_ms=80)
    await all_decided(b, 12)
    send = asyncio.create_task(a.stream(xa, frame_ms=20, realtime=1.0))
    bsend = asyncio.create_task(b.stream(xb[12 * FRAME :], frame_ms=20, realtime=1.0))
    await a.wait_for(lambda e: len(decisions(a)) >= 5, within_s=60)
    bsend.cancel()
    await b.close()  # leaves while a is mid-stream
    await send
    await all_heard(a, FRAMES)
    assert trace(a) == alone_a[0]
    got = audio(a)
    assert got.size == alone_a[1].size
    assert np.max(np.abs(got.astype(np.int32) - alone_a[1].astype(np.int32)), initial=0) <= 2
    await a.close()


async def test_no_free_slot_refuses_the_session_at_admission(server: ServerProcess) -> None:
    held = [await duplex(server) for _ in range(MAX_SESSIONS)]
    ws = await websockets.connect(f"ws://{server.base}/v1/duplex", max_size=None)
    events = []
    try:
        async for frame in ws:
            events.append(json.loads(frame))
    except websockets.ConnectionClosed:
        pass  # the server ends a refused session
    err = next(e for e in events if e["type"] == "error")
    assert err["error"]["code"] == "capacity_exceeded"
    assert f"all {MAX_SESSIONS} model slots are in use" in err["error"]["message"]
    assert "session.created" not in [e["type"] for e in events]  # refused before it began
    # A slot frees when a session ends, and the next session gets it.
    await held[0].close()
    c = await NativeClient.connect(server)
    await c.send({"type": "session.update", "session": {"turn_mode": "duplex"}})
    await c.wait_for("session.updated")
    await c.stream(clip(wav("hello"), 6), frame_ms=80)
    assert len(await all_decided(c, 6)) == 6
    for x in (c, held[1]):
        await x.close()
