"""The adapter's side of the bus: one HostLink per process, one SessionLink per session.

A protocol handler (Realtime, native, demo bridge) owns a :class:`SessionLink`: it calls
its command methods and receives session events, in order, through an async handler run
by the link's writer task. The link is the adapter's egress fence: an event's epoch is
checked when it is *dequeued*, so audio that was queued for a slow client before a
barge-in is dropped, never sent (and counted).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable

import numpy as np

from duplexd.bus.addresses import BusAddresses
from duplexd.bus.liveness import HandshakeError, HostWatch
from duplexd.bus.log import get_logger, log
from duplexd.bus.messages import (
    PROTOCOL_VERSION,
    AdapterEvent,
    AudioIn,
    AudioOut,
    ClientCommand,
    ClusterStatus,
    ControlMessage,
    EngineInfo,
    EpochAdvance,
    ErrorEvent,
    Goodbye,
    Heartbeat,
    Hello,
    InputClear,
    InputCommit,
    Item,
    ItemCreate,
    ItemDelete,
    ItemRetrieve,
    ItemTruncate,
    Message,
    MetricSample,
    Plane,
    PlaybackAck,
    ResponseCancel,
    ResponseCreate,
    ResponseDone,
    ResponseOptions,
    Role,
    SessionClose,
    SessionClosed,
    SessionConfig,
    SessionEvent,
    SessionOpen,
    SessionUpdate,
    SnapshotRequest,
)
from duplexd.bus.metrics import BACKPRESSURE, BUS_BAD_FRAMES, STALE_DROPPED, snapshot
from duplexd.bus.sockets import (
    CONTROL,
    DATA,
    AsyncWaiter,
    Backpressure,
    Channel,
    connect_peer,
    handshake_async,
    peer_identity,
)

_log = get_logger(__name__)

EventHandler = Callable[[AdapterEvent], Awaitable[None]]


class SessionUnavailable(Exception):
    """The session cannot be opened (host down, stages not ready, server draining)."""


class SessionLink:
    """One session, seen from a protocol handler."""

    def __init__(self, link: HostLink, session_id: str, handler: EventHandler, max_queue: int) -> None:
        self.link = link
        self.session_id = session_id
        self.epoch = 0
        self.announced = 0  # newest epoch whose EpochAdvance was queued for the handler
        self.seq = 0
        self.closed = False
        self.engine: EngineInfo | None = None
        self._handler = handler
        self._queue: asyncio.Queue[AdapterEvent] = asyncio.Queue()
        self._max_queue = max_queue
        self._done_responses: set[str] = set()
        self.dropped_stale = 0
        self._writer = asyncio.get_running_loop().create_task(self._write_loop(), name=f"egress-{session_id}")

    # ------------------------------------------------------------------ commands
    def _next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def _data(self, msg: ClientCommand) -> None:
        if self.closed:
            raise SessionUnavailable("session is closed")
        self.link.send(DATA, msg)

    def audio(self, pcm: np.ndarray, force: bool = False) -> None:
        """Native-rate float32 audio."""
        self._data(AudioIn(self.session_id, self.epoch, self._next_seq(), pcm, force))

    def commit(self, event_id: str = "") -> None:
        self._data(InputCommit(self.session_id, self.epoch, self._next_seq(), event_id))

    def clear(self, event_id: str = "") -> None:
        self._data(InputClear(self.session_id, self.epoch, self._next_seq(), event_id))

    def create_response(self, options: ResponseOptions | None = None, event_id: str = "") -> None:
        self._data(
            ResponseCreate(self.session_id, self.epoch, self._next_seq(), options or ResponseOptions(), event_id)
        )

    def update(self, config: SessionConfig, event_id: str = "") -> None:
        self._data(SessionUpdate(self.session_id, self.epoch, self._next_seq(), config, event_id))

    def ack(self, response_id: str, item_id: str, played_ms: int, event_id: str = "") -> None:
        self._data(
            PlaybackAck(self.session_id, self.epoch, self._next_seq(), response_id, item_id, played_ms, event_id)
        )

    def truncate(self, item_id: str, audio_end_ms: int, content_index: int = 0, event_id: str = "") -> None:
        self._data(
            ItemTruncate(self.session_id, self.epoch, self._next_seq(), item_id, audio_end_ms, content_index, event_id)
        )

    def item_create(self, item: Item, previous_item_id: str | None = None, event_id: str = "") -> None:
        self._data(ItemCreate(self.session_id, self.epoch, self._next_seq(), item, previous_item_id, event_id))

    def item_delete(self, item_id: str, event_id: str = "") -> None:
        self._data(ItemDelete(self.session_id, self.epoch, self._next_seq(), item_id, event_id))

    def item_retrieve(self, item_id: str, event_id: str = "") -> None:
        self._data(ItemRetrieve(self.session_id, self.epoch, self._next_seq(), item_id, event_id))

    def request_snapshot(self, event_id: str = "") -> None:
        self._data(SnapshotRequest(self.session_id, self.epoch, self._next_seq(), event_id))

    def cancel(self, response_id: str = "", event_id: str = "") -> None:
        """Control plane: overtakes queued audio. ``after_seq`` fences a response.create
        the client sent before this cancel that the host has not processed yet."""
        if self.closed:
            raise SessionUnavailable("session is closed")
        self.link.send(CONTROL, ResponseCancel(self.session_id, self.epoch, self.seq, response_id, event_id))

    async def close(self, reason: str = "client closed") -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(Backpressure, SessionUnavailable):
                self.link.send(CONTROL, SessionClose(self.session_id, self.epoch, reason))
        self.link.forget(self.session_id)
        self._writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._writer

    # ------------------------------------------------------------------ events
    def advance(self, epoch: int) -> None:
        self.epoch = max(self.epoch, epoch)

    def announce(self, msg: EpochAdvance) -> None:
        """Control plane: fence now (queued stale audio is dropped at dequeue) and tell
        the handler, which may tell its client to flush playback."""
        self.advance(msg.epoch)
        if msg.epoch > self.announced:
            self.announced = msg.epoch
            self._queue.put_nowait(msg)

    def deliver(self, msg: SessionEvent) -> None:
        """Called by the HostLink loop, in bus order; never blocks."""
        self.advance(msg.epoch)  # a newer epoch seen on data first is adopted at once
        if isinstance(msg, AudioOut) and self._stale(msg):
            return
        if self._queue.qsize() >= self._max_queue:
            # The client is not reading: fail loudly rather than buffer without bound.
            self.closed = True
            self._queue.put_nowait(
                ErrorEvent(
                    self.session_id,
                    self.epoch,
                    "client_too_slow",
                    "the client is not reading its events",
                    type="server_error",
                    fatal=True,
                )
            )
            return
        self._queue.put_nowait(msg)

    def _stale(self, msg: AudioOut) -> bool:
        if msg.epoch < self.epoch or msg.response_id in self._done_responses:
            self.dropped_stale += 1
            STALE_DROPPED.labels(hop="adapter").inc()
            return True
        return False

    async def _write_loop(self) -> None:
        while True:
            msg = await self._queue.get()
            if isinstance(msg, AudioOut):
                if self._stale(msg):
                    continue
            elif isinstance(msg, ResponseDone):
                self._done_responses.add(msg.response.id)
                if len(self._done_responses) > 64:
                    self._done_responses = {msg.response.id}
            try:
                await self._handler(msg)
            except asyncio.CancelledError:
                raise
            except Exception:
                log(
                    _log,
                    logging.ERROR,
                    "event handler failed",
                    session_id=self.session_id,
                    epoch=self.epoch,
                    exc_info=True,
                )
            if isinstance(msg, SessionClosed) or (isinstance(msg, ErrorEvent) and msg.fatal):
                self.closed = True


class HostLink:
    """The adapter process's connection to the session host."""

    def __init__(
        self,
        addrs: BusAddresses,
        handshake_timeout_s: float = 30.0,
        heartbeat_interval_s: float = 0.5,
        heartbeat_timeout_s: float = 5.0,
        metrics_interval_s: float = 2.0,
        max_session_queue: int = 20000,
    ) -> None:
        self.addrs = addrs
        self.identity = peer_identity(Role.ADAPTER.value)
        self.handshake_timeout_s = handshake_timeout_s
        self.hb_interval = heartbeat_interval_s
        self.hb_timeout = heartbeat_timeout_s
        self.metrics_interval = metrics_interval_s
        self.max_session_queue = max_session_queue
        self.status: ClusterStatus | None = None
        self.connected = False
        self.sessions: dict[str, SessionLink] = {}
        self._chan: Channel | None = None
        self._waiter: AsyncWaiter | None = None
        self.watch = HostWatch(heartbeat_interval_s, heartbeat_timeout_s, metrics_interval_s)
        self._task: asyncio.Task[None] | None = None
        self._connected_event = asyncio.Event()
        self._bad_seen = 0

    @property
    def engine(self) -> EngineInfo | None:
        return self.status.engine if self.status else None

    def ready(self) -> bool:
        """All four roles up: what /health reports as 200."""
        if not self.connected or self.status is None:
            return False
        roles = {r.role for r in self.status.roles if r.state == "ready"}
        return {Role.HOST, Role.STAGE0, Role.STAGE1} <= roles and not self.status.draining

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="host-link")

    async def wait_connected(self, timeout_s: float) -> None:
        async with asyncio.timeout(timeout_s):
            await self._connected_event.wait()

    async def stop(self) -> None:
        for s in list(self.sessions.values()):
            await s.close("adapter shutting down")
        if self._chan is not None:
            with contextlib.suppress(Exception):
                self._chan.send(CONTROL, Goodbye(self.identity, reason="shutdown"))
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._teardown()

    def _teardown(self) -> None:
        if self._waiter:
            self._waiter.close()
            self._waiter = None
        if self._chan:
            self._chan.close(linger_ms=200)
            self._chan = None

    # ------------------------------------------------------------------ sessions
    def open(self, session_id: str, config: SessionConfig, handler: EventHandler) -> SessionLink:
        if not self.ready():
            raise SessionUnavailable("the server is not ready (model stages starting, restarting or draining)")
        link = SessionLink(self, session_id, handler, self.max_session_queue)
        link.engine = self.engine
        self.sessions[session_id] = link
        try:
            self.send(CONTROL, SessionOpen(session_id, config))
        except Backpressure as exc:
            self.sessions.pop(session_id, None)
            raise SessionUnavailable(str(exc)) from exc
        return link

    def forget(self, session_id: str) -> None:
        self.sessions.pop(session_id, None)

    def send(self, plane: Plane, msg: Message) -> None:
        if self._chan is None or not self.connected:
            raise SessionUnavailable("the session host is not connected")
        try:
            self._chan.send(plane, msg)
        except Backpressure:
            BACKPRESSURE.labels(hop=f"adapter-{plane}").inc()
            raise
        if self._waiter:
            self._waiter.wake()

    # ------------------------------------------------------------------ loop
    def _hello(self) -> Hello:
        return Hello(Role.ADAPTER, self.identity, os.getpid(), PROTOCOL_VERSION, hostname=socket.gethostname())

    async def _connect(self) -> None:
        self._teardown()
        self._chan = connect_peer(self.addrs, self.identity)
        self._waiter = AsyncWaiter(self._chan)
        while True:
            try:
                ready = await handshake_async(self._chan, self._waiter, self._hello(), self.handshake_timeout_s)
                break
            except HandshakeError as exc:
                log(_log, logging.WARNING, "waiting for the session host", error=str(exc))
        self.watch = HostWatch(self.hb_interval, self.hb_timeout, self.metrics_interval)
        self.watch.connected(ready, time.monotonic())
        self.connected = True
        self._connected_event.set()
        log(_log, logging.INFO, "connected to session host", instance=ready.host_instance)

    async def _run(self) -> None:
        await self._connect()
        while True:
            assert self._chan is not None and self._waiter is not None
            await self._waiter.wait(self.watch.wait_s(time.monotonic()))
            now = time.monotonic()
            try:
                for rc in self._chan.recv_batch(CONTROL):
                    self._on_control(rc.msg, now)
                for rd in self._chan.recv_batch(DATA, 1024):
                    msg = rd.msg
                    if isinstance(msg, SessionEvent):
                        s = self.sessions.get(msg.session_id)
                        if s is not None:
                            if msg.epoch > s.announced:
                                # The host sent this epoch's EpochAdvance first, on the other
                                # socket: take it now, so the client hears of it first.
                                for rc in self._chan.recv_batch(CONTROL):
                                    self._on_control(rc.msg, now)
                            s.deliver(msg)
            except _HostLost as exc:
                self._host_lost(str(exc))
                await self._connect()
                continue
            if self._chan.bad_frames.count != self._bad_seen:
                BUS_BAD_FRAMES.inc(self._chan.bad_frames.count - self._bad_seen)
                self._bad_seen = self._chan.bad_frames.count
            silent = self.watch.silent(now)
            if silent is not None:
                self._host_lost(silent)
                await self._connect()
                continue
            beat = self.watch.heartbeat_due(now)
            if beat is not None:
                metrics: tuple[MetricSample, ...] = snapshot() if beat.with_metrics else ()
                with contextlib.suppress(Backpressure):
                    self._chan.send(CONTROL, Heartbeat(beat.seq, self.identity, metrics=metrics))

    def _on_control(self, msg: ControlMessage, now: float) -> None:
        gone = self.watch.on_control(msg, now)
        if gone is not None:
            raise _HostLost(gone)
        match msg:
            case EpochAdvance(session_id=sid):
                s = self.sessions.get(sid)
                if s is not None:
                    s.announce(msg)
            case ClusterStatus():
                self.status = msg
            case _:
                pass

    def _host_lost(self, reason: str) -> None:
        log(_log, logging.ERROR, "lost the session host", reason=reason)
        self.connected = False
        self.status = None
        self._connected_event.clear()
        for s in list(self.sessions.values()):
            s.deliver(
                ErrorEvent(
                    s.session_id,
                    s.epoch,
                    "server_unavailable",
                    f"{reason}; the session ended",
                    type="server_error",
                    fatal=True,
                )
            )
            s.deliver(SessionClosed(s.session_id, s.epoch, reason))
            s.closed = True
        self.sessions.clear()


class _HostLost(Exception):
    pass
