"""Stage0's lockstep gating: when a lockstep thinker's step may run (no sockets needed)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from duplexd.actors.engines.scripted import ScriptedOptions, ScriptedThinker
from duplexd.actors.stage0 import Stage0Worker
from duplexd.bus.addresses import ipc_addresses
from duplexd.bus.messages import AudioChunk, ChunkKind, SessionConfig


def worker(tmp_path: Path, grace_s: float, idle_s: float = 10.0) -> Stage0Worker:
    th = ScriptedThinker(ScriptedOptions())
    th.lockstep_grace_s, th.lockstep_idle_s = grace_s, idle_s
    w = Stage0Worker(th, ipc_addresses(str(tmp_path)))
    for sid in ("a", "b"):
        w.epochs[sid] = 0
        w.open_session(sid, SessionConfig())
    return w


def consume(w: Stage0Worker, *sids: str) -> None:
    """What a step does to the queues of the sessions it takes."""
    for sid in sids:
        w.queues[sid].popleft()
        w._arrivals[sid].popleft()  # noqa: SLF001


def chunk(sid: str, seq: int) -> AudioChunk:
    return AudioChunk(sid, 0, seq, ChunkKind.LIVE, np.zeros(1600, np.float32))


def test_without_lockstep_any_input_is_work(tmp_path: Path) -> None:
    w = worker(tmp_path, grace_s=0.0)
    w.on_data(chunk("a", 0))
    assert w.has_work() and w.next_due_s() is None


def test_a_step_waits_for_every_streaming_session_then_the_grace(tmp_path: Path) -> None:
    w = worker(tmp_path, grace_s=0.2)
    w.on_data(chunk("a", 0))
    assert w.has_work()  # b never sent anything: it does not hold the step
    w.on_data(chunk("b", 0))
    consume(w, "a", "b")
    w.on_data(chunk("a", 1))
    assert not w.has_work()  # b streams: its next chunk is awaited...
    due = w.next_due_s()
    assert due is not None and 0.1 < due <= 0.2
    w.on_data(chunk("b", 1))
    assert w.has_work()  # ...and here it is
    consume(w, "b")
    time.sleep(0.21)
    assert w.has_work()  # b is late past the grace: a steps, b is fed silence


def test_a_session_idle_past_idle_s_no_longer_holds_the_step(tmp_path: Path) -> None:
    w = worker(tmp_path, grace_s=5.0, idle_s=0.05)
    w.on_data(chunk("a", 0))
    w.on_data(chunk("b", 0))
    consume(w, "a", "b")
    time.sleep(0.06)
    w.on_data(chunk("a", 1))
    assert w.has_work()
