"""Plain HTTP answers served beside the websockets: health, metrics, static files."""

from __future__ import annotations

import json
import mimetypes
from http import HTTPStatus
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from websockets.datastructures import Headers
from websockets.http11 import Response

WEB_DIR = Path(__file__).parent / "web"

# Slim images have no /etc/mime.types: without these, CSS would go out as octet-stream
# and browsers refuse to apply it (strict MIME checking).
for _ext, _type in ((".css", "text/css"), (".js", "text/javascript"), (".html", "text/html"), (".wav", "audio/wav")):
    mimetypes.add_type(_type, _ext)


def response(status: int, body: bytes, content_type: str, extra: dict[str, str] | None = None) -> Response:
    headers = Headers(
        [("Content-Type", content_type), ("Content-Length", str(len(body))), ("Cache-Control", "no-store")]
    )
    for k, v in (extra or {}).items():
        headers[k] = v
    return Response(status, HTTPStatus(status).phrase, headers, body)


def json_response(status: int, payload: Any) -> Response:
    return response(status, json.dumps(payload, indent=1).encode(), "application/json")


def metrics_response(*registries: CollectorRegistry) -> Response:
    body = b"".join(generate_latest(r) for r in registries)
    return response(200, body, "text/plain; version=0.0.4; charset=utf-8")


def static_response(path: str, root: Path = WEB_DIR) -> Response | None:
    """A file under ``root`` for ``path`` (``/`` → index.html), or None."""
    rel = path.split("?", 1)[0].lstrip("/") or "index.html"
    target = (root / rel).resolve()
    if not target.is_relative_to(root.resolve()) or not target.is_file():
        return None
    ctype = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
    if ctype.startswith("text/") or ctype in ("application/javascript", "application/json"):
        ctype += "; charset=utf-8"
    return response(200, target.read_bytes(), ctype)
