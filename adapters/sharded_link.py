"""The adapter's connection to several session hosts: each session goes to its owner.

With ``[bus] hosts`` the adapter keeps one :class:`~duplexd.adapters.link.HostLink` per
session host and opens each session on the host that owns its id (rendezvous hashing,
:mod:`duplexd.bus.shards`), skipping hosts that are not ready, so every adapter sends a
given session to the same host and a host that is down only moves its own new sessions.
Everything a session does after open goes through the link it was opened on.

It offers what the protocol handlers and ``/health`` use of a single link: ``open``,
``ready``, ``status`` (the hosts' statuses merged: each stage replica once, each host under
``host-N``), ``engine`` and ``identity``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable

from duplexd.adapters.link import (
    EgressLimits,
    EventHandler,
    HostLink,
    SessionLink,
    SessionUnavailable,
    SlowHandler,
)
from duplexd.bus.addresses import BusAddresses
from duplexd.bus.messages import ClusterStatus, EngineInfo, MetricSample, Role, RoleStatus, SessionConfig
from duplexd.bus.shards import owner


class ShardedLink:
    """One :class:`HostLink` per session host, routing sessions by id (module docstring)."""

    def __init__(
        self,
        hosts: list[BusAddresses],
        handshake_timeout_s: float = 30.0,
        heartbeat_interval_s: float = 0.5,
        heartbeat_timeout_s: float = 0.75,
        egress: EgressLimits | None = None,
    ) -> None:
        self.hosts = hosts
        self.names = [a.control for a in hosts]  # what every adapter hashes: the same list everywhere
        self.links = [
            HostLink(a, handshake_timeout_s, heartbeat_interval_s, heartbeat_timeout_s, egress=egress) for a in hosts
        ]
        self.identity = self.links[0].identity

    @property
    def on_turn(self) -> Callable[[], object] | None:
        return self.links[0].on_turn

    @on_turn.setter
    def on_turn(self, ping: Callable[[], object] | None) -> None:
        # Every link's loop pings the watchdog: a stuck one is seen even while others turn.
        for link in self.links:
            link.on_turn = ping

    # ------------------------------------------------------------------ what a HostLink offers
    @property
    def status(self) -> ClusterStatus | None:
        statuses = [(i, link.status) for i, link in enumerate(self.links) if link.status is not None]
        if not statuses:
            return None
        roles: list[RoleStatus] = []
        metrics: list[MetricSample] = []
        roles_seen: set[str] = set()
        metrics_taken: set[str] = set()  # stages heard by several hosts: one copy of their metrics
        for i, st in statuses:
            for r in st.roles:
                if r.role == Role.HOST:
                    roles.append(RoleStatus(r.role, f"host-{i}", r.pid, r.state, r.protocol_version, r.host))
                elif r.identity not in roles_seen:
                    roles_seen.add(r.identity)
                    roles.append(r)
            taken_here: set[str] = set()
            for m in st.metrics:
                labels = dict(m.labels)
                ident = labels.get("identity", "")
                if labels.get("role") == Role.HOST.value:
                    labels["identity"] = f"host-{i}"
                    metrics.append(
                        MetricSample(m.name, m.kind, m.documentation, m.sample, tuple(sorted(labels.items())), m.value)
                    )
                elif ident not in metrics_taken:
                    taken_here.add(ident)
                    metrics.append(m)
            metrics_taken |= taken_here
        missing = [i for i, link in enumerate(self.links) if link.status is None]
        roles += [RoleStatus(Role.HOST, f"host-{i}", 0, "starting") for i in missing]
        return ClusterStatus(
            host_instance=",".join(st.host_instance for _, st in statuses),
            roles=tuple(roles),
            sessions=sum(st.sessions for _, st in statuses),
            engine=next((st.engine for _, st in statuses if st.engine is not None), None),
            draining=all(st.draining for _, st in statuses) and not missing,
            metrics=tuple(metrics),
            capacity=_total(st.capacity for _, st in statuses),
            available=_total(st.available for _, st in statuses),
        )

    @property
    def engine(self) -> EngineInfo | None:
        return next((link.engine for link in self.links if link.engine is not None), None)

    @property
    def sessions(self) -> dict[str, SessionLink]:
        out: dict[str, SessionLink] = {}
        for link in self.links:
            out.update(link.sessions)
        return out

    def ready(self) -> bool:
        """Every host, and through it every stage, ready: /health 200."""
        return all(link.ready() for link in self.links)

    def owner(self, session_id: str) -> int | None:
        """The index of the host that takes a new session ``session_id`` now: its first
        choice among the hosts that are ready and have room (admission: a full host's
        stages refuse; another host may still take it). When every ready host is full, the
        first ready choice, which refuses it with ``capacity_exceeded``."""
        ready = [i for i, link in enumerate(self.links) if link.ready()]
        with_room = [i for i in ready if _has_room(self.links[i].status)]
        return owner(session_id, self.names, alive=lambda i: i in with_room) if with_room else (
            owner(session_id, self.names, alive=lambda i: i in ready)
        )

    def open(
        self, session_id: str, config: SessionConfig, handler: EventHandler, on_slow: SlowHandler | None = None
    ) -> SessionLink:
        i = self.owner(session_id)
        if i is None:
            raise SessionUnavailable("no session host is ready (starting, restarting or draining)")
        return self.links[i].open(session_id, config, handler, on_slow)

    async def start(self) -> None:
        for link in self.links:
            await link.start()

    async def wait_connected(self, timeout_s: float) -> None:
        """Until one host is connected (the others join as they come)."""
        waits = [asyncio.ensure_future(link.wait_connected(timeout_s)) for link in self.links]
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED, timeout=timeout_s)
            if not any(t.exception() is None for t in done):
                raise TimeoutError("no session host connected")
        finally:
            for t in waits:
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                    await t

    async def stop(self) -> None:
        await asyncio.gather(*(link.stop() for link in self.links))


def _has_room(status: ClusterStatus | None) -> bool:
    return status is not None and status.available != 0


def _total(values: Iterable[int]) -> int:
    """Sum of per-host limits; -1 (no limit) when any host has none."""
    vals = list(values)
    return -1 if any(v < 0 for v in vals) else sum(vals)


AnyLink = HostLink | ShardedLink  # what the adapter's servers talk through
