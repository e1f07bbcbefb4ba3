"""Added latency at one session, both input resampler modes interleaved (the lever's A/B).

One real-time echo session over ``/v1/duplex`` (tests/bench/loadgen.py in a process of its
own; scripted echo engine, 100 ms chunks at 16 kHz, pcm16 24 kHz in and out). Added
latency is counted from the frame that completes a chunk in input time: for decisions
(``response.speak`` of chunk k) and for the echoed audio. ``[server] input_resampler``
alternates ``low_latency`` / ``high_quality`` for ``rounds`` rounds, so both see the same
machine. Goal: p50 < 5 ms, p99 < 20 ms.
"""

from __future__ import annotations

import json
import time
from typing import Any

from tests.bench.bench_sweep import ECHO_SECTIONS, RESULTS, duplexd_pids, run_point
from tests.bench.table import print_table
from tests.harness import ServerProcess

MODES = ("low_latency", "high_quality")


def main(quick: bool = False) -> dict[str, Any]:
    rounds, warmup, measure = (1, 1.0, 2.0) if quick else (2, 2.0, 6.0)
    points = []
    for r in range(rounds):
        for mode in MODES:
            sections = {k: dict(v) for k, v in ECHO_SECTIONS.items()}
            sections["server"] = {"input_resampler": mode}
            with ServerProcess(sections=sections) as server:
                time.sleep(0.5)
                pt = run_point("native", 1, server.port, duplexd_pids(server), warmup, measure)
            points.append({"round": r, "mode": mode, **pt.__dict__})
    rows = [
        [p["mode"], str(p["round"]), f"{p['decision_p50_ms']:.1f}", f"{p['decision_p99_ms']:.1f}",
         f"{p['p50_ms']:.1f}", f"{p['p99_ms']:.1f}", f"{p['drop_pct']:.2f}"]
        for p in points
    ]
    print_table(
        "1 session, added latency from the frame that completes a chunk (ms); goal p50 < 5, p99 < 20",
        ["input resampler", "round", "decision p50", "decision p99", "audio p50", "audio p99", "drop %"],
        rows,
    )
    RESULTS.mkdir(exist_ok=True)
    out = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "points": points}
    (RESULTS / ("latency-quick.json" if quick else "latency.json")).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
