"""Hostile input over real processes: a seeded generator sends thousands of bad events to
``/v1/realtime``, ``/v1/duplex`` and the MiniCPM-o demo bridge. Every one is answered with
exactly one error event, no process crashes, and afterwards a valid turn still works on the
same connection and on a new one.

The generator only makes events that are certainly wrong (broken JSON, JSON that is not an
object, unknown or missing types, a known event with a field of the wrong type or missing,
audio that is not base64 or not whole samples, edits of items that do not exist), so "one
error per event" is exact. Events go one at a time: the next is sent once the last one's
error arrived, which is how an unanswered event is found. ``DUPLEXD_FUZZ_SEED`` and
``DUPLEXD_FUZZ_EVENTS`` pick another run.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import string
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import websockets

from tests.harness import JsonClient, ServerProcess, free_port, silence, tone

pytestmark = pytest.mark.timeout(300)

SEED = int(os.environ.get("DUPLEXD_FUZZ_SEED", "15"))
EVENTS = int(os.environ.get("DUPLEXD_FUZZ_EVENTS", "2000"))  # per protocol: 6000 in all

Event = dict[str, Any] | str


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    s = ServerProcess(
        sections={
            "server": {"bridge_port": free_port()},
            "engines.scripted": {"reply_ms": 400, "out_chunk_ms": 40},
            "host": {"vad": "energy"},
        }
    )
    with s:
        yield s



# ---------------------------------------------------------------------- the generator
def _junk(rng: random.Random) -> Any:
    """A JSON value of a random kind."""
    return rng.choice(
        [
            rng.randint(-(2**40), 2**40),
            rng.random() * 1e9,
            "".join(rng.choices(string.printable, k=rng.randint(0, 12))),
            [rng.randint(0, 9) for _ in range(rng.randint(0, 3))],
            {"k": rng.randint(0, 9)},
            True,
            None,
        ]
    )


def _not(kind: type, rng: random.Random) -> Any:
    """A JSON value that is not of ``kind`` (and not null: null means "not set")."""
    while True:
        v = _junk(rng)
        if v is None or isinstance(v, kind) or (kind is int and isinstance(v, bool)):
            continue
        if kind is float and isinstance(v, int) and not isinstance(v, bool):
            continue
        return v


def _broken_json(rng: random.Random) -> str:
    while True:
        s = "".join(rng.choices('{}[]":,tfn0123456789.e- abcxyz\\', k=rng.randint(1, 40)))
        try:
            json.loads(s)
        except ValueError:
            return s


def _bad_base64(rng: random.Random) -> str:
    return "".join(rng.choices("!@#$%^&*()~`<>?", k=rng.randint(1, 30)))


def _odd_samples(rng: random.Random, width: int) -> str:
    n = rng.randint(0, 20) * width + rng.randint(1, width - 1)  # never whole samples
    return base64.b64encode(rng.randbytes(n)).decode()


def _common(rng: random.Random) -> Event:
    """Bad in the same way on every protocol."""
    kind = rng.randrange(4)
    if kind == 0:
        return _broken_json(rng)
    if kind == 1:
        return json.dumps(rng.choice([[1, 2], 3, "text", True, None, []]))  # JSON, but not an object
    if kind == 2:
        return {"type": "x." + "".join(rng.choices(string.ascii_lowercase, k=8)), "v": _junk(rng)}
    return {"no_type": _junk(rng)}


def realtime_event(rng: random.Random, i: int) -> Event:
    eid = f"fz_{i}"
    kind = rng.randrange(12)
    if kind < 3:
        return _common(rng)
    if kind == 3:
        return {"type": "input_audio_buffer.append", "audio": _not(str, rng), "event_id": eid}
    if kind == 4:
        return {"type": "input_audio_buffer.append", "audio": _bad_base64(rng), "event_id": eid}
    if kind == 5:
        return {"type": "input_audio_buffer.append", "audio": _odd_samples(rng, 2), "event_id": eid}
    if kind == 6:
        return {"type": "session.update", "session": _not(dict, rng), "event_id": eid}
    if kind == 7:
        return {"type": "session.update", "session": {"type": "realtime", "instructions": _not(str, rng)}}
    if kind == 8:
        return {"type": "response.create", "response": {"instructions": _not(str, rng)}, "event_id": eid}
    if kind == 9:
        return {"type": "conversation.item.delete", "item_id": rng.choice([_not(str, rng), f"item_nope{i}"])}
    if kind == 10:
        return {
            "type": "conversation.item.truncate",
            "item_id": f"item_nope{i}",
            "content_index": rng.choice([_not(int, rng), 0]),
            "audio_end_ms": 0,
        }
    return {"type": "response.cancel", "event_id": eid}  # nothing to cancel


def native_event(rng: random.Random, i: int) -> Event:
    eid = f"fz_{i}"
    kind = rng.randrange(10)
    if kind < 3:
        return _common(rng)
    if kind == 3:
        return {"type": "input_audio_buffer.append", "audio": _not(str, rng), "event_id": eid}
    if kind == 4:
        return {"type": "input_audio_buffer.append", "audio": _bad_base64(rng), "event_id": eid}
    if kind == 5:
        return {"type": "input_audio_buffer.append", "audio": _odd_samples(rng, 2), "event_id": eid}  # pcm16
    if kind == 6:
        return {"type": "session.update", "session": {"instructions": _not(str, rng)}, "event_id": eid}
    if kind == 7:
        return {"type": "response.create", "response": {"instructions": _not(str, rng)}, "event_id": eid}
    if kind == 8:
        return {"type": "conversation.item.delete", "item_id": rng.choice([_not(str, rng), f"item_nope{i}"])}
    return {"type": "response.cancel", "event_id": eid}


def bridge_event(rng: random.Random, i: int) -> Event:
    kind = rng.randrange(6)
    if kind < 3:
        return _common(rng)
    if kind == 3:
        return {"type": "audio_chunk", "audio_base64": rng.choice([_not(str, rng), _bad_base64(rng)])}
    if kind == 4:
        return {"type": "audio_chunk", "audio_base64": _odd_samples(rng, 4)}
    return {"type": "audio_chunk"}


# ---------------------------------------------------------------------- connections and turns
async def _realtime(server: ServerProcess) -> JsonClient:
    c = JsonClient(await websockets.connect(f"ws://{server.base}/v1/realtime", max_size=None))
    await c.wait_for("session.created")
    await c.ask(
        {"type": "session.update", "session": {"type": "realtime", "audio": {"input": {"turn_detection": None}}}},
        "session.updated",
    )
    return c


async def _native(server: ServerProcess) -> JsonClient:
    c = JsonClient(await websockets.connect(f"ws://{server.base}/v1/duplex", max_size=None))
    await c.wait_for("session.created")
    await c.ask({"type": "session.update", "session": {"turn_mode": "manual"}}, "session.updated")
    return c


def _bridge_port(server: ServerProcess) -> int:
    return next(
        int(v)
        for line in server.logs().splitlines()
        if '"demo bridge listening"' in line
        for k, v in json.loads(line).items()
        if k == "port"
    )


async def _bridge(server: ServerProcess, name: str) -> JsonClient:
    url = f"ws://127.0.0.1:{_bridge_port(server)}/ws/duplex?session_id={name}"
    for _ in range(50):  # the bridge serves one client: the last one may still be releasing
        c = JsonClient(await websockets.connect(url, max_size=None))
        try:
            await c.ask({"type": "prepare", "config": {"force_listen_count": 0, "sample_rate": 16000}}, "prepared", 5)
            return c
        except (AssertionError, ConnectionError):
            await c.close()
            await asyncio.sleep(0.2)
    raise AssertionError("the bridge never took a new connection")


async def _realtime_turn(c: JsonClient) -> None:
    n = len(c.events)
    await c.send({"type": "input_audio_buffer.append", "audio": base64.b64encode(_pcm16(tone(300))).decode()})
    await c.send({"type": "input_audio_buffer.commit"})
    await c.send({"type": "response.create"})
    done = await c.wait_for("response.done", start=n, within_s=20)
    assert done["response"]["status"] == "completed", done
    assert c.of("response.output_audio.delta", n)


async def _native_turn(c: JsonClient) -> None:
    n = len(c.events)
    await c.send({"type": "input_audio_buffer.append", "audio": base64.b64encode(_pcm16(tone(300))).decode()})
    await c.send({"type": "input_audio_buffer.commit"})
    await c.send({"type": "response.create"})
    try:
        done = await c.wait_for("response.done", start=n, within_s=20)
    except ConnectionError as exc:
        raise AssertionError(f"{exc}; close {c.ws.close_code} {c.ws.close_reason!r}; {c.of('error')[-3:]}") from None
    assert done["response"]["status"] == "completed", done
    assert c.of("(audio frame)", n)


async def _bridge_turn(c: JsonClient) -> None:
    """Speech, then silence: the model speaks (a result with is_listen false and audio)."""
    n = len(c.events)
    for pcm in (tone(1000, 16000), silence(1000, 16000), silence(1000, 16000)):
        await c.send({"type": "audio_chunk", "audio_base64": base64.b64encode(pcm.astype("<f4").tobytes()).decode()})
    await c.wait_for(
        lambda e: e["type"] == "result" and e.get("is_listen") is False and bool(e.get("audio_data")),
        start=n,
        within_s=30,
    )


def _pcm16(x: np.ndarray) -> bytes:
    return (np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()


async def _fuzz(c: JsonClient, make: Callable[[random.Random, int], Event], rng: random.Random) -> dict[str, int]:
    """Send EVENTS bad events one at a time; each must be answered by exactly one error."""
    kinds: dict[str, int] = {}
    for i in range(EVENTS):
        event = make(rng, i)
        n = len(c.events)
        await c.send(event)
        try:
            await c.wait_for("error", start=n, within_s=10)
        except AssertionError:
            raise AssertionError(f"event {i} was never answered: {str(event)[:300]}") from None
        kind = event.get("type", "(no type)") if isinstance(event, dict) else "(not JSON or not an object)"
        kind = "(unknown type)" if kind.startswith("x.") else kind
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def _errors(c: JsonClient) -> int:
    return len(c.of("error"))


@pytest.mark.parametrize("protocol", ["realtime", "duplex", "bridge"])
async def test_thousands_of_bad_events_each_get_one_error_and_turns_still_work(
    server: ServerProcess, protocol: str
) -> None:
    rng = random.Random(f"{SEED}-{protocol}")
    pids = {r["role"]: r["pid"] for r in server.health()[1]["roles"]}
    if protocol == "realtime":
        c, make, turn = await _realtime(server), realtime_event, _realtime_turn
    elif protocol == "duplex":
        c, make, turn = await _native(server), native_event, _native_turn
    else:
        c, make, turn = await _bridge(server, "fuzz1"), bridge_event, _bridge_turn
    before = _errors(c)
    kinds = await _fuzz(c, make, rng)
    # Exactly one error each: a valid event's answer comes after every error the bad ones
    # caused (same connection, in order), so none can arrive late and be missed.
    if protocol == "bridge":
        await turn(c)
    else:
        await c.ask({"type": "input_audio_buffer.clear"}, "input_audio_buffer.cleared")
    assert _errors(c) - before == EVENTS, (_errors(c) - before, EVENTS)
    print(f"\n[fuzz {protocol}] {EVENTS} bad events (seed {SEED}), one error each: {dict(sorted(kinds.items()))}")
    assert not c.closed
    if protocol != "bridge":
        await turn(c)  # the same connection
    await c.close()
    if protocol == "realtime":
        fresh = await _realtime(server)
    elif protocol == "duplex":
        fresh = await _native(server)
    else:
        fresh = await _bridge(server, "fuzz2")
    await turn(fresh)  # a new connection
    await fresh.close()
    code, body = server.health()
    assert code == 200, body
    assert {r["role"]: r["pid"] for r in body["roles"]} == pids  # nothing crashed or restarted
    assert "Traceback" not in server.logs()
