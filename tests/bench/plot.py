"""PNG plots of a sweep's JSON: ``python -m tests.bench.plot bench-results/sweep.json``.

Runs in the clients venv (matplotlib is a benchmark-only dependency there). Writes
``<stem>-latency.png`` (p50 and p99 added latency against N) and ``<stem>-cpu.png`` (server
CPU per session-second and memory per session against N) beside the JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

COLORS = {"native": "tab:blue", "realtime": "tab:green", "pipecat": "tab:red"}
LABELS = {"native": "duplexd /v1/duplex", "realtime": "duplexd /v1/realtime", "pipecat": "Pipecat 1.14"}


def main(path: str) -> None:
    src = Path(path)
    data = json.loads(src.read_text())
    pts = data["points"]
    systems = [s for s in COLORS if any(p["system"] == s for p in pts)]
    title = f"{data['machine']}, {data['when']}"

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for s in systems:
        ps = sorted((p for p in pts if p["system"] == s), key=lambda p: p["sessions"])
        n = [p["sessions"] for p in ps]
        ax.plot(n, [p["p99_ms"] for p in ps], "-o", color=COLORS[s], label=f"{LABELS[s]} p99")
        ax.plot(n, [p["p50_ms"] for p in ps], "--", color=COLORS[s], alpha=0.6, label=f"{LABELS[s]} p50")
    ax.axhline(50, color="gray", lw=0.8, ls=":")
    ax.set_yscale("log")
    ax.set_xlabel("concurrent real-time sessions")
    ax.set_ylabel("added latency of the echo (ms)")
    ax.set_title(f"Echo latency vs sessions\n{title}", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(src.with_name(f"{src.stem}-latency.png"), dpi=110)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for s in systems:
        ps = sorted((p for p in pts if p["system"] == s), key=lambda p: p["sessions"])
        n = [p["sessions"] for p in ps]
        a1.plot(n, [p["cpu_per_session_s"] * 1000 for p in ps], "-o", color=COLORS[s], label=LABELS[s])
        a2.plot(n, [p["mem_kb_per_session"] for p in ps], "-o", color=COLORS[s], label=LABELS[s])
    a1.set_xlabel("concurrent sessions")
    a1.set_ylabel("server CPU ms per session-second")
    a1.set_ylim(bottom=0)
    a2.set_xlabel("concurrent sessions")
    a2.set_ylabel("server memory per session (kB, PSS)")
    a2.set_ylim(bottom=0)
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.suptitle(f"Server cost per session\n{title}", fontsize=9)
    fig.tight_layout()
    fig.savefig(src.with_name(f"{src.stem}-cpu.png"), dpi=110)


if __name__ == "__main__":
    main(sys.argv[1])
