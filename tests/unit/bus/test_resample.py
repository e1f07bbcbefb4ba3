"""The low-latency input resampler: nothing held back, and the audio it makes matches the
high-quality (soxr HQ) path once its constant delay is taken out."""

from __future__ import annotations

import numpy as np
import pytest

from duplexd.adapters.audio import InputResampler
from duplexd.bus.resample import PolyphaseResampler, SoxrResampler

RATES = [(24000, 16000), (48000, 16000), (8000, 16000), (44100, 16000), (16000, 24000), (22050, 24000)]


def speech_like(rate: int, seconds: float, top_hz: float = 7000.0, seed: int = 3) -> np.ndarray:
    """Voiced harmonics up to ``top_hz`` with a moving pitch, plus a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(rate * seconds)) / rate
    f0 = 140 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    x = sum(np.sin(k * phase) / k for k in range(1, 40) if k * 170 < top_hz) * 0.08
    return (x + rng.normal(0, 0.002, t.size)).astype(np.float32)


def stream(rs: PolyphaseResampler | SoxrResampler, x: np.ndarray, frame: int) -> tuple[np.ndarray, int]:
    """Push ``x`` in frames; (output with the flushed tail, most samples held after a push)."""
    parts, held, n_in = [], 0, 0
    for i in range(0, x.size, frame):
        parts.append(rs.push(x[i : i + frame]))
        n_in += x[i : i + frame].size
        due = -(-n_in * rs.out_rate // rs.in_rate)
        held = max(held, due - sum(p.size for p in parts))
    parts.append(rs.flush())
    return np.concatenate(parts), held


def delayed(y: np.ndarray, delay: float) -> np.ndarray:
    """``y`` shifted later by ``delay`` samples (fractional, band-limited)."""
    f = np.fft.rfftfreq(y.size)
    return np.fft.irfft(np.fft.rfft(y) * np.exp(-2j * np.pi * f * delay), y.size)


@pytest.mark.parametrize(("in_rate", "out_rate"), RATES)
def test_low_latency_holds_nothing_and_matches_the_high_quality_path(in_rate: int, out_rate: int) -> None:
    x = speech_like(in_rate, 2.0, top_hz=0.8 * min(in_rate, out_rate) / 2)  # the band both keep
    frame = in_rate // 50  # 20 ms
    ll = PolyphaseResampler(in_rate, out_rate)
    fast, held = stream(ll, x, frame)
    slow, slow_held = stream(SoxrResampler(in_rate, out_rate), x, frame)
    assert held == 0  # every output whose instant has passed leaves with the push
    assert slow_held > 0  # (the reason for the mode: soxr HQ holds some back)
    assert fast.size == slow.size == round(x.size * out_rate / in_rate)
    ref = delayed(slow.astype(np.float64), ll.delay_s * out_rate)
    edge = out_rate // 20  # start-up and tail transients of both filters
    a, b = fast[edge:-edge], ref[edge:-edge]
    snr_db = 10 * np.log10(np.sum(b**2) / np.sum((a - b) ** 2))
    assert snr_db > 40.0, f"{in_rate}->{out_rate}: {snr_db:.1f} dB against soxr HQ"


def test_irregular_pushes_give_the_same_audio_as_regular_ones() -> None:
    x = speech_like(24000, 1.0)
    a, _ = stream(PolyphaseResampler(24000, 16000), x, 480)
    rs = PolyphaseResampler(24000, 16000)
    parts, i = [], 0
    for n in [1, 7, 480, 0, 333, 1000, 2, 479] * 40:
        parts.append(rs.push(x[i : i + n]))
        i += n
    parts.append(rs.push(x[i:]))
    parts.append(rs.flush())
    b = np.concatenate(parts)
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_a_chunk_completes_on_the_frame_that_completes_it() -> None:
    """100 ms engine chunks at 16 kHz from 20 ms frames at 24 kHz: the fifth frame of each
    chunk brings the chunk's last sample, in the default (low-latency) mode only."""
    x = speech_like(24000, 1.0)
    for mode, complete in (("low_latency", True), ("high_quality", False)):
        rs = InputResampler(24000, 16000, mode)
        got = 0
        on_time = []
        for k in range(50):
            got += rs.push(x[k * 480 : (k + 1) * 480]).size
            if k % 5 == 4:
                on_time.append(got >= (k // 5 + 1) * 1600)
        assert all(on_time) is complete, mode
