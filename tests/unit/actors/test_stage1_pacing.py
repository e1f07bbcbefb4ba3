"""Stage1 paces generation with a timer heap: a turn ``max_lead_ms`` ahead of real time is
held until its time comes, sessions nobody fed are never looked at, and a cancel while
held leaves nothing due. Real worker, real scripted talker, real bus sockets."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator

import pytest
import zmq

from duplexd.actors.engines.scripted import ScriptedOptions, ScriptedTalker
from duplexd.actors.stage1 import Stage1Worker
from duplexd.bus.addresses import ipc_addresses
from duplexd.bus.messages import AudioOut, Handoff
from duplexd.bus.sockets import DATA, Channel, bind_host, connect_peer

LEAD_MS = 200


class _CountingTalker(ScriptedTalker):
    """The scripted talker, counting which sessions stage1 asks about."""

    def __init__(self, opts: ScriptedOptions) -> None:
        super().__init__(opts)
        self.asked: list[str] = []

    def pending(self, session_id: str) -> bool:
        self.asked.append(session_id)
        return super().pending(session_id)


@pytest.fixture
def stage1() -> Iterator[tuple[Stage1Worker, _CountingTalker, Channel]]:
    with tempfile.TemporaryDirectory(prefix="dxs1-") as d:
        ctx = zmq.Context()
        addrs = ipc_addresses(d)
        host = bind_host(addrs, ctx)
        talker = _CountingTalker(ScriptedOptions(reply_ms=3000, out_chunk_ms=40))
        worker = Stage1Worker(talker, addrs, max_lead_ms=LEAD_MS)
        worker.chan = connect_peer(addrs, "stage1-t", ctx)
        try:
            yield worker, talker, host
        finally:
            worker.chan.close(0)
            host.close(0)
            ctx.term()


def _audio_ms(host: Channel) -> float:
    total = 0.0
    host.poll(50)
    for r in host.recv_batch(DATA):
        assert isinstance(r.msg, AudioOut)
        total += r.msg.pcm.size / 24
    return total


def _run(worker: Stage1Worker) -> int:
    steps = 0
    while worker.has_work():
        worker.step()
        steps += 1
    return steps


def test_a_turn_ahead_of_real_time_waits_on_the_heap_and_idle_sessions_are_not_touched(
    stage1: tuple[Stage1Worker, _CountingTalker, Channel],
) -> None:
    worker, talker, host = stage1
    for sid in [f"s{i}" for i in range(50)]:
        worker.open_session(sid, None)  # type: ignore[arg-type]
        # A turn in progress with nothing to say yet (the model is still thinking).
        worker.on_data(Handoff(sid, 0, f"resp_{sid}", f"item_{sid}", 0))
    _run(worker)
    talker.asked.clear()
    worker.on_data(Handoff("s7", 0, "resp_a", "item_a", 0, text="hello there", end_of_turn=True))
    t0 = time.monotonic()
    _run(worker)
    made = _audio_ms(host)
    assert LEAD_MS <= made <= LEAD_MS + 80  # ahead by the lead, not the whole 3 s reply
    assert set(talker.asked) == {"s7"}  # the 49 idle turns were not asked about again
    due = worker.next_due_s()
    assert due is not None and 0 < due <= 0.08
    talker.asked.clear()
    assert not worker.has_work() and talker.asked == []  # held: not even looked at
    time.sleep(due + 0.005)
    _run(worker)
    assert _audio_ms(host) >= 40  # its time came: it goes on
    elapsed_ms = (time.monotonic() - t0) * 1000
    assert made <= elapsed_ms + LEAD_MS + 80


def test_a_cancel_while_held_leaves_nothing_due(stage1: tuple[Stage1Worker, _CountingTalker, Channel]) -> None:
    worker, _, host = stage1
    worker.open_session("s1", None)  # type: ignore[arg-type]
    worker.on_data(Handoff("s1", 0, "resp_a", "item_a", 0, text="hello there", end_of_turn=True))
    _run(worker)
    assert _audio_ms(host) > 0
    assert worker.next_due_s() is not None
    worker.advance_epoch("s1")
    assert worker.next_due_s() is None
    assert not worker.has_work()
