"""Streaming Whisper log-mel features for the Qwen2.5-Omni audio encoder.

The encoder reads 128-bin log-mel frames (16 kHz, 25 ms window, 10 ms hop) in windows of
``2 * n_window`` frames (2 s) and treats every window on its own: convolution padding,
positions and attention all restart per window. So a user turn can be encoded window by
window as the audio arrives, and only the tail window waits for the end of the turn.

Frames match ``WhisperFeatureExtractor`` (centred STFT, reflect padding at the start,
the zero padding it adds at the end, ``log10``, clamp to 8 below the maximum, ``(x+4)/4``)
with one streaming change: the maximum is the running maximum of the turn so far,
because the offline extractor's maximum over the whole clip is not known until its end.
"""

from __future__ import annotations

import numpy as np

RATE = 16000
N_FFT = 400
HOP = 160
N_MELS = 128


def mel_filters() -> np.ndarray:
    """[201, 128] Slaney mel filter bank, as the Whisper feature extractor builds it."""
    from transformers.audio_utils import mel_filter_bank

    return mel_filter_bank(
        num_frequency_bins=1 + N_FFT // 2,
        num_mel_filters=N_MELS,
        min_frequency=0.0,
        max_frequency=8000.0,
        sampling_rate=RATE,
        norm="slaney",
        mel_scale="slaney",
    ).astype(np.float32)


_WINDOW = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)).astype(np.float32)  # periodic Hann


class StreamingMel:
    """Log-mel frames of one user turn, released in whole encoder windows."""

    def __init__(self, filters: np.ndarray, window_frames: int = 200, max_samples: int = 0) -> None:
        self.filters = filters
        self.window_frames = window_frames
        self.max_samples = max_samples  # 0: unbounded; beyond it input is ignored (turn too long)
        self._samples = np.zeros(0, dtype=np.float32)
        self._base = 0  # stream index of _samples[0]
        self.n = 0  # samples received
        self.frames_out = 0  # frames released
        self._max = -np.inf  # running maximum of log10 mel
        self.dropped = 0  # samples beyond max_samples

    def push(self, pcm: np.ndarray) -> list[np.ndarray]:
        """Adds audio; returns the windows it completes, each [128, window_frames] float32."""
        pcm = np.asarray(pcm, dtype=np.float32).reshape(-1)
        if self.max_samples and self.n + pcm.size > self.max_samples:
            keep = max(0, self.max_samples - self.n)
            self.dropped += pcm.size - keep
            pcm = pcm[:keep]
        if pcm.size:
            self._samples = np.concatenate((self._samples, pcm))
            self.n += pcm.size
        out = []
        while True:
            last = self.frames_out + self.window_frames - 1
            if self.n < last * HOP + N_FFT // 2 + 1:  # the last frame's window must be complete
                break
            out.append(self._frames(self.frames_out, self.frames_out + self.window_frames, final=False))
        return out

    def flush(self) -> np.ndarray:
        """The frames not released yet ([128, f], f may be 0): the end of the turn."""
        total = -(-self.n // HOP)  # the frames the processor's feature mask keeps: ceil(n / hop)
        if total <= self.frames_out:
            return np.zeros((N_MELS, 0), dtype=np.float32)
        return self._frames(self.frames_out, total, final=True)

    def _frames(self, a: int, b: int, final: bool) -> np.ndarray:
        # Frame t covers stream samples [t*HOP - 200, t*HOP + 200): reflect before 0, zeros after n.
        lo, hi = a * HOP - N_FFT // 2, (b - 1) * HOP + N_FFT // 2
        seg = np.zeros(hi - lo, dtype=np.float32)
        src_lo, src_hi = max(lo, 0), min(hi, self.n)
        seg[src_lo - lo : src_hi - lo] = self._samples[src_lo - self._base : src_hi - self._base]
        if lo < 0:  # numpy's "reflect": x[k] for k = -1, -2, ... is x[1], x[2], ...
            k = -lo
            seg[:k] = self._samples[1 : k + 1][::-1] if self.n > k else 0.0
        frames = np.lib.stride_tricks.sliding_window_view(seg, N_FFT)[::HOP][: b - a]
        spec = np.abs(np.fft.rfft(frames * _WINDOW, axis=-1)) ** 2  # [f, 201]
        logmel = np.log10(np.maximum(spec @ self.filters, 1e-10)).T  # [128, f]
        self._max = max(self._max, float(logmel.max()))
        logmel = (np.maximum(logmel, self._max - 8.0) + 4.0) / 4.0
        self.frames_out = b
        if not final:
            # Keep only what later frames still read (their windows reach back 200 samples).
            drop = b * HOP - N_FFT // 2 - self._base
            if drop > N_FFT:  # (the reflected start needs the first 201 samples)
                self._samples = self._samples[drop:]
                self._base += drop
        return logmel.astype(np.float32)


def tokens_for_frames(frames: int) -> int:
    """Audio tokens the encoder makes of one window of ``frames`` mel frames."""
    if frames <= 0:
        return 0
    after_conv = (frames - 1) // 2 + 1
    return max(0, (after_conv - 2) // 2 + 1)
