"""What a session's thinker context holds, turn by turn, and how it follows the history.

The thinker's KV slot holds the token sequence of a list of :class:`Turn`:
``<|im_start|>role\\n body <|im_end|>\\n`` each, user audio as ``<|audio_bos|>`` + one
position per audio token + ``<|audio_eos|>``. :class:`Context` keeps that list equal to
the committed conversation the session host sends (``ContextUpdate``), so **the model's
memory is the committed history**:

* the user's audio turns and the model's replies are *bound* to the history items that
  stand for them (by item id, first seen in order);
* an assistant item cut to what the client played (barge-in, truncate, ``ack_only``)
  cuts its reply to the tokens whose words were heard — the rollback;
* items the model never saw (created by the client) become text turns; items deleted
  from the history leave the context; a reply that never entered the history (an
  out-of-band response) is dropped once the history moves past it;
* the oldest turns leave the context when it would exceed ``max_context``.

:meth:`Context.sync` compares the list with what the KV slot holds and says where the
slot's valid prefix ends and which positions must be prefilled next: a changed turn
costs re-prefilling from it on, never the turns before it. Each turn keeps its inputs
(token ids; the audio encoder's output) so that is always possible.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from duplexd.actors.engines.qwen_omni.tokens import ChatTokens, Pieces
from duplexd.bus.messages import HistoryEntry


class Kind(enum.IntEnum):
    SYSTEM = 0  # the system prompt (instructions)
    TEXT = 1  # a text item of the history (user, system or a client-made assistant item)
    AUDIO = 2  # a user turn the engine heard
    REPLY = 3  # a reply the engine generated


@dataclass(eq=False)
class Turn:
    """One turn of the context. ``eq=False``: turns are compared by identity."""

    kind: Kind
    role: str
    seq: int  # creation order within the session
    item_id: str = ""  # the history item it is bound to ("": not yet)
    text: str = ""  # SYSTEM / TEXT: the text
    body: list[int] = field(default_factory=list)  # SYSTEM / TEXT: ids; REPLY: ids fed so far
    audio: list[Any] = field(default_factory=list)  # AUDIO: encoder outputs per window, [n_i, hidden]
    audio_tokens: int = 0  # AUDIO: positions of audio so far
    complete: bool = True  # AUDIO: the user's turn ended; REPLY: generation ended
    pieces: Pieces | None = None  # REPLY: the text of each fed id
    cut: int | None = None  # REPLY: ids kept (None: all)
    key: str = ""  # REPLY: the response (or duplex turn) it answers
    # where its tokens sit in the KV slot
    kv_start: int = -1
    kv_len: int = 0

    def kept(self) -> int:
        """REPLY: the number of body ids in the context."""
        return len(self.body) if self.cut is None else min(self.cut, len(self.body))


class Context:
    """The turns of one session and their place in its KV slot (see module docstring)."""

    def __init__(self, tokens: ChatTokens, system_prompt: str, max_context: int, reserve: int) -> None:
        self.t = tokens
        self.default_system = system_prompt
        self.max_context = max_context
        self.reserve = reserve  # positions kept free for a reply when old turns must go
        self._seq = 0
        self.turns: list[Turn] = [self._system(system_prompt)]
        self.kv_len = 0  # positions of the slot that hold the start of the turn sequence
        self.known: dict[str, Turn] = {}  # every turn bound to a history item, by item id
        self.evicted: list[Turn] = []  # turns left out for room (the engine moves their audio off the GPU)
        self.rollbacks = 0
        self.dropped = 0  # positions given up by rollbacks and edits
        self.evicted_turns = 0  # turns left out because the context was full

    # ------------------------------------------------------------------ building turns
    def _next(self) -> int:
        self._seq += 1
        return self._seq

    def _system(self, text: str, role: str = "system") -> Turn:
        return Turn(Kind.SYSTEM, role, self._next(), text=text, body=self.t.encode(text))

    def text_turn(self, role: str, text: str, item_id: str = "") -> Turn:
        return Turn(Kind.TEXT, role, self._next(), item_id=item_id, text=text, body=self.t.encode(text))

    def open_audio(self) -> Turn:
        turn = Turn(Kind.AUDIO, "user", self._next(), complete=False)
        self.turns.append(turn)
        return turn

    def open_reply(self, key: str) -> Turn:
        turn = Turn(Kind.REPLY, "assistant", self._next(), complete=False, pieces=Pieces(self.t), key=key)
        self.turns.append(turn)
        return turn

    # ------------------------------------------------------------------ token layout
    def head(self, turn: Turn) -> list[int]:
        h = self.t.header(turn.role)
        return [*h, self.t.audio_start] if turn.kind == Kind.AUDIO else h

    def tail(self, turn: Turn) -> list[int]:
        if not turn.complete:
            return []
        f = self.t.footer()
        return [self.t.audio_end, *f] if turn.kind == Kind.AUDIO else f

    def length(self, turn: Turn) -> int:
        if turn.kind == Kind.AUDIO:
            body = turn.audio_tokens
        elif turn.kind == Kind.REPLY:
            body = turn.kept()
        else:
            body = len(turn.body)
        return len(self.head(turn)) + body + len(self.tail(turn))

    def body_start(self, turn: Turn) -> int:
        """Slot position of the turn's first body token (its header before it)."""
        return turn.kv_start + len(self.head(turn))

    # ------------------------------------------------------------------ following the history
    def reconcile(self, history: Sequence[HistoryEntry], instructions: str) -> None:
        """Make the turn list the committed ``history`` (see module docstring)."""
        system = instructions or self.default_system
        old = self.turns
        turns: list[Turn] = [old[0] if old[0].text == system else self._system(system)]
        audio = [t for t in old if t.kind == Kind.AUDIO and not t.item_id]
        replies = [t for t in old if t.kind == Kind.REPLY and not t.item_id]
        newest_bound = 0
        for e in history:
            turn = self.known.get(e.item_id) if e.item_id else None
            role = e.role if e.role in ("user", "assistant", "system") else "user"
            if turn is None:
                if role == "user" and not e.text and audio:
                    turn = audio.pop(0)
                elif (
                    role == "assistant"
                    and replies
                    and replies[0].pieces is not None
                    and replies[0].pieces.tokens_within(e.text) is not None
                ):
                    turn = replies.pop(0)
                if turn is not None and e.item_id:
                    turn.item_id = e.item_id
                    self.known[e.item_id] = turn
            if turn is not None and turn.kind == Kind.REPLY:
                if not self._cut_reply(turn, e.text):
                    turn = None  # its text is no longer the reply's: say it as text
            elif turn is not None and turn.kind in (Kind.TEXT, Kind.SYSTEM) and (
                turn.text != e.text or turn.role != role
            ):
                turn = None
            if turn is None:
                if not e.text:
                    continue  # an item with nothing the model can read (audio it never heard)
                turn = self.text_turn(role, e.text, e.item_id)
                if e.item_id:
                    self.known[e.item_id] = turn
            if turn.kind in (Kind.AUDIO, Kind.REPLY):
                newest_bound = max(newest_bound, turn.seq)
            turns.append(turn)
        # What the host does not know yet: the turn being heard, the reply being made.
        live = [t for t in old if t.kind in (Kind.AUDIO, Kind.REPLY) and not t.item_id and t.seq > newest_bound]
        turns += live
        self.turns = turns
        self.fit()

    def _cut_reply(self, turn: Turn, text: str) -> bool:
        """The history says the reply ended with ``text`` heard: keep those tokens."""
        assert turn.pieces is not None
        turn.complete = True  # in the history, so its response is over
        k = turn.pieces.tokens_within(text)
        if k is None:
            return False
        if k < turn.kept():
            self.rollbacks += 1
            self.dropped += turn.kept() - k
            # Positions from the first dropped token on hold words nobody heard: void.
            turn.kv_len = min(turn.kv_len, len(self.head(turn)) + k)
        turn.cut = k
        return True

    def fit(self) -> None:
        """Leave out the oldest turns while the context would not fit (reply room kept)."""
        budget = self.max_context - self.reserve
        while len(self.turns) > 2 and self.total() > budget:
            # Never the system prompt, nor what is being heard or said right now.
            victim = next((i for i, t in enumerate(self.turns[1:], 1) if t.complete), None)
            if victim is None:
                break
            self.evicted.append(self.turns.pop(victim))
            self.evicted_turns += 1

    def total(self) -> int:
        return sum(self.length(t) for t in self.turns)

    # ------------------------------------------------------------------ the slot
    def sync(self) -> tuple[int, list[tuple[Turn, int, int]]]:
        """Compare the turns with the slot. Returns the slot's valid length (positions
        from there on must be rewritten) and what to prefill next, in order, as
        ``(turn, from offset, to offset)``: everything available up to the first turn
        still growing (a user turn being heard blocks what follows it)."""
        pos = 0
        valid: int | None = None
        todo: list[tuple[Turn, int, int]] = []
        stop = len(self.turns)
        for i, turn in enumerate(self.turns):
            n = self.length(turn)
            if valid is not None or turn.kv_start != pos:
                valid = pos if valid is None else valid
                turn.kv_start, turn.kv_len = pos, 0
            turn.kv_len = min(turn.kv_len, n)
            if turn.kv_len < n:
                valid = pos + turn.kv_len if valid is None else valid
                todo.append((turn, turn.kv_len, n))
            pos += n
            if not turn.complete:
                stop = i + 1
                break
        for turn in self.turns[stop:]:
            turn.kv_start, turn.kv_len = -1, 0  # waits behind a turn still growing
        self.kv_len = pos if valid is None else valid
        return self.kv_len, todo

    def mark_written(self, turn: Turn, upto: int) -> None:
        """Positions of ``turn`` up to offset ``upto`` are now in the slot."""
        turn.kv_len = max(turn.kv_len, upto)
        self.kv_len = max(self.kv_len, turn.kv_start + upto)

    def forget_slot(self) -> None:
        """The slot was released: nothing of the context is in KV any more."""
        for t in self.turns:
            t.kv_start, t.kv_len = -1, 0
        self.kv_len = 0


def map_audio(turn: Turn, fn: Callable[[Any], Any]) -> None:
    """Moves a turn's stored audio embeddings (to the CPU on release, back on re-lease)."""
    turn.audio = [fn(a) for a in turn.audio]
