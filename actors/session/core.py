"""What every part of a session shares: who it is, its settings, its epoch and its outbox.

The session's parts (turn detection, the response lifecycle, playback, ...) each own their
own state; this is the little they all read or write. Every message a part wants sent is
appended to ``outbox`` as an :class:`Out`; the host does the I/O.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from duplexd.actors.session.conversation import Conversation
from duplexd.bus.messages import (
    ContextUpdate,
    EngineInfo,
    EpochAdvance,
    ErrorEvent,
    Message,
    Plane,
    SessionConfig,
)


class Dest(enum.IntEnum):
    """Where the host sends an :class:`Out`."""

    ADAPTER = 0
    STAGE0 = 1
    STAGE1 = 2


@dataclass(slots=True)
class Out:
    """One message the host must send on the session's behalf."""

    dest: Dest
    plane: Plane
    msg: Message
    frames: list[Any] | None = None  # raw frames to forward unchanged (zero-copy)


@dataclass(frozen=True, slots=True)
class HostSettings:
    """Host-wide knobs (``[host]`` config) that are not per-session protocol settings."""

    vad: str = "silero"  # silero | energy
    max_input_buffer_ms: int = 15 * 60 * 1000
    continuation_pace: float = 1.0  # 1.0: one silence unit per chunk of wall time
    output_rate: int = 24000


IdFactory = Callable[[str], str]


def random_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


@dataclass(slots=True)
class Counters:
    """What the session counts (snapshot, metrics)."""

    responses: int = 0  # responses created
    done_events: int = 0  # terminal response.done events sent
    dropped_stale: int = 0  # stage output not applied: old epoch, or a response that ended
    backchannels: int = 0
    barge_ins: int = 0
    stage_errors: int = 0


class SessionCore:
    """Identity, settings, epoch, stage readiness and the outbox of one session."""

    def __init__(
        self,
        session_id: str,
        config: SessionConfig,
        engine: EngineInfo,
        settings: HostSettings,
        new_id: IdFactory,
    ) -> None:
        self.session_id = session_id
        self.config = config
        self.engine = engine
        self.settings = settings
        self.new_id = new_id
        self.epoch = 0
        self.closed = False
        self.outbox: list[Out] = []
        self.conversation = Conversation()
        self.counters = Counters()
        self.stage0_ready = True
        self.stage1_ready = True
        # The seq of the client command being applied (None outside one): a response it
        # creates remembers it, so a cancel that overtook the command can find it.
        self.command_seq: int | None = None

    @property
    def chunk_ms(self) -> float:
        return self.engine.chunk_samples * 1000 / self.engine.input_rate

    def emit(self, dest: Dest, msg: Message, plane: Plane = "data", frames: list[Any] | None = None) -> None:
        self.outbox.append(Out(dest, plane, msg, frames))

    def event(self, msg: Message) -> None:
        """An event for the client (data plane, in order)."""
        self.emit(Dest.ADAPTER, msg)

    def error(
        self,
        code: str,
        message: str,
        event_id: str = "",
        response_id: str = "",
        type_: str = "invalid_request_error",
        param: str = "",
    ) -> None:
        self.event(
            ErrorEvent(
                self.session_id,
                self.epoch,
                code,
                message,
                type=type_,
                param=param,
                event_id=event_id,
                response_id=response_id,
            )
        )

    def advance_epoch(self, reason: str) -> None:
        """The stale-audio fence: a new epoch, announced on the control plane to all three hops."""
        self.epoch += 1
        adv = EpochAdvance(self.session_id, self.epoch, reason)
        for dest in (Dest.ADAPTER, Dest.STAGE0, Dest.STAGE1):
            self.emit(dest, adv, "control")

    def send_context(self, instructions: str | None = None) -> None:
        """The committed conversation, as stage0's context."""
        self.emit(
            Dest.STAGE0,
            ContextUpdate(
                self.session_id,
                self.epoch,
                self.conversation.context(),
                instructions=instructions or self.config.instructions,
            ),
        )

    def take_outbox(self) -> list[Out]:
        out, self.outbox = self.outbox, []
        return out
