"""The plain loop every stage worker runs around its engine step.

One iteration: wait until a plane is readable or work is due, take **all** control
messages, then up to ``max_data`` data messages, then run one engine step. Control is
therefore handled between any two model steps: a cancel never waits behind audio.

The worker keeps the newest epoch it knows per session and drops older data (counted
per hop). It says Hello and re-handshakes if the host restarts or goes silent (the rules:
:mod:`duplexd.bus.liveness`). Its heartbeats come from a beacon thread
(:mod:`duplexd.bus.beacon`), so a long model step does not make it look dead; the loop
itself pings the watchdog (``WATCHDOG=1``) once per turn, so a stuck step is seen there.
"""

from __future__ import annotations

import abc
import logging
import os
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable

from duplexd.bus.addresses import BusAddresses
from duplexd.bus.beacon import Beacon
from duplexd.bus.liveness import HandshakeError, HostWatch, process_exited
from duplexd.bus.log import get_logger, log
from duplexd.bus.messages import (
    PROTOCOL_VERSION,
    ControlMessage,
    EngineInfo,
    EpochAdvance,
    Goodbye,
    Hello,
    NoNewSessions,
    Ready,
    Role,
    SessionConfig,
    Stage0Result,
    StageClose,
    StageData,
    StageError,
    StageOpen,
)
from duplexd.bus.metrics import (
    BACKPRESSURE,
    BUS_BAD_FRAMES,
    BUS_CONTROL_MESSAGES,
    BUS_DATA_MESSAGES,
    QUEUE_DEPTH,
    STALE_DROPPED,
    snapshot,
)
from duplexd.bus.sockets import (
    CONTROL,
    DATA,
    Backpressure,
    Channel,
    PeerUnreachable,
    QueueFull,
    connect_peer,
    handshake,
    peer_identity,
)

_log = get_logger(__name__)

_HELD_RETRY_MS = 5  # how soon held results are retried while the host's queue is full


class WorkerOptions:
    """Timing knobs shared by all workers (from ``[bus]`` config)."""

    def __init__(
        self,
        handshake_timeout_s: float = 30.0,
        heartbeat_interval_s: float = 0.1,
        heartbeat_timeout_s: float = 0.75,
        metrics_interval_s: float = 2.0,
        max_data: int = 256,
        max_sessions: int = 0,
    ) -> None:
        self.handshake_timeout_s = handshake_timeout_s
        self.heartbeat_interval_s = heartbeat_interval_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.metrics_interval_s = metrics_interval_s
        self.max_data = max_data
        self.max_sessions = max_sessions  # admission: sessions this process takes (0: no cap of its own)


class StageWorker(abc.ABC):
    """Generic stage process: handshake, control handling, epochs, heartbeat, loop."""

    role: Role

    def __init__(
        self,
        addrs: BusAddresses,
        opts: WorkerOptions | None = None,
        identity: str | None = None,
    ) -> None:
        self.addrs = addrs
        self.opts = opts or WorkerOptions()
        self.identity = identity or peer_identity(self.role.value)
        self.epochs: dict[str, int] = {}
        self.configs: dict[str, SessionConfig] = {}
        self.stop_event = threading.Event()
        self.chan: Channel | None = None
        self.watch = self._new_watch()
        # Results the host's full data queue refused, in order: the worker steps again only
        # once they are out, so backpressure slows the stage instead of losing a result.
        self.held: deque[StageData] = deque()
        self._bad_frames_seen = 0
        self.on_ready: Callable[[], object] | None = None
        self.on_turn: Callable[[], object] | None = None  # once per loop turn (the watchdog ping)
        self._instance = ""
        self._hostname = socket.gethostname()
        QUEUE_DEPTH.labels(queue="stage_held").set_function(lambda: len(self.held))
        self.beacon = Beacon(
            addrs,
            self.identity,
            self.opts.heartbeat_interval_s,
            self.opts.metrics_interval_s,
            snapshot,
            load=lambda: len(self.epochs),  # len() of a dict is safe to read from the beacon thread
        )

    def _new_watch(self) -> HostWatch:
        o = self.opts
        return HostWatch(o.heartbeat_interval_s, o.heartbeat_timeout_s, o.metrics_interval_s)

    # ------------------------------------------------------------------ to implement
    @abc.abstractmethod
    def engine_info(self) -> EngineInfo | None: ...

    @abc.abstractmethod
    def open_session(self, session_id: str, config: SessionConfig) -> None: ...

    @abc.abstractmethod
    def close_session(self, session_id: str) -> None: ...

    @abc.abstractmethod
    def advance_epoch(self, session_id: str) -> None:
        """Drop the session's pending output of older epochs."""

    def update_session(self, session_id: str, config: SessionConfig) -> None:  # noqa: B027
        """Settings changed (StageOpen for a session already open)."""

    @abc.abstractmethod
    def on_data(self, msg: StageData) -> None:
        """A data message whose epoch is current."""

    @abc.abstractmethod
    def has_work(self) -> bool: ...

    @abc.abstractmethod
    def step(self) -> None:
        """One engine step over the batch of sessions with work."""

    def next_due_s(self) -> float | None:
        """Seconds until work becomes due without new input (pacing), or None."""
        return None

    # ------------------------------------------------------------------ helpers
    def send_data(self, msg: StageData) -> bool:
        """Send, or hold it (in order) while the host's queue is full. False: the host is
        not connected, the message is lost with the connection (the host fails the work)."""
        assert self.chan is not None
        if self.held:
            self.held.append(msg)
            return True
        try:
            self.chan.send(DATA, msg)
            return True
        except QueueFull as exc:
            BACKPRESSURE.labels(hop=self.role.value).inc()
            log(_log, logging.WARNING, "data queue to host full; holding results", error=str(exc))
            self.held.append(msg)
            return True
        except PeerUnreachable as exc:
            log(_log, logging.WARNING, "host not connected; result dropped", error=str(exc))
            return False

    def _send_held(self) -> None:
        """Out with what the host's queue refused; stale output is dropped, not sent."""
        assert self.chan is not None
        while self.held:
            msg = self.held[0]
            sid = msg.session_id
            stale = sid not in self.epochs or msg.epoch < self.epochs[sid]
            if stale and not isinstance(msg, Stage0Result):  # (stage0 answers every chunk, whatever its epoch)
                self.held.popleft()
                STALE_DROPPED.labels(hop=self.role.value).inc()
                continue
            try:
                self.chan.send(DATA, msg)
            except QueueFull:
                return
            except PeerUnreachable:
                self.held.clear()
                return
            self.held.popleft()

    def send_control(self, msg: ControlMessage) -> None:
        assert self.chan is not None
        try:
            self.chan.send(CONTROL, msg)
        except Backpressure:
            BACKPRESSURE.labels(hop=f"{self.role.value}-control").inc()

    def report_error(self, session_id: str, code: str, message: str) -> None:
        log(_log, logging.ERROR, "stage error", session_id=session_id, code=code, error=message)
        self.send_control(StageError(session_id, self.epochs.get(session_id, 0), code, message, role=self.role))

    def is_current(self, session_id: str, epoch: int) -> bool:
        """Epoch fence for data: older is dropped (and counted); newer is adopted."""
        known = self.epochs.get(session_id)
        if known is None:
            return False
        if epoch < known:
            STALE_DROPPED.labels(hop=self.role.value).inc()
            return False
        if epoch > known:
            self.epochs[session_id] = epoch
            self.advance_epoch(session_id)
        return True

    # ------------------------------------------------------------------ control
    def _on_control(self, msg: ControlMessage) -> None:
        gone = self.watch.on_control(msg, time.monotonic())
        if gone is not None:
            raise _HostRestarted(gone)
        match msg:
            case StageOpen(session_id=sid, epoch=epoch, config=config):
                if sid in self.epochs:
                    self.configs[sid] = config
                    self.update_session(sid, config)
                    self._adopt(sid, epoch)
                    return
                self.epochs[sid] = epoch
                self.configs[sid] = config
                try:
                    self.open_session(sid, config)
                except Exception as exc:  # engine refused this session only
                    self.epochs.pop(sid, None)
                    self.report_error(sid, "stage_open_failed", f"{type(exc).__name__}: {exc}")
            case StageClose(session_id=sid):
                if self.epochs.pop(sid, None) is not None:
                    self.configs.pop(sid, None)
                    self.close_session(sid)
            case EpochAdvance(session_id=sid, epoch=epoch):
                self._adopt(sid, epoch)
            case NoNewSessions():
                pass  # the host stops routing new sessions to us; we keep serving
            case _:
                log(_log, logging.DEBUG, "ignored control message", type=type(msg).__name__)

    def _adopt(self, sid: str, epoch: int) -> None:
        if sid in self.epochs and epoch > self.epochs[sid]:
            self.epochs[sid] = epoch
            self.advance_epoch(sid)

    # ------------------------------------------------------------------ lifecycle
    def _hello(self) -> Hello:
        return Hello(
            role=self.role,
            identity=self.identity,
            pid=os.getpid(),
            protocol_version=PROTOCOL_VERSION,
            engine=self.engine_info(),
            hostname=self._hostname,
            instance=self._instance,
            max_sessions=self.opts.max_sessions,
        )

    def _connect(self) -> Ready:
        if self.chan is not None:
            self.chan.close(linger_ms=0)
        self.chan = connect_peer(self.addrs, self.identity)
        self._instance = uuid.uuid4().hex[:12]  # a new connection: the host must forget our old sessions
        ready = handshake(
            self.chan, self._hello(), self.opts.handshake_timeout_s, stopped=self.stop_event.is_set, tick=self.on_turn
        )
        self.watch = self._new_watch()
        self.watch.connected(ready, time.monotonic())
        log(_log, logging.INFO, "ready", identity=self.identity)
        return ready

    def _reset_sessions(self) -> None:
        self.held.clear()
        for sid in list(self.epochs):
            self.close_session(sid)
        self.epochs.clear()
        self.configs.clear()

    def run(self) -> None:
        """Serve until ``stop_event`` is set. Re-handshakes when the host restarts."""
        self._connect()
        self.beacon.start()
        if self.on_ready is not None:
            self.on_ready()
        try:
            while not self.stop_event.is_set():
                try:
                    self._iterate()
                except _HostRestarted as exc:
                    log(_log, logging.WARNING, "reconnecting to the session host", reason=str(exc))
                    self._reset_sessions()
                    try:
                        self._connect()
                    except HandshakeError:
                        if self.stop_event.is_set():
                            break  # told to stop while the host was away
                        raise
        except BaseException as exc:
            # Tell the host we are dead (and why) before the process goes.
            log(_log, logging.ERROR, "worker failed", exc_info=True)
            self.beacon.stop()
            self._shutdown(reason=f"{type(exc).__name__}: {exc}", fatal=True)
            raise
        self.beacon.stop()
        self._shutdown()

    def _iterate(self) -> None:
        chan = self.chan
        assert chan is not None
        if self.on_turn is not None:
            self.on_turn()
        if self.held:
            timeout_ms = _HELD_RETRY_MS  # waiting for room in the host's queue
        elif self.has_work():
            timeout_ms = 0
        else:
            due = self.next_due_s()
            wait = self.opts.heartbeat_interval_s if due is None else min(due, self.opts.heartbeat_interval_s)
            timeout_ms = max(0, int(wait * 1000))
        chan.poll(timeout_ms)
        self._read_control()
        # Judged after reading control: a long step must not make the host look silent.
        dead = self.watch.dead(time.monotonic(), self._hostname, process_exited)
        if dead is not None:
            raise _HostRestarted(dead)
        received = 0
        for rd in chan.recv_batch(DATA, self.opts.max_data):
            received += 1
            msg = rd.msg
            if not isinstance(msg, StageData):
                continue
            if msg.session_id not in self.epochs:
                # Data is read lazily, behind on_data calls that may take a while (a long
                # reply rendered at once): the StageOpen of a session opened meanwhile can
                # be waiting on control. Dropping its data would orphan the response.
                self._read_control()
            if self.is_current(msg.session_id, msg.epoch):
                self.on_data(msg)
        if received:
            BUS_DATA_MESSAGES.inc(received)
        if chan.bad_frames.count != self._bad_frames_seen:
            BUS_BAD_FRAMES.inc(chan.bad_frames.count - self._bad_frames_seen)
            log(_log, logging.WARNING, "undecodable bus message", error=chan.bad_frames.last)
            self._bad_frames_seen = chan.bad_frames.count
        if self.held:
            self._send_held()
        if not self.held and self.has_work():
            self.step()

    def _read_control(self) -> None:
        assert self.chan is not None
        received = 0
        for rc in self.chan.recv_batch(CONTROL):
            received += 1
            self._on_control(rc.msg)
        if received:
            BUS_CONTROL_MESSAGES.inc(received)  # one increment per batch, not per message

    def _shutdown(self, reason: str = "shutdown", fatal: bool = False) -> None:
        if self.chan is None:
            return
        try:
            self.chan.send(CONTROL, Goodbye(self.identity, reason=reason, fatal=fatal))
        except Exception:
            pass
        self.chan.close(linger_ms=200)
        self.chan = None


class _HostRestarted(Exception):
    """The host we handshook with is gone or was replaced."""


def run_worker_forever(worker: StageWorker) -> int:
    """Entry point helper: serve, return a process exit code."""
    try:
        worker.run()
    except HandshakeError as exc:
        log(_log, logging.ERROR, "handshake failed", error=str(exc))
        return 3
    return 0
