"""Streaming resamplers for real-time audio: a causal low-latency polyphase FIR, or soxr.

A look-ahead resampler (soxr, any quality) holds back the last few milliseconds of every
push until the next one arrives. On a 20 ms frame that completes an engine chunk, that
hold delays the whole chunk by one more frame. :class:`PolyphaseResampler` never holds a
sample: output ``n`` is computed from input up to its own instant with a windowed-sinc
filter made causal, so the audio comes out *shifted* by a constant ``delay_s`` (about
1 ms) instead of *held*. Every push of ``k`` input samples yields the outputs due up to
its last sample, so a chunk completes on the frame that completes it in input time.

Quality: a Kaiser-windowed sinc of ~2 ms (cut-off at 92 % of the lower Nyquist, ~80 dB
stop band), against soxr's HQ: see tests/unit/bus/test_resample.py, which compares the two
on speech-like audio.
"""

from __future__ import annotations

import functools
import math
from typing import Literal, Protocol

import numpy as np
import soxr

ResamplerMode = Literal["low_latency", "high_quality"]
RESAMPLER_MODES: tuple[ResamplerMode, ...] = ("low_latency", "high_quality")
_HALF_MS = 1.0  # filter half-length: the constant delay of the low-latency mode
_ROLLOFF = 0.92  # cut-off as a share of the lower Nyquist
_BETA = 8.0  # Kaiser window: ~80 dB stop band


class StreamResampler(Protocol):
    """What both modes offer: ``push`` a block, ``flush`` the tail (then start afresh)."""

    in_rate: int
    out_rate: int

    def push(self, x: np.ndarray) -> np.ndarray: ...

    def flush(self) -> np.ndarray: ...


@functools.lru_cache(maxsize=64)
def _filters(up: int, down: int, in_rate: int, out_rate: int, half: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(filter row per phase, the group matrix or None); shared by every resampler of a
    ratio (stage1 makes one per turn: the Kaiser window is not cheap)."""
    taps = 2 * half
    cutoff = 0.5 * min(1.0, out_rate / in_rate) * _ROLLOFF  # cycles per input sample
    j = np.arange(taps)
    rows = np.empty((up, taps))
    window = np.kaiser(taps, _BETA)
    for p in range(up):
        # Window element j is input sample i - (taps - 1) + j; output n (phase p) sits at
        # i + p / up, and the filter is centred `half` samples before it: the delay.
        dist = j - (taps - 1) + half - p / up
        h = 2 * cutoff * np.sinc(2 * cutoff * dist) * window
        rows[p] = h / h.sum()
    rows32 = rows.astype(np.float32)
    rows32.flags.writeable = False
    if up > 8:
        return rows32, None
    # Few phases: one (taps + offset) x up matrix computes a whole group of `up` consecutive
    # outputs from one window (member r's window ends r * down // up inputs after the first).
    offsets = [r * down // up for r in range(up)]
    group = np.zeros((taps + offsets[-1], up), dtype=np.float32)
    for r, off in enumerate(offsets):
        group[off : off + taps, r] = rows32[(r * down) % up]
    group.flags.writeable = False
    return rows32, group


class PolyphaseResampler:
    """Causal rational-ratio resampler: nothing held back, a constant ``delay_s`` shift.

    Output ``n`` is one filter row (its phase, ``n * M mod L``) times the window of inputs
    ending at ``floor(n * M / L)``. With few phases (``L`` = 2 for 24 kHz → 16 kHz) a push
    is one matrix product of a strided window view; many phases (44.1 kHz) gather rows.
    """

    def __init__(self, in_rate: int, out_rate: int, half_ms: float = _HALF_MS) -> None:
        g = math.gcd(in_rate, out_rate)
        self.in_rate, self.out_rate = in_rate, out_rate
        self.up, self.down = out_rate // g, in_rate // g
        half = max(8, round(in_rate * half_ms / 1000))
        taps = 2 * half
        self._rows, self._group = _filters(self.up, self.down, in_rate, out_rate, half)
        self._taps = taps
        self._half = half
        self.delay_s = half / in_rate
        self._hist = np.zeros(taps + self.down, dtype=np.float32)  # enough past inputs for a group
        self._pad = np.zeros(self.down + taps, dtype=np.float32)  # the last group's unused tail
        self._n_in = 0
        self._n_out = 0

    def push(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        start = self._n_in
        self._n_in += x.size
        hist = self._hist
        buf = np.concatenate((hist, x, self._pad))
        self._hist = buf[buf.size - self._pad.size - hist.size : buf.size - self._pad.size]
        n0 = self._n_out
        n1 = -(-self._n_in * self.up // self.down)  # every output whose instant has passed
        if n1 <= n0:
            return np.zeros(0, dtype=np.float32)
        self._n_out = n1
        up, down = self.up, self.down
        step = buf.strides[0]
        if self._group is not None:
            # One matrix product: group g (outputs g*up .. g*up + up - 1) reads the window of
            # inputs g*down - taps + 1 .. g*down + max offset; buf index of input i is
            # i - start + len(hist).
            g0, g1 = n0 // up, (n1 - 1) // up + 1
            k0 = g0 * down - self._taps + 1 - start + hist.size
            width = self._group.shape[0]
            view = np.ndarray((g1 - g0, width), np.float32, buf, k0 * step, (step * down, step))
            out: np.ndarray = (view @ self._group).reshape(-1)
            return out[n0 - g0 * up : n1 - g0 * up]
        n = np.arange(n0, n1)
        k = (n * down) // up - self._taps + 1 - start + hist.size
        wins = np.ndarray((buf.size - self._taps + 1, self._taps), np.float32, buf, 0, (step, step))
        res: np.ndarray = np.einsum("ij,ij->i", wins[k], self._rows[(n * down) % up])
        return res

    def flush(self) -> np.ndarray:
        """The delayed tail (``delay_s`` of zeros pushed through), trimmed so the whole
        stream has exactly ``round(n_in * out / in)`` samples; then start afresh."""
        total = round(self._n_in * self.up / self.down)
        tail = self.push(np.zeros(self._half, dtype=np.float32))
        keep = max(0, total - (self._n_out - tail.size))
        self.__init__(self.in_rate, self.out_rate)  # type: ignore[misc]
        return tail[:keep]


class SoxrResampler:
    """soxr HQ streaming (look-ahead: holds back up to ~30 ms of every push)."""

    def __init__(self, in_rate: int, out_rate: int) -> None:
        self.in_rate, self.out_rate = in_rate, out_rate
        self._rs = soxr.ResampleStream(in_rate, out_rate, 1, dtype="float32")

    def push(self, x: np.ndarray) -> np.ndarray:
        out: np.ndarray = self._rs.resample_chunk(np.asarray(x, dtype=np.float32))
        return out

    def flush(self) -> np.ndarray:
        tail: np.ndarray = self._rs.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
        self._rs = soxr.ResampleStream(self.in_rate, self.out_rate, 1, dtype="float32")
        return tail


def stream_resampler(in_rate: int, out_rate: int, mode: ResamplerMode = "low_latency") -> StreamResampler:
    """A streaming resampler of the given mode."""
    if mode == "low_latency":
        return PolyphaseResampler(in_rate, out_rate)
    return SoxrResampler(in_rate, out_rate)
