"""An in-process chat model on CTranslate2: prompts as token ids, batched streaming generation.

One :class:`LocalLM` serves every session of a stage0 process. Requests go to a queue;
a worker thread runs all waiting requests (same temperature, up to ``max_batch``) as one
CTranslate2 ``generate_batch``, so concurrent sessions share each decoding step instead
of taking turns. CTranslate2 calls back once per generated token and batch item; the
callback hands the token to its request and returns whether that request was cancelled,
which stops decoding for that item before its next token. A request that arrives while
a batch is running waits for it (at most ``max_tokens`` steps).

Generation never runs on the stage loop's thread: the loop only polls (see policy.py).
"""

from __future__ import annotations

import abc
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from duplexd.actors.engines.cascade.convert import ChatFormat
from duplexd.actors.engines.cascade.model_cache import PreparedModel
from duplexd.bus.log import get_logger, log

_log = get_logger(__name__)
_MAX_CACHED_PREFIXES = 16  # distinct system prompts whose prefilled state stays cached


@dataclass(frozen=True, slots=True)
class Turn:
    role: str  # system | user | assistant
    content: str


@dataclass(frozen=True, slots=True)
class Prompt:
    prefix: tuple[int, ...]  # BOS + system turn: cacheable
    rest: list[int]  # history, the newest user turn, the assistant header


class TokenSink(abc.ABC):
    """What a generation request streams into (the policy's reply stream implements it)."""

    prefix: tuple[str, ...]  # token strings of the cacheable prompt prefix
    prompt: list[str]  # token strings of the rest of the prompt
    temperature: float

    @abc.abstractmethod
    def accept(self, token_id: int) -> bool:
        """One generated token (end tokens excluded), on the generator's thread; True stops it."""

    @abc.abstractmethod
    def finish(self, reason: str, error: str | None = None) -> None:
        """The request is over: ``reason`` is "end", "length", "cancelled" or "error"."""

    @abc.abstractmethod
    def stopped(self) -> bool:
        """Cancelled before or during generation."""


class LocalLM:
    """A CTranslate2 generator, its tokenizer and chat format, and the batching worker."""

    def __init__(
        self,
        model: PreparedModel,
        threads: int = 2,
        compute_type: str = "int8",
        max_tokens: int = 72,
        context_tokens: int = 2048,
        max_batch: int = 8,
        history_tokens: int = 128,
    ) -> None:
        self.model = model
        self.chat: ChatFormat = model.chat
        self.threads = threads
        self.compute_type = compute_type
        self.max_tokens = max_tokens
        self.context_tokens = context_tokens
        self.max_batch = max_batch
        self.history_tokens = history_tokens
        self._cached_prefixes: set[tuple[str, ...]] = set()
        self.generator: Any = None
        self.tokenizer: Any = None
        self._vocab: list[str] = []
        self._end_ids: frozenset[int] = frozenset()
        self._queue: deque[TokenSink] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self.batches = 0  # generate_batch calls so far (tests, logs)

    # ------------------------------------------------------------------ lifecycle
    def load(self) -> None:
        import ctranslate2
        from tokenizers import Tokenizer

        self.generator = ctranslate2.Generator(
            str(self.model.path), device="cpu", compute_type=self.compute_type, intra_threads=self.threads
        )
        tk = Tokenizer.from_file(str(self.model.path / "tokenizer.json"))
        tk.encode_special_tokens = True  # text is text: "<|im_end|>" typed by a user is not a control token
        self.tokenizer = tk
        self._vocab = [tk.id_to_token(i) or f"<unused_{i}>" for i in range(tk.get_vocab_size(with_added_tokens=True))]
        missing = [t for t in (*self.chat.end_tokens, self.chat.bos) if t and tk.token_to_id(t) is None]
        if missing:
            raise ValueError(f"{self.model.path}: chat format {self.chat.name} needs tokens {missing}")
        self._end_ids = frozenset(i for t in self.chat.end_tokens if (i := tk.token_to_id(t)) is not None)
        self._thread = threading.Thread(target=self._run, name="local-llm", daemon=True)
        self._thread.start()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            pending = list(self._queue)
            self._queue.clear()
            self._cv.notify_all()
        for r in pending:
            r.finish("cancelled")
        if self._thread is not None:
            self._thread.join(timeout=10)

    # ------------------------------------------------------------------ prompts
    def _ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids if text else []

    def _special(self, token: str) -> int:
        return self.tokenizer.token_to_id(token)

    def _turn_ids(self, t: Turn) -> list[int]:
        if self.chat.name == "chatml":
            return [
                self._special("<|im_start|>"),
                *self._ids(f"{t.role}\n{t.content}"),
                self._special("<|im_end|>"),
            ] + (self._ids("\n"))
        # llama3
        return [
            self._special("<|start_header_id|>"),
            *self._ids(t.role),
            self._special("<|end_header_id|>"),
            *self._ids("\n\n" + t.content.strip()),
            self._special("<|eot_id|>"),
        ]

    def _reply_ids(self) -> list[int]:
        if self.chat.name == "chatml":
            return [self._special("<|im_start|>"), *self._ids("assistant\n")]
        return [self._special("<|start_header_id|>"), *self._ids("assistant"), self._special("<|end_header_id|>")] + (
            self._ids("\n\n")
        )

    def prompt(self, turns: list[Turn]) -> Prompt:
        """The chat prompt in token ids, ending where the assistant's reply starts.

        ``prefix`` is the BOS and the system turn: the same for every turn of a session, so
        CTranslate2 keeps its state cached. The rest holds the newest user turn (always,
        cut from its start if it alone is over budget) after as much of the history as fits
        in ``history_tokens`` (prefill cost grows with the prompt: this bounds the latency
        of a long conversation) and ``context_tokens - max_tokens``; oldest turns go first.
        """
        budget = max(16, self.context_tokens - self.max_tokens)
        head = [self._special(self.chat.bos)] if self.chat.bos else []
        system = [t for t in turns[:1] if t.role == "system"]
        prefix = head + (self._turn_ids(system[0]) if system else [])
        parts = [self._turn_ids(t) for t in turns[len(system) :]]
        tail = self._reply_ids()
        keep: list[list[int]] = []
        used = len(prefix) + len(tail)
        history = 0
        for ids in reversed(parts):
            if keep and (used + len(ids) > budget or history + len(ids) > self.history_tokens):
                break
            if keep:
                history += len(ids)
            keep.append(ids)
            used += len(ids)
        keep.reverse()
        if keep and used > budget:
            keep[0] = keep[0][-max(1, budget - len(prefix) - len(tail)) :]
        return Prompt(tuple(prefix), [i for ids in keep for i in ids] + tail)

    def prompt_ids(self, turns: list[Turn]) -> list[int]:
        """The whole prompt (prefix + rest) in token ids."""
        p = self.prompt(turns)
        return [*p.prefix, *p.rest]

    def tokens(self, ids: list[int]) -> list[str]:
        """Token strings for CTranslate2's vocabulary (its generate API takes strings)."""
        return [self._vocab[i] for i in ids]

    def decoder(self) -> Callable[[int], str]:
        """A streaming detokenizer: one token id in, the text it completes out ("" while a
        multi-byte character is still incomplete)."""
        from tokenizers.decoders import DecodeStream

        ds = DecodeStream(skip_special_tokens=True)
        tk = self.tokenizer

        def step(token_id: int) -> str:
            return ds.step(tk, token_id) or ""

        return step

    # ------------------------------------------------------------------ requests
    def submit(self, req: TokenSink) -> None:
        with self._cv:
            if self._closed:
                raise RuntimeError("the local model is closed")
            self._queue.append(req)
            self._cv.notify()

    def _take(self) -> list[TokenSink] | None:
        with self._cv:
            while not self._queue and not self._closed:
                self._cv.wait()
            if self._closed:
                return None
            # One call shares one temperature and one cached prefix (CTranslate2 options are per call).
            first = self._queue[0]
            batch = [r for r in self._queue if r.temperature == first.temperature and r.prefix == first.prefix]
            batch = batch[: self.max_batch]
            for r in batch:
                self._queue.remove(r)
        live = []
        for r in batch:
            if r.stopped():
                r.finish("cancelled")
            else:
                live.append(r)
        return live

    def _run(self) -> None:
        while (batch := self._take()) is not None:
            if batch:
                self._generate(batch)

    def _generate(self, batch: list[TokenSink]) -> None:
        ended = [False] * len(batch)
        stopped = [False] * len(batch)
        end_ids = self._end_ids

        def on_step(step: Any) -> bool:
            i = step.batch_id
            if step.token_id in end_ids:
                ended[i] = True
                return True
            stopped[i] = batch[i].accept(step.token_id)
            return stopped[i]

        temp, prefix = batch[0].temperature, batch[0].prefix
        opts: dict[str, Any] = (
            {"sampling_topk": 1} if temp <= 0 else {"sampling_topk": 50, "sampling_temperature": temp}
        )
        # CTranslate2 keeps the state after a static prompt for good (it has no eviction), so
        # only a bounded number of distinct system prompts are cached; others are prefilled.
        if prefix in self._cached_prefixes or len(self._cached_prefixes) < _MAX_CACHED_PREFIXES:
            self._cached_prefixes.add(prefix)
            opts["static_prompt"] = list(prefix)
            prompts = [r.prompt for r in batch]
        else:
            prompts = [[*prefix, *r.prompt] for r in batch]
        self.batches += 1
        t0 = time.perf_counter()
        try:
            self.generator.generate_batch(
                prompts,
                max_length=self.max_tokens,
                include_prompt_in_result=False,
                end_token=list(self.chat.end_tokens),
                callback=on_step,
                **opts,
            )
        except Exception as exc:
            log(_log, logging.ERROR, "local model: generation failed", error=f"{type(exc).__name__}: {exc}")
            for r in batch:
                r.finish("error", f"local model: {type(exc).__name__}: {exc}")
            return
        log(_log, logging.DEBUG, "local model: batch done", size=len(batch), total_s=round(time.perf_counter() - t0, 3))
        for i, r in enumerate(batch):
            r.finish("cancelled" if stopped[i] or r.stopped() else "end" if ended[i] else "length")
