"""The uncommitted input audio of a turn-mode session (Realtime ``input_audio_buffer``).

Positioned on the session's input clock (ms of audio received), so server VAD positions
(speech start minus prefix padding) map onto samples of the buffer.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

Pcm = npt.NDArray[np.float32]  # mono float32 audio at the engine's input rate


class InputBuffer:
    """Appended pieces of float32 audio at one rate; committed (taken) or dropped whole."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self._parts: list[Pcm] = []
        self.samples = 0
        self.start_ms = 0.0  # input-clock position of the first sample held

    @property
    def ms(self) -> float:
        return self.samples * 1000 / self.rate

    def append(self, pcm: Pcm, at_ms: float) -> None:
        """``pcm`` whose first sample is at input position ``at_ms``."""
        if not self._parts:
            self.start_ms = at_ms
        self._parts.append(pcm)
        self.samples += pcm.size

    def drop(self, now_ms: float) -> None:
        """Forget everything; the next audio starts at ``now_ms``."""
        self._parts.clear()
        self.samples = 0
        self.start_ms = now_ms

    def keep_tail(self, samples: int, now_ms: float) -> None:
        """Keep only the last ``samples`` (silence server VAD has ruled out goes)."""
        pcm = np.concatenate(self._parts)[-samples:] if samples > 0 and self._parts else np.zeros(0, np.float32)
        self._parts = [pcm] if pcm.size else []
        self.samples = pcm.size
        self.start_ms = now_ms - pcm.size * 1000 / self.rate

    def take(self, from_ms: float | None, now_ms: float) -> Pcm:
        """All audio held (from input position ``from_ms`` on, if given), emptying the buffer."""
        pcm = np.concatenate(self._parts) if self._parts else np.zeros(0, np.float32)
        if from_ms is not None:
            skip_ms = max(0.0, from_ms - self.start_ms)
            pcm = pcm[int(skip_ms * self.rate / 1000) :]
        self.drop(now_ms)
        return pcm
