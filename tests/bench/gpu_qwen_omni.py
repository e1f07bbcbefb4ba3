"""GPU benchmark of the qwen-omni engine: where the time goes, end of user turn → first audio, capacity.

Random weights in the shapes of the released Qwen2.5-Omni-7B (no weights can be
downloaded here): every number is a random-weight, full-size-config number. Replies have
fixed lengths (``--reply-tokens`` text tokens, ``--codec-tokens`` codec tokens = 20 ms of
audio each), since a random model's end tokens mean nothing.

The run is bounded: it ends by itself within ``--budget-s`` of wall time (a watchdog
kills what is left and prints the table even if a phase hangs), and writes ``--out``
after every phase and every level. Phases, each guarded (a failure is recorded and the
next phase runs):

1. ``micro`` (a child process; :mod:`tests.bench.qwen_omni_micro`): both stages loaded
   in one process with the server's options: load / warm-up / per-graph capture times,
   device times of the thinker's prefill of a 2 s turn, a thinker and a talker decode
   step at batch 1/8/16, one token2wav chunk (DiT per window, BigVGAN) at batch 1/8, a
   thinker step beside a DiT call, the DiT in bfloat16; one reply's timeline (turn end
   processed, first token, talker start, first chunk's codec tokens, token2wav, first
   audio); then end of turn → first audio at each session count with both engines
   stepped in that process (``inproc``, one turn per level).
2. ``duplexd``: the real server (supervisor + adapter + host + stage0 + stage1, stage0
   and stage1 two processes on the GPU) with the ``qwen-omni`` engine; N native
   websocket clients (N in ``--counts``) each stream a 2 s user turn at real time, then
   all commit at once (manual turn mode) and ask for a reply. Measured on the client's
   clock: commit → first audio frame (p50/p99), the first event of each kind, and
   whether every frame arrived before a client with a ``--jitter-ms`` playout buffer had
   to play it (a session "stays real-time"). Step times come from the stages'
   Prometheus metrics; the server's log lines about loading, graphs and errors are kept.
3. ``stock`` (a child process; :mod:`tests.bench.qwen_omni_stock`): transformers'
   ``generate()`` on the same shapes and lengths, N = 1 and 4 (``--stock-levels``), a
   batch of N prompts at once: its audio exists only when it returns, so first audio =
   the whole call. Its reply is shortened (and marked so) only if it could not finish
   before the deadline.

``--placement split`` puts stage0 on cuda:0 and stage1 on cuda:1. ``--tiny`` runs all of
it on the CPU with the tiny config, to check the script end to end.

    python -m tests.bench.gpu_qwen_omni --out /tmp/qwen_omni.json            # one H200, ~7 min
    python -m tests.bench.gpu_qwen_omni --tiny --out /tmp/qwen_omni_tiny.json # CPU check
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import faulthandler
import importlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
for _k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):  # nothing can be reached: fail fast, never wait
    os.environ.setdefault(_k, "1")
SERVER_DEPS = ("zmq", "msgspec", "websockets", "soxr", "uvloop", "prometheus_client")


# ---------------------------------------------------------------------- bootstrap
def bootstrap() -> str:
    """Makes ``import duplexd`` work from a plain checkout (no pip install): a shim
    directory with ``duplexd/<part>`` links to the repository's folders, also exported in
    PYTHONPATH for the server's child processes."""
    try:
        importlib.import_module("duplexd.bus")
        return "installed"
    except ImportError:
        pass
    shim = Path(tempfile.mkdtemp(prefix="dx-shim-"))
    pkg = shim / "duplexd"
    pkg.mkdir()
    for part in ("runtime", "actors", "bus", "adapters"):
        (pkg / part).symlink_to(REPO / part)
    sys.path.insert(0, str(shim))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(shim), str(REPO), os.environ.get("PYTHONPATH")) if p)
    importlib.invalidate_caches()
    return f"shim {shim}"


class Results:
    """Everything measured so far, written to ``path`` after every change."""

    def __init__(self, path: Path, args: argparse.Namespace) -> None:
        self.path = path
        self.data: dict[str, Any] = {"args": vars(args), "errors": [], "note": "random weights, full-size config"}
        if args.tiny:
            self.data["note"] = "random weights, TINY config on the CPU (a script check, not a measurement)"
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        tmp.replace(self.path)

    def error(self, phase: str, exc: BaseException, extra: str = "") -> None:
        self.data["errors"].append(
            {"phase": phase, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:],
             "extra": extra[-6000:]}
        )
        print(f"!! {phase} failed: {type(exc).__name__}: {exc}", flush=True)
        self.save()


def environment(args: argparse.Namespace) -> dict[str, Any]:
    env: dict[str, Any] = {"python": platform.python_version(), "host": platform.node()}
    try:
        import torch

        env["torch"] = torch.__version__
        env["cuda"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            env["gpus"] = [
                {"name": torch.cuda.get_device_name(i), "memory_gib": round(
                    torch.cuda.get_device_properties(i).total_memory / 2**30, 1)}
                for i in range(torch.cuda.device_count())
            ]
    except Exception as exc:
        env["torch_error"] = str(exc)
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except Exception as exc:
        env["transformers_error"] = str(exc)
    missing = []
    for mod in SERVER_DEPS:
        try:
            importlib.import_module(mod)
        except ImportError:
            missing.append(mod)
    env["server_deps_missing"] = missing
    return env


# ---------------------------------------------------------------------- settings
def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    split = args.placement == "split"
    o: dict[str, Any] = {
        "random_init": True,
        "random_size": "tiny" if args.tiny else "full",
        "stage0_device": "cpu" if args.tiny else "cuda:0",
        "stage1_device": "cpu" if args.tiny else ("cuda:1" if split else "cuda:0"),
        "max_sessions": max(args.counts),
        # Two turns of 2 s audio and 40-token replies fit in 1024 positions; fewer span buckets
        # (graphs) to capture than the default 8192.
        "max_context": 1024,
        "max_reply_tokens": args.reply_tokens,
        "min_reply_tokens": args.reply_tokens - 1,
        "max_codec_tokens": args.codec_tokens,
        "min_codec_tokens": args.codec_tokens - 1,
        "lease_idle_s": 0.0,
        "cuda_graphs": not args.no_graphs,
    }
    if args.tiny:
        o.update({"cpu_threads": 1, "t2w_steps": 2, "t2w_chunk": 24, "vocoder_context": 4})
    return o


def user_audio(seed: int, seconds: float, rate: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(rate * seconds)
    env = 0.5 + 0.5 * np.sin(np.linspace(0, 8 * np.pi, n))
    return (0.2 * env * rng.standard_normal(n)).astype(np.float32)


def summarize(ttfa: list[float], late: list[float], audio_s: list[float], jitter_s: float) -> dict[str, Any]:
    from tests.bench.table import percentiles

    out: dict[str, Any] = {"responses": len(ttfa)}
    if ttfa:
        p50, p99 = percentiles(ttfa, 50, 99)
        out.update(ttfa_ms=[round(v * 1000, 1) for v in ttfa], first_audio_p50_ms=round(p50 * 1000, 1),
                   first_audio_p99_ms=round(p99 * 1000, 1))
    if late:
        out["max_lateness_ms"] = round(max(late) * 1000, 1)
        out["realtime_responses"] = sum(1 for v in late if v <= 0)
        out["all_realtime"] = all(v <= 0 for v in late)
        out["jitter_buffer_ms"] = jitter_s * 1000
    if audio_s:
        out["audio_s_per_response"] = round(float(np.mean(audio_s)), 2)
    return out


def lateness(frames: list[tuple[float, int, int]], jitter_s: float) -> float:
    """How late the latest frame came for a client that starts playing ``jitter_s`` after
    the first frame (frames: arrival time, start ms, samples). <= 0: never starved."""
    t_first = frames[0][0]
    return max(t - (t_first + jitter_s + start / 1000) for t, start, _ in frames)


# ---------------------------------------------------------------------- metrics
def parse_metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        labels: tuple[tuple[str, str], ...] = ()
        if "{" in name:
            name, _, rest = name.partition("{")
            labels = tuple(sorted(
                (k, v.strip('"')) for k, v in (p.split("=", 1) for p in rest.rstrip("}").split('",') if "=" in p)
            ))
        with contextlib.suppress(ValueError):
            out[(name, labels)] = out.get((name, labels), 0.0) + float(value)
    return out


def step_means(before: dict, after: dict) -> dict[str, float]:
    """Mean ms (and rows) per qwen-omni model call in the interval, by stage and phase."""
    res: dict[str, float] = {}
    for (name, labels), v in after.items():
        if name not in ("duplexd_qwen_step_seconds_sum", "duplexd_qwen_batch_rows_sum"):
            continue
        lab = {k: x for k, x in labels if k in ("stage", "phase")}
        key_labels = tuple(sorted(labels))
        count_name = name.replace("_sum", "_count")
        dv = v - before.get((name, key_labels), 0.0)
        dc = after.get((count_name, key_labels), 0.0) - before.get((count_name, key_labels), 0.0)
        if dc <= 0:
            continue
        unit = "ms" if "seconds" in name else "rows"
        k = f"{lab.get('stage')}_{lab.get('phase')}_{unit}"
        res[k] = round(dv / dc * (1000 if unit == "ms" else 1), 3)
    return res


# ---------------------------------------------------------------------- the clock
class Watchdog:
    """Ends the run at ``hard_at`` whatever a phase is doing: kills the child processes,
    writes the results and prints the table, then exits."""

    def __init__(self, results: Results, args: argparse.Namespace, hard_at: float) -> None:
        self.results, self.args, self.hard_at = results, args, hard_at
        self.started = args.deadline - args.budget_s
        self.children: list[subprocess.Popen[bytes]] = []
        self.server: Any = None
        self.lock = threading.Lock()
        threading.Thread(target=self._run, name="bench-watchdog", daemon=True).start()

    def _run(self) -> None:
        while time.monotonic() < self.hard_at:
            time.sleep(0.5)
        print("!! global deadline reached: stopping what is left", flush=True)
        faulthandler.dump_traceback(all_threads=True)
        with self.lock:
            self.kill_all()
            self.results.data.setdefault("aborted", "global deadline reached")
            self.results.data["wall_s"] = round(time.monotonic() - self.started, 1)
            with contextlib.suppress(Exception):
                table(self.results, self.args)
        os._exit(3)

    def kill_all(self) -> None:
        for p in self.children:
            if p.poll() is None:
                with contextlib.suppress(Exception):
                    os.killpg(p.pid, signal.SIGKILL)
        srv = self.server
        if srv is not None and srv.proc is not None and srv.proc.poll() is None:
            with contextlib.suppress(Exception):
                srv.proc.kill()  # the roles die with it (PR_SET_PDEATHSIG)


def left(args: argparse.Namespace) -> float:
    return args.deadline - time.monotonic()


# ---------------------------------------------------------------------- child phases
def run_child(phase: str, args: argparse.Namespace, results: Results, watchdog: Watchdog, timeout_s: float) -> None:
    """Runs ``phase`` in a child process (its own CUDA context: a hang or a crash there costs
    only its time, and its GPU memory is free when it ends), merging its JSON."""
    out = args.out.with_name(f"{args.out.stem}.{phase}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "tests.bench.gpu_qwen_omni", *args.argv, "--phase", phase,
           "--phase-out", str(out), "--phase-deadline", str(time.time() + timeout_s - 4)]
    print(f"== {phase}: up to {timeout_s:.0f} s", flush=True)
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True)
    watchdog.children.append(proc)
    try:
        code = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        code = None
        results.error(f"{phase}:timeout", TimeoutError(f"the {phase} phase ran past {timeout_s:.0f} s and was killed"))
    data: dict[str, Any] = {}
    if out.exists():
        with contextlib.suppress(ValueError):
            data = json.loads(out.read_text())
    for err in data.pop("errors", []):
        results.data["errors"].append(err)
    data["wall_s"] = round(time.monotonic() - t0, 1)
    data["exit_code"] = code
    results.data[phase] = data
    if code not in (0, None):
        results.error(f"{phase}:exit", RuntimeError(f"the {phase} phase exited with {code}"))
    results.save()


# ---------------------------------------------------------------------- phase 2: the real server
SERVER_LOG_KEYS = ("qwen-omni", "graph", "warm", "ERROR", "CRITICAL", "Traceback", "Error", "ready", "token2wav")


def server_log_excerpt(text: str, limit: int = 120) -> list[str]:
    lines = [ln[:600] for ln in text.splitlines() if any(k in ln for k in SERVER_LOG_KEYS)]
    return lines[-limit:]


async def run_server_levels(args: argparse.Namespace, results: Results, watchdog: Watchdog, until: float) -> None:
    """The levels through the real processes; nothing starts after ``until`` (monotonic)."""
    from tests.harness import NativeClient, ServerProcess

    class TimedClient(NativeClient):
        async def add(self, event: dict[str, Any]) -> None:
            event["_t"] = time.monotonic()
            await super().add(event)

    sections = {
        "engines.qwen_omni": engine_options(args),
        "host": {"vad": "energy", "continuation_pace": args.continuation_pace},
        "session": {"turn_mode": "manual", "continuation_cap_ms": 60000},
        "supervisor": {"start_timeout_s": 900.0},
        "logging": {"level": "INFO"},
    }
    phase = results.data.setdefault("duplexd", {"mode": "processes", "levels": {}})
    t0 = time.monotonic()
    server = ServerProcess(sections=sections, engine="qwen-omni", ready_timeout_s=max(20.0, until - t0 - 20))
    watchdog.server = server
    print(f"== duplexd: the real server, up to {until - t0:.0f} s", flush=True)
    try:
        server.start()
    except BaseException as exc:
        phase["server_log"] = server_log_excerpt(server.logs())
        results.error("duplexd:start", exc, server.logs())
        raise
    phase["init_s"] = round(time.monotonic() - t0, 1)
    print(f"server ready in {phase['init_s']} s", flush=True)
    results.save()

    def metrics() -> dict:
        import urllib.request

        with urllib.request.urlopen(f"http://{server.base}/metrics", timeout=10) as r:
            return parse_metrics(r.read().decode())

    try:
        m = await asyncio.to_thread(metrics)
        phase["graphs"] = {f"{dict(lab).get('stage')}_{dict(lab).get('state')}": v for (n, lab), v in m.items()
                           if n == "duplexd_qwen_cuda_graphs"}
        for n in args.counts:
            budget = until - time.monotonic()
            # A level: 2 s of audio per turn, the reply's audio at real time, the metrics scrape.
            need = args.turns * (args.user_s + args.codec_tokens / 50 + 1.5) + 6
            if budget < need:
                phase["skipped_from"] = n
                phase["skip_reason"] = f"{budget:.0f} s left, a level needs ~{need:.0f} s"
                print(f"duplexd  N={n}: skipped ({phase['skip_reason']})", flush=True)
                break
            try:
                before = await asyncio.to_thread(metrics)
                cap = min(budget - 5, need * 3)
                level = await asyncio.wait_for(server_level(server, TimedClient, n, args, cap), timeout=cap + 5)
                await asyncio.sleep(4.5)  # stage metrics ride on heartbeats, then on the host status (2 s each)
                level["steps"] = step_means(before, await asyncio.to_thread(metrics))
                phase["levels"][str(n)] = level
                print(f"duplexd  N={n:>3}: {json.dumps({k: v for k, v in level.items() if k != 'ttfa_ms'})}",
                      flush=True)
            except BaseException as exc:
                results.error(f"duplexd:N={n}", exc, server.logs())
                if isinstance(exc, asyncio.CancelledError | KeyboardInterrupt):
                    raise
            phase["server_log"] = server_log_excerpt(server.logs())
            results.save()
    finally:
        phase["server_log"] = server_log_excerpt(server.logs())
        results.save()
        await asyncio.to_thread(server.stop, 20.0)
        watchdog.server = None


async def server_level(server: Any, client_cls: Any, n: int, args: argparse.Namespace, cap: float) -> dict[str, Any]:
    t_level = time.monotonic()

    def within() -> float:
        return max(1.0, cap - (time.monotonic() - t_level))

    clients = [await client_cls.connect(server) for _ in range(n)]
    for c in clients:
        await c.send({"type": "session.update", "session": {"turn_detection": None}})
        await c.wait_for("session.updated", within_s=within())
    ttfa: list[float] = []
    late: list[float] = []
    audio_s: list[float] = []
    statuses: list[str] = []
    firsts: dict[str, list[float]] = {}
    try:
        for turn in range(args.turns):
            audios = [user_audio(1000 * turn + i, args.user_s, 24000) for i in range(n)]
            # At real time, as a microphone sends it: the turn's end then costs only its tail.
            await asyncio.gather(*(c.stream(a, frame_ms=100, realtime=1.0) for c, a in zip(clients, audios,
                                                                                           strict=True)))
            marks = [len(c.events) for c in clients]
            t_commit = time.monotonic()

            async def commit(c: Any) -> None:
                await c.send({"type": "input_audio_buffer.commit"})
                await c.send({"type": "response.create"})

            await asyncio.gather(*(commit(c) for c in clients))

            async def collect(c: Any, mark: int, t_commit: float = t_commit) -> None:
                created = await c.wait_for("response.created", within_s=within(), start=mark)
                rid = created["response"]["id"]
                done = await c.wait_for(lambda e, r=rid: e["type"] == "response.done" and e["response"]["id"] == r,
                                        within_s=within(), start=mark)
                statuses.append(done["response"]["status"])
                seen: set[str] = set()
                for e in c.events[mark:]:
                    if e["type"] not in seen:
                        seen.add(e["type"])
                        firsts.setdefault(e["type"], []).append(e["_t"] - t_commit)
                frames = [(e["_t"], e["start_ms"], e["bytes"] // 2) for e in c.events[mark:]
                          if e["type"] == "audio" and e.get("response_id") == rid and e["bytes"]]
                if frames:
                    ttfa.append(frames[0][0] - t_commit)
                    late.append(lateness(frames, args.jitter_ms / 1000))
                    audio_s.append(sum(f[2] for f in frames) / 24000)

            await asyncio.gather(*(collect(c, m) for c, m in zip(clients, marks, strict=True)))
    finally:
        for c in clients:
            with contextlib.suppress(Exception):
                await c.close()
    out = summarize(ttfa, late, audio_s, args.jitter_ms / 1000)
    out["statuses"] = {s: statuses.count(s) for s in set(statuses)}
    out["realtime_sessions"] = n if out.get("all_realtime") else 0
    out["first_event_ms"] = {k: round(float(np.median(v)) * 1000, 1) for k, v in sorted(firsts.items())}
    out["wall_s"] = round(time.monotonic() - t_level, 1)
    return out


def free_gpu() -> None:
    import gc

    gc.collect()
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------- report
def _ms(d: dict[str, Any], key: str, field: str = "ms") -> str:
    v = d.get(key)
    if isinstance(v, dict) and field in v:
        return str(v[field])
    return "-"


def micro_table(results: Results) -> None:
    from tests.bench.table import print_table

    m = results.data.get("micro", {})
    micro = m.get("micro", {})
    init = m.get("init", {})
    if not micro and not init:
        return
    rows: list[list[str]] = []
    flat: dict[str, Any] = {}
    for k, v in micro.items():  # nested results (the bf16 DiT per batch) become rows of their own
        subs = {a: b for a, b in v.items() if isinstance(b, dict)} if isinstance(v, dict) else {}
        flat[k] = {a: b for a, b in v.items() if not isinstance(b, dict)} if subs else v
        for a, b in subs.items():
            flat[f"{k}_{a}"] = b
    for k, v in flat.items():
        if not isinstance(v, dict):
            continue
        if "ms" in v:
            extra = []
            for f in ("eager_ms", "step_with_sampling_wall_ms", "graph", "frames", "rel_diff_to_fp32"):
                if f in v:
                    extra.append(f"{f}={v[f]}")
            rows.append([k, str(v["ms"]), " ".join(extra)])
        else:
            rows.append([k, "-", " ".join(f"{a}={b}" for a, b in v.items() if not isinstance(b, dict) and a != "note")
                         or json.dumps(v)[:110]])
    gpu = ", ".join(g["name"] for g in results.data.get("env", {}).get("gpus", [])) or "CPU"
    print_table(f"qwen-omni micro-profile on {gpu} — {results.data['note']} (device ms, median)",
                ["what", "ms", "details"], rows)
    if init:
        g = init.get("graphs", {})
        caps = ", ".join(f"{k} {v.get('captured')} graphs {v.get('capture_s')} s" for k, v in g.items())
        print(f"init {init.get('init_s')} s (thinker load {init.get('thinker_load_s')} + warm-up "
              f"{init.get('thinker_warm_up_s')}, talker load {init.get('talker_load_s')} + warm-up "
              f"{init.get('talker_warm_up_s')}); captures: {caps}; DiT field check {init.get('dit_field_check')}",
              flush=True)
    tl = m.get("timeline", {}).get("n1")
    if tl:
        print("one reply, both engines in one process (ms after the turn's end): "
              + ", ".join(f"{k} {v}" for k, v in tl.items() if k != "note"), flush=True)
    est = first_audio_estimate(results)
    if est:
        print(f"first audio at 1 session from the micro-profile: {est}", flush=True)


def first_audio_estimate(results: Results) -> str:
    """turn end + (first chunk + look-ahead + 1) thinker steps + first DiT window + vocoder."""
    m = results.data.get("micro", {})
    micro, init = m.get("micro", {}), m.get("init", {})
    try:
        turn = micro["thinker_turn_end_warm"]
        step = micro["thinker_decode_b1"]["step_with_sampling_wall_ms"]
        tstep = micro["talker_decode_b1"]["step_with_sampling_wall_ms"]
        frames = init["t2w_windows_frames"][0]
        dit = micro[f"dit_b1_frames{frames}"]["ms"]
        voc = micro["vocoder_b1"]["ms"]
    except (KeyError, IndexError, TypeError):
        return ""
    rows = frames // 2 + 1
    total = turn["turn_end_step_ms"] + turn["reply_start_step_ms"] + rows * (step + tstep) + dit + voc
    return (f"~{total:.0f} ms = turn end {turn['turn_end_step_ms']} + reply start {turn['reply_start_step_ms']} + "
            f"{rows} x (thinker {step} + talker {tstep}) + DiT {dit} + BigVGAN {voc} (serial; the two stages "
            f"overlap their steps in the server)")


def table(results: Results, args: argparse.Namespace) -> str:
    from tests.bench.table import print_table

    micro_table(results)
    d = results.data
    ours = d.get("duplexd", {}).get("levels", {})
    inproc = d.get("micro", {}).get("inproc", {}).get("levels", {})
    stock = d.get("stock", {}).get("stock", {}).get("levels", {})
    gpu = ", ".join(g["name"] for g in d.get("env", {}).get("gpus", [])) or "CPU"
    rows = []
    for n in args.counts:
        o, i, s = ours.get(str(n), {}), inproc.get(str(n), {}), stock.get(str(n), {})
        st = o.get("steps", {}) or i.get("steps", {})
        ratio = ""
        if o.get("first_audio_p50_ms") and s.get("first_audio_p50_ms"):
            ratio = f"{s['first_audio_p50_ms'] / o['first_audio_p50_ms']:.1f}x"
        rows.append([
            str(n),
            f"{o.get('first_audio_p50_ms', '-')} / {o.get('first_audio_p99_ms', '-')}",
            f"{i.get('first_audio_p50_ms', '-')} / {i.get('first_audio_p99_ms', '-')}",
            f"{s.get('first_audio_p50_ms', '-')}",
            ratio,
            f"{o.get('realtime_responses', '-')}/{o.get('responses', '-')}",
            f"{o.get('max_lateness_ms', '-')} / {i.get('max_lateness_ms', '-')}",
            f"{st.get('stage0_decode_ms', '-')}",
            f"{st.get('stage1_decode_ms', '-')}",
            f"{st.get('stage1_token2wav_ms', '-')} ({st.get('stage1_token2wav_rows', '-')})",
        ])
    rt = [n for n in args.counts if ours.get(str(n), {}).get("all_realtime")]
    rt_in = [n for n in args.counts if inproc.get(str(n), {}).get("all_realtime")]
    stock_note = d.get("stock", {}).get("stock", {}).get("shortened", "")
    title = (f"qwen-omni on {gpu} [{args.placement}] — {d['note']}; replies {args.reply_tokens} text / "
             f"{args.codec_tokens} codec tokens{'; ' + stock_note if stock_note else ''}")
    header = ["sessions", "first audio p50/p99 ms (server)", "in-process p50/p99 ms", "stock generate() ms",
              "stock/ours", "real-time replies (server)", "max lateness ms (server / in-proc)",
              "thinker decode ms", "talker decode ms", "token2wav ms (rows)"]
    print_table(title, header, rows)
    line = (f"largest session count with every reply real-time: server {max(rt) if rt else 'none'}, in-process "
            f"{max(rt_in) if rt_in else 'none'} (of {args.counts})")
    print(line, flush=True)
    d["largest_realtime_sessions"] = max(rt) if rt else 0
    d["largest_realtime_sessions_inproc"] = max(rt_in) if rt_in else 0
    errors = d.get("errors", [])
    if errors:
        print(f"{len(errors)} error(s): " + "; ".join(f"{e['phase']}: {e['error'][:160]}" for e in errors), flush=True)
    results.save()
    return line


# ---------------------------------------------------------------------- main
def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("qwen_omni_bench.json"))
    p.add_argument("--tiny", action="store_true", help="tiny config on the CPU (script check)")
    p.add_argument("--placement", choices=("single", "split"), default="single",
                   help="split: stage0 on cuda:0, stage1 on cuda:1")
    p.add_argument("--counts", type=lambda s: [int(x) for x in s.split(",")], default=None)
    p.add_argument("--turns", type=int, default=2)
    p.add_argument("--user-s", type=float, default=2.0)
    p.add_argument("--reply-tokens", type=int, default=40)
    p.add_argument("--codec-tokens", type=int, default=250)
    p.add_argument("--jitter-ms", type=float, default=200.0)
    p.add_argument("--continuation-pace", type=float, default=0.25,
                   help="[host] continuation_pace: how often (x chunk_ms) the thinker's new text goes to the talker")
    p.add_argument("--stock-levels", type=int, default=2, help="how many of --counts the stock baseline runs")
    p.add_argument("--skip", default="", help="phases to leave out, comma-separated: micro, duplexd, stock")
    p.add_argument("--no-graphs", action="store_true")
    p.add_argument("--budget-s", type=float, default=440.0, help="the whole run ends within this many seconds")
    p.add_argument("--micro-s", type=float, default=130.0, help="at most this long for the micro phase")
    p.add_argument("--stock-s", type=float, default=85.0, help="time kept for the stock phase")
    # Internal: one phase in a child process.
    p.add_argument("--phase", choices=("micro", "stock"), help=argparse.SUPPRESS)
    p.add_argument("--phase-out", help=argparse.SUPPRESS)
    p.add_argument("--phase-deadline", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = [a for a in (sys.argv[1:] if argv is None else argv)]
    if args.counts is None:
        args.counts = [1, 2] if args.tiny else [1, 4, 8, 16]
    if args.tiny:
        args.reply_tokens = min(args.reply_tokens, 8)
        args.codec_tokens = min(args.codec_tokens, 48)
        args.turns = min(args.turns, 1)
    return args


def main(argv: list[str] | None = None) -> int:
    t_start = time.monotonic()
    args = parse(argv)
    if args.phase:
        bootstrap()
        if args.phase == "micro":
            from tests.bench import qwen_omni_micro

            return qwen_omni_micro.run(args)
        from tests.bench import qwen_omni_stock

        return qwen_omni_stock.run(args)
    args.deadline = t_start + args.budget_s
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    how = bootstrap()
    results = Results(args.out, args)
    env = environment(args)
    env["duplexd_import"] = how
    results.data["env"] = env
    results.data["budget_s"] = args.budget_s
    results.save()
    print(f"environment: {json.dumps(env)}", flush=True)
    if not args.tiny and not env.get("cuda"):
        results.error("env", RuntimeError("no CUDA device (use --tiny for the CPU check)"))
        return 2
    if args.placement == "split" and len(env.get("gpus", [])) < 2 and not args.tiny:
        results.error("env", RuntimeError("--placement split needs two GPUs"))
        return 2
    free_gpu()  # (environment() initialised CUDA here: keep this process's footprint small)
    watchdog = Watchdog(results, args, hard_at=args.deadline + 10)
    stock_reserve = 0.0 if "stock" in skip else args.stock_s
    server_min = 0.0 if "duplexd" in skip else 110.0  # start (~40 s) and the levels
    micro_t = max(min(args.micro_s, left(args) - stock_reserve - server_min), min(30.0, left(args) - 5))
    micro_t = min(micro_t, left(args) - 5)
    if "micro" not in skip and micro_t >= 5:
        run_child("micro", args, results, watchdog, micro_t)
        print(f"-- micro done at {time.monotonic() - t_start:.0f} s", flush=True)
    if "duplexd" not in skip:
        if env["server_deps_missing"]:
            results.error("duplexd", RuntimeError(f"server packages missing: {env['server_deps_missing']}"))
        else:
            try:
                asyncio.run(run_server_levels(args, results, watchdog, until=args.deadline - stock_reserve))
            except Exception as exc:
                results.error("duplexd:processes", exc)
        print(f"-- duplexd done at {time.monotonic() - t_start:.0f} s", flush=True)
    if "stock" not in skip and left(args) > 20:
        run_child("stock", args, results, watchdog, left(args) - 3)
        print(f"-- stock done at {time.monotonic() - t_start:.0f} s", flush=True)
    with watchdog.lock:
        results.data["wall_s"] = round(time.monotonic() - t_start, 1)
        table(results, args)
        print(f"results: {args.out}", flush=True)
    return 0 if not results.data["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
