"""ZeroMQ sockets of the bus: two planes (control, data) between the host and each peer.

The session host binds one ROUTER per plane; every other process (adapter, stage0,
stage1) connects one DEALER per plane with a fixed identity and says ``Hello`` on both
(so the host can route to it on both), then waits for ``Ready`` on control. The rules
of the handshake and of heartbeats are :mod:`duplexd.bus.liveness`; this module does the IO.

Sends never block: a full data queue raises :class:`Backpressure`, which callers turn
into a clear overload error instead of unbounded memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Generic, Literal, TypeVar, overload

import zmq

from duplexd.bus.addresses import BusAddresses
from duplexd.bus.codec import CodecError, Encoder, control_decoder, data_decoder
from duplexd.bus.curve import secure_client, secure_server
from duplexd.bus.liveness import Handshake, HandshakeError
from duplexd.bus.messages import ControlMessage, DataMessage, Hello, Message, Plane, Ready

CONTROL: Final = "control"
DATA: Final = "data"
CONTROL_HWM = 10_000
_NOBLOCK_MORE = zmq.NOBLOCK | zmq.SNDMORE
Socket = zmq.Socket[bytes]


class Backpressure(Exception):
    """A data queue toward a peer is full, or the peer is not connected."""


class QueueFull(Backpressure):
    """The queue toward the peer is at its high-water mark: the peer reads slower than
    we send. Retrying later can succeed (nothing was sent)."""


class PeerUnreachable(Backpressure):
    """No connection to that peer identity (it left, or never said hello)."""


_M = TypeVar("_M", ControlMessage, DataMessage)


@dataclass(slots=True)
class Received(Generic[_M]):
    """One message off a socket: who sent it (ROUTER side), what, and its raw frames."""

    plane: Plane
    identity: bytes
    msg: _M
    frames: list[Any] = field(repr=False)


@dataclass(slots=True)
class BusErrorCounter:
    """Frames that did not decode; the loop keeps running and counts them."""

    count: int = 0
    last: str = ""

    def add(self, exc: Exception) -> None:
        self.count += 1
        self.last = str(exc)


class Channel:
    """Control + data sockets with the codec; a synchronous, never-blocking API."""

    def __init__(self, ctx: zmq.Context[Socket], ctl: Socket, data: Socket, routed: bool) -> None:
        self.ctx = ctx
        self.ctl = ctl
        self.data = data
        self._routed = routed
        self._enc = Encoder()
        self._dec = {CONTROL: control_decoder(), DATA: data_decoder()}
        self.bad_frames = BusErrorCounter()
        self._poller = zmq.Poller()
        self._poller.register(ctl, zmq.POLLIN)
        self._poller.register(data, zmq.POLLIN)

    # ------------------------------------------------------------------ send
    def encode(self, msg: Message) -> list[Any]:
        return self._enc.encode(msg)

    def send(self, plane: Plane, msg: Message, identity: bytes | None = None) -> None:
        self.send_frames(plane, self._enc.encode(msg), identity)

    def send_frames(self, plane: Plane, frames: Sequence[Any], identity: bytes | None = None) -> None:
        sock = self.ctl if plane == CONTROL else self.data
        try:
            if self._routed:
                sock.send(identity, _NOBLOCK_MORE)  # type: ignore[arg-type]
            if len(frames) == 1:
                sock.send(frames[0], zmq.NOBLOCK)
            else:
                # Zero-copy only pays for large buffers (pyzmq keeps them referenced until libzmq
                # is done with them); the codec makes extra frames only for large arrays.
                sock.send(frames[0], _NOBLOCK_MORE)
                last = len(frames) - 1
                for i in range(1, len(frames)):
                    sock.send(frames[i], zmq.NOBLOCK if i == last else _NOBLOCK_MORE, copy=False)
        except zmq.Again as exc:
            raise QueueFull(f"{plane} queue to {identity!r} is full") from exc
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                raise PeerUnreachable(f"peer {identity!r} is not connected on {plane}") from exc
            raise

    # ------------------------------------------------------------------ receive
    @overload
    def recv_nowait(self, plane: Literal["control"]) -> Received[ControlMessage] | None: ...
    @overload
    def recv_nowait(self, plane: Literal["data"]) -> Received[DataMessage] | None: ...
    def recv_nowait(self, plane: Plane) -> Received[Any] | None:
        """One decoded message, or None when the socket has nothing. Undecodable
        messages are counted and skipped: a bad frame never stops the loop."""
        sock = self.ctl if plane == CONTROL else self.data
        while True:
            try:
                first = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return None
            # The small header frame is copied (cheaper than a zmq.Frame); the raw array
            # frames that follow stay zmq messages, viewed without a copy.
            identity = b""
            if self._routed:
                identity, first = first, sock.recv()
            parts: list[Any] = [first]
            while sock.getsockopt(zmq.RCVMORE):
                parts.append(sock.recv(copy=False))
            try:
                msg = self._dec[plane].decode(parts)
            except CodecError as exc:
                self.bad_frames.add(exc)
                continue
            return Received(plane, identity, msg, parts)

    @overload
    def recv_batch(self, plane: Literal["control"], limit: int = ...) -> Iterator[Received[ControlMessage]]: ...
    @overload
    def recv_batch(self, plane: Literal["data"], limit: int = ...) -> Iterator[Received[DataMessage]]: ...
    def recv_batch(self, plane: Plane, limit: int = 1 << 30) -> Iterator[Received[Any]]:
        """Up to ``limit`` messages already queued on ``plane`` (never waits)."""
        for _ in range(limit):
            r: Received[Any] | None = self.recv_nowait(plane)
            if r is None:
                return
            yield r

    def readable(self) -> tuple[bool, bool]:
        """(control readable, data readable), reading EVENTS (this also re-arms the FD)."""
        return (
            bool(int(self.ctl.get(zmq.EVENTS)) & zmq.POLLIN),
            bool(int(self.data.get(zmq.EVENTS)) & zmq.POLLIN),
        )

    def poll(self, timeout_ms: int) -> tuple[bool, bool]:
        """Block up to ``timeout_ms`` until either plane is readable (sync workers)."""
        ready = dict(self._poller.poll(timeout_ms))
        return self.ctl in ready, self.data in ready

    def close(self, linger_ms: int = 200) -> None:
        for s in (self.ctl, self.data):
            with contextlib.suppress(zmq.ZMQError):
                s.close(linger=linger_ms)


def _socket(ctx: zmq.Context[Socket], kind: int, hwm: int) -> Socket:
    s: Socket = ctx.socket(kind)
    s.setsockopt(zmq.SNDHWM, hwm)
    s.setsockopt(zmq.RCVHWM, hwm)
    s.setsockopt(zmq.LINGER, 0)
    return s


def bind_host(addrs: BusAddresses, ctx: zmq.Context[Socket] | None = None) -> Channel:
    """The session host's side: ROUTER per plane, strict routing (unknown peer → error)."""
    ctx = ctx or zmq.Context.instance()
    addrs.prepare()
    ctl = _socket(ctx, zmq.ROUTER, CONTROL_HWM)
    data = _socket(ctx, zmq.ROUTER, addrs.data_hwm)
    for s, addr in ((ctl, addrs.control), (data, addrs.data)):
        s.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # A peer that reconnects (host restart, re-handshake) reuses its identity: let the new
        # connection take over instead of being silently dropped as a duplicate.
        s.setsockopt(zmq.ROUTER_HANDOVER, 1)
        secure_server(s, ctx, addrs.curve)
        s.bind(addr)
    return Channel(ctx, ctl, data, routed=True)


def connect_peer(addrs: BusAddresses, identity: str, ctx: zmq.Context[Socket] | None = None) -> Channel:
    """A worker's or adapter's side: DEALER per plane with a fixed identity."""
    ctx = ctx or zmq.Context.instance()
    ctl = _socket(ctx, zmq.DEALER, CONTROL_HWM)
    data = _socket(ctx, zmq.DEALER, addrs.data_hwm)
    for s, addr in ((ctl, addrs.control), (data, addrs.data)):
        s.setsockopt(zmq.IDENTITY, identity.encode())
        secure_client(s, addrs.curve)
        s.connect(addr)
    return Channel(ctx, ctl, data, routed=False)


def say_hello(chan: Channel, hello: Hello) -> None:
    """Hello on both planes: the host routes to us only once it has seen both."""
    chan.send(CONTROL, hello)
    chan.send(DATA, hello)


def _try_hello(chan: Channel, hello: Hello) -> None:
    # No connection yet, or one the host refused (a CURVE key it does not know): nothing is
    # queued; the next retry says hello again, and the handshake times out with a clear error.
    with contextlib.suppress(Backpressure):
        say_hello(chan, hello)


def handshake(
    chan: Channel,
    hello: Hello,
    timeout_s: float,
    retry_s: float = 1.0,
    stopped: Callable[[], bool] | None = None,
    tick: Callable[[], object] | None = None,
) -> Ready:
    """Blocking HELLO → READY for stage workers (the rules: :class:`Handshake`). Other
    control messages before Ready are dropped (the host only talks to us after Ready).
    ``stopped``: give up at once when it turns true (a shutdown while the host is away);
    ``tick``: called every turn of the wait (the watchdog: waiting is not being stuck)."""
    hs = Handshake(time.monotonic(), timeout_s, retry_s)
    while True:
        if tick is not None:
            tick()
        if stopped is not None and stopped():
            raise HandshakeError("stopped while waiting for the session host")
        now = time.monotonic()
        if hs.hello_due(now):
            _try_hello(chan, hello)
        ctl_ready, _ = chan.poll(int(min(hs.wait_s(now), 0.25) * 1000) + 1)
        if ctl_ready:
            for r in chan.recv_batch(CONTROL):
                ready = hs.on_control(r.msg)
                if ready is not None:
                    return ready


class AsyncWaiter:
    """Lets an asyncio loop wait until a channel is readable, without zmq.asyncio's
    per-poll futures: one reader callback per FD sets an event; EVENTS is re-read
    before every wait because the ZeroMQ FD is edge-triggered."""

    def __init__(self, chan: Channel, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._chan = chan
        self._loop = loop or asyncio.get_running_loop()
        self._event = asyncio.Event()
        self._fds = (int(chan.ctl.get(zmq.FD)), int(chan.data.get(zmq.FD)))
        for fd in self._fds:
            self._loop.add_reader(fd, self._event.set)

    async def wait(self, timeout_s: float | None = None) -> tuple[bool, bool]:
        ready = self._chan.readable()
        if ready[0] or ready[1]:
            return ready
        self._event.clear()
        ready = self._chan.readable()
        if ready[0] or ready[1]:
            return ready
        if timeout_s is None:
            await self._event.wait()
        else:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await self._event.wait()
        return self._chan.readable()

    def wake(self) -> None:
        """Sends re-arm the FD's edge; poke the waiter so it re-reads EVENTS."""
        self._event.set()

    def close(self) -> None:
        for fd in self._fds:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(fd)


async def handshake_async(
    chan: Channel,
    waiter: AsyncWaiter,
    hello: Hello,
    timeout_s: float,
    retry_s: float = 1.0,
    tick: Callable[[], object] | None = None,
) -> Ready:
    """HELLO → READY for the asyncio side (adapter); the rules: :class:`Handshake`."""
    hs = Handshake(time.monotonic(), timeout_s, retry_s)
    while True:
        if tick is not None:
            tick()
        now = time.monotonic()
        if hs.hello_due(now):
            _try_hello(chan, hello)
            waiter.wake()
        ctl_ready, _ = await waiter.wait(min(hs.wait_s(now), 0.25))
        if ctl_ready:
            for r in chan.recv_batch(CONTROL):
                ready = hs.on_control(r.msg)
                if ready is not None:
                    return ready


def peer_identity(role: str, suffix: str | None = None) -> str:
    """A fixed, unique identity for this process: role plus host and pid by default."""
    return f"{role}-{suffix or f'{os.uname().nodename}-{os.getpid()}'}"
