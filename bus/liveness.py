"""Peer liveness, sans IO: handshake, heartbeats, who is alive, protocol versions.

The session host binds; every other process (adapter, stage0, stage1) connects, says
``Hello`` on both planes and waits for ``Ready``. Then both sides heartbeat on the control
plane; a peer silent for the heartbeat timeout is dead, and so is a process that exited
on this machine (known at once, no need to wait). Hello, Ready and Heartbeat carry the
bus protocol version: mismatched processes refuse to talk.

A peer's heartbeats come from a *beacon* (bus/beacon.py): a thread with a socket of its
own, identity ``<peer identity>/beat``, so a model step that legitimately runs for seconds
does not silence the process, while a stopped or frozen process (SIGSTOP, swapped out, a
dead machine) goes quiet at once and is declared dead after the timeout (default 0.75 s).
A loop that is stuck while its process lives is the watchdog's business (sd_notify
``WATCHDOG=1`` from the main loop), not this module's.

Silence is judged from the observer's side too: a host (or peer) that was itself stalled
judges by the time it last read its control queue, not by the wall clock, so its own stall
is never blamed on the peers whose heartbeats wait unread in its queue.

Nothing here touches a socket or a clock: callers pass ``now`` (monotonic seconds) and
the messages they received, and do the sending the answers ask for. The host drives a
:class:`PeerBook`; the stage workers (a plain blocking loop) and the adapter's host link
(asyncio) drive a :class:`Handshake` and then a :class:`HostWatch`, so both concurrency
styles share one set of rules.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from duplexd.bus.messages import (
    PROTOCOL_VERSION,
    ClusterStatus,
    ControlMessage,
    Goodbye,
    Heartbeat,
    Hello,
    HelloRequired,
    Ready,
    Refused,
    Role,
)

BEACON_SUFFIX = "/beat"  # identity suffix of a peer's heartbeat thread (bus/beacon.py)

CONTROL_PLANE = "control"
DATA_PLANE = "data"
BOTH_PLANES = frozenset({CONTROL_PLANE, DATA_PLANE})


class HandshakeError(Exception):
    """The host did not answer Hello in time, or refused us."""


def beacon_identity(identity: str) -> str:
    """The socket identity of ``identity``'s heartbeat thread."""
    return identity + BEACON_SUFFIX


def beacon_owner(routing_id: bytes) -> bytes | None:
    """The peer whose beacon ``routing_id`` is, or None for a peer's own socket."""
    suffix = BEACON_SUFFIX.encode()
    return routing_id[: -len(suffix)] if routing_id.endswith(suffix) else None


def process_exited(pid: int) -> bool:
    """Whether process ``pid`` on this machine is gone (signal 0 probes it, sends nothing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # it exists, owned by someone else
    return False


def version_refusal(version: int) -> str | None:
    """Why a peer speaking bus protocol ``version`` is refused, or None when it matches."""
    if version == PROTOCOL_VERSION:
        return None
    return f"protocol version {version} unsupported (this process speaks {PROTOCOL_VERSION})"


# ---------------------------------------------------------------------- connecting side
class Handshake:
    """HELLO → READY from a connecting peer: when to (re)send Hello, when to give up,
    what the host's answer means."""

    def __init__(self, now: float, timeout_s: float, retry_s: float = 1.0) -> None:
        self.deadline = now + timeout_s
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self._next_hello = now

    def hello_due(self, now: float) -> bool:
        """Whether to send Hello (on both planes) now; raises when the time is up."""
        if now >= self.deadline:
            raise HandshakeError(f"no Ready from the session host within {self.timeout_s:.1f}s")
        if now >= self._next_hello:
            self._next_hello = now + self.retry_s
            return True
        return False

    def wait_s(self, now: float) -> float:
        """How long to wait for an answer before the next Hello (or the deadline)."""
        return max(0.0, min(self.deadline, self._next_hello) - now)

    def on_control(self, msg: ControlMessage) -> Ready | None:
        """The host's Ready, None for anything else (the host only talks after Ready);
        raises :class:`HandshakeError` on a refusal or a protocol mismatch."""
        if isinstance(msg, Refused):
            raise HandshakeError(
                f"host refused: {msg.reason} (host protocol {msg.protocol_version}, ours {PROTOCOL_VERSION})"
            )
        if isinstance(msg, Ready):
            if msg.protocol_version != PROTOCOL_VERSION:
                raise HandshakeError(f"host speaks protocol {msg.protocol_version}, we speak {PROTOCOL_VERSION}")
            return msg
        return None


@dataclass(frozen=True, slots=True)
class Beat:
    """A heartbeat to send now: its sequence number, and whether metrics ride along."""

    seq: int
    with_metrics: bool


class BeatSchedule:
    """Heartbeats every ``interval_s``; metrics on one every ``metrics_interval_s``."""

    def __init__(self, interval_s: float, metrics_interval_s: float) -> None:
        self.interval_s = interval_s
        self.metrics_interval_s = metrics_interval_s
        self.seq = 0
        self._sent_at = float("-inf")
        self._metrics_at = float("-inf")

    def due(self, now: float) -> Beat | None:
        if now - self._sent_at < self.interval_s:
            return None
        self._sent_at = now
        self.seq += 1
        with_metrics = now - self._metrics_at >= self.metrics_interval_s
        if with_metrics:
            self._metrics_at = now
        return Beat(self.seq, with_metrics)

    def wait_s(self, now: float) -> float:
        return max(0.0, self._sent_at + self.interval_s - now)


class HostWatch:
    """A connected peer's view of the host: is it alive, is it still the same instance,
    when to heartbeat it."""

    def __init__(self, heartbeat_interval_s: float, heartbeat_timeout_s: float, metrics_interval_s: float) -> None:
        self.timeout_s = heartbeat_timeout_s
        self._beats = BeatSchedule(heartbeat_interval_s, metrics_interval_s)
        self.host_instance = ""
        self.host_pid = 0
        self.host_hostname = ""
        self._last_heard = 0.0

    def connected(self, ready: Ready, now: float) -> None:
        self.host_instance = ready.host_instance
        self.host_pid = ready.pid
        self.host_hostname = ready.hostname
        self._last_heard = now

    def on_control(self, msg: ControlMessage, now: float) -> str | None:
        """Any control message shows the host alive. Returns why the host we handshook
        with is gone (it restarted, left, or does not know us), or None."""
        self._last_heard = now
        match msg:
            case Heartbeat(host_instance=inst) | ClusterStatus(host_instance=inst):
                if inst and self.host_instance and inst != self.host_instance:
                    return "the session host restarted"
            case HelloRequired():
                return "the session host restarted"
            case Goodbye(reason=reason):
                return f"the session host left: {reason}"
            case _:
                pass
        return None

    def silent(self, now: float) -> str | None:
        """Why the host counts as dead for silence, or None. ``now``: when the caller last
        read its control queue (see the module docstring)."""
        if now - self._last_heard > self.timeout_s:
            return "the session host stopped answering"
        return None

    def dead(self, now: float, local_host: str, process_exited: Callable[[int], bool]) -> str | None:
        """Why the host counts as dead: its process exited (same machine: known at once),
        or it was silent past the timeout; None while it lives."""
        if self.host_pid and self.host_hostname == local_host and process_exited(self.host_pid):
            return "the session host process exited"
        return self.silent(now)

    def heartbeat_due(self, now: float) -> Beat | None:
        return self._beats.due(now)

    def wait_s(self, now: float) -> float:
        """Until the next heartbeat is due."""
        return self._beats.wait_s(now)


# ---------------------------------------------------------------------- host side
class HelloVerdict(enum.Enum):
    REFUSED = "refused"  # another protocol version: answer Refused
    WAITING = "waiting"  # seen on one plane; the other is still to come
    READY = "ready"  # now known on both planes: answer Ready
    READY_AGAIN = "ready_again"  # a retried Hello of a ready peer: answer Ready again
    ALREADY = "already"  # a retried Hello on data: nothing to answer


@dataclass(slots=True)
class PeerLife:
    """What the host knows of one peer's liveness."""

    identity: bytes
    role: Role
    pid: int
    hostname: str
    instance: str = ""  # the connection (Hello.instance); another one: the peer forgot its sessions
    planes: set[str] = field(default_factory=set)
    ready: bool = False
    last_seen: float = 0.0


@dataclass(frozen=True, slots=True)
class HelloOutcome:
    verdict: HelloVerdict
    peer: PeerLife | None  # None when refused
    replaced: PeerLife | None = None  # an earlier process with this identity, now gone
    reason: str = ""  # why it was refused


class PeerBook:
    """The host's record of its peers: handshakes, last heard, dead ones, heartbeats."""

    def __init__(
        self, heartbeat_interval_s: float, heartbeat_timeout_s: float, metrics_interval_s: float = 2.0
    ) -> None:
        self.timeout_s = heartbeat_timeout_s
        self._beats = BeatSchedule(heartbeat_interval_s, metrics_interval_s)
        self.peers: dict[bytes, PeerLife] = {}

    def hello(self, identity: bytes, hello: Hello, plane: str, now: float) -> HelloOutcome:
        refusal = version_refusal(hello.protocol_version)
        if refusal is not None:
            return HelloOutcome(HelloVerdict.REFUSED, None, reason=refusal)
        peer = self.peers.get(identity)
        replaced = None
        if peer is None or peer.pid != hello.pid or peer.instance != hello.instance:
            # A new process took over the identity (a restart), or the same one reconnected
            # after it gave us up for dead: either way it holds none of our sessions.
            replaced = peer
            peer = self.peers[identity] = PeerLife(identity, hello.role, hello.pid, hello.hostname, hello.instance)
        peer.planes.add(plane)
        peer.last_seen = now
        if not peer.ready and peer.planes >= BOTH_PLANES:
            peer.ready = True
            return HelloOutcome(HelloVerdict.READY, peer, replaced)
        if peer.ready:
            verdict = HelloVerdict.READY_AGAIN if plane == CONTROL_PLANE else HelloVerdict.ALREADY
            return HelloOutcome(verdict, peer, replaced)
        return HelloOutcome(HelloVerdict.WAITING, peer, replaced)

    def seen(self, identity: bytes, now: float) -> PeerLife | None:
        """A control message from ``identity``: alive. None for a peer we do not know
        (the host restarted: ask it to say hello again)."""
        peer = self.peers.get(identity)
        if peer is not None:
            peer.last_seen = now
        return peer

    def beat(self, routing_id: bytes, hb: Heartbeat, now: float) -> tuple[bytes, PeerLife | None] | None:
        """A heartbeat from a beacon socket: (its owner, the owner's record or None when
        the owner is unknown: it must say hello again). None: not a beacon's."""
        owner = beacon_owner(routing_id)
        if owner is None:
            return None
        if hb.sender.encode() != owner:
            return owner, None
        return owner, self.seen(owner, now)

    def forget(self, identity: bytes) -> PeerLife | None:
        return self.peers.pop(identity, None)

    def dead(self, now: float, local_host: str, process_exited: Callable[[int], bool]) -> list[tuple[PeerLife, str]]:
        """Peers to declare dead now, with why: a process on this machine that exited
        (``process_exited(pid)``), or a ready peer silent past the heartbeat timeout.
        ``now``: when the host last read its control queue (see the module docstring)."""
        out: list[tuple[PeerLife, str]] = []
        for p in self.peers.values():
            if p.hostname == local_host and process_exited(p.pid):
                out.append((p, "process exited"))
            elif p.ready and now - p.last_seen > self.timeout_s:
                out.append((p, "heartbeat timeout"))
        return out

    def heartbeat_due(self, now: float) -> Beat | None:
        """The host's own heartbeat to every ready peer, when due."""
        return self._beats.due(now)

    def wait_s(self, now: float) -> float:
        return self._beats.wait_s(now)
