"""The session host's sends: now, or, for an adapter whose data queue is full, in order
behind that adapter's backlog (:mod:`duplexd.actors.backlog`).

Stages are not backlogged: a stage whose queue is full is overloaded, and the session turns
the refused send into a visible error at once (``SessionActor.on_send_failed``). An adapter's
full queue only means its event loop is behind for a moment, so its events wait here, and
the host fails a session visibly once that session's share passes its budget.
"""

from __future__ import annotations

import logging
from typing import Any

from duplexd.actors.backlog import BacklogBudget, PeerBacklog, Pending
from duplexd.bus.log import get_logger, log
from duplexd.bus.messages import Message, Plane
from duplexd.bus.metrics import BACKPRESSURE
from duplexd.bus.sockets import DATA, Backpressure, Channel, PeerUnreachable, QueueFull

_log = get_logger("duplexd.actors.host")


class HostSender:
    """Sends on the host's channel; holds adapter data its full queue refused."""

    def __init__(self, chan: Channel, budget: BacklogBudget) -> None:
        self.chan = chan
        self.budget = budget
        self.backlogs: dict[bytes, PeerBacklog] = {}

    def send(
        self, identity: bytes, plane: Plane, msg: Message, frames: list[Any] | None = None, holdable: bool = False
    ) -> bool:
        """Send now; ``holdable`` (adapter data): queue behind that peer's backlog when its
        queue is full. False: neither sent nor held (the caller turns that into an error)."""
        backlog = self.backlogs.get(identity) if plane == DATA else None
        if backlog:
            backlog.push(getattr(msg, "session_id", ""), msg, frames)  # behind what waits: bus order kept
            return True
        try:
            self._raw(identity, plane, msg, frames)
            return True
        except QueueFull as exc:
            if holdable and plane == DATA:
                # Slowed, never lost: it waits within the session's budget (SessionHost._relieve).
                BACKPRESSURE.labels(hop="host-adapter-backlog").inc()
                backlog = self.backlogs.get(identity)
                if backlog is None:
                    backlog = self.backlogs[identity] = PeerBacklog(self.budget)
                    log(_log, logging.WARNING, "adapter queue full; holding its events", peer=_name(identity))
                backlog.push(getattr(msg, "session_id", ""), msg, frames)
                return True
            self._refused(identity, plane, exc)
            return False
        except PeerUnreachable as exc:
            self._refused(identity, plane, exc)
            return False

    def _raw(self, identity: bytes, plane: Plane, msg: Message, frames: list[Any] | None) -> None:
        if frames is not None:
            self.chan.send_frames(plane, frames, identity)
        else:
            self.chan.send(plane, msg, identity)

    @staticmethod
    def _refused(identity: bytes, plane: Plane, exc: Backpressure) -> None:
        BACKPRESSURE.labels(hop=f"host-{plane}").inc()
        log(_log, logging.WARNING, "send refused", peer=_name(identity), error=str(exc))

    @property
    def backlogged(self) -> bool:
        return any(self.backlogs.values())

    @property
    def depth(self) -> int:
        return sum(len(b) for b in self.backlogs.values())

    def drain(self) -> None:
        """Send what waits, in order, while the queues take it."""
        for identity, backlog in list(self.backlogs.items()):
            if not backlog:
                continue

            def send(p: Pending, identity: bytes = identity) -> bool:
                try:
                    self._raw(identity, DATA, p.msg, p.frames)
                except (QueueFull, PeerUnreachable):
                    return False  # (unreachable: the peer is going; the host drops its backlog)
                return True

            backlog.drain(send)
            if not backlog:
                log(_log, logging.INFO, "adapter caught up", peer=_name(identity))

    def drop(self, identity: bytes) -> None:
        """The peer is gone: what waited for it cannot be delivered."""
        backlog = self.backlogs.pop(identity, None)
        if backlog:
            n = backlog.clear()
            log(_log, logging.WARNING, "dropped events for a departed adapter", peer=_name(identity), queued=n)


def _name(identity: bytes) -> str:
    return identity.decode(errors="replace")
