"""Backchannel or interruption? The overlap decision on real speech, over a sweep of thresholds.

While the assistant is audible, user speech whose voiced length reaches
``overlap.short_ack_ms`` is an interruption (``speech_started``, and with
``interrupt_response`` the reply is cancelled at once); shorter speech that stops is a
backchannel and leaves no trace. A lower threshold interrupts sooner but cancels more
backchannels. This measures both on synthesised speech (tests/fixtures/speech/overlap/:
backchannels such as "mm-hmm", "yeah", "okay" and interruptions such as "Wait, stop, I meant
Tuesday", in Piper and espeak-ng voices), said while a reply is in progress, streamed in 20 ms
pieces into a real ``SessionActor`` with server VAD.

Each clip is first run with the real Silero detector (``host.vad = "silero"``), recording the
speech probability of every window; the threshold sweep then replays those probabilities
through the same detector state machine and actor, which is exact (Silero's output depends
only on the audio and its context, not on the thresholds) and keeps the sweep to seconds.

Latency is in input-audio time from the true start of speech to the ``speech_started`` event
(when the server has seen the piece of audio that triggered it): what a client waits beyond
its own network and buffering. ``audio_start_ms`` error is the event's reported start minus
the true start.
"""

from __future__ import annotations

import json
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from duplexd.actors.session import HostSettings, SessionActor
from duplexd.actors.vad import SileroDetector, SpeechDetector
from duplexd.bus.messages import (
    AudioIn,
    EngineInfo,
    OverlapParams,
    ResponseCreate,
    ResponseDone,
    SessionConfig,
    SpeechStarted,
    TurnMode,
    VadParams,
)
from tests.bench.table import percentiles, print_table

FIXTURES = Path(__file__).parents[1] / "fixtures" / "speech" / "overlap"
RATE = 16000
ENGINE = EngineInfo("bench", input_rate=RATE, chunk_samples=1600)
PIECE_MS = 20  # a client's microphone chunk
LEAD_MS = 600  # silence before the clip (the reply is already playing)
TAIL_MS = 1000
NOISE_DBFS = -60.0
SHORT_ACK_SWEEP = [150, 200, 250, 300, 350, 400, 450, 500, 600, 700]
VAD_THRESHOLDS = [0.4, 0.5, 0.6]
SID = "sess_bench"


@dataclass(frozen=True, slots=True)
class Clip:
    name: str
    text: str
    kind: str  # backchannel | interruption
    voice: str
    pcm: np.ndarray  # lead silence + speech + tail silence, with a noise floor
    onset_ms: float  # true start of speech in the stream


@dataclass(frozen=True, slots=True)
class Outcome:
    started_ms: float | None  # input position when speech_started was sent (None: never)
    reported_start_ms: int | None  # its audio_start_ms
    cancelled_with_start: bool  # the reply was cancelled in the same step as speech_started


class ReplayDetector(SpeechDetector):
    """Silero's detector state machine (``SpeechDetector``), fed the probabilities the
    model gave for this clip."""

    def __init__(self, probs: list[float], threshold: float, silence_ms: int, floor_rms: float) -> None:
        super().__init__(threshold, silence_ms, floor_rms=floor_rms)
        self._probs = probs
        self._next = 0

    def reset(self, pos_ms: float | None = None) -> None:
        super().reset(pos_ms)
        self._next = 0

    def _prob(self, window: np.ndarray) -> float:
        p = self._probs[self._next]
        self._next += 1
        return p


class RecordingDetector(SileroDetector):
    def __init__(self, threshold: float, silence_ms: int, floor_rms: float) -> None:
        super().__init__(threshold, silence_ms, floor_rms=floor_rms)
        self.probs: list[float] = []

    def reset(self, pos_ms: float | None = None) -> None:
        super().reset(pos_ms)
        self.probs = []

    def _prob(self, window: np.ndarray) -> float:
        p = super()._prob(window)
        self.probs.append(p)
        return p


def load_clips() -> list[Clip]:
    rng = np.random.default_rng(7)
    noise_rms = 10 ** (NOISE_DBFS / 20)
    clips = []
    for e in json.loads((FIXTURES / "manifest.json").read_text()):
        with wave.open(str(FIXTURES / e["file"])) as w:
            assert w.getframerate() == RATE
            speech = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768
        lead, tail = np.zeros(RATE * LEAD_MS // 1000, np.float32), np.zeros(RATE * TAIL_MS // 1000, np.float32)
        pcm = np.concatenate([lead, speech, tail])
        pcm = pcm + rng.normal(0.0, noise_rms, pcm.size).astype(np.float32)
        clips.append(Clip(e["file"], e["text"], e["kind"], e["voice"], pcm, LEAD_MS + e["onset_ms"]))
    return clips


def config(short_ack_ms: int, vad_threshold: float) -> SessionConfig:
    return SessionConfig(
        turn_mode=TurnMode.SERVER_VAD,
        vad=VadParams(threshold=vad_threshold),
        overlap=OverlapParams(short_ack_ms=short_ack_ms),
    )


def run(clip: Clip, cfg: SessionConfig, detector: SpeechDetector) -> Outcome:
    """The clip said while a reply is in progress (stage0 never answers: it keeps going)."""
    actor = SessionActor(SID, cfg, ENGINE, HostSettings(vad="silero"), detector=detector)
    now = 0.0
    actor.open(now)
    actor.on_command(ResponseCreate(SID, 0, 1), now)
    actor.take_outbox()
    piece = RATE * PIECE_MS // 1000
    started: float | None = None
    reported: int | None = None
    cancelled = False
    for seq, i in enumerate(range(0, clip.pcm.size, piece), start=2):
        now += PIECE_MS / 1000
        actor.on_command(AudioIn(SID, 0, seq, clip.pcm[i : i + piece]), now)
        outs = [o.msg for o in actor.take_outbox()]
        for k, msg in enumerate(outs):
            if isinstance(msg, SpeechStarted) and started is None:
                started, reported = actor.input_ms, msg.audio_start_ms
                cancelled = any(isinstance(m, ResponseDone) and m.response.status == "cancelled" for m in outs[k:])
    return Outcome(started, reported, cancelled)


def sweep(clips: list[Clip]) -> dict[tuple[int, float], list[tuple[Clip, Outcome]]]:
    results: dict[tuple[int, float], list[tuple[Clip, Outcome]]] = {}
    base = config(SHORT_ACK_SWEEP[0], VAD_THRESHOLDS[0])
    silence_ms, floor = base.vad.silence_duration_ms, base.overlap.silence_rms
    for clip in clips:
        rec = RecordingDetector(VAD_THRESHOLDS[0], silence_ms, floor)
        run(clip, base, rec)  # the real model, once per clip
        for thr in VAD_THRESHOLDS:
            for ms in SHORT_ACK_SWEEP:
                replay = ReplayDetector(rec.probs, thr, silence_ms, floor)
                out = run(clip, config(ms, thr), replay)
                assert replay._next == len(rec.probs), "replay diverged from the recorded windows"
                results.setdefault((ms, thr), []).append((clip, out))
    return results


def _pct(n: int, d: int) -> str:
    return f"{100 * n / d:.0f}% ({n}/{d})" if d else "-"


def summarise(rows: list[tuple[Clip, Outcome]]) -> list[str]:
    bc = [o for c, o in rows if c.kind == "backchannel"]
    words = [o for c, o in rows if c.kind == "interruption" and len(c.text.split()) == 1]
    sentences = [o for c, o in rows if c.kind == "interruption" and len(c.text.split()) > 1]
    heard = [(c, o) for c, o in rows if c.kind == "interruption" and o.started_ms is not None]
    lat = [o.started_ms - c.onset_ms for c, o in heard if o.started_ms is not None]
    err = [o.reported_start_ms - c.onset_ms for c, o in heard if o.reported_start_ms is not None]
    starts = [o for _, o in rows if o.started_ms is not None]
    p50, p90 = percentiles(lat, 50, 90) if lat else (float("nan"), float("nan"))
    return [
        _pct(sum(o.started_ms is not None for o in bc), len(bc)),
        _pct(sum(o.started_ms is None for o in sentences), len(sentences)),
        _pct(sum(o.started_ms is None for o in words), len(words)),
        f"{p50:.0f}",
        f"{p90:.0f}",
        f"{max(lat):.0f}" if lat else "-",
        _pct(sum(o.cancelled_with_start for o in starts), len(starts)),
        f"{np.median(err):+.0f}" if err else "-",
    ]


HEADER = [
    "short_ack_ms",
    "backchannels interrupted",
    "sentences missed",
    "one-word stops missed",
    "latency p50 ms",
    "p90",
    "max",
    "cancelled at speech_started",
    "audio_start_ms err",
]


def main() -> None:
    clips = load_clips()
    results = sweep(clips)
    voices = sorted({c.voice for c in clips})
    n_bc = sum(c.kind == "backchannel" for c in clips)
    for thr in VAD_THRESHOLDS:
        rows = [[str(ms), *summarise(results[(ms, thr)])] for ms in SHORT_ACK_SWEEP]
        print_table(
            f"overlap decision, Silero threshold {thr}: {n_bc} backchannels and {len(clips) - n_bc} interruptions "
            f"({len(voices)} voices: {', '.join(voices)}), latency from the true speech start to speech_started",
            HEADER,
            rows,
        )
    default = OverlapParams().short_ack_ms
    per_voice = [[v, *summarise([(c, o) for c, o in results[(default, 0.5)] if c.voice == v])] for v in voices]
    print_table(f"default short_ack_ms {default}, threshold 0.5, per voice", ["voice", *HEADER[1:]], per_voice)
    kinds = {c.text: c.kind for c in clips}
    texts = sorted(kinds, key=lambda t: (kinds[t], t))
    by_text = []
    for t in texts:
        rows = [(c, o) for c, o in results[(default, 0.5)] if c.text == t]
        wrong = [c.voice for c, o in rows if (kinds[t] == "backchannel") == (o.started_ms is not None)]
        by_text.append([t, kinds[t], f"{len(rows) - len(wrong)}/{len(rows)}", ", ".join(wrong) or "-"])
    print_table(
        f"default short_ack_ms {default}, threshold 0.5, per phrase",
        ["phrase", "kind", "right", "wrong in voices"],
        by_text,
    )


if __name__ == "__main__":
    main()
