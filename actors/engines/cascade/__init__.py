"""The default CPU engine: VAD + Whisper ASR + a reply policy (stage0) → Piper TTS (stage1).

Everything runs on the CPU from model files shipped in PyPI wheels: no GPU, no model
hub. ``faster_whisper`` and ``piper`` are imported when the engine loads, so the
package imports (and the other engines work) without the ``cascade`` extra.
"""

from duplexd.actors.engines.cascade.options import CascadeOptions
from duplexd.actors.engines.cascade.talker import CascadeTalker
from duplexd.actors.engines.cascade.thinker import CascadeThinker

__all__ = ["CascadeOptions", "CascadeTalker", "CascadeThinker"]
