"""What the session host holds for a peer whose data queue is full: a bounded backlog.

A ZeroMQ data queue toward a peer has a high-water mark; when an adapter reads slower than
its sessions produce (a busy event loop, hundreds of sessions), a send is refused. Such a
message must not be lost (a lost ``ResponseDone`` wedges the client's turn forever) nor
kept without bound. The host keeps it here, in send order, and every later data message for
that peer queues behind it until the backlog drains, so the peer sees the bus order.

Budgets are per session: a session whose share of the backlog passes ``max_audio_ms`` of
audio or ``max_messages`` messages is *over budget*, and the host fails its response
visibly (an ``overloaded`` error and ``response.done`` failed; see
:meth:`SessionHost._relieve`). Failing advances the session's epoch, and the audio of older
epochs waiting here is then removed (:meth:`PeerBacklog.purge_stale`): the adapter would drop
it at its egress fence anyway. What is left for an over-budget session is small control
events (errors, terminal events), which are never dropped.

Nothing here does IO: the host passes a ``send`` callable to :meth:`PeerBacklog.drain`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from duplexd.bus.audio_format import OUTPUT_RATE
from duplexd.bus.messages import AudioOut, Message


@dataclass(slots=True)
class Pending:
    """One data message waiting for the peer's queue."""

    session_id: str
    msg: Message
    frames: list[Any] | None
    audio_ms: float


@dataclass(slots=True)
class _Share:
    messages: int = 0
    audio_ms: float = 0.0


@dataclass(frozen=True, slots=True)
class BacklogBudget:
    """Per-session limits of what may wait for one peer (``[host]`` config)."""

    max_audio_ms: float = 3000.0
    max_messages: int = 2000


def audio_ms(msg: Message) -> float:
    """Milliseconds of assistant audio a message carries (0 for anything else)."""
    if isinstance(msg, AudioOut):
        return float(np.asarray(msg.pcm).size) * 1000.0 / OUTPUT_RATE
    return 0.0


class PeerBacklog:
    """Data-plane messages for one peer, in send order, with per-session accounting."""

    def __init__(self, budget: BacklogBudget) -> None:
        self.budget = budget
        self._items: deque[Pending] = deque()
        self._shares: dict[str, _Share] = {}
        self.high_water = 0  # the deepest it has been (messages)

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        return bool(self._items)

    @property
    def audio_ms(self) -> float:
        return sum(s.audio_ms for s in self._shares.values())

    def push(self, session_id: str, msg: Message, frames: list[Any] | None) -> None:
        ms = audio_ms(msg)
        self._items.append(Pending(session_id, msg, frames, ms))
        share = self._shares.get(session_id)
        if share is None:
            share = self._shares[session_id] = _Share()
        share.messages += 1
        share.audio_ms += ms
        self.high_water = max(self.high_water, len(self._items))

    def share(self, session_id: str) -> tuple[int, float]:
        """(messages, ms of audio) waiting for ``session_id``."""
        s = self._shares.get(session_id)
        return (s.messages, s.audio_ms) if s is not None else (0, 0.0)

    def over_budget(self, session_id: str) -> bool:
        s = self._shares.get(session_id)
        if s is None:
            return False
        return s.audio_ms > self.budget.max_audio_ms or s.messages > self.budget.max_messages

    def purge_stale(self, session_id: str, epoch: int) -> int:
        """Drop the session's queued audio of epochs older than ``epoch``; returns how many."""
        if session_id not in self._shares:
            return 0
        kept: deque[Pending] = deque()
        dropped = 0
        for p in self._items:
            if p.session_id == session_id and isinstance(p.msg, AudioOut) and p.msg.epoch < epoch:
                dropped += 1
                self._take(p)
            else:
                kept.append(p)
        self._items = kept
        return dropped

    def clear(self) -> int:
        """The peer is gone: nothing queued for it can be delivered. Returns how many."""
        n = len(self._items)
        self._items.clear()
        self._shares.clear()
        return n

    def drain(self, send: Callable[[Pending], bool]) -> int:
        """Send from the front while ``send`` succeeds; returns how many left."""
        sent = 0
        while self._items:
            p = self._items[0]
            if not send(p):
                break
            self._items.popleft()
            self._take(p)
            sent += 1
        return sent

    def _take(self, p: Pending) -> None:
        s = self._shares.get(p.session_id)
        if s is None:
            return
        s.messages -= 1
        s.audio_ms -= p.audio_ms
        if s.messages <= 0:
            del self._shares[p.session_id]
