"""Speech detection: Silero on real speech, the detector's timing rules, positions, rates."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import pytest
import soxr

from duplexd.actors.vad import EnergyDetector, SileroDetector, SpeechDetector, VadEvent, make_detector

SPEECH = Path(__file__).parents[2] / "fixtures" / "speech"


def load(name: str) -> np.ndarray:
    """24 kHz mono float32."""
    with wave.open(str(SPEECH / f"{name}.wav")) as w:
        assert w.getframerate() == 24000 and w.getnchannels() == 1
        return np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768


def zeros(ms: int, rate: int = 24000) -> np.ndarray:
    return np.zeros(rate * ms // 1000, dtype=np.float32)


def run(det: SpeechDetector, x: np.ndarray, rate: int = 24000, piece_ms: int = 20) -> list[VadEvent]:
    n = rate * piece_ms // 1000
    out: list[VadEvent] = []
    for i in range(0, x.size, n):
        out += det.feed(x[i : i + n], rate)
    return out


class Scripted(SpeechDetector):
    """The detector's timing rules driven by given window probabilities (one per 32 ms window)."""

    def __init__(self, probs: list[float], **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.probs = iter(probs)

    def _prob(self, window: np.ndarray) -> float:
        return next(self.probs)


W = 32.0  # window ms


def feed_windows(det: Scripted, n: int) -> list[VadEvent]:
    return det.feed(np.full(512 * n, 0.1, np.float32))


# ---------------------------------------------------------------- Silero on real speech
@pytest.mark.parametrize("name", ["hello", "weather"])
def test_silero_finds_each_utterance_once_with_its_boundaries(name: str) -> None:
    x = load(name)
    active = np.flatnonzero(np.abs(x) > 0.02) / 24  # ms with audible signal
    lead = 500
    events = run(SileroDetector(0.5, 500), np.concatenate([zeros(lead), x, zeros(1200)]))
    assert [e.speaking for e in events] == [True, False]
    start, stop = events[0].at_ms - lead, events[1].at_ms - lead
    assert abs(start - active[0]) <= 150, (start, active[0])
    assert abs(stop - active[-1]) <= 450, (stop, active[-1])
    assert stop - start >= 1000  # both utterances are over a second of speech


def test_silero_is_a_speech_detector_not_an_energy_gate() -> None:
    t = np.arange(24000 * 2) / 24000
    tone = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    noise = (0.1 * np.random.default_rng(7).standard_normal(48000)).astype(np.float32)
    for loud in (tone, noise):
        x = np.concatenate([zeros(300), loud, zeros(800)])
        assert run(SileroDetector(0.5, 500), x) == []
        assert [e.speaking for e in run(EnergyDetector(0.5, 500), x)] == [True, False]


def test_silero_same_positions_at_16k_and_24k_input() -> None:
    x24 = np.concatenate([zeros(300), load("hello"), zeros(1000)])
    x16 = soxr.resample(x24, 24000, 16000).astype(np.float32)
    a = run(SileroDetector(0.5, 500), x24, 24000)
    b = run(SileroDetector(0.5, 500), x16, 16000)
    assert [e.speaking for e in a] == [e.speaking for e in b]
    assert all(abs(p.at_ms - q.at_ms) <= W for p, q in zip(a, b, strict=True))


def test_short_speech_snippet_is_short_and_reset_restarts_the_model() -> None:
    x = load("weather")[24 * 400 : 24 * 650]  # 250 ms of a word: a backchannel-sized utterance
    det = SileroDetector(0.5, 300)
    ev = run(det, np.concatenate([zeros(300), x, zeros(800)]))
    assert [e.speaking for e in ev] == [True, False]
    assert ev[1].at_ms - ev[0].at_ms <= 450
    det.reset(10_000)
    ev2 = run(det, np.concatenate([zeros(300), x, zeros(800)]))
    assert [round(e.at_ms - 10_000) for e in ev2] == [round(e.at_ms) for e in ev]


def test_floor_rms_gates_near_silence_without_running_the_model() -> None:
    x = np.concatenate([zeros(300), load("hello") * 0.005, zeros(800)])  # speech at -60 dBFS
    gated = SileroDetector(0.5, 500, floor_rms=0.003)
    assert run(gated, x) == []
    assert gated.windows == 0  # the model was never called
    ungated = SileroDetector(0.5, 500)
    run(ungated, x)
    assert ungated.windows > 50


def test_make_detector() -> None:
    assert isinstance(make_detector("silero", 0.5, 500), SileroDetector)
    e = make_detector("energy", 0.5, 400, floor_rms=0.01)
    assert isinstance(e, EnergyDetector) and e.silence_ms == 400 and e.floor_rms == 0.01
    with pytest.raises(ValueError, match="unknown VAD"):
        make_detector("webrtc", 0.5, 500)


# ---------------------------------------------------------------- timing rules
def test_start_needs_min_speech_and_is_reported_at_its_first_window() -> None:
    det = Scripted([0.0, 0.9, 0.1, 0.0, 0.9, 0.9, 0.9], threshold=0.5, silence_ms=300, min_speech_ms=64)
    ev = feed_windows(det, 7)
    assert ev == [VadEvent(True, 4 * W)]  # the lone voiced window at 1 was a click
    assert det.speaking and det.voiced_until_ms == 7 * W


def test_stop_after_silence_ms_reported_where_silence_began_with_hysteresis() -> None:
    # 0.4 is under the threshold but above threshold - 0.15: it keeps speech going.
    probs = [0.9, 0.9, 0.4, 0.4, 0.0, 0.0, 0.9] + [0.0] * 10
    det = Scripted(probs, threshold=0.5, silence_ms=150, min_speech_ms=64)
    ev = feed_windows(det, len(probs))
    # A pause of 2 windows (64 ms) is shorter than silence_ms: one utterance.
    assert ev == [VadEvent(True, 0.0), VadEvent(False, 7 * W)]
    assert det.voiced_until_ms == 7 * W  # the hangover is not counted as voiced


def test_events_at_caller_positions_after_reset_and_across_pieces() -> None:
    det = EnergyDetector(0.5, 200)
    det.reset(5000.0)
    x = np.concatenate([zeros(96, 16000), np.full(16 * 320, 0.5, np.float32), zeros(400, 16000)])
    ev = run(det, x, 16000, piece_ms=7)  # odd piece sizes: windows span pieces
    assert ev == [VadEvent(True, 5000 + 96), VadEvent(False, 5000 + 96 + 320)]
    assert det.position_ms == pytest.approx(5000 + (x.size // 512) * W)


def test_reset_drops_speech_state() -> None:
    det = EnergyDetector(0.5, 200)
    assert run(det, np.full(16 * 200, 0.5, np.float32), 16000)[0].speaking
    det.reset(0)
    assert not det.speaking
    assert run(det, zeros(1000, 16000), 16000) == []  # no stop for a speech it no longer knows


# ---------------------------------------------------------------- pooled model contexts
def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


def test_dropped_detectors_give_their_model_back_and_memory_stays_at_the_peak() -> None:
    """Rounds of 100 sessions' detectors: the contexts of one round serve the next
    (unpooled, each round left ~250 MB behind that the next did not reuse)."""
    from duplexd.actors.silero_pool import POOL

    speech = np.concatenate([zeros(300), load("hello"), zeros(800)])
    window = np.zeros(512 * 3, np.float32)
    rss: list[float] = []
    loaded: list[int] = []
    for _ in range(3):
        dets = [SileroDetector(0.5, 500) for _ in range(100)]
        for d in dets:
            d.feed(window, 16000)  # each context runs (its compute buffers are in use)
        del dets, d
        rss.append(_rss_mb())
        loaded.append(POOL.loaded)
    assert loaded[2] == loaded[0], loaded  # rounds 2 and 3 made no new context
    assert rss[2] - rss[0] < 30, rss
    # A context given back is reset: a reused detector hears exactly what a fresh one does.
    fresh = run(SileroDetector(0.5, 500), speech)
    assert fresh and run(SileroDetector(0.5, 500), speech) == fresh


def test_release_gives_the_context_back_at_once() -> None:
    """A closed session's parts reference each other, so its detector goes only with a
    garbage collection: the session releases it on close instead (the bench of rounds of
    100 sessions showed +254 MB a round before)."""
    from duplexd.actors.silero_pool import POOL

    det = SileroDetector(0.5, 500)
    model = det._model
    cycle = [det]
    cycle.append(cycle)  # type: ignore[arg-type]  # kept alive by a cycle, like a session's parts
    idle = POOL.idle
    det.release()
    assert POOL.idle == idle + 1
    assert SileroDetector(0.5, 500)._model is model
