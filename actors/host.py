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
from dataclasses import dataclass, field
from typing import Any

import msgspec

from duplexd.actors.session import Dest, HostSettings, Out, SessionActor
from duplexd.bus.addresses import BusAddresses
from duplexd.bus.liveness import HelloVerdict, PeerBook, PeerLife
from duplexd.bus.log import get_logger, log
from duplexd.bus.messages import (
    PROTOCOL_VERSION,
    AudioChunk,
    AudioOut,
    ChunksAnswered,
    ClientCommand,
    ClusterStatus,
    ControlMessage,
    DataMessage,
    Decision,
    EngineInfo,
    ErrorEvent,
    Goodbye,
    Heartbeat,
    Hello,
    HelloRequired,
    KvLease,
    KvLeaseReport,
    Message,
    MetricSample,
    NoNewSessions,
    Plane,
    Ready,
    Refused,
    ResponseCancel,
    ResponseDone,
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
    BACKPRESSURE,
    BUS_BAD_FRAMES,
    BUS_MESSAGES,
    FIRST_AUDIO_SECONDS,
    RESPONSES,
    SESSIONS,
    STAGE_ERRORS,
    STALE_DROPPED,
    snapshot,
    tag,
)
from duplexd.bus.sockets import CONTROL, DATA, AsyncWaiter, Backpressure, Channel, Received, bind_host

_log = get_logger(__name__)


def _plane(name: str) -> Plane:
    return CONTROL if name == CONTROL else DATA


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


@dataclass(slots=True)
class Peer:
    """A connected process: its liveness record plus what the host routes to it."""

    life: PeerLife
    engine: EngineInfo | None
    sessions: set[str] = field(default_factory=set)
    metrics: tuple[MetricSample, ...] = ()

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
    cap = p.engine.max_sessions if p.engine is not None else 0
    return cap == 0 or len(p.sessions) < cap


@dataclass(slots=True)
class _Bound:
    actor: SessionActor
    adapter: bytes
    stage0: bytes | None
    stage1: bytes | None
    first_audio_logged: str = ""
    chunk_sent: int = -1  # newest chunk_seq sent to stage0
    decision_shown: int = -1  # newest chunk_seq whose Decision reached the adapter
    kv_lease: KvLease | None = None  # the newest lease report of its stage0


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
        self.sessions: dict[str, _Bound] = {}
        self.draining = False
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
                await waiter.wait(self.hb_interval)
                for rc in chan.recv_batch(CONTROL):
                    BUS_MESSAGES.labels(plane="control").inc()
                    self._on_control(rc)
                for rd in chan.recv_batch(DATA, self.max_data):
                    BUS_MESSAGES.labels(plane="data").inc()
                    self._on_data(rd)
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
            self._close_session(sid, now, "server shutting down")
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
        assert self._chan is not None
        try:
            if frames is not None:
                self._chan.send_frames(plane, frames, identity)
            else:
                self._chan.send(plane, msg, identity)
            return True
        except Backpressure as exc:
            BACKPRESSURE.labels(hop=f"host-{plane}").inc()
            log(_log, logging.WARNING, "send refused", peer=identity.decode(errors="replace"), error=str(exc))
            return False

    def _flush(self, sid: str) -> None:
        b = self.sessions.get(sid)
        if b is None:
            return
        actor = b.actor
        now = self.now()
        adapter_stuck = False
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
                    if out.dest == Dest.ADAPTER:
                        adapter_stuck = True
                    else:
                        actor.on_send_failed(out, now)
                    continue
                self._observe(b, out, now)
        if adapter_stuck and not actor.closed:
            # The adapter is not reading: events would be lost, so end the session cleanly.
            actor.close(now, "adapter overloaded")
            for out in actor.take_outbox():
                dest = self._dest(b, out.dest)
                if dest is not None and out.dest != Dest.ADAPTER:
                    self._send(dest, _plane(out.plane), out.msg)
        if actor.closed:
            self._forget(sid)
        else:
            self._schedule(sid, actor.next_deadline())

    def _dest(self, b: _Bound, dest: Dest) -> bytes | None:
        if dest == Dest.ADAPTER:
            return b.adapter if b.adapter in self.peers else None
        ident = b.stage0 if dest == Dest.STAGE0 else b.stage1
        if ident is None or ident not in self.peers:
            return None
        return ident

    def _observe(self, b: _Bound, out: Out, now: float) -> None:
        msg = out.msg
        if isinstance(msg, AudioChunk):
            b.chunk_sent = msg.chunk_seq
        elif isinstance(msg, Decision):
            b.decision_shown = msg.chunk_seq
        elif isinstance(msg, ResponseDone):
            RESPONSES.labels(status=msg.response.status.value).inc()
            log(
                _log,
                logging.INFO,
                "response done",
                session_id=msg.session_id,
                response_id=msg.response.id,
                epoch=msg.epoch,
                status=msg.response.status.value,
                reason=msg.response.reason,
            )
        elif isinstance(msg, AudioOut) and msg.response_id != b.first_audio_logged:
            b.first_audio_logged = msg.response_id
            r = b.actor.response
            if r is not None and r.id == msg.response_id:
                FIRST_AUDIO_SECONDS.observe(max(0.0, now - r.created_at))
        elif isinstance(msg, ErrorEvent):
            # The adapter logs the one INFO line per error event a client gets ("client error").
            log(
                _log,
                logging.DEBUG,
                "error event",
                session_id=msg.session_id,
                response_id=msg.response_id,
                epoch=msg.epoch,
                code=msg.code,
                error=msg.message,
            )

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
            peer = self.peers[identity] = Peer(out.peer, hello.engine)
        if out.verdict == HelloVerdict.READY:
            log(_log, logging.INFO, "peer ready", peer=peer.name, peer_role=peer.role.value, peer_pid=peer.pid)
            self._send(identity, CONTROL, Ready(PROTOCOL_VERSION, self.instance))
            self._status_dirty = True
            if peer.role in (Role.STAGE0, Role.STAGE1):
                self._rebind_orphans(peer)
        elif out.verdict == HelloVerdict.READY_AGAIN:
            self._send(identity, CONTROL, Ready(PROTOCOL_VERSION, self.instance))  # a retried hello

    def _peer_gone(self, peer: Peer, reason: str) -> None:
        if self.peers.get(peer.identity) is not peer:
            return
        del self.peers[peer.identity]
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
        peer = self._pick(role)
        if peer is None:
            return
        if role == Role.STAGE0:
            b.stage0 = peer.identity
        else:
            b.stage1 = peer.identity
        peer.sessions.add(sid)
        b.actor.stage_names[role] = peer.name
        b.actor.on_stage_bound(role, self.now())
        self._flush(sid)

    def _ready(self, role: Role) -> list[Peer]:
        return [p for p in self.peers.values() if p.role == role and p.ready]

    def _pick(self, role: Role, with_room: bool = False) -> Peer | None:
        """The least-loaded ready peer of ``role``; ``with_room``: only one with a free model slot."""
        ready = self._ready(role)
        if with_room:
            ready = [p for p in ready if _has_room(p)]
        return min(ready, key=lambda p: len(p.sessions)) if ready else None

    def engine_info(self) -> EngineInfo | None:
        p = self._pick(Role.STAGE0)
        return p.engine if p else None

    # ------------------------------------------------------------------ sessions
    def _open_session(self, adapter: Peer, msg: SessionOpen, now: float) -> None:
        sid = msg.session_id

        def refuse(code: str, message: str) -> None:
            self._send(adapter.identity, DATA, ErrorEvent(sid, 0, code, message, type="server_error", fatal=True))
            self._send(adapter.identity, DATA, SessionClosed(sid, 0, message))

        if sid in self.sessions:
            refuse("session_exists", f"session {sid} is already open")
            return
        if self.draining:
            refuse("server_draining", "the server is shutting down; no new sessions")
            return
        s0, s1 = self._pick(Role.STAGE0, with_room=True), self._pick(Role.STAGE1)
        if s0 is None and self._pick(Role.STAGE0) is not None:
            # Admission: a stage0 with a fixed number of model slots has none free.
            slots = sum(p.engine.max_sessions for p in self._ready(Role.STAGE0) if p.engine)
            refuse("capacity_exceeded", f"all {slots} model slots are in use; try again when a session ends")
            return
        if s0 is None or s1 is None or s0.engine is None:
            refuse("stage_unavailable", "the model stages are not ready")
            return
        actor = SessionActor(sid, msg.config, s0.engine, self.settings)
        actor.stage_names = {Role.STAGE0: s0.name, Role.STAGE1: s1.name}
        self.sessions[sid] = _Bound(actor, adapter.identity, s0.identity, s1.identity)
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

    def _close_session(self, sid: str, now: float, reason: str) -> None:
        b = self.sessions.get(sid)
        if b is None:
            return
        b.actor.close(now, reason)
        self._flush(sid)

    def _forget(self, sid: str) -> None:
        b = self.sessions.pop(sid, None)
        if b is None:
            return
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
            for life, reason in self.book.dead(now, self._hostname, lambda pid: not _pid_alive(pid)):
                peer = self.peers.get(life.identity)
                if peer is None:
                    self.book.forget(life.identity)
                    continue
                log(
                    _log,
                    logging.ERROR,
                    "peer dead",
                    peer=peer.name,
                    peer_role=peer.role.value,
                    reason=reason,
                    silent_s=round(now - life.last_seen, 2),
                )
                self._peer_gone(peer, reason)
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

    def role_statuses(self) -> tuple[RoleStatus, ...]:
        out = [RoleStatus(Role.HOST, "host", os.getpid(), "ready", host=self._hostname)]
        out += [
            RoleStatus(p.role, p.name, p.pid, "ready" if p.ready else "starting", host=p.hostname)
            for p in self.peers.values()
            if p.role != Role.ADAPTER
        ]
        return tuple(out)

    def _broadcast_status(self) -> None:
        self._status_dirty = False
        if self._chan is None:
            return
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
        )
        for p in list(self.peers.values()):
            if p.role == Role.ADAPTER and p.ready:
                self._send(p.identity, CONTROL, status)
