"""The two engine interfaces the stage actors drive.

Engines are model code: they know nothing of sockets, epochs on the wire or clients.
The stage actors batch work across sessions and call ``step`` between control polls,
so a ``step`` should be one model step (bounded time), never a whole reply.

A vLLM-backed engine slots in behind the same interfaces: ``step`` maps onto one
``EngineCore.step()`` over the batch; open/close map onto request add/abort.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import numpy as np

from duplexd.bus.audio_format import OUTPUT_RATE
from duplexd.bus.messages import Action, ChunkKind, EngineInfo, HistoryEntry, KvLease, SessionConfig


@dataclass(slots=True)
class ThinkerInput:
    """One input chunk of one session for a stage0 step."""

    session_id: str
    chunk_seq: int
    kind: ChunkKind
    pcm: np.ndarray  # float32 mono at ThinkerInfo.input_rate
    force_listen: bool = False
    response_id: str = ""  # CONTINUATION: the response the unit belongs to


@dataclass(slots=True)
class ThinkerOutput:
    """The decision for one chunk. A speak carries what stage1 should say."""

    action: Action
    text: str = ""
    end_of_turn: bool = False
    interrupt: bool = False
    listen_prob: float = 1.0
    input_transcript: str | None = None
    tokens: np.ndarray | None = None
    hidden: np.ndarray | None = None


@dataclass(slots=True)
class TalkerInput:
    """What to say next for one session's current turn (one stage0 speak unit)."""

    text: str = ""
    end_of_turn: bool = False
    tokens: np.ndarray | None = None
    hidden: np.ndarray | None = None
    voice: str = ""
    turn_key: str = ""  # the response this belongs to; a new key starts a new turn


@dataclass(slots=True)
class TalkerChunk:
    """One chunk of assistant audio (float32 mono at the talker's output rate)."""

    pcm: np.ndarray
    text: str = ""  # the words this chunk speaks
    end_of_turn: bool = False


class EngineError(Exception):
    """An engine failure for one session (``session_id``) or for the whole step."""

    def __init__(self, message: str, session_id: str | None = None, code: str = "engine_error"):
        super().__init__(message)
        self.session_id = session_id
        self.code = code


class Thinker(abc.ABC):
    """Stage0: listens to input chunks and decides, per chunk, listen or speak.

    A *lockstep* thinker (``lockstep_grace_s`` > 0) steps every open session in each
    ``step``, feeding its own silence to those absent from the batch. Stage0 then waits,
    at most ``lockstep_grace_s`` after the oldest queued chunk arrived, until every
    session that sent a chunk in the last ``lockstep_idle_s`` has one queued, so that a
    session missing a step is a late client, not an artefact of arrival order.
    """

    info: EngineInfo
    lockstep_grace_s: float = 0.0  # 0: step whenever any session has input
    lockstep_idle_s: float = 0.0

    def load(self) -> None:  # noqa: B027 - optional hook
        """Load weights (from a local path); called once before warm_up."""

    def warm_up(self) -> None:  # noqa: B027 - optional hook
        """Run one throwaway step so the first client does not pay for lazy init."""

    @abc.abstractmethod
    def open_session(self, session_id: str, config: SessionConfig) -> None: ...

    def update_session(self, session_id: str, config: SessionConfig) -> None:  # noqa: B027
        """New session settings (instructions, voice, listen_prob_scale...)."""

    @abc.abstractmethod
    def close_session(self, session_id: str) -> None: ...

    def set_context(  # noqa: B027 - optional hook
        self, session_id: str, history: tuple[HistoryEntry, ...], instructions: str
    ) -> None:
        """The committed conversation (what the client actually heard)."""

    def discard_pending(self, session_id: str) -> None:  # noqa: B027 - optional hook
        """An epoch advanced: drop output pending for the old epoch; keep the context."""

    @abc.abstractmethod
    def step(self, batch: list[ThinkerInput]) -> list[ThinkerOutput]:
        """One decision per input, in order. At most one input per session per call.
        An engine with :meth:`has_background_work` is also stepped with an empty batch."""

    def has_background_work(self) -> bool:
        """Model work that needs no new input (a reply still being generated)."""
        return False

    def next_due_s(self) -> float | None:
        """Seconds until the engine wants a step without input (housekeeping), or None."""
        return None

    def lease_updates(self) -> list[KvLease]:
        """KV leases that changed since the last call (engines with a persistent context)."""
        return []


class Talker(abc.ABC):
    """Stage1: turns handoffs into assistant audio chunks at ``output_rate``, the talker's
    native rate (stage1 resamples it to the bus output format)."""

    output_rate: int = OUTPUT_RATE

    def load(self) -> None:  # noqa: B027 - optional hook
        """Load weights (from a local path); called once before warm_up."""

    def warm_up(self) -> None:  # noqa: B027 - optional hook
        """Run one throwaway synthesis."""

    @abc.abstractmethod
    def open_session(self, session_id: str, config: SessionConfig) -> None: ...

    def update_session(self, session_id: str, config: SessionConfig) -> None:  # noqa: B027
        """New session settings (voice, speed...)."""

    @abc.abstractmethod
    def close_session(self, session_id: str) -> None: ...

    @abc.abstractmethod
    def feed(self, session_id: str, unit: TalkerInput) -> None:
        """Queue text/tokens for the session's current turn."""

    @abc.abstractmethod
    def abort(self, session_id: str) -> None:
        """Drop all in-flight synthesis of the session (barge-in/cancel)."""

    @abc.abstractmethod
    def pending(self, session_id: str) -> bool:
        """Whether ``step`` has audio (or a turn end) to produce for the session."""

    @abc.abstractmethod
    def step(self, session_ids: list[str]) -> list[TalkerChunk | None]:
        """Next chunk per session (None if it has nothing ready yet)."""

    def next_due_s(self) -> float | None:
        """Seconds until work in flight elsewhere (an asynchronous GPU job) may be ready."""
        return None

    # Whether ``pending`` can turn true without a ``feed`` (asynchronous work, slots freed
    # by other sessions): stage1 then looks at every turn each wake-up instead of only at
    # the sessions fed, stepped or due since the last one.
    polls_pending: bool = False


class TalkerTurn(Protocol):
    key: str  # the response the turn speaks for
    flushed: bool  # its end-of-turn chunk has been emitted


TurnT = TypeVar("TurnT", bound=TalkerTurn)


class TurnTalker(Talker, Generic[TurnT]):
    """A talker that keeps one turn per session: a handoff for another response, or after
    the last turn flushed, starts a new turn; abort and close drop it."""

    def __init__(self) -> None:
        self._turns: dict[str, TurnT] = {}

    def open_session(self, session_id: str, config: SessionConfig) -> None:
        pass  # nothing per session until its first handoff

    def close_session(self, session_id: str) -> None:
        self._turns.pop(session_id, None)

    def abort(self, session_id: str) -> None:
        self._turns.pop(session_id, None)

    def _turn_for(self, session_id: str, unit: TalkerInput, new: Callable[[], TurnT]) -> TurnT:
        turn = self._turns.get(session_id)
        if turn is None or turn.key != unit.turn_key or turn.flushed:
            turn = self._turns[session_id] = new()
        return turn
