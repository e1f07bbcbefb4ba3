"""The session host: owns every session actor and routes all traffic between roles.

One asyncio loop (uvloop in production) owns the bus sockets and all actors. Each
iteration takes the whole control plane before a bounded batch of data, so a
cancel or epoch advance is applied before any audio queued behind it is looked at.

Peers (adapters, stage0s, stage1s) say Hello on both planes; the host answers Ready,
tracks their heartbeats (the rules: :class:`~duplexd.bus.liveness.PeerBook`) and turns a
silent or departed peer into typed failures for the sessions it served. Sessions are
bound to the least-loaded stage of each kind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any

import msgspec

from duplexd.actors import admission
from duplexd.actors.backlog import BacklogBudget
from duplexd.actors.bound import Bound
from duplexd.actors.outbound import HostSender
from duplexd.actors.peers import Peer, load, pick, ready_peers
from duplexd.actors.session import Dest, HostSettings, SessionActor
from duplexd.bus.addresses import BusAddresses
from duplexd.bus.liveness import HelloVerdict, PeerBook, process_exited
from duplexd.bus.log import get_logger, log
from duplexd.bus.messages import (
    PROTOCOL_VERSION,
    AudioOut,
    ChunksAnswered,
    ClientCommand,
    CloseCause,
    ClusterStatus,
    ControlMessage,
    DataMessage,
    EngineInfo,
    ErrorEvent,
    Goodbye,
    Heartbeat,
    Hello,
    HelloRequired,
    KvLeaseReport,
    Message,
    NoNewSessions,
    Plane,
    Ready,
    Refused,
    ResponseCancel,
    Role,
    RoleStatus,
    SessionClose,
    SessionClosed,
    SessionOpen,
    Snapshot,
    Stage0Result,
    StageError,
)
from duplexd.bus.metrics import (
    ADMISSIONS_REFUSED,
    BACKLOG_OVERFLOWS,
    BUS_BAD_FRAMES,
    BUS_CONTROL_MESSAGES,
    BUS_DATA_MESSAGES,
    QUEUE_DEPTH,
    SESSION_CAPACITY,
    SESSIONS,
    SESSIONS_AVAILABLE,
    STAGE_ERRORS,
    STALE_DROPPED,
    snapshot,
    tag,
)
from duplexd.bus.sockets import (
    CONTROL,
    DATA,
    AsyncWaiter,
    Channel,
    Received,
    bind_host,
)

_log = get_logger(__name__)

_BACKLOG_RETRY_S = 0.005  # how soon the loop retries a peer whose data queue was full


def _plane(name: str) -> Plane:
    return CONTROL if name == CONTROL else DATA


class SessionHost:
    """Routes and owns sessions (see module docstring)."""

    def __init__(
        self,
        addrs: BusAddresses,
        settings: HostSettings | None = None,
        heartbeat_interval_s: float = 0.5,
        heartbeat_timeout_s: float = 5.0,
        metrics_interval_s: float = 2.0,
        max_data: int = 512,
        clock: Callable[[], float] | None = None,
        backlog: BacklogBudget | None = None,
        max_sessions: int = 0,
    ) -> None:
        self.addrs = addrs
        self.settings = settings or HostSettings()
        self.hb_interval = heartbeat_interval_s
        self.hb_timeout = heartbeat_timeout_s
        self.metrics_interval = metrics_interval_s
        self.max_data = max_data
        self.instance = uuid.uuid4().hex[:12]
        self.book = PeerBook(heartbeat_interval_s, heartbeat_timeout_s, metrics_interval_s)
        self.peers: dict[bytes, Peer] = {}
        self.sessions: dict[str, Bound] = {}
        self.backlog_budget = backlog or BacklogBudget()
        self._out: HostSender | None = None  # sends, and adapter data its full queue refused
        self.max_sessions = max_sessions  # the node's admission limit (0: none)
        self.draining = False
        # When the loop last read the control plane: silence is judged from there, so a
        # stall of this process is never blamed on peers whose heartbeats wait unread.
        self._control_read_at = 0.0
        self._exited: set[bytes] = set()  # peers found dead while sending; handled after that flush
        self.on_turn: Callable[[], object] | None = None  # once per loop turn (the watchdog ping)
        self._stop = asyncio.Event()
        self._chan: Channel | None = None
        self._waiter: AsyncWaiter | None = None
        self._timers: dict[str, tuple[float, asyncio.TimerHandle]] = {}
        self._clock = clock
        self._bad_seen = 0
        self._status_dirty = True
        self._hostname = socket.gethostname()

    # ------------------------------------------------------------------ time
    def now(self) -> float:
        return self._clock() if self._clock else time.monotonic()

    # ------------------------------------------------------------------ main loop
    async def serve(self, ready: Callable[[], object] | None = None) -> None:
        self._chan = chan = bind_host(self.addrs)
        self._out = out = HostSender(chan, self.backlog_budget)
        self._waiter = waiter = AsyncWaiter(chan)
        log(
            _log,
            logging.INFO,
            "session host listening",
            control=self.addrs.control,
            data=self.addrs.data,
            instance=self.instance,
        )
        if ready:
            ready()
        hb = asyncio.get_running_loop().create_task(self._heartbeat_loop())
        try:
            while not self._stop.is_set():
                if self.on_turn is not None:
                    self.on_turn()
                # A backlog waits for room in a peer's queue: look again soon.
                await waiter.wait(_BACKLOG_RETRY_S if out.backlogged else self.hb_interval)
                out.drain()
                self._read_control()
                received = 0
                for rd in chan.recv_batch(DATA, self.max_data):
                    received += 1
                    self._on_data(rd)
                if received:
                    BUS_DATA_MESSAGES.inc(received)
                if chan.bad_frames.count != self._bad_seen:
                    BUS_BAD_FRAMES.inc(chan.bad_frames.count - self._bad_seen)
                    log(_log, logging.WARNING, "undecodable bus message", error=chan.bad_frames.last)
                    self._bad_seen = chan.bad_frames.count
                if self._status_dirty:
                    self._broadcast_status()
        finally:
            hb.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await hb
            self._shutdown()

    def _read_control(self) -> None:
        assert self._chan is not None
        received = 0
        for rc in self._chan.recv_batch(CONTROL):
            received += 1
            self._on_control(rc)
        if received:
            BUS_CONTROL_MESSAGES.inc(received)
        self._control_read_at = self.now()

    def stop(self) -> None:
        self._stop.set()
        if self._waiter:
            self._waiter.wake()

    async def drain(self, timeout_s: float) -> None:
        """SIGTERM drain: refuse new sessions, let active responses finish, then stop."""
        self.draining = True
        self._status_dirty = True
        for p in self.peers.values():
            self._send(p.identity, CONTROL, NoNewSessions("host draining"))
        deadline = self.now() + timeout_s
        while self.now() < deadline and any(b.actor.response for b in self.sessions.values()):  # noqa: ASYNC110
            await asyncio.sleep(0.05)  # responses end through the bus loop; poll their state
        now = self.now()
        for sid in list(self.sessions):
            self._close_session(sid, now, "server shutting down", CloseCause.SHUTDOWN)
        await asyncio.sleep(0.1)  # let the closes leave
        self.stop()

    def _shutdown(self) -> None:
        for _, h in self._timers.values():
            h.cancel()
        self._timers.clear()
        if self._waiter:
            self._waiter.close()
        if self._chan:
            for p in self.peers.values():
                with contextlib.suppress(Exception):
                    self._chan.send(CONTROL, Goodbye("host", reason="shutdown"), p.identity)
            self._chan.close(linger_ms=200)

    # ------------------------------------------------------------------ sending
    def _send(self, identity: bytes, plane: Plane, msg: Message, frames: list[Any] | None = None) -> bool:
        """Send now, or (adapter data) hold it behind that adapter's backlog; False: lost."""
        assert self._out is not None
        peer = self.peers.get(identity)
        return self._out.send(identity, plane, msg, frames, holdable=peer is not None and peer.role == Role.ADAPTER)

    def _flush(self, sid: str) -> None:
        b = self.sessions.get(sid)
        if b is None:
            return
        actor = b.actor
        now = self.now()
        # Sending can make the actor emit more (a failed send is itself an event): loop.
        while actor.outbox:
            for out in actor.take_outbox():
                dest = self._dest(b, out.dest)
                if dest is None:
                    continue  # that stage is gone; the session is re-opened where it rebinds
                if isinstance(out.msg, Snapshot) and b.kv_lease is not None:
                    # The actor builds the snapshot; the lease is stage0's and joins it here.
                    out.msg = msgspec.structs.replace(
                        out.msg, snapshot=msgspec.structs.replace(out.msg.snapshot, kv_lease=b.kv_lease)
                    )
                if not self._send(dest, _plane(out.plane), out.msg, out.frames):
                    # A stage whose process just exited: not "overloaded"; its loss fails the
                    # work below. (To the adapter: it is gone; _peer_gone closes its sessions.)
                    if out.dest != Dest.ADAPTER and not self._exited_now(dest):
                        actor.on_send_failed(out, now)
                    continue
                b.observe(out, now)
            if not actor.outbox:
                self._relieve(b, now)
        if actor.closed:
            self._forget(sid)
        else:
            self._schedule(sid, actor.next_deadline())
        while self._exited:
            peer = self.peers.get(self._exited.pop())
            if peer is not None:
                self._dead(peer, "process exited", self.now())

    def _exited_now(self, identity: bytes) -> bool:
        """Whether the peer a send to failed is a process on this machine that has exited."""
        peer = self.peers.get(identity)
        if peer is None or peer.hostname != self._hostname or not process_exited(peer.pid):
            return False
        self._exited.add(identity)
        return True

    def _relieve(self, b: Bound, now: float) -> None:
        """A session whose events wait too long for its adapter fails visibly: its response
        first (``overloaded`` error, ``response.done`` failed: the epoch advance makes its
        queued audio stale, and it is dropped here); then, if that is not enough, the
        session itself. Its error and terminal events still reach the client, in order."""
        backlog = self._out.backlogs.get(b.adapter) if self._out is not None else None
        actor = b.actor
        if backlog is None or actor.closed or not backlog.over_budget(actor.session_id):
            return
        queued, ms = backlog.share(actor.session_id)
        had_response = actor.response is not None
        BACKLOG_OVERFLOWS.labels(action="response_failed" if had_response else "session_closed").inc()
        log(
            _log,
            logging.WARNING,
            "client events backlogged past budget",
            session_id=actor.session_id,
            epoch=actor.epoch,
            queued=queued,
            queued_audio_ms=round(ms),
            action="fail response" if had_response else "close session",
        )
        actor.on_client_overloaded(now)
        stale = backlog.purge_stale(actor.session_id, actor.epoch)
        if stale:
            STALE_DROPPED.labels(hop="host").inc(stale)

    def _dest(self, b: Bound, dest: Dest) -> bytes | None:
        if dest == Dest.ADAPTER:
            return b.adapter if b.adapter in self.peers else None
        ident = b.stage0 if dest == Dest.STAGE0 else b.stage1
        if ident is None or ident not in self.peers:
            return None
        return ident

    def _chunks_answered(self, sid: str, through_seq: int) -> None:
        """Tell the adapter stage0 got this far with answers no Decision showed."""
        b = self.sessions.get(sid)
        if b is None or through_seq < 0 or b.adapter not in self.peers:
            return
        self._send(b.adapter, DATA, ChunksAnswered(sid, b.actor.epoch, through_seq))

    def _schedule(self, sid: str, deadline: float | None) -> None:
        cur = self._timers.get(sid)
        if cur is not None and cur[0] == deadline:
            return
        if cur is not None:
            cur[1].cancel()
            del self._timers[sid]
        if deadline is None:
            return
        loop = asyncio.get_running_loop()
        delay = max(0.0, deadline - self.now())
        self._timers[sid] = (deadline, loop.call_later(delay, self._on_timer, sid))

    def _on_timer(self, sid: str) -> None:
        self._timers.pop(sid, None)
        b = self.sessions.get(sid)
        if b is None:
            return
        b.actor.tick(self.now())
        self._flush(sid)

    # ------------------------------------------------------------------ control plane
    def _on_control(self, r: Received[ControlMessage]) -> None:
        msg = r.msg
        if isinstance(msg, Hello):
            self._on_hello(r.identity, msg, CONTROL)
            return
        now = self.now()
        if isinstance(msg, Heartbeat):
            beat = self.book.beat(r.identity, msg, now)
            if beat is not None:  # from a peer's beacon thread: never answered there
                owner, life = beat
                if life is None:
                    self._send(owner, CONTROL, HelloRequired(self.instance))  # to its main socket
                elif owner in self.peers:
                    sender = self.peers[owner]
                    if msg.metrics:
                        sender.metrics = msg.metrics
                    if msg.load >= 0 and msg.load != sender.reported_load:
                        sender.reported_load = msg.load  # the replica's load, as it counts it
                        self._status_dirty = True
                return
        peer = self.peers.get(r.identity)
        if peer is None or self.book.seen(r.identity, now) is None:
            # A peer we do not know (we restarted): ask it to say hello again.
            self._send(r.identity, CONTROL, HelloRequired(self.instance))
            return
        match msg:
            case Heartbeat(metrics=metrics):
                if metrics:
                    peer.metrics = metrics
            case Goodbye(reason=reason, fatal=fatal):
                log(
                    _log,
                    logging.WARNING if fatal else logging.INFO,
                    "peer left",
                    peer=peer.name,
                    peer_role=peer.role.value,
                    reason=reason,
                )
                self._peer_gone(peer, reason or "left")
            case SessionOpen():
                self._open_session(peer, msg, now)
            case SessionClose(session_id=sid, reason=reason):
                self._close_session(sid, now, reason or "client closed")
            case ResponseCancel(session_id=sid):
                b = self.sessions.get(sid)
                if b is not None:
                    b.actor.on_cancel(msg, now)
                    self._flush(sid)
            case KvLeaseReport(session_id=sid, lease=lease):
                b = self.sessions.get(sid)
                if b is not None and r.identity == b.stage0:
                    b.kv_lease = msgspec.structs.replace(lease, holder=peer.name)
            case StageError(session_id=sid):
                STAGE_ERRORS.labels(stage=msg.role.value).inc()
                b = self.sessions.get(sid)
                if b is not None:
                    b.actor.on_stage_error(msg, now, msg.chunk_seq if msg.chunk_seq >= 0 else None)
                    self._flush(sid)
                    if msg.role == Role.STAGE0 and msg.chunk_seq >= 0:
                        self._chunks_answered(sid, msg.chunk_seq)
            case _:
                log(_log, logging.DEBUG, "ignored control message", type=type(msg).__name__, peer=peer.name)

    def _on_hello(self, identity: bytes, hello: Hello, plane: str) -> None:
        out = self.book.hello(identity, hello, plane, self.now())
        if out.verdict == HelloVerdict.REFUSED:
            log(
                _log,
                logging.ERROR,
                "refusing peer with another protocol version",
                peer=hello.identity,
                theirs=hello.protocol_version,
                ours=PROTOCOL_VERSION,
            )
            self._send(identity, CONTROL, Refused(out.reason))
            return
        assert out.peer is not None
        old = self.peers.get(identity)
        if old is not None and old.life is not out.peer:
            self._peer_gone(old, "replaced by a new process")
        peer = self.peers.get(identity)
        if peer is None:
            cap = admission.stage_capacity(hello.max_sessions, hello.engine)
            peer = self.peers[identity] = Peer(out.peer, hello.engine, cap)
        if out.verdict == HelloVerdict.READY:
            log(_log, logging.INFO, "peer ready", peer=peer.name, peer_role=peer.role.value, peer_pid=peer.pid)
            self._send(identity, CONTROL, self._ready_msg())
            self._status_dirty = True
            if peer.role in (Role.STAGE0, Role.STAGE1):
                self._rebind_orphans(peer)
        elif out.verdict == HelloVerdict.READY_AGAIN:
            self._send(identity, CONTROL, self._ready_msg())  # a retried hello

    def _ready_msg(self) -> Ready:
        return Ready(PROTOCOL_VERSION, self.instance, pid=os.getpid(), hostname=self._hostname)

    def _dead(self, peer: Peer, reason: str, now: float) -> None:
        silent = round(now - peer.life.last_seen, 2)
        log(_log, logging.ERROR, "peer dead", peer=peer.name, peer_role=peer.role.value, reason=reason, silent_s=silent)
        self._peer_gone(peer, reason)

    def _peer_gone(self, peer: Peer, reason: str) -> None:
        if self.peers.get(peer.identity) is not peer:
            return
        del self.peers[peer.identity]
        if self._out is not None:
            self._out.drop(peer.identity)
        if self.book.peers.get(peer.identity) is peer.life:
            self.book.forget(peer.identity)
        # The cluster status first, so an adapter knows the stage is gone (/health 503) by
        # the time its clients get the errors below.
        self._broadcast_status()
        now = self.now()
        for sid in list(peer.sessions):
            b = self.sessions.get(sid)
            if b is None:
                continue
            if peer.role == Role.ADAPTER:
                self._close_session(sid, now, f"adapter gone: {reason}")
                continue
            if peer.role == Role.STAGE0:
                b.stage0 = None
            else:
                b.stage1 = None
            b.actor.on_stage_lost(peer.role, now)
            self._flush(sid)
            if peer.role == Role.STAGE0:
                self._chunks_answered(sid, b.chunk_sent)  # lost: no answer will come
            if sid in self.sessions:
                self._rebind(sid, peer.role)

    def _rebind_orphans(self, peer: Peer) -> None:
        for sid, b in self.sessions.items():
            if (peer.role == Role.STAGE0 and b.stage0 is None) or (peer.role == Role.STAGE1 and b.stage1 is None):
                self._rebind(sid, peer.role)

    def _rebind(self, sid: str, role: Role) -> None:
        b = self.sessions[sid]
        peer = self._pick(role, with_room=True)
        if peer is None:
            return
        if role == Role.STAGE0:
            b.stage0 = peer.identity
        else:
            b.stage1 = peer.identity
        peer.sessions.add(sid)
        b.actor.stage_names[role] = peer.name
        log(_log, logging.INFO, "session re-bound", session_id=sid, epoch=b.actor.epoch, stage=peer.name)
        b.actor.on_stage_bound(role, self.now())
        self._flush(sid)

    def _ready(self, role: Role) -> list[Peer]:
        return ready_peers(self.peers.values(), role)

    def _pick(self, role: Role, with_room: bool = False) -> Peer | None:
        return pick(self.peers.values(), role, with_room)

    def engine_info(self) -> EngineInfo | None:
        p = self._pick(Role.STAGE0)
        return p.engine if p else None

    # ------------------------------------------------------------------ sessions
    def _open_session(self, adapter: Peer, msg: SessionOpen, now: float) -> None:
        sid = msg.session_id

        def refuse(code: str, message: str, limit: str) -> None:
            ADMISSIONS_REFUSED.labels(limit=limit).inc()
            log(_log, logging.INFO, "session refused", session_id=sid, code=code, limit=limit, error=message)
            # An error, then a close the adapter renders as 1013 "try again later".
            self._send(adapter.identity, DATA, ErrorEvent(sid, 0, code, message, type="server_error"))
            self._send(adapter.identity, DATA, SessionClosed(sid, 0, message, cause=CloseCause.REFUSED))

        if sid in self.sessions:
            refuse("session_exists", f"session {sid} is already open", "duplicate")
            return
        if self.draining:
            refuse("server_draining", "the server is shutting down; no new sessions", "draining")
            return
        ready0, ready1 = self._ready(Role.STAGE0), self._ready(Role.STAGE1)
        if not ready0 or not ready1:
            refuse("stage_unavailable", "the model stages are not ready", "unavailable")
            return
        refusal = admission.admit(
            len(self.sessions), self.max_sessions, [load(p) for p in ready0], [load(p) for p in ready1]
        )
        if refusal is not None:
            refuse(refusal.code, refusal.message, refusal.limit)
            return
        s0, s1 = self._pick(Role.STAGE0, with_room=True), self._pick(Role.STAGE1, with_room=True)
        if s0 is None or s1 is None or s0.engine is None:
            refuse("stage_unavailable", "the model stages are not ready", "unavailable")
            return
        actor = SessionActor(sid, msg.config, s0.engine, self.settings)
        actor.stage_names = {Role.STAGE0: s0.name, Role.STAGE1: s1.name}
        self.sessions[sid] = Bound(actor, adapter.identity, s0.identity, s1.identity)
        for p in (adapter, s0, s1):
            p.sessions.add(sid)
        SESSIONS.set(len(self.sessions))
        self._status_dirty = True
        log(
            _log,
            logging.INFO,
            "session opened",
            session_id=sid,
            epoch=0,
            stage0=s0.name,
            stage1=s1.name,
            mode=msg.config.turn_mode.value,
        )
        actor.open(now)
        self._flush(sid)

    def _close_session(self, sid: str, now: float, reason: str, cause: CloseCause = CloseCause.NORMAL) -> None:
        b = self.sessions.get(sid)
        if b is None:
            return
        b.actor.close(now, reason, cause)
        self._flush(sid)

    def _forget(self, sid: str) -> None:
        b = self.sessions.pop(sid, None)
        if b is None:
            return
        b.actor.release()
        for ident in (b.adapter, b.stage0, b.stage1):
            if ident is not None and ident in self.peers:
                self.peers[ident].sessions.discard(sid)
        t = self._timers.pop(sid, None)
        if t:
            t[1].cancel()
        SESSIONS.set(len(self.sessions))
        self._status_dirty = True
        log(_log, logging.INFO, "session closed", session_id=sid, epoch=b.actor.epoch)

    # ------------------------------------------------------------------ data plane
    def _on_data(self, r: Received[DataMessage]) -> None:
        msg = r.msg
        if isinstance(msg, Hello):
            self._on_hello(r.identity, msg, DATA)
            return
        peer = self.peers.get(r.identity)
        if peer is None or not peer.ready:
            self._send(r.identity, CONTROL, HelloRequired(self.instance))
            return
        sid = getattr(msg, "session_id", None)
        b = self.sessions.get(sid) if sid is not None else None
        if b is None and sid is not None and peer.role == Role.ADAPTER:
            # Its SessionOpen may have reached the control queue after we last read it.
            self._read_control()
            b = self.sessions.get(sid)
        if b is None:
            return  # a session that closed while this was in flight
        now = self.now()
        actor = b.actor
        if peer.role == Role.ADAPTER:
            if r.identity != b.adapter or not isinstance(msg, ClientCommand):
                return
            actor.on_command(msg, now)
        elif isinstance(msg, Stage0Result):
            if r.identity != b.stage0:
                return
            if msg.epoch < actor.epoch:
                STALE_DROPPED.labels(hop="host").inc()
            actor.on_stage0(msg, now)
            self._flush(msg.session_id)
            if b.decision_shown < msg.chunk_seq:
                self._chunks_answered(msg.session_id, msg.chunk_seq)  # answered, but not shown
            return
        elif isinstance(msg, AudioOut):
            if r.identity != b.stage1:
                return
            if not actor.on_audio_out(msg, now, r.frames):
                STALE_DROPPED.labels(hop="host").inc()
        else:
            log(_log, logging.DEBUG, "ignored data message", type=type(msg).__name__, peer=peer.name)
            return
        self._flush(sid)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ liveness and status
    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(max(0.01, self.book.wait_s(self.now())))
            now = self.now()
            # Same machine: a dead process is known at once, no need to wait for heartbeats.
            # Silence counts up to when the loop last read control (see bus/liveness.py).
            judged_at = min(now, self._control_read_at) if self._control_read_at else now
            for life, reason in self.book.dead(judged_at, self._hostname, process_exited):
                peer = self.peers.get(life.identity)
                if peer is None:
                    self.book.forget(life.identity)
                    continue
                self._dead(peer, reason, now)
            beat = self.book.heartbeat_due(now)
            if beat is not None:
                for p in list(self.peers.values()):
                    if p.ready:
                        self._send(p.identity, CONTROL, Heartbeat(beat.seq, "host", host_instance=self.instance))
                if beat.with_metrics:
                    self._status_dirty = True
            if self._status_dirty:
                # Right away, so adapters learn of a dead peer with (or before) its sessions' errors.
                self._broadcast_status()

    def capacity(self) -> tuple[int, int]:
        """(sessions admitted in all, more admitted now); -1: no limit (actors/admission.py)."""
        return admission.capacity(
            len(self.sessions),
            self.max_sessions,
            [load(p) for p in self._ready(Role.STAGE0)],
            [load(p) for p in self._ready(Role.STAGE1)],
        )

    def role_statuses(self) -> tuple[RoleStatus, ...]:
        out = [RoleStatus(Role.HOST, "host", os.getpid(), "ready", host=self._hostname)]
        out += [
            RoleStatus(
                p.role,
                p.name,
                p.pid,
                "ready" if p.ready else "starting",
                host=p.hostname,
                sessions=p.load,
                capacity=p.capacity,
                load=p.reported_load,
            )
            for p in self.peers.values()
            if p.role != Role.ADAPTER
        ]
        return tuple(out)

    def _broadcast_status(self) -> None:
        self._status_dirty = False
        if self._chan is None:
            return
        cap, available = self.capacity()
        SESSION_CAPACITY.set(cap)
        SESSIONS_AVAILABLE.set(0 if self.draining else available)
        QUEUE_DEPTH.labels(queue="host_adapter_backlog").set(self._out.depth if self._out else 0)
        # Stage metrics ride along, tagged, so the adapter can render the whole cluster.
        metrics = tag(snapshot(), Role.HOST.value, "host")
        for p in self.peers.values():
            if p.role != Role.ADAPTER:
                metrics += tag(p.metrics, p.role.value, p.name)
        status = ClusterStatus(
            host_instance=self.instance,
            roles=self.role_statuses(),
            sessions=len(self.sessions),
            engine=self.engine_info(),
            draining=self.draining,
            metrics=tuple(metrics),
            capacity=cap,
            available=0 if self.draining else available,
        )
        for p in list(self.peers.values()):
            if p.role == Role.ADAPTER and p.ready:
                self._send(p.identity, CONTROL, status)
