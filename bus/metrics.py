"""Prometheus metrics of every role, and their shipping over the bus.

Each process keeps its own registry. Workers attach a snapshot of it to their
heartbeats; the host forwards all snapshots to the adapters in ``ClusterStatus``; the
adapter's ``/metrics`` renders them with a ``role`` and ``identity`` label. This works
the same on one machine and across machines.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from duplexd.bus.messages import MetricSample

disable_created_metrics()  # *_created gauges double the exposition and nobody graphs them
REGISTRY = CollectorRegistry(auto_describe=True)

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

STALE_DROPPED = Counter(
    "duplexd_stale_dropped",
    "Data messages dropped because their epoch is older than the session's newest",
    ["hop"],
    registry=REGISTRY,
)
BUS_MESSAGES = Counter("duplexd_bus_messages", "Bus messages received", ["plane"], registry=REGISTRY)
BUS_BAD_FRAMES = Counter("duplexd_bus_bad_frames", "Bus messages that did not decode", registry=REGISTRY)
BACKPRESSURE = Counter(
    "duplexd_backpressure", "Sends refused because a data queue was full", ["hop"], registry=REGISTRY
)
STEP_SECONDS = Histogram(
    "duplexd_stage_step_seconds",
    "Engine step duration",
    ["stage"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
STEP_BATCH = Histogram(
    "duplexd_stage_batch_size",
    "Sessions per engine step",
    ["stage"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
    registry=REGISTRY,
)
STAGE_ERRORS = Counter("duplexd_stage_errors", "Engine failures reported to sessions", ["stage"], registry=REGISTRY)
SESSIONS = Gauge("duplexd_sessions", "Open sessions", registry=REGISTRY)
RESPONSES = Counter("duplexd_responses", "Responses by terminal status", ["status"], registry=REGISTRY)
CLIENT_ERRORS = Counter("duplexd_client_errors", "Error events sent to clients", ["code"], registry=REGISTRY)
FIRST_AUDIO_SECONDS = Histogram(
    "duplexd_first_audio_seconds",
    "From response creation to its first audio chunk leaving the host",
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
HANDOFF_ARRAYS = Counter(
    "duplexd_handoff_arrays",
    "Handoff arrays (token ids, hidden states) received by stage1, by whether they view the bus frame",
    ["zero_copy"],
    registry=REGISTRY,
)
CONNECTIONS = Gauge("duplexd_ws_connections", "Open websocket connections", ["endpoint"], registry=REGISTRY)
ROLE_RESTARTS = Counter("duplexd_role_restarts", "Roles restarted by the supervisor", ["role"], registry=REGISTRY)


def snapshot(registry: CollectorRegistry = REGISTRY) -> tuple[MetricSample, ...]:
    """Every sample of ``registry`` as plain wire structs."""
    out: list[MetricSample] = []
    for metric in registry.collect():
        for s in metric.samples:
            out.append(
                MetricSample(
                    name=metric.name,
                    kind=metric.type,
                    documentation=metric.documentation,
                    sample=s.name,
                    labels=tuple(sorted(s.labels.items())),
                    value=float(s.value),
                )
            )
    return tuple(out)


def tag(samples: Iterable[MetricSample], role: str, identity: str) -> list[MetricSample]:
    """The same samples labelled with the process they came from."""
    extra = (("identity", identity), ("role", role))
    return [
        MetricSample(s.name, s.kind, s.documentation, s.sample, tuple(sorted(s.labels + extra)), s.value)
        for s in samples
    ]


class RemoteCollector(Collector):
    """Renders tagged samples of several processes as one exposition (one family each)."""

    def __init__(self) -> None:
        self._samples: tuple[MetricSample, ...] = ()

    def update(self, samples: tuple[MetricSample, ...]) -> None:
        self._samples = samples

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for s in self._samples:
            fam = families.get(s.name)
            if fam is None:
                fam = families[s.name] = Metric(s.name, s.documentation, s.kind)
            fam.add_sample(s.sample, dict(s.labels), s.value)
        yield from families.values()
