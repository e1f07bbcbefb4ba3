"""One function per role: build it from config and serve until told to stop.

Each is what ``duplexd run ROLE`` executes, alone (systemd, multi-host) or as a child
of the supervisor. Readiness is reported with sd_notify in both cases, and so are the
watchdog pings (``WATCHDOG=1``, runtime/watchdog.py) from each role's main loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable

import uvloop

from duplexd.actors.backlog import BacklogBudget
from duplexd.actors.engines.registry import build_talker, build_thinker, missing_requirements
from duplexd.actors.host import SessionHost
from duplexd.actors.session import HostSettings
from duplexd.actors.stage0 import Stage0Worker
from duplexd.actors.stage1 import Stage1Worker
from duplexd.actors.worker import StageWorker, WorkerOptions, run_worker_forever
from duplexd.adapters.link import EgressLimits, HostLink
from duplexd.adapters.server import AdapterServer
from duplexd.adapters.sharded_link import AnyLink, ShardedLink
from duplexd.bus.log import get_logger, log
from duplexd.bus.metrics import ROLE_RESTARTS
from duplexd.runtime import sdnotify
from duplexd.runtime.config import Config
from duplexd.runtime.preflight import EXIT_NO_RESTART
from duplexd.runtime.supervisor import RESTARTS_ENV
from duplexd.runtime.watchdog import Watchdog

_log = get_logger("duplexd.runtime")

ROLES = ("host", "stage0", "stage1", "adapter")


def count_restarts() -> None:
    """``duplexd_role_restarts_total`` in this role's own metrics (tagged with its role when
    shipped): the supervisor that restarted it has no /metrics, so the new process reports it."""
    n = os.environ.get(RESTARTS_ENV, "")
    if n.isdigit() and int(n) > 0:
        ROLE_RESTARTS.inc(int(n))


def _worker_options(cfg: Config, max_sessions: int) -> WorkerOptions:
    b = cfg.bus
    return WorkerOptions(
        b.handshake_timeout_s, b.heartbeat_interval_s, b.heartbeat_timeout_s, max_sessions=max_sessions
    )


def run_host(cfg: Config) -> int:
    count_restarts()
    settings = HostSettings(
        vad=cfg.host.vad, max_input_buffer_ms=cfg.host.max_input_buffer_ms, continuation_pace=cfg.host.continuation_pace
    )
    host = SessionHost(
        cfg.addresses(),
        settings,
        cfg.bus.heartbeat_interval_s,
        cfg.bus.heartbeat_timeout_s,
        backlog=BacklogBudget(cfg.host.backlog_audio_ms, cfg.host.backlog_events),
        max_sessions=cfg.host.max_sessions,
    )
    host.on_turn = Watchdog().ping

    async def main() -> None:
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task[None]] = set()

        def on_signal() -> None:
            if not host.draining:
                sdnotify.stopping()
                t = loop.create_task(host.drain(cfg.server.drain_timeout_s))
                tasks.add(t)
                t.add_done_callback(tasks.discard)

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        await host.serve(ready=lambda: sdnotify.ready("session host listening"))

    uvloop.run(main())
    return 0


class EngineUnavailable(Exception):
    """The engine cannot load here; restarting will not help (one-line reason)."""


def _load_engine(what: str, load: Callable[[], None], warm_up: Callable[[], None], name: str) -> None:
    t0 = time.perf_counter()
    log(_log, logging.INFO, f"loading {what}", engine=name)
    with Watchdog().covering(f"loading the {what}"):
        _load_and_warm(what, load, warm_up, name, t0)


def _load_and_warm(what: str, load: Callable[[], None], warm_up: Callable[[], None], name: str, t0: float) -> None:
    try:
        load()
    except (RuntimeError, OSError, ImportError, ValueError) as exc:
        # Missing files or packages: the same on every restart. Say it once, plainly.
        log(_log, logging.DEBUG, f"{what} failed to load", engine=name, exc_info=True)
        raise EngineUnavailable(f"the {name} engine's {what} cannot load: {exc}") from exc
    t1 = time.perf_counter()
    log(_log, logging.INFO, f"{what} loaded; warming up", engine=name, load_s=round(t1 - t0, 3))
    warm_up()
    log(_log, logging.INFO, f"{what} warm", engine=name, warm_up_s=round(time.perf_counter() - t1, 3))


def _serve_worker(worker: StageWorker) -> int:
    def on_signal(signum: int, frame: object) -> None:
        worker.stop_event.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    worker.on_ready = lambda: sdnotify.ready(f"{worker.role.value} ready")
    worker.on_turn = Watchdog().ping
    return run_worker_forever(worker)


def _cannot_start(role: str, reason: str) -> int:
    log(_log, logging.ERROR, f"{role} cannot start: {reason}")
    return EXIT_NO_RESTART


def run_stage0(cfg: Config) -> int:
    count_restarts()
    missing = missing_requirements(cfg.engine.name, cfg.engines)
    if missing is not None:
        return _cannot_start("stage0", missing)
    thinker = build_thinker(cfg.engine.name, cfg.engines)
    try:
        _load_engine("thinker", thinker.load, thinker.warm_up, cfg.engine.name)
    except EngineUnavailable as exc:
        return _cannot_start("stage0", str(exc))
    worker = Stage0Worker(
        thinker, cfg.addresses(), _worker_options(cfg, cfg.stage0.max_sessions), max_batch=cfg.stage0.max_batch
    )
    return _serve_worker(worker)


def run_stage1(cfg: Config) -> int:
    count_restarts()
    missing = missing_requirements(cfg.engine.name, cfg.engines)
    if missing is not None:
        return _cannot_start("stage1", missing)
    talker = build_talker(cfg.engine.name, cfg.engines)
    try:
        _load_engine("talker", talker.load, talker.warm_up, cfg.engine.name)
    except EngineUnavailable as exc:
        return _cannot_start("stage1", str(exc))
    worker = Stage1Worker(
        talker,
        cfg.addresses(),
        _worker_options(cfg, cfg.stage1.max_sessions),
        max_lead_ms=cfg.stage1.max_lead_ms,
        max_batch=cfg.stage1.max_batch,
    )
    return _serve_worker(worker)


def run_adapter(cfg: Config) -> int:
    count_restarts()
    b = cfg.bus
    bind_error: list[str] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        s = cfg.server
        hosts = cfg.host_addresses()
        egress = EgressLimits(s.slow_client_audio_ms, s.slow_client_events)
        link: AnyLink
        if len(hosts) > 1:
            # Sharded session hosts: each session goes to the host that owns its id.
            link = ShardedLink(
                hosts, b.handshake_timeout_s, b.heartbeat_interval_s, b.heartbeat_timeout_s, egress=egress
            )
        else:
            link = HostLink(
                hosts[0], b.handshake_timeout_s, b.heartbeat_interval_s, b.heartbeat_timeout_s, egress=egress
            )
        link.on_turn = Watchdog().ping
        await link.start()
        server = AdapterServer(cfg.server, link, cfg.session)
        bridge = None
        try:
            await server.start()
            if cfg.server.bridge_port:
                from duplexd.adapters.bridge import BridgeServer

                bridge = BridgeServer(cfg.server, link, cfg.session)
                await bridge.start()
        except OSError as exc:
            # Port taken (or not ours to bind): restarting cannot fix it.
            bind_error.append(f"cannot listen on {cfg.server.host} (port {cfg.server.port}): {exc.strerror or exc}")
            await server.drain(0)
            await link.stop()
            return
        await link.wait_connected(b.handshake_timeout_s * 10)
        sdnotify.ready(f"adapter listening on {cfg.server.host}:{server.bound_port}")
        await stop.wait()
        sdnotify.stopping()
        log(_log, logging.INFO, "adapter draining")
        # SIGTERM drain: both listeners refuse new connections and let responses end, together.
        await asyncio.gather(server.drain(), *([bridge.drain()] if bridge is not None else []))
        await link.stop()

    uvloop.run(main())
    return _cannot_start("adapter", bind_error[0]) if bind_error else 0


RUNNERS: dict[str, Callable[[Config], int]] = {
    "host": run_host,
    "stage0": run_stage0,
    "stage1": run_stage1,
    "adapter": run_adapter,
}
