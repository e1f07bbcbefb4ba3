"""Secrets in the config (API keys): never on disk in the clear, never printed.

``duplexd serve`` writes the effective config for its children without the secrets and
hands the secrets over in the children's environment (``DUPLEXD_SECRETS``, readable
only by the same user, gone with the process); each child removes the variable as it
reads it. Everything that prints a config prints :func:`redacted`, and the log
formatters scrub every secret value (:func:`values`) from every line.
"""

from __future__ import annotations

import json
import os
from typing import Any, TypeVar

import msgspec

ENV = "DUPLEXD_SECRETS"
REDACTED = "<redacted>"
# Dotted keys of the config that hold secrets.
KEYS = ("server.api_keys", "engines.cascade.openai_api_key")

S = TypeVar("S", bound=msgspec.Struct)


def _get(obj: Any, key: str) -> Any:
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _set(obj: S, key: str, value: Any) -> S:
    head, _, rest = key.partition(".")
    inner = value if not rest else _set(getattr(obj, head), rest, value)
    return msgspec.structs.replace(obj, **{head: inner})


def _blank(value: Any, mark: str | None) -> Any:
    if isinstance(value, list | tuple):
        return [mark] * len(value) if mark else []
    return (mark or "") if value else value


def redacted(cfg: S) -> S:
    """``cfg`` with every secret replaced by ``<redacted>`` (for printing)."""
    for key in KEYS:
        cfg = _set(cfg, key, _blank(_get(cfg, key), REDACTED))
    return cfg


def split(cfg: S) -> tuple[S, dict[str, Any]]:
    """(``cfg`` without its secrets, the secrets by key): what a file may hold, what it may not."""
    secrets = {k: _get(cfg, k) for k in KEYS if _get(cfg, k)}
    for key in secrets:
        cfg = _set(cfg, key, _blank(_get(cfg, key), None))
    return cfg, secrets


def merge(cfg: S, secrets: dict[str, Any]) -> S:
    """``cfg`` with the secrets of :func:`split` put back."""
    for key, value in secrets.items():
        if key not in KEYS:
            raise ValueError(f"{ENV}: {key!r} is not a secret config key")
        cfg = _set(cfg, key, list(value) if isinstance(value, list | tuple) else value)
    return cfg


def to_env(secrets: dict[str, Any]) -> dict[str, str]:
    return {ENV: json.dumps(secrets)} if secrets else {}


def take_from_env() -> dict[str, Any]:
    """The secrets the supervisor passed, removed from this process's environment."""
    raw = os.environ.pop(ENV, "")
    return json.loads(raw) if raw else {}


def values(cfg: Any) -> list[str]:
    """Every secret string the process may hold: keys from the config, the key file, the
    chat endpoint's key from its environment variable."""
    out: list[str] = list(cfg.server.api_keys)
    if cfg.server.api_key_file:
        try:
            from duplexd.adapters.server import load_api_keys

            out += load_api_keys(cfg.server)
        except OSError:
            pass
    cascade = cfg.engines.cascade
    out.append(cascade.openai_api_key)
    if cascade.openai_api_key_env:
        out.append(os.environ.get(cascade.openai_api_key_env, ""))
    # Very short values would scrub ordinary words from the logs; keys are long.
    return sorted({v for v in out if len(v) >= 4}, key=len, reverse=True)


def scrub(text: str, secrets: list[str]) -> str:
    for s in secrets:
        if s in text:
            text = text.replace(s, REDACTED)
    return text
