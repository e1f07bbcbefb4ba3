"""The adapter's side of the bus: one HostLink per process, one SessionLink per session.

A protocol handler (Realtime, native, demo bridge) owns a :class:`SessionLink`: it calls
its command methods and receives session events, in order, through an async handler run
by the link's writer task. The link is the adapter's egress fence: an event's epoch is
checked when it is *dequeued*, so audio that was queued for a slow client before a
barge-in is dropped, never sent (and counted).

The egress queue is bounded (:class:`EgressLimits`): a client that does not read its events
(more than ``max_audio_ms`` of assistant audio or ``max_events`` events waiting) is cut: the
queue is dropped, the handler is told (it sends a ``client_too_slow`` error and closes the
socket with 1008, aborting it if even the close frame cannot leave) and the host closes the
session. When the session host is lost, every session gets an error, the terminal
``response.done`` (failed) of its active response, and a close (1011) with the reason
(:meth:`SessionLink.abort`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import numpy as np

from duplexd.bus.addresses import BusAddresses
from duplexd.bus.audio_format import OUTPUT_RATE
from duplexd.bus.beacon import Beacon
from duplexd.bus.liveness import HandshakeError, HostWatch, process_exited
from duplexd.bus.log import get_logger, log
from duplexd.bus.messages import (
    PROTOCOL_VERSION,
    AdapterEvent,
    AudioIn,
    AudioOut,
    ClientCommand,
    CloseCause,
    ClusterStatus,
    ControlMessage,
    EngineInfo,
    EpochAdvance,
    ErrorEvent,
    Goodbye,
    Hello,
    InputClear,
    InputCommit,
    Item,
    ItemCreate,
    ItemDelete,
    ItemRetrieve,
    ItemTruncate,
    Message,
    Plane,
    PlaybackAck,
    ResponseCancel,
    ResponseCreate,
    ResponseCreated,
    ResponseDone,
    ResponseInfo,
    ResponseOptions,
    ResponseStatus,
    Role,
    SessionClose,
    SessionClosed,
    SessionConfig,
    SessionEvent,
    SessionOpen,
    SessionUpdate,
    SnapshotRequest,
)
from duplexd.bus.metrics import BACKPRESSURE, BUS_BAD_FRAMES, QUEUE_DEPTH, SLOW_CLIENTS, STALE_DROPPED, snapshot
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
SlowHandler = Callable[[str], Coroutine[Any, Any, None]]


class SessionUnavailable(Exception):
    """The session cannot be opened (host down, stages not ready, server draining)."""


@dataclass(frozen=True, slots=True)
class EgressLimits:
    """What may wait for one client before it counts as not reading (``[server]`` config)."""

    max_audio_ms: float = 5000.0
    max_events: int = 2000


class SessionLink:
    """One session, seen from a protocol handler."""

    def __init__(
        self,
        link: HostLink,
        session_id: str,
        handler: EventHandler,
        limits: EgressLimits,
        on_slow: SlowHandler | None = None,
    ) -> None:
        self.link = link
        self.session_id = session_id
        self.epoch = 0
        self.announced = 0  # newest epoch whose EpochAdvance was queued for the handler
        self.seq = 0
        self.closed = False
        self.engine: EngineInfo | None = None
        self._handler = handler
        self._on_slow = on_slow
        self._queue: asyncio.Queue[AdapterEvent] = asyncio.Queue()
        self.limits = limits
        self.queued_audio_ms = 0.0  # assistant audio in the queue
        self.active: ResponseInfo | None = None  # the response in progress, as queued for the client
        self._done_responses: set[str] = set()
        self.dropped_stale = 0
        self._writer = asyncio.get_running_loop().create_task(self._write_loop(), name=f"egress-{session_id}")

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    # ------------------------------------------------------------------ commands
    def _next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def _data(self, msg: ClientCommand) -> None:
        if self.closed:
            raise SessionUnavailable("session is closed")
        try:
            self.link.send(DATA, msg)
        except (Backpressure, SessionUnavailable):
            # It never left: its seq is not spent (a cancel fences on seqs the host will see).
            self.seq -= 1
            raise

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
        if self._ended:
            return  # ended on this side (abort, or cut for not reading): nothing more is queued
        self.advance(msg.epoch)  # a newer epoch seen on data first is adopted at once
        if isinstance(msg, AudioOut):
            if self._stale(msg):
                return
            self.queued_audio_ms += _audio_ms(msg)
        elif isinstance(msg, ResponseCreated):
            self.active = msg.response
        elif isinstance(msg, ResponseDone) and self.active is not None and self.active.id == msg.response.id:
            self.active = None
        self._queue.put_nowait(msg)
        if self.queued_audio_ms > self.limits.max_audio_ms or self._queue.qsize() > self.limits.max_events:
            self._cut_slow()

    _ended = False

    def _cut_slow(self) -> None:
        """The client does not read: drop what waits for it (bounded memory), tell the
        host, and let the handler say why and close the socket."""
        reason = (
            f"the client is not reading its events ({self.queued_audio_ms / 1000:.1f} s of audio, "
            f"{self._queue.qsize()} events waiting)"
        )
        self._ended = True
        SLOW_CLIENTS.inc()
        log(_log, logging.WARNING, "client too slow", session_id=self.session_id, epoch=self.epoch, error=reason)
        while not self._queue.empty():
            self._queue.get_nowait()
        self.queued_audio_ms = 0.0
        if not self.closed:
            self.closed = True
            with contextlib.suppress(Backpressure, SessionUnavailable):
                self.link.send(CONTROL, SessionClose(self.session_id, self.epoch, "client too slow"))
        self._writer.cancel()  # it may be blocked sending to the client
        if self._on_slow is not None:
            asyncio.get_running_loop().create_task(self._on_slow(reason), name=f"slow-{self.session_id}")

    def abort(self, code: str, message: str, cause: CloseCause = CloseCause.FAILED, tell_host: bool = False) -> None:
        """End the session from the adapter's side (the host is gone, or a shutdown cannot
        wait): an error naming the active response, that response's terminal
        ``response.done`` (failed), then the close. ``tell_host``: the host closes it too."""
        if self.closed and self.active is None:
            return
        if tell_host and not self.closed:
            with contextlib.suppress(Backpressure, SessionUnavailable):
                self.link.send(CONTROL, SessionClose(self.session_id, self.epoch, message))
        r = self.active
        self.deliver(
            ErrorEvent(
                self.session_id, self.epoch, code, message, type="server_error", response_id=r.id if r else ""
            )
        )
        if r is not None:
            info = ResponseInfo(
                id=r.id,
                status=ResponseStatus.FAILED,
                reason="error",
                error_code=code,
                error_message=message,
                modalities=r.modalities,
                metadata=r.metadata,
                conversation=r.conversation,
            )
            self.deliver(ResponseDone(self.session_id, self.epoch, info))
        self.deliver(SessionClosed(self.session_id, self.epoch, message, cause=cause))
        self.closed = True
        self._ended = True  # what the host still sends for it would contradict the above

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
                self.queued_audio_ms = max(0.0, self.queued_audio_ms - _audio_ms(msg))
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


def _audio_ms(msg: AudioOut) -> float:
    return float(np.asarray(msg.pcm).size) * 1000.0 / OUTPUT_RATE


class HostLink:
    """The adapter process's connection to the session host."""

    def __init__(
        self,
        addrs: BusAddresses,
        handshake_timeout_s: float = 30.0,
        heartbeat_interval_s: float = 0.1,
        heartbeat_timeout_s: float = 0.75,
        metrics_interval_s: float = 2.0,
        egress: EgressLimits | None = None,
    ) -> None:
        self.addrs = addrs
        self.identity = peer_identity(Role.ADAPTER.value)
        self.handshake_timeout_s = handshake_timeout_s
        self.hb_interval = heartbeat_interval_s
        self.hb_timeout = heartbeat_timeout_s
        self.metrics_interval = metrics_interval_s
        self.egress = egress or EgressLimits()
        self.status: ClusterStatus | None = None
        self.connected = False
        self.sessions: dict[str, SessionLink] = {}
        self._chan: Channel | None = None
        self._waiter: AsyncWaiter | None = None
        self.watch = HostWatch(heartbeat_interval_s, heartbeat_timeout_s, metrics_interval_s)
        self._task: asyncio.Task[None] | None = None
        self._connected_event = asyncio.Event()
        self._bad_seen = 0
        self._hostname = socket.gethostname()
        self._instance = ""
        # Heartbeats from a thread: a busy event loop (hundreds of sockets) is not a dead adapter.
        self.beacon = Beacon(addrs, self.identity, heartbeat_interval_s, metrics_interval_s, snapshot)
        self._control_read_at = 0.0
        self.on_turn: Callable[[], object] | None = None  # once per loop turn (the watchdog ping)
        QUEUE_DEPTH.labels(queue="adapter_egress").set_function(self._egress_depth)

    def _egress_depth(self) -> float:
        return float(sum(s.queued for s in list(self.sessions.values())))

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
        await asyncio.to_thread(self.beacon.stop)
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
    def open(
        self, session_id: str, config: SessionConfig, handler: EventHandler, on_slow: SlowHandler | None = None
    ) -> SessionLink:
        if not self.ready():
            raise SessionUnavailable("the server is not ready (model stages starting, restarting or draining)")
        link = SessionLink(self, session_id, handler, self.egress, on_slow)
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
        return Hello(
            Role.ADAPTER, self.identity, os.getpid(), PROTOCOL_VERSION, hostname=self._hostname, instance=self._instance
        )

    async def _connect(self) -> None:
        self._teardown()
        self._chan = connect_peer(self.addrs, self.identity)
        self._waiter = AsyncWaiter(self._chan)
        self._instance = uuid.uuid4().hex[:12]  # a new connection: the host forgets our old sessions
        while True:
            try:
                ready = await handshake_async(
                    self._chan, self._waiter, self._hello(), self.handshake_timeout_s, tick=self.on_turn
                )
                break
            except HandshakeError as exc:
                log(_log, logging.WARNING, "waiting for the session host", error=str(exc))
        self.watch = HostWatch(self.hb_interval, self.hb_timeout, self.metrics_interval)
        self.watch.connected(ready, time.monotonic())
        self._control_read_at = time.monotonic()
        self.beacon.start()  # (once: it outlives reconnections)
        self.connected = True
        self._connected_event.set()
        log(_log, logging.INFO, "connected to session host", instance=ready.host_instance)

    async def _run(self) -> None:
        await self._connect()
        while True:
            assert self._chan is not None and self._waiter is not None
            await self._waiter.wait(self.hb_interval)
            if self.on_turn is not None:
                self.on_turn()
            now = time.monotonic()
            try:
                for rc in self._chan.recv_batch(CONTROL):
                    self._on_control(rc.msg, now)
                self._control_read_at = now
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
            dead = self.watch.dead(self._control_read_at, self._hostname, process_exited)
            if dead is not None:
                self._host_lost(dead)
                await self._connect()
                continue

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
            s.abort("server_unavailable", f"{reason}; the session ended")
        self.sessions.clear()


class _HostLost(Exception):
    pass
