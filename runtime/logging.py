"""Log setup: one JSON object per line with role, pid and the structured fields.

Every line is scrubbed of the process's secrets (API keys) before it is written.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

from duplexd.bus.log import STRUCTURED_FIELDS
from duplexd.runtime.secrets import scrub


class JsonFormatter(logging.Formatter):
    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role
        self.pid = os.getpid()

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "role": self.role,
            "pid": self.pid,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in STRUCTURED_FIELDS[1:]:
            val = getattr(record, key, None)
            if val is not None:
                out[key] = val
        for k, v in (getattr(record, "fields", None) or {}).items():
            out[f"field_{k}" if k in out else k] = v  # never clobber role/pid/msg
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        parts = [
            time.strftime("%H:%M:%S", time.localtime(record.created)),
            f"{self.role:7s}",
            record.levelname[:4],
            record.getMessage(),
        ]
        for key in STRUCTURED_FIELDS[1:]:
            val = getattr(record, key, None)
            if val is not None:
                parts.append(f"{key}={val}")
        for k, v in (getattr(record, "fields", None) or {}).items():
            parts.append(f"{k}={v}")
        line = " ".join(str(p) for p in parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class RedactingFormatter(logging.Formatter):
    """Another formatter's lines with every secret value replaced by ``<redacted>``."""

    def __init__(self, inner: logging.Formatter, secrets: list[str]) -> None:
        super().__init__()
        self.inner = inner
        self.secrets = secrets

    def format(self, record: logging.LogRecord) -> str:
        return scrub(self.inner.format(record), self.secrets)


def setup(role: str, level: str = "INFO", fmt: str = "json", secrets: list[str] | None = None) -> None:
    handler = logging.StreamHandler(sys.stderr)
    inner: logging.Formatter = JsonFormatter(role) if fmt == "json" else TextFormatter(role)
    handler.setFormatter(RedactingFormatter(inner, secrets) if secrets else inner)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # websockets logs every failed handshake at ERROR with a traceback; keep it at WARNING.
    logging.getLogger("websockets").setLevel(logging.WARNING)
