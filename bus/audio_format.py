"""The audio format on the bus, owned here: every other module imports it.

Assistant audio travels from stage1 through the host to the adapters as **pcm16
(little-endian int16), mono, 24 kHz**, whatever the talker's native rate (stage1
resamples). The adapters convert it once, at the edge, to the client's format. Input
audio travels as float32 mono at the *engine's* native rate, which each engine announces
in :class:`~duplexd.bus.messages.EngineInfo` (``input_rate``, ``chunk_samples``).
"""

from __future__ import annotations

from typing import Final

import numpy as np

OUTPUT_RATE: Final = 24000  # Hz, assistant audio on the bus and the default client rate
OUTPUT_ENCODING: Final = "pcm16"
OUTPUT_DTYPE: Final = np.dtype("<i2")


def output_seconds(samples: int) -> float:
    """Seconds of ``samples`` of bus output audio."""
    return samples / OUTPUT_RATE
