"""What the session host knows of each connected process, and how it picks one.

A :class:`Peer` is a process that said hello on both planes (its liveness record is
:class:`~duplexd.bus.liveness.PeerLife`), plus what routing needs: its engine, its
admission capacity and the sessions bound to it. New sessions go to the least-loaded
ready stage of each kind that has room (actors/admission.py says what room is).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from duplexd.actors import admission
from duplexd.bus.liveness import PeerLife
from duplexd.bus.messages import EngineInfo, MetricSample, Role


@dataclass(slots=True)
class Peer:
    """A connected process: its liveness record plus what the host routes to it."""

    life: PeerLife
    engine: EngineInfo | None
    capacity: int = 0  # sessions it admits (admission.stage_capacity); 0: no limit
    sessions: set[str] = field(default_factory=set)
    metrics: tuple[MetricSample, ...] = ()
    reported_load: int = -1  # sessions the stage says it holds (its heartbeats); -1: not yet

    @property
    def load(self) -> int:
        """Sessions bound there. Our own count decides: a stage serves one host, and its
        report lags a close by up to a heartbeat (it would refuse a slot just freed)."""
        return len(self.sessions)

    @property
    def identity(self) -> bytes:
        return self.life.identity

    @property
    def role(self) -> Role:
        return self.life.role

    @property
    def pid(self) -> int:
        return self.life.pid

    @property
    def hostname(self) -> str:
        return self.life.hostname

    @property
    def ready(self) -> bool:
        return self.life.ready

    @property
    def name(self) -> str:
        return self.identity.decode(errors="replace")


def _has_room(p: Peer) -> bool:
    return p.capacity <= 0 or p.load < p.capacity


def _load(p: Peer) -> admission.StageLoad:
    return admission.StageLoad(p.load, p.capacity)


def has_room(p: Peer) -> bool:
    return p.capacity <= 0 or p.load < p.capacity


def load(p: Peer) -> admission.StageLoad:
    return admission.StageLoad(p.load, p.capacity)


def ready_peers(peers: Iterable[Peer], role: Role) -> list[Peer]:
    return [p for p in peers if p.role == role and p.ready]


def pick(peers: Iterable[Peer], role: Role, with_room: bool = False) -> Peer | None:
    """The least-loaded ready peer of ``role``; ``with_room``: only one below its capacity."""
    ready = ready_peers(peers, role)
    if with_room:
        ready = [p for p in ready if has_room(p)]
    return min(ready, key=lambda p: p.load) if ready else None
