"""Audio conversion at the edge: client formats ↔ the engine's native format.

Input is converted once, here, to float32 at the engine's input rate with a streaming
resampler that holds nothing back (:mod:`duplexd.bus.resample`; soxr HQ on request).
Output leaves as the bus output format (:mod:`duplexd.bus.audio_format`, pcm16 24 kHz),
resampled to the client's rate, or as G.711 at 8 kHz. G.711 uses the standard library's
``audioop`` (``audioop-lts`` on Python 3.13+), a maintained codec.
"""

from __future__ import annotations

import base64
import binascii
import sys
from dataclasses import dataclass

import numpy as np
import soxr

from duplexd.bus.audio_format import OUTPUT_DTYPE, OUTPUT_ENCODING, OUTPUT_RATE
from duplexd.bus.resample import ResamplerMode, stream_resampler

if sys.version_info >= (3, 13):  # pragma: no cover - depends on the interpreter
    import audioop  # provided by audioop-lts
else:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import audioop

G711_RATE = 8000


class AudioFormatError(ValueError):
    """Client audio that cannot be decoded as declared."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class AudioFormat:
    """A client-side audio format: encoding (pcm16 | pcmu | pcma | float32) and rate."""

    encoding: str = OUTPUT_ENCODING
    rate: int = OUTPUT_RATE

    @property
    def bytes_per_sample(self) -> int:
        return {"pcm16": 2, "pcmu": 1, "pcma": 1, "float32": 4}[self.encoding]


PCM16_OUT = AudioFormat(OUTPUT_ENCODING, OUTPUT_RATE)  # the bus output format, unchanged
SUPPORTED_RATES = (8000, 16000, 22050, 24000, 32000, 44100, 48000)


def b64decode(data: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise AudioFormatError("invalid_base64", f"audio is not valid base64: {exc}") from exc


def b64encode(data: bytes | memoryview | np.ndarray) -> str:
    if isinstance(data, np.ndarray):
        data = np.ascontiguousarray(data).data
    return base64.b64encode(data if isinstance(data, bytes) else data.cast("B")).decode()


def decode(raw: bytes | memoryview, fmt: AudioFormat) -> np.ndarray:
    """Client bytes → float32 mono at ``fmt.rate``."""
    n = len(raw)
    if n % fmt.bytes_per_sample:
        raise AudioFormatError(
            "invalid_audio_length",
            f"{fmt.encoding} audio must be a whole number of {fmt.bytes_per_sample}-byte samples; got {n} bytes",
        )
    if fmt.encoding == "pcm16":
        return np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    if fmt.encoding == "float32":
        x = np.frombuffer(raw, dtype="<f4")
        if not np.all(np.isfinite(x)):
            raise AudioFormatError("invalid_audio", "float32 audio contains NaN or infinity")
        return x.astype(np.float32, copy=True)
    lin = audioop.ulaw2lin(bytes(raw), 2) if fmt.encoding == "pcmu" else audioop.alaw2lin(bytes(raw), 2)
    return np.frombuffer(lin, dtype="<i2").astype(np.float32) / 32768.0


def encode(pcm_out: np.ndarray, fmt: AudioFormat, resampler: OutputResampler | None = None) -> bytes:
    """Bus output audio (pcm16 at ``OUTPUT_RATE``) → client bytes in ``fmt``."""
    if fmt == PCM16_OUT:
        return pcm_out.astype(OUTPUT_DTYPE, copy=False).tobytes()
    x = pcm_out.astype(np.float32) / 32768.0
    if fmt.rate != OUTPUT_RATE:
        x = resampler.push(x) if resampler else soxr.resample(x, OUTPUT_RATE, fmt.rate)
    if fmt.encoding == "float32":
        return x.astype("<f4").tobytes()
    lin: bytes = np.round(np.clip(x, -1.0, 32767 / 32768) * 32768.0).astype("<i2").tobytes()
    if fmt.encoding == "pcm16":
        return lin
    out: bytes = audioop.lin2ulaw(lin, 2) if fmt.encoding == "pcmu" else audioop.lin2alaw(lin, 2)
    return out


class InputResampler:
    """Streaming client-rate → engine-rate conversion (state kept across appends).

    ``low_latency`` (the default) holds nothing back, so the frame that completes an
    engine chunk in input time completes it at the engine rate too (the audio is shifted
    by ~1 ms instead); ``high_quality`` is soxr HQ, which holds up to ~30 ms of each push
    until the next (:mod:`duplexd.bus.resample`).
    """

    def __init__(self, in_rate: int, out_rate: int, mode: ResamplerMode = "low_latency") -> None:
        self.in_rate = in_rate
        self.out_rate = out_rate
        self.mode = mode
        self._rs = None if in_rate == out_rate else stream_resampler(in_rate, out_rate, mode)

    def push(self, x: np.ndarray) -> np.ndarray:
        if self._rs is None:
            return x
        return self._rs.push(x)

    def flush(self) -> np.ndarray:
        """The resampler's tail (call before commit so the last milliseconds count)."""
        if self._rs is None:
            return np.zeros(0, dtype=np.float32)
        return self._rs.flush()


class OutputResampler(InputResampler):
    """Streaming bus-output-rate → client-rate conversion for assistant audio (soxr HQ:
    its hold only delays the tail of an output message, never a decision)."""

    def __init__(self, out_rate: int) -> None:
        super().__init__(OUTPUT_RATE, out_rate, "high_quality")
