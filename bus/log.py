"""Structured logging helpers: every line carries the session, response and epoch.

``runtime.logging`` installs the JSON formatter; these helpers only attach fields.
"""

from __future__ import annotations

import logging
from typing import Any

_FIELDS = ("role", "session_id", "response_id", "epoch")


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)


def log(
    logger: logging.Logger,
    level: int,
    msg: str,
    *,
    session_id: str | None = None,
    response_id: str | None = None,
    epoch: int | None = None,
    exc_info: bool = False,
    **fields: Any,
) -> None:
    """Log ``msg`` with structured fields (skipped cheaply when the level is off)."""
    if not logger.isEnabledFor(level):
        return
    extra: dict[str, Any] = {"fields": fields}
    if session_id is not None:
        extra["session_id"] = session_id
    if response_id:
        extra["response_id"] = response_id
    if epoch is not None:
        extra["epoch"] = epoch
    logger.log(level, msg, extra=extra, exc_info=exc_info, stacklevel=2)


STRUCTURED_FIELDS = _FIELDS
