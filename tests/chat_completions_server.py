"""A stand-in for vLLM / llama.cpp: a real local HTTP server speaking the OpenAI chat
completions streaming format (SSE), scripted per request, recording what it was sent.

Used by the cascade engine's ``openai-chat`` policy tests (unit and e2e).
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Reply:
    """One scripted answer: text pieces sent after a delay each, split into token-like deltas."""

    pieces: list[tuple[float, str]] = field(default_factory=list)
    status: int = 200  # not 200: a JSON error body instead
    stream: bool = True  # False: one non-streaming chat.completion JSON document
    done_marker: bool = True  # False: the stream ends without "data: [DONE]"


@dataclass
class ChatScript:
    """Answers in order (a default one-sentence reply when empty) and what was received."""

    replies: deque[Reply] = field(default_factory=deque)
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    sent_at: list[list[float]] = field(default_factory=list)  # monotonic time each piece was written
    disconnected: threading.Event = field(default_factory=threading.Event)  # a client hung up mid-stream
    models: list[str] = field(default_factory=lambda: ["stand-in"])  # GET /v1/models lists these
    model_queries: list[dict[str, str]] = field(default_factory=list)  # headers of each GET /v1/models

    def say(self, *pieces: tuple[float, str], **kw: Any) -> None:
        self.replies.append(Reply(list(pieces), **kw))


def chat_server(script: ChatScript) -> ThreadingHTTPServer:
    """Serve ``script`` on 127.0.0.1 (a free port) until ``shutdown()``; POST /v1/chat/completions,
    GET /v1/models."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def _json(self, status: int, doc: dict[str, Any]) -> None:
            body = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path != "/v1/models":
                self._json(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
                return
            script.model_queries.append(dict(self.headers))
            self._json(200, {"object": "list", "data": [{"id": m, "object": "model"} for m in script.models]})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            script.requests.append(body)
            script.headers.append(dict(self.headers))
            reply = script.replies.popleft() if script.replies else Reply([(0.0, "Okay.")])
            if self.path != "/v1/chat/completions":
                self._json(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
                return
            if reply.status != 200:
                self._json(reply.status, {"error": {"message": "model overloaded", "type": "server_error"}})
                return
            times: list[float] = []
            script.sent_at.append(times)
            if not reply.stream:
                text = "".join(t for _, t in reply.pieces)
                self._json(200, {"object": "chat.completion", "choices": [{"message": {"content": text}}]})
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            try:
                for delay, text in reply.pieces:
                    time.sleep(delay)
                    for tok in re.findall(r"\S+\s*|\s+", text):  # token-like deltas
                        chunk = {"choices": [{"index": 0, "delta": {"content": tok}, "finish_reason": None}]}
                        self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                    self.wfile.flush()
                    times.append(time.monotonic())
                if reply.done_marker:
                    self.wfile.write(b"data: [DONE]\n\n")
                    self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                script.disconnected.set()
            self.close_connection = True

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv
