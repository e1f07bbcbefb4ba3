"""Concurrency sweep: N real-time echo sessions on duplexd (both protocols) and on Pipecat.

For each N, in one run and interleaved (native, realtime, Pipecat, then the next N), a
fresh server is started and N sessions stream 20 ms pcm16 24 kHz frames in real time for
``warmup + measure`` seconds from load-generator processes of their own
(tests/bench/loadgen.py). duplexd runs the scripted engine in echo mode (every 100 ms chunk
at 16 kHz is spoken back; stage1 converts it to 24 kHz), duplex turn mode, nothing forced
to listen; Pipecat runs the same echo in one pipeline per session
(tests/bench/pipecat_echo.py). Measured over the window:

* added latency of the echo (p50/p99, ms): input frame holding a sample sent → the output
  message carrying that sample received (loadgen.py);
* server CPU per session-second: CPU seconds of the server processes only (duplexd's
  supervisor + four roles; Pipecat's one process) / (N x window);
* memory per session: server PSS at the end of the window minus before the sessions
  opened, / N;
* drops: audio sent that did not come back (% of samples), error events, closed sessions.

Results: a table per run, bench-results/sweep.json, PNGs (tests/bench/plot.py). The load
average is recorded beside every point: the machine is shared.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tests.bench import procstat
from tests.bench.table import print_table
from tests.harness import REPO, ServerProcess, free_port

RESULTS = REPO / "bench-results"
CLIENTS_PY = REPO / ".venv-clients" / "bin" / "python"
PY_SPY = REPO / ".venv-clients" / "bin" / "py-spy"
SYSTEMS = ("native", "realtime", "pipecat")
SESSIONS_PER_GENERATOR = 150
LATENCY_GOAL_MS = 50.0
STOP_AFTER_FAILURES = 2  # consecutive counts losing audio or sessions

ECHO_CHUNK_MS = 100
ECHO_SECTIONS: dict[str, dict[str, Any]] = {
    "engine": {"name": "scripted"},
    "engines.scripted": {"echo": True, "input_rate": 16000, "chunk_ms": ECHO_CHUNK_MS, "reply_ms": 5000},
    "session": {"turn_mode": "duplex", "force_listen_count": 0},
    "logging": {"level": "WARNING"},
}


@dataclass
class Point:
    system: str
    sessions: int
    opened: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    decision_p50_ms: float
    decision_p99_ms: float
    cpu_per_session_s: float  # server core-seconds per session-second
    server_cores: float
    mem_kb_per_session: float
    drop_pct: float
    errors: int
    closed_early: int
    loadgen_cores: float
    send_lag_p99_ms: float
    loadavg: float
    window_s: float
    error_samples: list[str]
    role_cores: dict[str, float]  # server cores by process (duplexd: supervisor and roles)

    def losing(self) -> bool:
        """Past saturation: audio or sessions lost (latency alone keeps the sweep going)."""
        return self.opened < self.sessions or self.drop_pct >= 5.0 or self.errors > 0 or self.closed_early > 0

    def ok(self) -> bool:
        """Real time: the latency goal met and nothing lost."""
        return (
            self.opened == self.sessions
            and self.p99_ms < LATENCY_GOAL_MS
            and self.drop_pct < 0.5
            and self.errors == 0
            and self.closed_early == 0
        )


class PipecatServer:
    """tests/bench/pipecat_echo.py in the clients venv."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        fd, self.log_path = tempfile.mkstemp(prefix="pipecat-", suffix=".log")
        self.log = os.fdopen(fd, "wb")

    def __enter__(self) -> PipecatServer:
        self.proc = subprocess.Popen(
            [str(CLIENTS_PY), "-W", "ignore::DeprecationWarning", "-m", "tests.bench.pipecat_echo", str(self.port)],
            cwd=REPO,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pipecat server exited: {Path(self.log_path).read_text()[-2000:]}")
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1).read()
                return self
            time.sleep(0.2)
        raise TimeoutError("pipecat server did not start")

    def pids(self) -> dict[str, int]:
        assert self.proc is not None
        return {"pipecat": self.proc.pid}

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        with contextlib.suppress(OSError):
            os.unlink(self.log_path)


def _temp_path(prefix: str, suffix: str) -> str:
    fd, path = tempfile.mkstemp(prefix=prefix, suffix=suffix)
    os.close(fd)
    return path


def duplexd_pids(server: ServerProcess) -> dict[str, int]:
    """The supervisor and its children (the four roles), by role."""
    assert server.proc is not None
    _, body = server.health()
    names = {r["pid"]: r["role"] for r in body.get("roles", []) if isinstance(r, dict)}
    kids = procstat.children(server.proc.pid)
    return {"supervisor": server.proc.pid, **{names.get(p, f"pid{p}"): p for p in kids}}


def run_point(
    system: str, n: int, port: int, roles: dict[str, int], warmup_s: float, measure_s: float,
    profile: Path | None = None,
) -> Point:
    pids = list(roles.values())
    generators = max(1, math.ceil(n / SESSIONS_PER_GENERATOR))
    shares = [n // generators + (1 if i < n % generators else 0) for i in range(generators)]
    outs = [_temp_path("loadgen-", ".json") for _ in shares]
    mem0 = procstat.total_pss_kb(pids)
    procs = []
    for i, share in enumerate(shares):
        spec = {
            "protocol": system,
            "sessions": share,
            "host": "127.0.0.1",
            "port": port,
            "warmup_s": warmup_s,
            "measure_s": measure_s,
            "engine_chunk_ms": 20 if system == "pipecat" else ECHO_CHUNK_MS,
            "seed": i * 1000,
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "tests.bench.loadgen", json.dumps(spec), outs[i]],
                cwd=REPO,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
        )
    opened = 0
    for p in procs:
        assert p.stdout is not None
        line = p.stdout.readline()
        opened += int(line.split()[1]) if line.startswith("opened") else 0
    start_at = time.time() + 0.5
    for p in procs:
        assert p.stdin is not None
        p.stdin.write(f"{start_at}\n")
        p.stdin.flush()
    gen_pids = [p.pid for p in procs]
    time.sleep(max(0.0, start_at + warmup_s - time.time()))
    cpu0, gen0, t0 = procstat.total_cpu_s(pids), procstat.total_cpu_s(gen_pids), time.monotonic()
    role0 = {r: procstat.cpu_s(p) for r, p in roles.items()}
    spy = None
    if profile is not None:
        spy = subprocess.Popen(
            [str(PY_SPY), "record", "--nonblocking", "-r", "50", "-d", str(int(measure_s)), "-f", "raw",
             "-o", str(profile), "-p", str(pids[0]), "--subprocesses"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    time.sleep(max(0.0, start_at + warmup_s + measure_s - time.time()))
    cpu1, gen1, t1 = procstat.total_cpu_s(pids), procstat.total_cpu_s(gen_pids), time.monotonic()
    role1 = {r: procstat.cpu_s(p) for r, p in roles.items()}
    mem1 = procstat.total_pss_kb(pids)
    load = procstat.loadavg()[0]
    results = []
    for p, out in zip(procs, outs, strict=True):
        p.wait(120)
        with open(out) as f:
            results.append(json.load(f))
        os.unlink(out)
    if spy is not None:
        spy.wait(60)
    lat = np.concatenate([np.asarray(r["latency_ms"]) for r in results])
    dec = np.concatenate([np.asarray(r["decision_ms"]) for r in results])
    lag = np.concatenate([np.asarray(r["send_lag_ms"]) for r in results])
    # What is still in flight when the generators stop listening (a partial engine chunk,
    # resampler tails) is not a drop: 300 ms per session are allowed for.
    expected = sum(r["expected_samples"] for r in results) - int(0.3 * 24000) * opened
    received = sum(r["received_samples"] for r in results)
    window = t1 - t0

    def pct(a: np.ndarray, q: float) -> float:
        return float(np.percentile(a, q)) if a.size else float("nan")

    return Point(
        system=system,
        sessions=n,
        opened=opened,
        p50_ms=pct(lat, 50),
        p90_ms=pct(lat, 90),
        p99_ms=pct(lat, 99),
        max_ms=float(lat.max()) if lat.size else float("nan"),
        decision_p50_ms=pct(dec, 50),
        decision_p99_ms=pct(dec, 99),
        cpu_per_session_s=(cpu1 - cpu0) / (n * window),
        server_cores=(cpu1 - cpu0) / window,
        mem_kb_per_session=(mem1 - mem0) / n,
        drop_pct=100.0 * max(0, expected - received) / expected if expected else 100.0,
        errors=sum(r["errors"] for r in results),
        closed_early=sum(r["closed_early"] for r in results),
        loadgen_cores=(gen1 - gen0) / window,
        send_lag_p99_ms=pct(lag, 99),
        loadavg=load,
        window_s=window,
        error_samples=[e for r in results for e in r["error_samples"]][:4],
        role_cores={r: round((role1[r] - role0[r]) / window, 3) for r in roles},
    )


def sweep(
    counts: list[int],
    systems: tuple[str, ...],
    warmup_s: float,
    measure_s: float,
    profile_dir: Path | None = None,
    server_settings: dict[str, Any] | None = None,
) -> list[Point]:
    points: list[Point] = []
    broken: dict[str, int] = {}  # consecutive counts a system was not real time at
    for n in counts:
        for system in systems:
            if broken.get(system, 0) >= STOP_AFTER_FAILURES:
                continue  # past where it loses audio: higher N only burns the shared machine
            prof = None
            if profile_dir is not None and n == max(counts):
                prof = profile_dir / f"{system}-{n}.txt"
            if system == "pipecat":
                with PipecatServer() as pc:
                    time.sleep(0.5)
                    pt = run_point(system, n, pc.port, pc.pids(), warmup_s, measure_s, prof)
            else:
                sections = {k: dict(v) for k, v in ECHO_SECTIONS.items()}
                if server_settings:
                    sections["server"] = dict(server_settings)
                with ServerProcess(sections=sections) as server:
                    time.sleep(0.5)
                    pids = duplexd_pids(server)
                    pt = run_point(system, n, server.port, pids, warmup_s, measure_s, prof)
            points.append(pt)
            broken[system] = 0 if not pt.losing() else broken.get(system, 0) + 1
            print(
                f"  {system:8} N={n:4}: p50 {pt.p50_ms:6.1f} p99 {pt.p99_ms:7.1f} ms, "
                f"cpu/session-s {pt.cpu_per_session_s:.5f} ({pt.server_cores:.2f} cores), "
                f"mem {pt.mem_kb_per_session:6.0f} kB/session, drops {pt.drop_pct:.2f} %, "
                f"errors {pt.errors}, load {pt.loadavg:.2f}; cores {pt.role_cores}",
                flush=True,
            )
    return points


def report(points: list[Point], title: str) -> list[list[str]]:
    by = {(p.system, p.sessions): p for p in points}
    counts = sorted({p.sessions for p in points})
    systems = [s for s in SYSTEMS if any(p.system == s for p in points)]
    rows = []
    for n in counts:
        for s in systems:
            p = by.get((s, n))
            if p is None:
                continue
            base = by.get(("pipecat", n))
            ratio = f"{p.cpu_per_session_s / base.cpu_per_session_s:.2f}" if base and s != "pipecat" else "-"
            rows.append(
                [
                    str(n),
                    s,
                    f"{p.p50_ms:.1f}",
                    f"{p.p99_ms:.1f}",
                    f"{p.cpu_per_session_s:.5f}",
                    ratio,
                    f"{p.server_cores:.2f}",
                    f"{p.mem_kb_per_session:.0f}",
                    f"{p.drop_pct:.2f}",
                    str(p.errors + p.closed_early),
                    f"{p.loadgen_cores:.2f}",
                    f"{p.loadavg:.2f}",
                    "yes" if p.ok() else "no",
                ]
            )
    header = ["N", "system", "p50 ms", "p99 ms", "CPU/sess-s", "vs pipecat", "cores", "kB/sess", "drop %",
              "err", "gen cores", "load", "real time"]
    print_table(title, header, rows)
    best = []
    for s in systems:
        ok = [p.sessions for p in points if p.system == s and p.ok()]
        best.append([s, str(max(ok)) if ok else "0"])
    print_table(f"most sessions in real time (p99 < {LATENCY_GOAL_MS:g} ms, no drops)", ["system", "sessions"], best)
    return rows


def main(quick: bool = False, argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tests.bench sweep")
    ap.add_argument("--counts", default="", help="comma-separated session counts")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--warmup", type=float, default=0.0)
    ap.add_argument("--measure", type=float, default=0.0)
    ap.add_argument("--profile", action="store_true", help="py-spy the server at the highest N")
    ap.add_argument("--input-resampler", default="", help="[server] input_resampler for duplexd (A/B the lever)")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv or [])
    counts = [int(x) for x in args.counts.split(",") if x] or ([5] if quick else [50, 100, 200, 300, 400, 600, 800])
    systems = tuple(s for s in args.systems.split(",") if s)
    warmup = args.warmup or (0.5 if quick else 3.0)
    measure = args.measure or (1.5 if quick else 8.0)
    RESULTS.mkdir(exist_ok=True)
    prof_dir = RESULTS / "profiles" if args.profile else None
    if prof_dir is not None:
        prof_dir.mkdir(exist_ok=True)
    t = time.strftime("%Y-%m-%d %H:%M:%S")
    print(f"sweep {counts} over {systems}, warm-up {warmup} s, window {measure} s; load {procstat.loadavg()}",
          flush=True)
    server = {"input_resampler": args.input_resampler} if args.input_resampler else {}
    points = sweep(counts, systems, warmup, measure, prof_dir, server)
    report(points, f"Echo sweep ({procstat.machine()}, {t}; duplexd scripted echo, Pipecat 1.14 echo)")
    out = Path(args.out) if args.out else RESULTS / ("sweep-quick.json" if quick else "sweep.json")
    out.write_text(
        json.dumps(
            {
                "when": t,
                "machine": procstat.machine(),
                "command": " ".join(["python -m tests.bench sweep", *(argv or [])]),
                "warmup_s": warmup,
                "measure_s": measure,
                "points": [p.__dict__ for p in points],
            },
            indent=1,
        )
    )
    print(f"results: {out}")
    if CLIENTS_PY.exists():
        subprocess.run([str(CLIENTS_PY), "-m", "tests.bench.plot", str(out)], cwd=REPO, check=False)


if __name__ == "__main__":
    main(argv=sys.argv[1:])
