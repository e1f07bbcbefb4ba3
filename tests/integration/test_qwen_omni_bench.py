"""The GPU benchmark script runs end to end on the CPU (tiny config), so a GPU run —
rare and expensive — does not fail on a script error: every phase (micro-profile in a
child process, the real server, the stock baseline in a child process) reports, and the
table prints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import REPO

pytestmark = pytest.mark.timeout(600)


def test_gpu_benchmark_runs_on_the_cpu_with_tiny(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tests.bench.gpu_qwen_omni", "--tiny", "--counts", "1,2", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=540, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["errors"] == []
    micro = data["micro"]
    assert micro["exit_code"] == 0 and micro["init"]["dit_field_used"] is True
    for key in ("thinker_turn_end_warm", "thinker_decode_b1", "talker_decode_b2", "dit_b1_frames48", "vocoder_b1"):
        assert micro["micro"][key], key
    assert micro["timeline"]["n1"]["first_audio"] > 0
    assert set(micro["inproc"]["levels"]) == {"1", "2"}
    ours, stock = data["duplexd"]["levels"], data["stock"]["stock"]["levels"]
    assert data["duplexd"]["mode"] == "processes" and set(ours) == set(stock) == {"1", "2"}
    for level in ours.values():
        assert level["responses"] > 0 and level["first_audio_p50_ms"] > 0
        assert level["statuses"] == {"completed": level["responses"]}
        assert level["steps"]["stage1_decode_ms"] > 0
        assert level["first_event_ms"]["audio"] == level["ttfa_ms"][0] or level["responses"] > 1
    assert any("qwen-omni" in line for line in data["duplexd"]["server_log"])
    assert "first audio p50/p99 ms (server)" in proc.stdout and "largest session count" in proc.stdout
    assert "micro-profile" in proc.stdout and data["wall_s"] < data["budget_s"]


def test_the_benchmark_ends_by_its_deadline_and_still_prints_its_table(tmp_path: Path) -> None:
    """A budget too short for every phase: phases are cut or skipped, the run ends on time,
    and the table prints with what was measured."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tests.bench.gpu_qwen_omni", "--tiny", "--counts", "1,2", "--out", str(out),
         "--budget-s", "14", "--stock-s", "5", "--skip", "duplexd"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )
    data = json.loads(out.read_text())
    assert data["wall_s"] <= 14 + 12, data["wall_s"]
    assert "largest session count" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "micro" in data
