"""GPU benchmark of the Moshi engine: batched slot step vs the naive transformers path.

    python -m tests.bench.gpu_moshi --out results/            # full size, random bf16 weights, CUDA
    python -m tests.bench.gpu_moshi --tiny --out /tmp/moshi   # the same phases, tiny model, CPU

Full size means the real Moshi architecture (7.8 B parameters, Mimi codec) with random
weights: no checkpoint can be downloaded here, so every number is a random-weight number
(timing does not depend on the weights' values). Phases, each in its own try/except, each
writing ``<out>/<phase>.json`` as soon as it ends (a failing phase writes its traceback
and the run goes on):

* ``env``: GPU, versions.
* ``graph_check``: a tiny model's CUDA-graph replay against its eager step (same tokens).
* ``init``: random full-size model built on the GPU in bf16.
* ``batched``: the engine's step (CUDA graphs per bucket, context 3000 frames, every
  window full) at 1, 8, 16, 32, 64 sessions: wall p50/p99 per step and GPU time per phase
  (Mimi encode, LM, depth, Mimi decode; CUDA events).
* ``profile_64``: torch.profiler of the step at 64 sessions (eager, kernels by category).
* ``batched_128``: 96 and 128 sessions with a 1536-frame window (KV must fit in memory).
* ``naive``: HF forward with a dynamic cache + ``depth_decoder.generate`` + Mimi
  encode/decode per frame, at 1, 8 and 64 sessions: the baseline.
* ``server``: the real processes (supervisor, host, stage0 on the GPU, stage1, adapter)
  with 1 and then 32 real-time websocket clients: input frame → first output audio, and
  input frame → its answer, p50/p99.

``summary.json`` and a printed table close the run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REALTIME_MS = 80.0


# --------------------------------------------------------------------------- results
class Results:
    def __init__(self, out: Path) -> None:
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.phases: dict[str, Any] = {}

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        print(f"== {name} ({time.strftime('%H:%M:%S')})", flush=True)
        t0 = time.perf_counter()
        try:
            data = fn()
            rec = {"ok": True, "seconds": round(time.perf_counter() - t0, 2), "data": data}
        except Exception as exc:  # noqa: BLE001 - one failing phase must not lose the others
            rec = {
                "ok": False,
                "seconds": round(time.perf_counter() - t0, 2),
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(),
                "cuda_memory": _cuda_memory(),
            }
            print(rec["traceback"], file=sys.stderr, flush=True)
        self.phases[name] = rec
        (self.out / f"{name}.json").write_text(json.dumps(rec, indent=2, default=str))
        print(f"   {name}: {'ok' if rec['ok'] else 'FAILED ' + rec['error']} in {rec['seconds']} s", flush=True)
        return rec.get("data")


def _cuda_memory() -> dict[str, float]:
    try:
        import torch

        if not torch.cuda.is_available():
            return {}
        free, total = torch.cuda.mem_get_info()
        return {
            "allocated_gib": round(torch.cuda.memory_allocated() / 2**30, 2),
            "reserved_gib": round(torch.cuda.memory_reserved() / 2**30, 2),
            "max_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "free_gib": round(free / 2**30, 2),
            "total_gib": round(total / 2**30, 2),
        }
    except Exception as exc:  # noqa: BLE001
        return {"error": str(exc)}


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


def summary_of(xs: list[float]) -> dict[str, float]:
    return {
        "p50": round(pct(xs, 50), 3),
        "p99": round(pct(xs, 99), 3),
        "mean": round(statistics.fmean(xs), 3) if xs else float("nan"),
        "n": len(xs),
    }


# --------------------------------------------------------------------------- setup
class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tiny = args.tiny
        self.model: Any = None
        self.runner: Any = None
        self.device = "cpu"

    def env(self) -> dict[str, Any]:
        import torch
        import transformers

        self.device = args_device(self.args)
        info: dict[str, Any] = {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "device": self.device,
            "tiny": self.tiny,
            "weights": "random (no checkpoint can be downloaded)",
            # msgspec: every phase (engine options); the rest: the server phase
            "packages": {m: _importable(m) for m in ("msgspec", "zmq", "websockets", "soxr", "uvloop",
                                                     "prometheus_client")},
        }
        if self.device.startswith("cuda"):
            info["gpu"] = torch.cuda.get_device_name()
            info["cuda"] = torch.version.cuda
            info["memory"] = _cuda_memory()
        print(f"   {info}", flush=True)
        return info

    def graph_check(self) -> dict[str, Any]:
        """Correctness before speed: the captured graphs replay exactly the eager step
        (tiny model on the bench device, streams joining and leaving mid-run)."""
        import torch

        from duplexd.actors.engines.moshi.runner import MoshiRunner, StepConfig
        from tests.moshi_tiny import tiny_model

        model = tiny_model().to(self.device)
        if self.device.startswith("cuda"):
            model = model.to(torch.bfloat16)
        outs = {}
        for graphs in (False, True):
            r = MoshiRunner(model, StepConfig(slots=4, context=16, buckets=(1, 2, 4), cuda_graphs=graphs))
            r.capture()
            rng = np.random.default_rng(3)
            got = []
            for i in range(12):
                live = [s for s, start in ((0, 0), (2, 3), (1, 5)) if start <= i and not (s == 0 and i >= 9)]
                for s, start in ((0, 0), (2, 3), (1, 5)):
                    if i == start:
                        r.reset_slot(s, 40 + s)
                        r.set_controls(s, 0.0, i == 0, 1.0)
                    r.set_input(s, (0.1 * rng.standard_normal(1920)).astype(np.float32) if s in live else None)
                out = r.step(max(live) + 1)
                got.append((out.text[live].copy(), out.codes[live].copy(), out.pcm[live].copy()))
            outs[graphs] = (got, r.use_graphs)
        (eager, _), (graphed, used) = outs[False], outs[True]
        pairs = list(zip(eager, graphed, strict=True))
        tokens_equal = all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in pairs)
        pcm_diff = max(float(np.max(np.abs(a[2] - b[2]))) for a, b in pairs)
        if not tokens_equal or pcm_diff > 1e-2:
            raise AssertionError(f"graph replay differs from the eager step: tokens equal {tokens_equal}, "
                                 f"max pcm diff {pcm_diff}")
        return {"graphs_used": used, "tokens_equal": tokens_equal, "max_pcm_diff": pcm_diff}

    def init(self) -> dict[str, Any]:
        import torch

        from duplexd.actors.engines.moshi.loading import full_size_config

        t0 = time.perf_counter()
        if self.tiny:
            from tests.moshi_tiny import tiny_model

            self.model = tiny_model().to(self.device)
        else:
            from transformers import MoshiForConditionalGeneration

            with torch.device(self.device):
                self.model = MoshiForConditionalGeneration._from_config(full_size_config(), dtype=torch.bfloat16)
            self.model.eval().requires_grad_(False)
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        params = sum(p.numel() for p in self.model.parameters())
        return {
            "params_b": round(params / 1e9, 3),
            "weights_gib": round(sum(p.numel() * p.element_size() for p in self.model.parameters()) / 2**30, 2),
            "dtype": str(next(self.model.parameters()).dtype),
            "seconds": round(time.perf_counter() - t0, 2),
            "memory": _cuda_memory(),
        }

    # ------------------------------------------------------------------ the engine's step
    def build_runner(self, slots: int, context: int, buckets: tuple[int, ...]) -> dict[str, Any]:
        from duplexd.actors.engines.moshi.runner import MoshiRunner, StepConfig

        self.free_runner()
        t0 = time.perf_counter()
        self.runner = MoshiRunner(self.model, StepConfig(slots=slots, context=context, buckets=buckets))
        built = time.perf_counter() - t0
        captured = self.runner.capture(lambda msg: print(f"   {msg}", flush=True))
        return {
            "slots": slots,
            "context_frames": context,
            "buckets": list(self.runner.buckets),
            "cuda_graphs": self.runner.use_graphs,
            "build_s": round(built, 2),
            "capture_s": round(captured, 2),
            "memory": _cuda_memory(),
        }

    def free_runner(self) -> None:
        if self.runner is not None:
            self.runner = None
            gc.collect()
            with contextlib.suppress(Exception):
                import torch

                torch.cuda.empty_cache()

    def measure(self, n: int, steps: int, warm: int) -> dict[str, Any]:
        r = self.runner
        rng = np.random.default_rng(n)
        frames = (0.1 * rng.standard_normal((n, 1920))).astype(np.float32)
        for slot in range(n):
            r.reset_slot(slot, 1000 + slot)
            r.set_controls(slot, 0.0, False, 1.0)
        # Every window full from the first step (the steady state of long sessions: the
        # attention reads the whole ring either way, this also makes the masks full).
        r.s.t[:n] = r.cfg.context
        r.timing = True
        wall: list[float] = []
        phases: dict[str, list[float]] = {}
        for i in range(warm + steps):
            t0 = time.perf_counter()
            for slot in range(n):
                r.set_input(slot, frames[slot])
            out = r.step(n)
            dt = (time.perf_counter() - t0) * 1000
            if i >= warm:
                wall.append(dt)
                for k, v in out.phase_ms.items():
                    phases.setdefault(k, []).append(v)
        r.timing = False
        res = {
            "sessions": n,
            "bucket": r.bucket_for(n),
            "step_ms": summary_of(wall),
            "phase_ms": {k: summary_of(v) for k, v in phases.items()},
            "realtime": pct(wall, 99) < REALTIME_MS,
        }
        if phases:
            mimi = [a + b for a, b in zip(phases["mimi_encode"], phases["mimi_decode"], strict=True)]
            res["phase_ms"]["mimi"] = summary_of(mimi)
        print(f"   {n:4d} sessions: step p50 {res['step_ms']['p50']:.2f} ms  p99 {res['step_ms']['p99']:.2f} ms"
              + "".join(f"  {k} {v['p50']:.2f}" for k, v in res["phase_ms"].items()), flush=True)
        return res

    def batched(self, counts: list[int], context: int, slots: int) -> dict[str, Any]:
        buckets = tuple(sorted(set(counts)))
        info = self.build_runner(slots, context, buckets)
        info["runs"] = []
        for n in counts:
            try:
                info["runs"].append(self.measure(n, self.args.steps, self.args.warm))
            except Exception as exc:  # noqa: BLE001 - keep the other counts
                info["runs"].append({"sessions": n, "error": f"{type(exc).__name__}: {exc}",
                                     "traceback": traceback.format_exc()})
                print(traceback.format_exc(), file=sys.stderr, flush=True)
        info["memory_after"] = _cuda_memory()
        return info

    def profile(self, n: int) -> dict[str, Any]:
        import torch
        from torch.profiler import ProfilerActivity, profile

        r = self.runner
        if r is None or r.cfg.slots < n:
            raise RuntimeError(f"no runner with {n} slots (the batched phase failed?)")
        b = r.bucket_for(n)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if r.device.type == "cuda" else [])
        with torch.inference_mode():
            r._run_eager(b)  # noqa: SLF001 - the eager step is what the graphs replay
            if r.device.type == "cuda":
                torch.cuda.synchronize()
            with profile(activities=acts) as prof:
                for _ in range(3):
                    r._run_eager(b)  # noqa: SLF001
                if r.device.type == "cuda":
                    torch.cuda.synchronize()
        avgs = prof.key_averages()
        key = "self_cpu_time_total"
        if r.device.type == "cuda":
            new_name = bool(avgs) and hasattr(avgs[0], "self_device_time_total")
            key = "self_device_time_total" if new_name else "self_cuda_time_total"
        table = avgs.table(sort_by=key, row_limit=30)
        (self.args.out / "profile_64.txt").write_text(table)
        cats: dict[str, float] = {}
        for ev in avgs:
            t = getattr(ev, key, 0.0)
            if not t:
                continue
            cats[_category(ev.key)] = cats.get(_category(ev.key), 0.0) + t / 1000 / 3
        total = sum(cats.values()) or 1.0
        return {
            "sessions": n,
            "bucket": b,
            "ms_per_step_by_category": {k: round(v, 3) for k, v in sorted(cats.items(), key=lambda kv: -kv[1])},
            "share": {k: round(v / total, 3) for k, v in cats.items()},
            "table": "profile_64.txt",
        }

    # ------------------------------------------------------------------ the naive path
    def naive(self, counts: list[int], steps: int) -> dict[str, Any]:
        import inspect

        import torch
        from transformers import DynamicCache

        self.free_runner()
        m = self.model
        dev = next(m.parameters()).device
        cache_kw = "cache" if "cache" in inspect.signature(m.decoder.forward).parameters else "past_key_values"
        V, A = m.config.vocab_size, m.config.audio_vocab_size  # noqa: N806
        runs = []
        for n in counts:
            cache = DynamicCache()
            text = torch.full((n,), V, device=dev)
            moshi = torch.full((n, 8), A, device=dev)
            user_prev = torch.full((n, 7), A, device=dev)
            pcm = 0.1 * torch.randn(n, 1, 1920, device=dev, dtype=next(m.audio_encoder.parameters()).dtype)
            times: dict[str, list[float]] = {"mimi_encode": [], "lm": [], "depth": [], "mimi_decode": [], "step": []}
            for i in range(steps + 2):
                marks = [time.perf_counter()]

                def mark(marks: list[float] = marks) -> None:
                    if dev.type == "cuda":
                        torch.cuda.synchronize()
                    marks.append(time.perf_counter())

                with torch.inference_mode():
                    ucodes = m.audio_encoder.encode(pcm, num_quantizers=8).audio_codes[:, :, 0]
                    mark()
                    audio = torch.cat([moshi, ucodes[:, :1], user_prev], dim=1)
                    emb = m.decoder.model.embed_tokens(text)[:, None] + sum(
                        m.embed_tokens[k](audio[:, k])[:, None] for k in range(16)
                    )
                    out = m.decoder(inputs_embeds=emb, use_cache=True, **{cache_kw: cache})
                    cache = getattr(out, cache_kw, None) or cache
                    probs = torch.softmax(out.logits[:, -1].float() / 0.7, dim=-1)
                    text = torch.multinomial(probs, 1)[:, 0]
                    mark()
                    codes = m.depth_decoder.generate(
                        last_hidden_state=out.last_hidden_state[:, -1:],
                        input_ids=text[:, None],
                        min_length=9,
                        max_length=9,
                        do_sample=True,
                        top_k=250,
                        temperature=0.8,
                    )[:, 1:]
                    mark()
                    _ = m.audio_encoder.decode(codes[:, :, None]).audio_values
                    mark()
                moshi, user_prev = codes, ucodes[:, 1:]
                if i >= 2:
                    for k, name in enumerate(("mimi_encode", "lm", "depth", "mimi_decode")):
                        times[name].append((marks[k + 1] - marks[k]) * 1000)
                    times["step"].append((marks[-1] - marks[0]) * 1000)
            run = {"sessions": n, **{k: summary_of(v) for k, v in times.items()}}
            run["realtime"] = pct(times["step"], 99) < REALTIME_MS
            print(f"   naive {n:4d} sessions: step p50 {run['step']['p50']:.1f} ms  p99 {run['step']['p99']:.1f} ms",
                  flush=True)
            runs.append(run)
            del cache
            gc.collect()
        return {"runs": runs, "cache": cache_kw}

    # ------------------------------------------------------------------ real processes
    def server(self, counts: list[int], seconds: float) -> dict[str, Any]:
        missing = [m for m in ("zmq", "msgspec", "websockets", "soxr", "uvloop", "prometheus_client")
                   if not _importable(m)]
        if missing:
            raise RuntimeError(f"the server phase needs these packages: {', '.join(missing)}")
        self.free_runner()
        self.model = None
        gc.collect()
        with contextlib.suppress(Exception):
            import torch

            torch.cuda.empty_cache()
        from tests.harness import ServerProcess

        tmp = Path(tempfile.mkdtemp(prefix="moshi-bench-"))
        moshi: dict[str, Any] = {
            "random_init": True,
            "device": self.device,
            "max_sessions": max(counts),
            "context_frames": self.args.context,
            "seed": 7,
            "speech_rms": 0.0,  # random weights: every frame counts as speech, so the model talks
            "hangover_frames": 1,
        }
        if self.tiny:
            from tests.moshi_tiny import tiny_config

            tiny_config().save_pretrained(tmp / "tiny")
            moshi["model_path"] = str(tmp / "tiny")
            moshi["cpu_threads"] = 1
        sections = {
            "engines.moshi": moshi,
            "stage0": {"max_batch": max(64, *counts)},
            "stage1": {"max_lead_ms": 0},
            "host": {"vad": "energy"},
            "supervisor": {"start_timeout_s": 600.0},
            "logging": {"level": "INFO"},
        }
        srv = ServerProcess(engine="moshi", sections=sections, ready_timeout_s=600.0)
        t0 = time.perf_counter()
        srv.start()
        started = time.perf_counter() - t0
        print(f"   server ready in {started:.1f} s", flush=True)
        try:
            runs = [asyncio.run(_latency_run(srv, n, seconds)) for n in counts]
        finally:
            logs = srv.logs()
            (self.args.out / "server.log").write_text(logs)
            srv.stop()
        return {"start_s": round(started, 1), "runs": runs, "log": "server.log"}


def _importable(name: str) -> bool:
    try:
        __import__(name)
        return True
    except ImportError:
        return False


def _category(name: str) -> str:
    n = name.lower()
    gemm = ("gemm", "cutlass", "xmma", "matmul", "aten::mm", "aten::addmm", "aten::bmm", "sm90", "gemv")
    if any(k in n for k in gemm):
        return "gemm"
    if any(k in n for k in ("fmha", "attention", "flash", "efficient")):
        return "attention"
    if any(k in n for k in ("conv", "cudnn", "implicit")):
        return "conv (mimi)"
    if any(k in n for k in ("topk", "sort", "argmax", "argmin", "multinomial")):
        return "sampling"
    if any(k in n for k in ("copy", "memcpy", "memset", "index", "gather", "scatter", "cat")):
        return "copies/indexing"
    return "elementwise/other"


async def _latency_run(srv: Any, n: int, seconds: float) -> dict[str, Any]:
    """n real-time clients: per chunk, when its last byte left vs when its answer came."""
    from tests.harness import NativeClient

    clients = [await _TimedClient.connect(srv) for _ in range(n)]
    for c in clients:
        await c.send({"type": "session.update", "session": {"turn_mode": "duplex"}})
    for c in clients:
        await c.wait_for("session.updated", within_s=60)
    chunks = int(seconds * 1000 / 80)
    rng = np.random.default_rng(0)
    x = (0.05 * rng.standard_normal(chunks * 1920)).astype(np.float32)

    async def feed(c: _TimedClient) -> None:
        t0 = time.monotonic()
        for k in range(chunks):
            for j in range(4):  # 20 ms frames, paced at real time
                i = k * 4 + j
                if j:
                    await asyncio.sleep(max(0.0, t0 + i * 0.02 - time.monotonic()))
                await c.send_audio(x[i * 480 : (i + 1) * 480])
            c.sent_at[k] = time.monotonic()  # the chunk is complete: the server can answer it
            await asyncio.sleep(max(0.0, t0 + (k + 1) * 0.08 - time.monotonic()))

    await asyncio.gather(*(feed(c) for c in clients))
    for c in clients:
        await c.wait_for(lambda e, c=c: e.get("chunk_seq") == chunks - 1, within_s=120)
    answer, first = [], []
    for c in clients:
        for e, at in zip(c.events, c.times, strict=True):
            if e["type"] in ("response.listen", "response.speak") and e["chunk_seq"] in c.sent_at:
                answer.append((at - c.sent_at[e["chunk_seq"]]) * 1000)
        speak = next((e for e in c.events if e["type"] == "response.speak"), None)
        audio_at = next((at for e, at in zip(c.events, c.times, strict=True) if e["type"] == "audio"), None)
        if speak is not None and audio_at is not None:
            first.append((audio_at - c.sent_at[speak["chunk_seq"]]) * 1000)
    for c in clients:
        await NativeClient.close(c)
    res = {
        "sessions": n,
        "chunks_per_session": chunks,
        "answer_ms": summary_of(answer),
        "first_audio_ms": summary_of(first),
        "sessions_with_audio": len(first),
    }
    print(f"   server {n:3d} sessions: first audio p50 {res['first_audio_ms']['p50']:.1f} ms, "
          f"answer p50 {res['answer_ms']['p50']:.1f} p99 {res['answer_ms']['p99']:.1f} ms", flush=True)
    return res


def _timed_client_class() -> type:
    from tests.harness import NativeClient

    class TimedClient(NativeClient):
        """A native client that stamps every event with its arrival time."""

        def __init__(self, ws: Any) -> None:
            self.times: list[float] = []
            self.sent_at: dict[int, float] = {}
            super().__init__(ws)

        async def add(self, event: dict[str, Any]) -> None:
            self.times.append(time.monotonic())
            await super().add(event)

    return TimedClient


class _TimedClientProxy:
    _cls: type | None = None

    @classmethod
    async def connect(cls, srv: Any) -> Any:
        if cls._cls is None:
            cls._cls = _timed_client_class()
        return await cls._cls.connect(srv)


_TimedClient = _TimedClientProxy


def args_device(args: argparse.Namespace) -> str:
    if args.device != "auto":
        return args.device
    if args.tiny:
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# --------------------------------------------------------------------------- table
def table(phases: dict[str, Any]) -> str:
    lines = ["Moshi step, random weights (no checkpoint available), " + _gpu(phases)]
    head = f"{'path':<8} {'sessions':>8} {'p50 ms':>8} {'p99 ms':>8} {'LM':>7} {'depth':>7} {'mimi':>7} {'RT':>3}"
    lines.append(head)
    best = 0
    for name in ("batched", "batched_128"):
        rec = phases.get(name) or {}
        for run in (rec.get("data") or {}).get("runs", []):
            if "error" in run:
                lines.append(f"{'engine':<8} {run['sessions']:>8} FAILED {run['error'][:60]}")
                continue
            ph = {k: run["phase_ms"].get(k, {}).get("p50", float("nan")) for k in ("lm", "depth", "mimi")}
            lines.append(
                f"{'engine':<8} {run['sessions']:>8} {run['step_ms']['p50']:>8.2f} {run['step_ms']['p99']:>8.2f} "
                f"{ph['lm']:>7.2f} {ph['depth']:>7.2f} {ph['mimi']:>7.2f} {'yes' if run['realtime'] else 'no':>3}"
            )
            if run["realtime"]:
                best = max(best, run["sessions"])
    naive = (phases.get("naive") or {}).get("data") or {}
    for run in naive.get("runs", []):
        lines.append(
            f"{'naive':<8} {run['sessions']:>8} {run['step']['p50']:>8.1f} {run['step']['p99']:>8.1f} "
            f"{run['lm']['p50']:>7.1f} {run['depth']['p50']:>7.1f} "
            f"{run['mimi_encode']['p50'] + run['mimi_decode']['p50']:>7.1f} {'yes' if run['realtime'] else 'no':>3}"
        )
    lines.append(f"largest real-time session count (p99 step < 80 ms): {best}")
    base = {r["sessions"]: r["step"]["p50"] for r in naive.get("runs", [])}
    for name in ("batched", "batched_128"):
        for run in ((phases.get(name) or {}).get("data") or {}).get("runs", []):
            if "error" not in run and run["sessions"] in base:
                ratio = base[run["sessions"]] / run["step_ms"]["p50"]
                lines.append(f"speed-up over naive at {run['sessions']}: {ratio:.1f}x")
    srv = (phases.get("server") or {}).get("data") or {}
    for run in srv.get("runs", []):
        lines.append(
            f"server {run['sessions']:>3} sessions: first audio p50 {run['first_audio_ms']['p50']:.1f} ms "
            f"p99 {run['first_audio_ms']['p99']:.1f}; frame→answer p50 {run['answer_ms']['p50']:.1f} "
            f"p99 {run['answer_ms']['p99']:.1f} ms"
        )
    prof = (phases.get("profile_64") or {}).get("data")
    if prof:
        lines.append("profile (eager step, ms by kernel category): " + ", ".join(
            f"{k} {v:.2f}" for k, v in prof["ms_per_step_by_category"].items()))
    failed = [k for k, v in phases.items() if not v.get("ok")]
    if failed:
        lines.append(f"FAILED phases: {', '.join(failed)} (see their JSON files)")
    return "\n".join(lines)


def _gpu(phases: dict[str, Any]) -> str:
    env = (phases.get("env") or {}).get("data") or {}
    return f"{env.get('gpu', env.get('device', '?'))}, torch {env.get('torch', '?')}"


# --------------------------------------------------------------------------- main
def ensure_duplexd() -> str:
    """Make ``duplexd`` importable here and in the server's child processes: the installed
    package, or else this source tree linked under a temporary ``duplexd`` namespace
    (a GPU machine may have no build tools for ``pip install -e .``)."""
    try:
        import duplexd.actors  # noqa: F401

        return "installed"
    except ImportError:
        pass
    repo = Path(__file__).resolve().parents[2]
    shim = Path(tempfile.mkdtemp(prefix="duplexd-shim-"))
    (shim / "duplexd").mkdir()
    for sub in ("runtime", "actors", "bus", "adapters"):
        (shim / "duplexd" / sub).symlink_to(repo / sub, target_is_directory=True)
    sys.path.insert(0, str(shim))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(shim), str(repo), os.environ.get("PYTHONPATH")]))
    import duplexd.actors  # noqa: F401

    return f"linked from {repo} via {shim}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny random model on the CPU: every phase, in seconds")
    p.add_argument("--out", type=Path, default=Path("moshi-bench"))
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=0, help="timed steps per session count")
    p.add_argument("--warm", type=int, default=5)
    p.add_argument("--context", type=int, default=0, help="LM window for counts up to 64")
    p.add_argument("--skip", default="", help="comma-separated phases to skip")
    p.add_argument("--quick", action="store_true", help="fewer counts and steps (a first GPU check, ~3 min)")
    args = p.parse_args(argv)
    tiny, quick = args.tiny, args.quick
    args.steps = args.steps or (4 if tiny else 30 if quick else 100)
    args.warm = 2 if tiny else args.warm
    args.context = args.context or (32 if tiny else 3000)
    counts = [1, 2, 4] if tiny else [1, 64] if quick else [1, 8, 16, 32, 64]
    big = [4] if tiny else [128] if quick else [96, 128]
    naive_counts = [1, 2] if tiny else [1, 64] if quick else [1, 8, 64]
    server_counts = [1, 2] if tiny else [1, 32]
    skip = set(filter(None, args.skip.split(",")))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if tiny:
        import torch

        torch.set_num_threads(1)
    how = ensure_duplexd()
    print(f"duplexd: {how}", flush=True)
    b = Bench(args)
    res = Results(args.out)
    t0 = time.perf_counter()
    res.run("env", b.env)
    if "graph_check" not in skip:
        res.run("graph_check", b.graph_check)
    res.run("init", b.init)
    if b.model is not None:
        if "batched" not in skip:
            res.run("batched", lambda: b.batched(counts, args.context, max(counts)))
        if "profile_64" not in skip:
            res.run("profile_64", lambda: b.profile(max(counts)))
        if "batched_128" not in skip:
            res.run("batched_128", lambda: b.batched(big, 8 if tiny else 1536, max(big)))
        if "naive" not in skip:
            res.run("naive", lambda: b.naive(naive_counts, 3 if tiny else 5))
    if "server" not in skip:
        res.run("server", lambda: b.server(server_counts, 1.6 if tiny else 6.0))
    text = table(res.phases)
    summary = {"seconds": round(time.perf_counter() - t0, 1), "table": text.splitlines(), "phases": {
        k: {"ok": v["ok"], "seconds": v["seconds"]} for k, v in res.phases.items()}}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(text, flush=True)
    print(f"(total {summary['seconds']} s; results in {args.out})", flush=True)
    return 0 if all(v["ok"] for v in res.phases.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
