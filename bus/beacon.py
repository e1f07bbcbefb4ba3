"""A peer's heartbeat thread: liveness that a long model step cannot silence.

A stage worker's loop runs the model step; a step may legitimately take seconds (a long
utterance through ASR, a first CUDA-graph replay). If the loop sent the heartbeats, the host
would have to wait longer than the longest step before it could call a peer dead, so a
frozen process (SIGSTOP, a dead machine) would go unnoticed for as long. The beacon sends
them from a thread of its own, on a DEALER socket of its own (ZeroMQ sockets are not shared
between threads) with the identity ``<peer>/beat`` (:func:`~duplexd.bus.liveness.beacon_identity`):
while the process is scheduled it beats, whatever the loop is doing. The host maps the
beats to their owner (:meth:`~duplexd.bus.liveness.PeerBook.beat`) and never sends to the
beacon. Metrics ride along every ``metrics_interval_s``.

Whether the loop itself still turns is told by the watchdog (``WATCHDOG=1`` from the main
loop, runtime/watchdog.py), which the service manager acts on.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from duplexd.bus.addresses import BusAddresses
from duplexd.bus.codec import Encoder
from duplexd.bus.curve import secure_client
from duplexd.bus.liveness import BeatSchedule, beacon_identity
from duplexd.bus.messages import Heartbeat, MetricSample

_HWM = 64  # beats queued while the host is away; older ones are worthless anyway


class Beacon:
    """Heartbeats ``identity`` to the host from a daemon thread (see module docstring)."""

    def __init__(
        self,
        addrs: BusAddresses,
        identity: str,
        interval_s: float,
        metrics_interval_s: float = 2.0,
        metrics: Callable[[], tuple[MetricSample, ...]] | None = None,
        ctx: zmq.Context[zmq.Socket[bytes]] | None = None,
        load: Callable[[], int] | None = None,
    ) -> None:
        self.addrs = addrs
        self.identity = identity
        self.interval_s = interval_s
        self._schedule = BeatSchedule(interval_s, metrics_interval_s)
        self._metrics = metrics
        self._load = load  # the sessions open in this process, read from the beacon thread
        self._ctx = ctx or zmq.Context.instance()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.sent = 0

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="liveness-beacon", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            self._thread = None

    def _run(self) -> None:
        sock: zmq.Socket[bytes] = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, beacon_identity(self.identity).encode())
        sock.setsockopt(zmq.SNDHWM, _HWM)
        sock.setsockopt(zmq.LINGER, 0)
        secure_client(sock, self.addrs.curve)  # the host refuses any connection without the peer's key
        sock.connect(self.addrs.control)
        enc = Encoder()
        try:
            while not self._stop.is_set():
                beat = self._schedule.due(time.monotonic())
                if beat is not None:
                    metrics: tuple[MetricSample, ...] = ()
                    if beat.with_metrics and self._metrics is not None:
                        metrics = self._metrics()
                    frames: list[Any] = enc.encode(
                        Heartbeat(beat.seq, self.identity, metrics=metrics, load=self._load() if self._load else -1)
                    )
                    with contextlib.suppress(zmq.Again):
                        sock.send_multipart(frames, zmq.NOBLOCK)
                        self.sent += 1
                self._stop.wait(self._schedule.wait_s(time.monotonic()))
        finally:
            sock.close(linger=0)
