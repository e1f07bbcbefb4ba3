"""Shared by the client drivers: a paced fake microphone, the scenario, the report.

The drivers run in the client libraries' own virtualenv (``.venv-clients``: their pins
differ from the server's), so this file needs nothing but numpy and the standard
library. Each driver plays the same scenario with its library's realtime class and
writes what the library handed to the application as JSON; the pytest side (main venv)
holds the assertions.

Scenario (server VAD on the server; the scripted engine answers with marked tone):
  1. session: connect, configure;
  2. a turn with audio: 600 ms of tone ("speech"), then silence: the server answers (R1);
  3. an interruption: once R1 has delivered ``INTERRUPT_AFTER_MS`` of audio, 1.6 s of tone
     over it; the library does what it does on ``speech_started`` (truncate, cancel);
  4. the interrupting speech is the next turn (R2): wait for it, then stop.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

RATE = 24000
FRAME_MS = 20
INTERRUPT_AFTER_MS = 600  # of R1 audio received before the user talks over it
TURN_TONE_MS = 600
BARGE_TONE_MS = 1600


def tone(ms: int, freq: float = 220.0, amp: float = 0.3) -> bytes:
    t = np.arange(RATE * ms // 1000) / RATE
    return np.round(amp * np.sin(2 * np.pi * freq * t) * 32767).astype("<i2").tobytes()


def silence(ms: int) -> bytes:
    return bytes(2 * RATE * ms // 1000)


def marker(pcm: bytes) -> list[int]:
    """The first four samples: the scripted engine's (0x5A5A, tag, seq, total) marker."""
    return [int(x) for x in np.frombuffer(pcm[:8], dtype="<i2")] if len(pcm) >= 8 else []


@dataclass
class Report:
    """What the library handed to the application, in order, with times."""

    library: str
    t0: float = 0.0  # times are CLOCK_MONOTONIC, system-wide: comparable with the test's wire log
    events: list[dict[str, Any]] = field(default_factory=list)
    audio_ms: float = 0.0

    def note(self, kind: str, **fields: Any) -> None:
        self.events.append({"t": round(time.monotonic() - self.t0, 4), "kind": kind, **fields})

    def audio(self, pcm: bytes, **fields: Any) -> None:
        ms = len(pcm) / 2 / RATE * 1000
        self.audio_ms += ms
        self.note("audio", bytes=len(pcm), ms=round(ms, 2), marker=marker(pcm), **fields)

    def audio_chunks(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e["kind"] == "audio"]

    def dump(self, path: str) -> None:
        Path(path).write_text(json.dumps({"library": self.library, "events": self.events}, indent=1))


class Microphone:
    """Streams 20 ms frames at real-time pace: queued segments, silence in between."""

    def __init__(self, send: Any) -> None:
        self.send = send  # async or sync callable taking one pcm16 frame
        self.queue: deque[bytes] = deque()
        self.stopped = False

    def say(self, pcm: bytes) -> None:
        n = 2 * RATE * FRAME_MS // 1000
        self.queue.extend(pcm[i : i + n] for i in range(0, len(pcm), n))

    async def run(self) -> None:
        frame_s = FRAME_MS / 1000
        next_at = time.monotonic()
        while not self.stopped:
            pcm = self.queue.popleft() if self.queue else silence(FRAME_MS)
            out = self.send(pcm)
            if asyncio.iscoroutine(out):
                await out
            next_at += frame_s
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))


async def wait_until(pred: Any, within_s: float, what: str, report: Report) -> None:
    deadline = time.monotonic() + within_s
    while not pred():
        if time.monotonic() > deadline:
            report.note("timeout", waiting_for=what)
            raise TimeoutError(what)
        await asyncio.sleep(0.01)


def args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True, help="ws://HOST:PORT/v1 of the server (or its recording proxy)")
    p.add_argument("--out", required=True, help="where the JSON report goes")
    p.add_argument("--key", default="sk-test-clients")
    return p.parse_args()


async def scenario(report: Report, mic: Microphone, r1_audio_ms: Any, responses_started: Any) -> None:
    """Steps 2-4 above; ``r1_audio_ms()`` and ``responses_started()`` read the library's view."""
    mic_task = asyncio.create_task(mic.run())
    try:
        report.note("say", what="turn", ms=TURN_TONE_MS)
        mic.say(tone(TURN_TONE_MS))
        await wait_until(lambda: r1_audio_ms() >= INTERRUPT_AFTER_MS, 20, "R1 audio", report)
        report.note("say", what="barge_in", ms=BARGE_TONE_MS)
        mic.say(tone(BARGE_TONE_MS, freq=330.0))
        # The interrupting speech is the user's next turn: its reply (R2) starts...
        await wait_until(lambda: responses_started() >= 2, 20, "R2 audio", report)
        # ...and we listen a while longer: any stale R1 audio would have come by now.
        await asyncio.sleep(2.0)
        report.note("done")
    finally:
        mic.stopped = True
        await mic_task
