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
from duplexd.actors.engines.cascade import requirements as cascade_requirements
from duplexd.actors.engines.moshi import MoshiOptions
from duplexd.actors.engines.qwen_omni.options import QwenOmniOptions
from duplexd.actors.engines.scripted import ScriptedOptions, ScriptedTalker, ScriptedThinker


class EngineOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[engines]``: one typed section per engine."""

    scripted: ScriptedOptions = ScriptedOptions()
    cascade: CascadeOptions = CascadeOptions()
    moshi: MoshiOptions = MoshiOptions()
    qwen_omni: QwenOmniOptions = QwenOmniOptions()


ThinkerFactory = Callable[[Any], Thinker]
TalkerFactory = Callable[[Any], Talker]


# Model engines import torch and transformers only when built, so that importing the
# registry (config loading, every role) stays light.
def _moshi_thinker(opts: MoshiOptions) -> Thinker:
    from duplexd.actors.engines.moshi.thinker import MoshiThinker

    return MoshiThinker(opts)


def _moshi_talker(opts: MoshiOptions) -> Talker:
    from duplexd.actors.engines.moshi.talker import MoshiTalker

    return MoshiTalker(opts)


def _qwen_thinker(opts: QwenOmniOptions) -> Thinker:
    from duplexd.actors.engines.qwen_omni.thinker import QwenOmniThinker

    return QwenOmniThinker(opts)


def _qwen_talker(opts: QwenOmniOptions) -> Talker:
    from duplexd.actors.engines.qwen_omni.talker import QwenOmniTalker

    return QwenOmniTalker(opts)


_ENGINES: dict[str, tuple[str, ThinkerFactory, TalkerFactory]] = {
    "scripted": ("scripted", ScriptedThinker, ScriptedTalker),
    "cascade": ("cascade", CascadeThinker, CascadeTalker),
    "moshi": ("moshi", _moshi_thinker, _moshi_talker),
    "qwen-omni": ("qwen_omni", _qwen_thinker, _qwen_talker),
}


def engine_names() -> list[str]:
    return sorted(_ENGINES)


def _lookup(name: str) -> tuple[str, ThinkerFactory, TalkerFactory]:
    try:
        return _ENGINES[name]
    except KeyError:
        raise ValueError(f"unknown engine {name!r}; known: {', '.join(engine_names())}") from None


# Per engine: what is missing to run it (one line naming the extra to install), or None.
_REQUIREMENTS: dict[str, Callable[[Any], str | None]] = {
    "cascade": cascade_requirements.missing,
}


def missing_requirements(name: str, options: EngineOptions) -> str | None:
    """Why engine ``name`` cannot load here (packages not installed), or None."""
    section, _, _ = _lookup(name)
    check = _REQUIREMENTS.get(name)
    return check(getattr(options, section)) if check else None


def build_thinker(name: str, options: EngineOptions) -> Thinker:
    section, thinker, _ = _lookup(name)
    return thinker(getattr(options, section))


def build_talker(name: str, options: EngineOptions) -> Talker:
    section, _, talker = _lookup(name)
    return talker(getattr(options, section))
