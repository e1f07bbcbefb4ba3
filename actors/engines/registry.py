"""Engine names → (thinker, talker) factories. Options come typed from ``[engines.*]``.

Importing this module must stay cheap and torch-free (``duplexd check-config`` and the
adapter import it): model engines are imported by their factory, when a stage builds one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from duplexd.actors.engines.base import Talker, Thinker
from duplexd.actors.engines.cascade import CascadeOptions, CascadeTalker, CascadeThinker
from duplexd.actors.engines.qwen_omni.options import QwenOmniOptions
from duplexd.actors.engines.scripted import ScriptedOptions, ScriptedTalker, ScriptedThinker


class EngineOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[engines]``: one typed section per engine."""

    scripted: ScriptedOptions = ScriptedOptions()
    cascade: CascadeOptions = CascadeOptions()
    qwen_omni: QwenOmniOptions = QwenOmniOptions()


ThinkerFactory = Callable[[Any], Thinker]
TalkerFactory = Callable[[Any], Talker]

def _qwen_thinker(opts: QwenOmniOptions) -> Thinker:
    from duplexd.actors.engines.qwen_omni.thinker import QwenOmniThinker

    return QwenOmniThinker(opts)


def _qwen_talker(opts: QwenOmniOptions) -> Talker:
    from duplexd.actors.engines.qwen_omni.talker import QwenOmniTalker

    return QwenOmniTalker(opts)


_ENGINES: dict[str, tuple[str, ThinkerFactory, TalkerFactory]] = {
    "scripted": ("scripted", ScriptedThinker, ScriptedTalker),
    "cascade": ("cascade", CascadeThinker, CascadeTalker),
    "qwen-omni": ("qwen_omni", _qwen_thinker, _qwen_talker),
}


def engine_names() -> list[str]:
    return sorted(_ENGINES)


def _lookup(name: str) -> tuple[str, ThinkerFactory, TalkerFactory]:
    try:
        return _ENGINES[name]
    except KeyError:
        raise ValueError(f"unknown engine {name!r}; known: {', '.join(engine_names())}") from None


def build_thinker(name: str, options: EngineOptions) -> Thinker:
    section, thinker, _ = _lookup(name)
    return thinker(getattr(options, section))


def build_talker(name: str, options: EngineOptions) -> Talker:
    section, _, talker = _lookup(name)
    return talker(getattr(options, section))
