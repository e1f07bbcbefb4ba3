"""The demo bridge's results: exactly one paced ``result`` per demo input chunk.

The session actor splits the input into engine chunks (e.g. 100 ms), so a 1 s demo chunk
gets several stage0 answers, and assistant audio comes separately, paced, as AudioOut.
A demo chunk's result is due once every engine chunk it completed has been answered: a
``Decision`` answers its own chunk, and ``ChunksAnswered`` says how far stage0 got with
answers no Decision shows (an epoch a barge-in ended, a stage error, a dead stage0).
Stage0 answers in order, so the two together are a high-water mark; nothing polls.

The result's audio is then taken from the head of the assistant audio queue: up to one
chunk's length of the response being spoken (waiting for it at most until the next chunk
is due), so results keep the pace of the input and never mix two responses. Audio of a
cancelled response is dropped the moment the epoch advances: none of it is sent later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from duplexd.adapters.audio import b64encode
from duplexd.bus.audio_format import output_seconds
from duplexd.bus.log import get_logger, log
from duplexd.bus.messages import (
    AdapterEvent,
    AudioOut,
    ChunksAnswered,
    Decision,
    EpochAdvance,
    ResponseCreated,
    ResponseDone,
    ResponseStatus,
)

_log = get_logger(__name__)

Result = dict[str, Any]


@dataclass(slots=True)
class DemoChunk:
    """One demo input chunk waiting for its result."""

    index: int
    received_at: float
    first_seq: int  # engine chunks [first_seq, end_seq) completed by this chunk
    end_seq: int
    out_samples: int  # bus-rate samples its result carries
    force_listen: bool
    cost_llm_ms: float = 0.0


@dataclass(slots=True)
class AssistantTurn:
    """Assistant audio of one response, queued for results."""

    response_id: str
    epoch: int
    segments: deque[tuple[np.ndarray, str]] = field(default_factory=deque)
    available: int = 0  # samples queued
    delivered: int = 0  # samples already sent in results
    ended: bool = False  # no more audio will come
    cancelled: bool = False
    finished: bool = False  # its turn-final result was sent

    def add(self, pcm: np.ndarray, text: str) -> None:
        if self.cancelled:
            return
        self.segments.append((pcm, text))
        self.available += pcm.size

    def take(self, n: int) -> tuple[np.ndarray, str]:
        parts: list[np.ndarray] = []
        texts: list[str] = []
        need = n
        while need > 0 and self.segments:
            pcm, text = self.segments.popleft()
            if pcm.size > need:
                # The words go with the part where the chunk starts.
                self.segments.appendleft((pcm[need:], ""))
                pcm = pcm[:need]
            parts.append(pcm)
            texts.append(text)
            need -= pcm.size
        out = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)
        self.available -= out.size
        self.delivered += out.size
        return out, "".join(texts)

    def drop(self) -> None:
        self.cancelled = True
        self.ended = True
        self.segments.clear()
        self.available = 0


class ResultPacer:
    """Turns session events and demo chunks into one result per chunk, in order, paced.

    ``send`` delivers a result; ``report_error(code, message)`` sends an error event;
    ``cancel_active`` cuts the response being generated; ``link_epoch`` is the session's
    newest epoch (a response created in an older one is cut before it is heard).
    """

    def __init__(
        self,
        send: Callable[[Result], Awaitable[None]],
        report_error: Callable[[str, str], Awaitable[None]],
        cancel_active: Callable[[], None],
        link_epoch: Callable[[], int],
        resolve_timeout_s: float,
    ) -> None:
        self._send = send
        self._report_error = report_error
        self._cancel_active = cancel_active
        self._link_epoch = link_epoch
        self.resolve_timeout_s = resolve_timeout_s
        self._changed = asyncio.Event()
        self._pending: deque[DemoChunk] = deque()
        self._turns: deque[AssistantTurn] = deque()
        self._resolved = -1  # every engine chunk up to this seq has been answered
        self._interrupted = False  # a response that had been heard was cut: tell the next result

    # ------------------------------------------------------------------ input side
    def reset(self) -> None:
        """A new conversation (re-prepare): nothing pending, nothing queued."""
        self._pending.clear()
        self._turns.clear()
        self._resolved = -1
        self._interrupted = False
        self._changed.set()

    def add_chunk(self, chunk: DemoChunk) -> None:
        self._pending.append(chunk)
        self._changed.set()

    def generating(self) -> bool:
        """A response is still being made (its audio has not all come)."""
        return any(not t.ended for t in self._turns)

    def cut_all(self) -> None:
        """The user took the floor: nothing queued plays."""
        for t in self._turns:
            self._cut(t)
        self._changed.set()

    def stop(self) -> None:
        self._pending.clear()
        for t in self._turns:
            t.drop()
        self._changed.set()

    # ------------------------------------------------------------------ session events
    def on_event(self, msg: AdapterEvent) -> None:
        match msg:
            case Decision(chunk_seq=seq):
                self._resolved = max(self._resolved, seq)
                for c in self._pending:
                    if c.first_seq <= seq < c.end_seq:
                        c.cost_llm_ms += msg.cost_ms
                        break
            case ChunksAnswered(through_seq=seq):
                self._resolved = max(self._resolved, seq)
            case ResponseCreated(response=resp):
                created = AssistantTurn(resp.id, msg.epoch)
                if msg.epoch < self._link_epoch():
                    created.drop()  # cancelled before we heard of it
                self._turns.append(created)
            case AudioOut():
                playing = self._turn(msg.response_id)
                if playing is not None:
                    playing.add(np.asarray(msg.pcm, dtype=np.float32) / 32768.0, msg.text)
                    playing.ended = playing.ended or msg.end_of_turn
            case ResponseDone(response=resp):
                done = self._turn(resp.id)
                if done is not None:
                    if resp.status in (ResponseStatus.CANCELLED, ResponseStatus.FAILED):
                        self._cut(done)
                    done.ended = True
            case EpochAdvance(epoch=epoch):
                # Output of older epochs is void (barge-in, cancel): drop what is queued, even
                # of a response the host already finished but the client has not heard yet.
                for t in self._turns:
                    if t.epoch < epoch:
                        self._cut(t)
            case _:
                pass
        self._changed.set()

    def _turn(self, response_id: str) -> AssistantTurn | None:
        return next((t for t in self._turns if t.response_id == response_id), None)

    def _cut(self, turn: AssistantTurn) -> None:
        if turn.delivered and not turn.cancelled:
            self._interrupted = True
        turn.drop()

    # ------------------------------------------------------------------ results
    async def _wait(self, limit_s: float) -> None:
        """Until the next event or chunk (or ``limit_s``)."""
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, limit_s)):
                await self._changed.wait()

    async def run(self) -> None:
        """Emit results until cancelled."""
        while True:
            while not self._pending:
                await self._wait(3600)
            chunk = self._pending[0]
            # 1. Every engine chunk this demo chunk completed has been answered.
            while self._pending and self._pending[0] is chunk and self._resolved < chunk.end_seq - 1:
                waited = time.monotonic() - chunk.received_at
                if waited > self.resolve_timeout_s:
                    # An answer that never comes (a chunk the bus refused): do not stall the demo.
                    log(_log, logging.WARNING, "stage0 answers missing; answering listen", chunk=chunk.index)
                    break
                await self._wait(self.resolve_timeout_s - waited)
            if not self._pending or self._pending[0] is not chunk:
                continue  # re-prepared or stopped meanwhile
            # 2. Its audio: one chunk's length of the response being spoken, if any.
            try:
                result = await self._compose(chunk)
            except Exception as exc:  # a bug of ours: the chunk still gets an answer
                log(_log, logging.ERROR, "bridge result failed", exc_info=True, chunk=chunk.index)
                if self._pending and self._pending[0] is chunk:
                    self._pending.popleft()
                await self._report_error("server_error", f"internal error: {type(exc).__name__}")
                continue
            if not self._pending or self._pending[0] is not chunk:
                continue
            self._pending.popleft()
            await self._send(result)

    def _head_turn(self) -> AssistantTurn | None:
        while self._turns:
            t = self._turns[0]
            if t.cancelled or t.finished or (t.ended and t.available == 0 and t.delivered == 0):
                self._turns.popleft()  # done, cut, or a response that never had audio
                continue
            return t
        return None

    async def _compose(self, chunk: DemoChunk) -> Result:
        n = chunk.out_samples
        if chunk.force_listen:
            # The user holds the floor for this chunk ("force listen" in the demo): nothing
            # queued plays, and a reply the model started meanwhile is withdrawn too.
            if self.generating():
                self._cancel_active()
            self.cut_all()
        turn: AssistantTurn | None = self._head_turn()
        waited_from = time.monotonic()
        if turn is not None:
            # Wait for a full chunk of audio (or the turn's end), but not past the time the
            # next input chunk is due: results keep the input's pace.
            due = chunk.received_at + output_seconds(n)
            while not (turn.cancelled or turn.ended or turn.available > n) and time.monotonic() < due:
                await self._wait(due - time.monotonic())
            if turn.cancelled:
                turn = None
        tts_wait_ms = (time.monotonic() - waited_from) * 1000
        if turn is None:
            pcm = np.zeros(n, dtype=np.float32)
            text = ""
            is_listen = True
            end_of_turn, self._interrupted = self._interrupted, False
            response_id = None
        else:
            starts = turn.delivered == 0
            pcm, text = turn.take(n)
            if starts:
                text = text.lstrip()  # a reply's first words, not a continuation
            end_of_turn = turn.finished = turn.ended and turn.available == 0
            if pcm.size < n and not end_of_turn:
                # The demo frontend plays every result as one chunk: pad at the front.
                pcm = np.concatenate((np.zeros(n - pcm.size, dtype=np.float32), pcm))
            is_listen = False
            response_id = turn.response_id
        wall_ms = (time.monotonic() - chunk.received_at) * 1000
        return {
            "type": "result",
            "is_listen": is_listen,
            "text": text,
            "audio_data": b64encode(pcm.astype("<f4", copy=False)),
            "end_of_turn": end_of_turn,
            "current_time": chunk.index,
            "cost_llm_ms": round(chunk.cost_llm_ms, 3),
            "cost_tts_prep_ms": 0.0,
            "cost_tts_ms": round(tts_wait_ms, 3),
            "cost_token2wav_ms": 0.0,
            "cost_all_ms": round(wall_ms, 3),
            "n_tokens": len(text.split()),
            "n_tts_tokens": 0,
            "server_send_ts": time.time(),
            "wall_clock_ms": round(wall_ms, 1),
            "kv_cache_length": 0,
            "response_id": response_id,
        }
