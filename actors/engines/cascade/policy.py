"""Reply policies: what the cascade says back to what it heard.

A policy turns the conversation into a :class:`ReplyStream` of sentences. The thinker
polls the stream once per step and never waits: ``echo`` answers at once,
``openai-chat`` streams from an OpenAI-compatible ``/chat/completions`` endpoint (a
local vLLM or llama.cpp server) in a background thread, and ``local`` (local_policy.py)
generates in-process on CTranslate2 in a background thread; either way the first
sentence goes to the voice while the rest is still being generated.
"""

from __future__ import annotations

import abc
import http.client
import json
import logging
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from duplexd.actors.engines.cascade.text import SentenceSplitter, clean_for_speech, split_sentences
from duplexd.bus.log import get_logger, log
from duplexd.bus.messages import BackendStatus

_log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str  # system | user | assistant
    content: str


def last_user_text(messages: list[ChatMessage]) -> str:
    return next((m.content for m in reversed(messages) if m.role == "user"), "")


@dataclass(frozen=True, slots=True)
class Polled:
    """What one poll of a reply found: new sentences, whether that is all, any error."""

    sentences: list[str]
    done: bool
    error: str | None = None


class ReplyStream(abc.ABC):
    """Sentences of one reply, as they become available."""

    @abc.abstractmethod
    def poll(self) -> Polled:
        """Sentences that arrived since the last poll, atomically with done/error (never blocks)."""

    def cancel(self) -> None:  # noqa: B027 - nothing to stop by default
        """Stop producing (barge-in, cancel); idempotent."""


class ReplyPolicy(abc.ABC):
    """Decides the reply text for a conversation."""

    name: str

    @abc.abstractmethod
    def start(self, messages: list[ChatMessage], temperature: float) -> ReplyStream:
        """Begin a reply to ``messages`` (system prompt first, newest user turn last)."""

    def load(self) -> None:  # noqa: B027 - nothing to load by default
        """Prepare and load models (stage0 start, before READY)."""

    def warm_up(self) -> None:  # noqa: B027 - nothing to warm by default
        """One throwaway pass so the first client does not pay for lazy initialisation."""

    def describe(self) -> dict[str, Any]:
        """What the start-up log says about this policy."""
        return {}

    def close(self) -> None:  # noqa: B027 - nothing to release by default
        """Release resources (stage0 shutdown)."""

    def probe(self) -> BackendStatus | None:
        """Check what the policy relies on (at start-up); None: it relies on nothing."""
        return None


class FixedReply(ReplyStream):
    """A reply whose whole text is known up front."""

    def __init__(self, sentences: list[str]) -> None:
        self._left = deque(sentences)

    def poll(self) -> Polled:
        out = list(self._left)
        self._left.clear()
        return Polled(out, True)

    def cancel(self) -> None:
        self._left.clear()


class EchoPolicy(ReplyPolicy):
    """Repeats what the ASR understood: the honest offline default (no language model)."""

    name = "echo"

    def __init__(self, template: str = "You said: {transcript}", empty_reply: str = "", max_chars: int = 200):
        self.template = template
        self.empty_reply = empty_reply
        self.max_chars = max_chars

    def start(self, messages: list[ChatMessage], temperature: float) -> ReplyStream:
        heard = last_user_text(messages).strip()
        text = self.template.format(transcript=heard) if heard else self.empty_reply
        return FixedReply(split_sentences(text, self.max_chars))


class ChatStreamError(Exception):
    """The chat endpoint failed or answered something that is not a chat completion."""


class _ChatStream(ReplyStream):
    """One streaming chat completion, read by a daemon thread."""

    def __init__(self, policy: OpenAIChatPolicy, body: bytes) -> None:
        self._policy = policy
        self._body = body
        self._lock = threading.Lock()
        self._ready: deque[str] = deque()
        self._finished = False
        self._error: str | None = None
        self._cancelled = threading.Event()
        self._conn: http.client.HTTPConnection | None = None
        self._sock: socket.socket | None = None  # kept: http.client drops conn.sock once the response owns it
        self._splitter = SentenceSplitter(policy.max_chars)
        self.text = ""  # everything received so far (for logs and tests)
        self._started = time.monotonic()
        self._first_at: float | None = None
        self._thread = threading.Thread(target=self._run, name="chat-stream", daemon=True)
        self._thread.start()

    def poll(self) -> Polled:
        with self._lock:
            out = list(self._ready)
            self._ready.clear()
            return Polled(out, self._finished, self._error)

    @property
    def finished(self) -> bool:
        with self._lock:
            return self._finished

    def cancel(self) -> None:
        self._cancelled.set()
        with self._lock:
            self._ready.clear()
        sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes the reader blocked in recv
            except OSError:
                pass

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    # ------------------------------------------------------------------ reader thread
    def _run(self) -> None:
        try:
            self._request()
        except Exception as exc:
            if not self._cancelled.is_set():
                with self._lock:
                    self._error = f"chat endpoint {self._policy.endpoint}: {type(exc).__name__}: {exc}"
        finally:
            tail = self._splitter.flush()
            with self._lock:
                if not self._cancelled.is_set() and self._error is None:
                    self._ready.extend(tail)
                self._finished = True
            log(
                _log,
                logging.DEBUG,
                "cascade: chat reply finished",
                first_text_s=None if self._first_at is None else round(self._first_at - self._started, 3),
                total_s=round(time.monotonic() - self._started, 3),
                chars=len(self.text),
                cancelled=self._cancelled.is_set(),
                error=self._error,
            )
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()

    def _request(self) -> None:
        p = self._policy
        cls = http.client.HTTPSConnection if p.scheme == "https" else http.client.HTTPConnection
        conn = self._conn = cls(p.host, p.port, timeout=p.timeout_s)
        if self._cancelled.is_set():
            return
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if p.api_key:
            headers["Authorization"] = f"Bearer {p.api_key}"
        conn.connect()
        self._sock = conn.sock
        if self._cancelled.is_set():
            return
        conn.request("POST", p.path, body=self._body, headers=headers)
        resp = conn.getresponse()
        try:
            self._read(resp)
        finally:
            resp.close()

    def _read(self, resp: http.client.HTTPResponse) -> None:
        if resp.status != 200:
            detail = resp.read(2000).decode("utf-8", "replace").strip()
            raise ChatStreamError(f"HTTP {resp.status} {resp.reason}: {detail}")
        ctype = resp.getheader("Content-Type", "")
        if "text/event-stream" not in ctype:
            # A server that ignored "stream": one JSON completion.
            doc = json.loads(resp.read())
            self._delta(_message_content(doc))
            return
        while not self._cancelled.is_set():
            raw = resp.readline()
            if not raw:
                raise ChatStreamError("stream ended without [DONE]")
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("data:"):
                continue  # blank separators, comments, "event:" lines
            data = line[5:].strip()
            if data == "[DONE]":
                return
            doc = json.loads(data)
            if "error" in doc:
                raise ChatStreamError(f"error event: {doc['error']}")
            self._delta(_delta_content(doc))

    def _delta(self, content: str) -> None:
        if not content:
            return
        if self._first_at is None:
            self._first_at = time.monotonic()
        self.text += content
        sentences = self._splitter.push(clean_for_speech(content))
        if sentences:
            with self._lock:
                if not self._cancelled.is_set():
                    self._ready.extend(sentences)


def _delta_content(doc: dict[str, Any]) -> str:
    choices = doc.get("choices") or []
    if not choices:
        return ""
    return (choices[0].get("delta") or {}).get("content") or ""


def _message_content(doc: dict[str, Any]) -> str:
    choices = doc.get("choices") or []
    if not choices:
        raise ChatStreamError(f"no choices in response: {str(doc)[:200]}")
    return (choices[0].get("message") or {}).get("content") or ""


class OpenAIChatPolicy(ReplyPolicy):
    """Streams the reply from ``<url>/chat/completions`` (OpenAI chat completions SSE)."""

    name = "openai-chat"

    def __init__(
        self,
        url: str,
        model: str = "default",
        api_key: str = "",
        max_tokens: int = 256,
        timeout_s: float = 30.0,
        max_chars: int = 200,
    ) -> None:
        parts = urlsplit(url.rstrip("/"))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"openai_url {url!r} is not an http(s) URL")
        self.endpoint = f"{url.rstrip('/')}/chat/completions"
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.path = f"{parts.path}/chat/completions"
        self.model = model
        self.api_key = api_key
        self.max_tokens = max_tokens
        self.timeout_s = timeout_s
        self.max_chars = max_chars
        self._streams: set[_ChatStream] = set()

    def describe(self) -> dict[str, Any]:
        return {"url": self.endpoint, "model": self.model}

    def start(self, messages: list[ChatMessage], temperature: float) -> ReplyStream:
        body: dict[str, object] = {
            "model": self.model,
            "messages": [{"role": m.role, "content": m.content} for m in messages],
            "stream": True,
            "temperature": temperature,
        }
        if self.max_tokens:
            body["max_tokens"] = self.max_tokens
        stream = _ChatStream(self, json.dumps(body).encode())
        self._streams = {s for s in self._streams if not s.finished}
        self._streams.add(stream)
        return stream

    def close(self) -> None:
        for s in self._streams:
            s.cancel()
        self._streams.clear()

    def probe(self, timeout_s: float = 3.0) -> BackendStatus:
        """``GET <url>/models`` (vLLM, llama.cpp and OpenAI all serve it): is the endpoint
        up, does it take our key, does it list our model."""
        base = self.endpoint.removesuffix("/chat/completions")
        public = _without_credentials(base)
        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        conn = cls(self.host, self.port, timeout=min(timeout_s, self.timeout_s))
        headers = {"Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        try:
            conn.request("GET", self.path.removesuffix("/chat/completions") + "/models", headers=headers)
            resp = conn.getresponse()
            body = resp.read(64 * 1024)
        except (OSError, http.client.HTTPException) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
            return BackendStatus("chat endpoint", public, False, f"unreachable: {reason}")
        finally:
            conn.close()
        if resp.status in (401, 403):
            return BackendStatus("chat endpoint", public, False, f"HTTP {resp.status}: the API key was refused")
        if resp.status != 200:
            # Up, but without a model list (some servers have none): the chat route may still work.
            return BackendStatus("chat endpoint", public, True, f"reachable; GET /models answered HTTP {resp.status}")
        try:
            served = [str(m.get("id")) for m in json.loads(body).get("data", []) if isinstance(m, dict)]
        except (ValueError, AttributeError):
            served = []
        if not served:
            return BackendStatus("chat endpoint", public, True, "reachable")
        listed = ", ".join(served[:5]) + (" ..." if len(served) > 5 else "")
        if self.model not in served:
            # llama.cpp ignores the name; vLLM refuses it. Say so rather than guess.
            return BackendStatus(
                "chat endpoint",
                public,
                True,
                f"reachable, but model {self.model!r} is not among those it serves ({listed}): "
                "set engines.cascade.openai_model (vLLM refuses unknown names)",
            )
        return BackendStatus("chat endpoint", public, True, f"reachable; serves {listed}")


def _without_credentials(url: str) -> str:
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return parts._replace(netloc=netloc).geturl()
