"""`make bench QUICK=1` works end to end: the bus hop (interleaved with raw pyzmq), the
single-session latency and barge-in bench (0 stale bytes), and the concurrency sweep over
both protocols and Pipecat, with its load generator in processes of its own. Numbers are
not judged here (the machine is shared); that every part ran and reported is."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.harness import REPO

RESULTS = REPO / "bench-results"
CLIENTS_PY = REPO / ".venv-clients" / "bin" / "python"


@pytest.mark.skipif(not CLIENTS_PY.exists(), reason="the clients venv (make clients) runs Pipecat")
def test_quick_bench_runs_every_part_and_writes_its_results() -> None:
    for name in ("bus-quick.json", "native-quick.json", "sweep-quick.json"):
        (RESULTS / name).unlink(missing_ok=True)
    proc = subprocess.run(
        [sys.executable, "-m", "tests.bench", "--quick", "bus", "native", "sweep"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    bus = json.loads((RESULTS / "bus-quick.json").read_text())
    assert {(p["transport"], p["payload"].split(" (")[0]) for p in bus["points"]} == {
        (t, p) for t in ("ipc", "tcp") for p in ("20 ms pcm16", "1 s float32", "32x3584 float16")
    }
    assert all(p["bus_p50_us"] > 0 and p["raw_p50_us"] > 0 for p in bus["points"])
    native = json.loads((RESULTS / "native-quick.json").read_text())
    assert native["cancels"] > 0 and native["stale_bytes"] == 0
    sweep = json.loads((RESULTS / "sweep-quick.json").read_text())
    points = {p["system"]: p for p in sweep["points"]}
    assert set(points) == {"native", "realtime", "pipecat"}
    for system, p in points.items():
        assert p["opened"] == p["sessions"], system
        assert p["errors"] == 0 and p["closed_early"] == 0, system
        assert p["drop_pct"] < 5, system  # the echo came back
        assert p["p50_ms"] > 0 and p["cpu_per_session_s"] > 0, system
    assert points["native"]["decision_p50_ms"] > 0
    assert {"adapter", "host", "stage0", "stage1"} <= set(points["native"]["role_cores"])
    assert (RESULTS / "sweep-quick-latency.png").stat().st_size > 0
