"""Prometheus metrics of the vLLM thinker backend (process registry: they reach ``/metrics``
with the stage heartbeats, like the transformers backend's)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from duplexd.bus.metrics import REGISTRY

REQUESTS = Counter(
    "duplexd_vllm_requests",
    "vLLM requests of the thinker by kind (reply; listen: a prefill of user audio while it is heard) and outcome "
    "(finished; aborted: cancel, barge-in, close; restarted: resubmitted with a fresh prefix-cache salt)",
    ["kind", "outcome"],
    registry=REGISTRY,
)
PROMPT_TOKENS = Counter(
    "duplexd_vllm_prompt_tokens",
    "Prompt positions of the thinker's vLLM requests, by whether the prefix cache held them",
    ["cached"],
    registry=REGISTRY,
)
RUNNING = Gauge("duplexd_vllm_requests_running", "vLLM requests of the thinker in flight", registry=REGISTRY)
LEASE_CACHED = Gauge(
    "duplexd_kv_lease_cached_tokens",
    "Prefix-cache hit of a session's newest vLLM request (positions not recomputed), beside duplexd_kv_lease_tokens",
    ["session_id", "slot"],
    registry=REGISTRY,
)
