"""The plain loop every stage worker runs around its engine step.

One iteration: wait until a plane is readable or work is due, drain **all** control
messages, then up to ``max_data`` data messages, then run one engine step. Control is
therefore handled between any two model steps: a cancel never waits behind audio.

The worker keeps the newest epoch it knows per session and drops older data (counted
per hop). It says Hello, heartbeats the host, and re-handshakes if the host restarts.
"""

from __future__ import annotations

import abc
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from duplexd.bus.addresses import BusAddresses
from duplexd.bus.log import get_logger, log
from duplexd.bus.messages import (
    PROTOCOL_VERSION,
    Drain,
    EngineInfo,
    EpochAdvance,
    Goodbye,
    Heartbeat,
    Hello,
    HelloRequired,
    Ready,
    Role,
    SessionConfig,
    StageClose,
    StageError,
    StageOpen,
)
from duplexd.bus.metrics import BACKPRESSURE, BUS_BAD_FRAMES, BUS_MESSAGES, STALE_DROPPED, snapshot
from duplexd.bus.sockets import (
    CONTROL,
    DATA,
    Backpressure,
    Channel,
    HandshakeError,
    connect_peer,
    handshake,
    peer_identity,
)

_log = get_logger(__name__)


class WorkerOptions:
    """Timing knobs shared by all workers (from ``[bus]`` config)."""

    def __init__(
        self,
        handshake_timeout_s: float = 30.0,
        heartbeat_interval_s: float = 0.5,
        heartbeat_timeout_s: float = 5.0,
        metrics_interval_s: float = 2.0,
        max_data: int = 256,
    ) -> None:
        self.handshake_timeout_s = handshake_timeout_s
        self.heartbeat_interval_s = heartbeat_interval_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.metrics_interval_s = metrics_interval_s
        self.max_data = max_data


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
        self._host_instance = ""
        self._last_host_hb = 0.0
        self._hb_seq = 0
        self._last_metrics = 0.0
        self._hb_sent_at = 0.0
        self._bad_frames_seen = 0
        self.on_ready: Callable[[], object] | None = None

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
    def on_data(self, msg: Any) -> None:
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
    def send_data(self, msg: Any) -> bool:
        assert self.chan is not None
        try:
            self.chan.send(DATA, msg)
            return True
        except Backpressure as exc:
            BACKPRESSURE.labels(hop=self.role.value).inc()
            log(_log, logging.WARNING, "data queue to host full", error=str(exc))
            return False

    def send_control(self, msg: Any) -> None:
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
    def _on_control(self, msg: Any) -> None:
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
            case Heartbeat(host_instance=inst):
                if inst and self._host_instance and inst != self._host_instance:
                    raise _HostRestarted()
                self._last_host_hb = time.monotonic()
            case HelloRequired():
                raise _HostRestarted()
            case Drain():
                pass  # the host stops routing new sessions to us; we keep serving
            case _:
                log(_log, logging.DEBUG, "ignored control message", type=type(msg).__name__)

    def _adopt(self, sid: str, epoch: int) -> None:
        if sid in self.epochs and epoch > self.epochs[sid]:
            self.epochs[sid] = epoch
            self.advance_epoch(sid)

    def _heartbeat(self, now: float) -> None:
        self._hb_seq += 1
        metrics: tuple = ()
        if now - self._last_metrics >= self.opts.metrics_interval_s:
            self._last_metrics = now
            metrics = snapshot()
        self.send_control(Heartbeat(self._hb_seq, self.identity, metrics=metrics))

    # ------------------------------------------------------------------ lifecycle
    def _hello(self) -> Hello:
        return Hello(
            role=self.role,
            identity=self.identity,
            pid=os.getpid(),
            protocol_version=PROTOCOL_VERSION,
            engine=self.engine_info(),
            hostname=socket.gethostname(),
        )

    def _connect(self) -> Ready:
        if self.chan is not None:
            self.chan.close(linger_ms=0)
        self.chan = connect_peer(self.addrs, self.identity)
        ready = handshake(self.chan, self._hello(), self.opts.handshake_timeout_s)
        self._host_instance = ready.host_instance
        self._last_host_hb = time.monotonic()
        log(_log, logging.INFO, "ready", identity=self.identity)
        return ready

    def _reset_sessions(self) -> None:
        for sid in list(self.epochs):
            self.close_session(sid)
        self.epochs.clear()
        self.configs.clear()

    def run(self) -> None:
        """Serve until ``stop_event`` is set. Re-handshakes when the host restarts."""
        self._connect()
        if self.on_ready is not None:
            self.on_ready()
        try:
            while not self.stop_event.is_set():
                try:
                    self._iterate()
                except _HostRestarted:
                    log(_log, logging.WARNING, "host restarted or lost; reconnecting")
                    self._reset_sessions()
                    self._connect()
        except BaseException as exc:
            # Tell the host we are dead (and why) before the process goes.
            log(_log, logging.ERROR, "worker failed", exc_info=True)
            self._shutdown(reason=f"{type(exc).__name__}: {exc}", fatal=True)
            raise
        self._shutdown()

    def _iterate(self) -> None:
        chan = self.chan
        assert chan is not None
        now = time.monotonic()
        if now - self._last_host_hb > self.opts.heartbeat_timeout_s:
            raise _HostRestarted()
        if self.has_work():
            timeout_ms = 0
        else:
            due = self.next_due_s()
            wait = self.opts.heartbeat_interval_s if due is None else min(due, self.opts.heartbeat_interval_s)
            timeout_ms = max(0, int(wait * 1000))
        chan.poll(timeout_ms)
        for r in chan.drain(CONTROL):
            BUS_MESSAGES.labels(plane="control").inc()
            self._on_control(r.msg)
        for r in chan.drain(DATA, self.opts.max_data):
            BUS_MESSAGES.labels(plane="data").inc()
            sid = getattr(r.msg, "session_id", None)
            if sid is not None and self.is_current(sid, r.msg.epoch):
                self.on_data(r.msg)
        if chan.bad_frames.count != self._bad_frames_seen:
            BUS_BAD_FRAMES.inc(chan.bad_frames.count - self._bad_frames_seen)
            log(_log, logging.WARNING, "undecodable bus message", error=chan.bad_frames.last)
            self._bad_frames_seen = chan.bad_frames.count
        if self.has_work():
            self.step()
        now = time.monotonic()
        if now - self._hb_sent_at >= self.opts.heartbeat_interval_s:
            self._hb_sent_at = now
            self._heartbeat(now)

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
