"""Prometheus metrics of the qwen-omni engine: the KV lease table and model step times.

They live in the process registry, so stage heartbeats carry them to ``/metrics`` with
the other stage metrics (labelled by role and identity).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from duplexd.bus.metrics import REGISTRY

_STEP_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.0, 2.0)

LEASE_TOKENS = Gauge(
    "duplexd_kv_lease_tokens",
    "Positions of a session's KV slot in use (one series per leased session: the lease table)",
    ["session_id", "slot"],
    registry=REGISTRY,
)
LEASE_SLOTS = Gauge("duplexd_kv_lease_slots", "KV cache slots by state", ["state"], registry=REGISTRY)
LEASE_RELEASES = Counter(
    "duplexd_kv_lease_releases", "KV slots given back, by reason", ["reason"], registry=REGISTRY
)
ROLLBACKS = Counter(
    "duplexd_kv_rollbacks", "Replies cut back in the thinker's context to what the user heard", registry=REGISTRY
)
ROLLBACK_TOKENS = Counter(
    "duplexd_kv_rollback_tokens", "Context positions dropped by rollbacks and history edits", registry=REGISTRY
)
MODEL_STEP = Histogram(
    "duplexd_qwen_step_seconds",
    "qwen-omni model work per step, by stage and phase",
    ["stage", "phase"],
    buckets=_STEP_BUCKETS,
    registry=REGISTRY,
)
MODEL_BATCH = Histogram(
    "duplexd_qwen_batch_rows",
    "Sessions in one qwen-omni model call, by stage and phase",
    ["stage", "phase"],
    buckets=(1, 2, 4, 8, 16, 32, 64),
    registry=REGISTRY,
)
TALKER_PROMPT_ROWS = Counter(
    "duplexd_qwen_talker_prompt_rows",
    "Prompt rows of replies the talker received, by whether its KV slot already held them",
    ["reused"],
    registry=REGISTRY,
)
GRAPHS = Gauge(
    "duplexd_qwen_cuda_graphs",
    "CUDA graphs of qwen-omni steps, by stage and state (captured; failed: the step runs eagerly)",
    ["stage", "state"],
    registry=REGISTRY,
)


def show_slots(used: int, total: int) -> None:
    LEASE_SLOTS.labels(state="leased").set(used)
    LEASE_SLOTS.labels(state="free").set(total - used)


def forget_lease_series(session_id: str, slot: int) -> None:
    """A released lease leaves the lease table gauge (no stale per-session series)."""
    try:
        LEASE_TOKENS.remove(session_id, str(slot))
    except KeyError:
        pass
