"""Overload over real processes: full bus queues slow a response or fail it visibly, never
orphan it; a slow adapter's sessions fail with an error and their terminal event."""

from __future__ import annotations

import asyncio
import os
import signal
import urllib.request
from typing import Any

import pytest

from tests.harness import NativeClient, RealtimeClient, ServerProcess, tone

pytestmark = pytest.mark.timeout(150)

SESSIONS = 40


def _metric_total(server: ServerProcess, name: str, **labels: str) -> float:
    with urllib.request.urlopen(f"http://{server.base}/metrics", timeout=5) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.split()[-1])
    return total


async def _turn_outcome(c: RealtimeClient, create_id: str, within_s: float) -> None:
    """The turn ends visibly: its response.done, or an error answering its response.create
    (dropped at a full queue: then no response was made)."""
    await c.wait_for(
        lambda e: e["type"] == "response.done"
        or (e["type"] == "error" and e["error"]["event_id"] == create_id),
        within_s=within_s,
    )


async def test_sessions_under_backpressure_progress_or_fail_visibly() -> None:
    """The wedge: with tiny bus queues, many sessions replying at once fill every queue.
    Each session still gets its turn's terminal event (or an error for what was dropped),
    and afterwards still answers: a cancel with nothing to cancel is answered with an error,
    and a new turn completes."""
    sections: dict[str, dict[str, Any]] = {
        "bus": {"data_hwm": 16},
        "engines.scripted": {"reply_ms": 2000, "out_chunk_ms": 40},
        "stage1": {"max_lead_ms": 500},
        "host": {"vad": "energy"},
    }
    with ServerProcess(sections=sections) as server:
        clients = await asyncio.gather(*(RealtimeClient.connect(server) for _ in range(SESSIONS)))
        manual = {"type": "session.update", "session": {"turn_detection": None}}
        await asyncio.gather(*(c.send(manual) for c in clients))
        ids = await asyncio.gather(*(c.manual_turn(tone(300, amp=0.3)) for c in clients))
        outcomes = await asyncio.gather(
            *(_turn_outcome(c, i, 45) for c, i in zip(clients, ids, strict=True)), return_exceptions=True
        )
        wedged = [i for i, o in enumerate(outcomes) if isinstance(o, BaseException)]
        assert wedged == [], f"{len(wedged)} sessions got neither response.done nor an error: {outcomes[wedged[0]]}"
        for c in clients:
            for d in c.of("response.done"):
                if d["response"]["status"] == "failed":
                    assert c.of("error"), "a failed response without an error event"
        # The path under test ran: some queue was full (counted where it was refused).
        assert _metric_total(server, "duplexd_backpressure_total") > 0
        # Every session is still alive: a cancel with nothing to cancel is answered.
        marks = [len(c.events) for c in clients]
        await asyncio.gather(*(c.send({"type": "response.cancel"}) for c in clients))
        for c, m in zip(clients, marks, strict=True):
            err = await c.wait_for("error", start=m, within_s=20)
            assert err["error"]["code"] in ("response_cancel_not_active", "overloaded"), err
        # And a new turn works on each (one at a time: no overload now).
        for c in clients[:5]:
            m = len(c.events)
            await c.manual_turn(tone(300, amp=0.3), "again")
            done = await c.wait_for("response.done", start=m, within_s=20)
            assert done["response"]["status"] == "completed"
        await asyncio.gather(*(c.close() for c in clients))


async def test_a_stalled_adapter_fails_its_responses_visibly_and_the_sessions_go_on() -> None:
    """The adapter stops reading for 1 s (SIGSTOP; the heartbeat timeout is longer here): the
    host holds its events, a response whose held audio passes the budget fails with an
    ``overloaded`` error and its ``response.done`` (failed), no audio of it follows, and the
    next turn on the same socket completes. 10 ms audio chunks: 100 messages a second per
    session, more than the bus queues and socket buffers hold in that second."""
    sections: dict[str, dict[str, Any]] = {
        "bus": {"data_hwm": 16, "heartbeat_timeout_s": 3.0},
        "host": {"vad": "energy", "backlog_audio_ms": 200},
        "engines.scripted": {"reply_ms": 6000, "out_chunk_ms": 10},
        "stage1": {"max_lead_ms": 300},
    }
    with ServerProcess(sections=sections) as server:
        clients = [await NativeClient.connect(server) for _ in range(2)]
        rids = []
        for c in clients:
            await c.send({"type": "session.update", "session": {"turn_mode": "manual"}})
            await c.wait_for("session.updated")
            await c.stream(tone(300), frame_ms=300)
            await c.send({"type": "input_audio_buffer.commit"})
            await c.send({"type": "response.create"})
            rids.append((await c.wait_for("response.created"))["response"]["id"])
        for c, rid in zip(clients, rids, strict=True):
            await c.wait_for(lambda e, rid=rid: e["type"] == "audio" and e["response_id"] == rid)
        adapter = server.role_pid("adapter")
        os.kill(adapter, signal.SIGSTOP)
        try:
            await asyncio.sleep(1.0)
        finally:
            os.kill(adapter, signal.SIGCONT)
        for c, rid in zip(clients, rids, strict=True):
            done = await c.wait_for(lambda e, rid=rid: e["type"] == "response.done" and e["response"]["id"] == rid)
            assert done["response"]["status"] == "failed", done["response"]
            i = c.events.index(done)
            err = [e for e in c.events[:i] if e["type"] == "error"]
            assert err and err[-1]["error"]["code"] == "overloaded"
            assert not [e for e in c.events[i:] if e["type"] == "audio" and e["response_id"] == rid]
        assert server.role_pid("adapter") == adapter  # not declared dead: it was only slow
        for c in clients:
            m = len(c.events)
            await c.stream(tone(300), frame_ms=300)
            await c.send({"type": "input_audio_buffer.commit"})
            await c.send({"type": "response.create"})
            done = await c.wait_for("response.done", start=m, within_s=20)
            assert done["response"]["status"] == "completed"
            await c.close()


async def test_sessions_opened_while_stage1_renders_long_replies_all_get_audio() -> None:
    """Stage workers read data lazily, behind on_data calls that can take a while (here each
    handoff renders two minutes of audio at once). A session opened meanwhile had its
    handoff read before its StageOpen (still unread on control) and dropped: response.created,
    then nothing, forever (8 of 10 sessions in the run that found it)."""
    sections: dict[str, dict[str, Any]] = {
        "engines.scripted": {"reply_ms": 120000, "out_chunk_ms": 40},
        "stage1": {"max_lead_ms": 1500},
        "host": {"vad": "energy"},
    }
    with ServerProcess(sections=sections) as server:
        clients = []
        for _ in range(10):  # back to back: each opens while stage1 renders the last reply
            c = await RealtimeClient.connect(server)
            await c.send({"type": "session.update", "session": {"turn_detection": None}})
            await c.manual_turn(tone(300, amp=0.3))
            clients.append(c)
        firsts = await asyncio.gather(
            *(c.wait_for("response.output_audio.delta", within_s=20) for c in clients), return_exceptions=True
        )
        silent = [i for i, f in enumerate(firsts) if isinstance(f, BaseException)]
        assert silent == [], f"sessions {silent} never got audio"
        await asyncio.gather(*(c.close() for c in clients))
