"""The GPU benchmark script runs end to end on the CPU (tiny config), so a GPU run —
rare and expensive — does not fail on a script error."""

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
    ours, stock = data["duplexd"]["levels"], data["stock"]["levels"]
    assert data["duplexd"]["mode"] == "processes" and set(ours) == set(stock) == {"1", "2"}
    for level in ours.values():
        assert level["responses"] > 0 and level["first_audio_p50_ms"] > 0
        assert level["statuses"] == {"completed": level["responses"]}
        assert level["steps"]["stage1_decode_ms"] > 0
    assert "first audio p50/p99 ms" in proc.stdout and "largest session count" in proc.stdout
