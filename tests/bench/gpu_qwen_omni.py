"""GPU benchmark of the qwen-omni engine: end of user turn → first audio, step times, real-time capacity.

Random weights in the shapes of the released Qwen2.5-Omni-7B (no weights can be
downloaded here): every number is a random-weight, full-size-config number. Replies have
fixed lengths (``--reply-tokens`` text tokens, ``--codec-tokens`` codec tokens = 20 ms of
audio each), since a random model's end tokens mean nothing.

Phases, each guarded (a failure is recorded and the next phase runs; partial results are
written to ``--out`` after every step):

1. ``duplexd``: the real server (supervisor + adapter + host + stage0 + stage1) with the
   ``qwen-omni`` engine; N native websocket clients (N in ``--counts``) each stream a
   2 s user turn, then all commit at once (manual turn mode) and ask for a reply. Measured
   on the client's clock: commit → first audio frame (p50/p99), and whether every frame
   arrived before a client with a ``--jitter-ms`` playout buffer had to play it (a
   session "stays real-time"). Step times come from the stages' Prometheus metrics.
   ``--mode inproc`` drives the two engines in this process instead (no bus; used
   automatically when the server's packages are missing).
2. ``stock``: transformers' ``Qwen2_5OmniForConditionalGeneration.generate()`` on the same
   shapes and lengths, a batch of N prompts at once: its audio exists only when it
   returns, so first audio = the whole call.

``--placement split`` puts stage0 on cuda:0 and stage1 on cuda:1. ``--tiny`` runs all of
it on the CPU with the tiny config, to check the script end to end.

    python -m tests.bench.gpu_qwen_omni --out /tmp/qwen_omni.json            # one H200
    python -m tests.bench.gpu_qwen_omni --tiny --out /tmp/qwen_omni_tiny.json # CPU check
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import os
import platform
import sys
import tempfile
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
        "max_context": 1024 if args.tiny else 4096,
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


# ---------------------------------------------------------------------- phase 1: the real server
async def run_server_levels(args: argparse.Namespace, results: Results) -> None:
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
    server = ServerProcess(sections=sections, engine="qwen-omni", ready_timeout_s=900)
    try:
        server.start()
    except BaseException as exc:
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
            if time.monotonic() > args.deadline:
                phase["skipped_from"] = n
                break
            try:
                before = await asyncio.to_thread(metrics)
                level = await server_level(server, TimedClient, n, args)
                await asyncio.sleep(4.5)  # stage metrics ride on heartbeats, then on the host status (2 s each)
                level["steps"] = step_means(before, await asyncio.to_thread(metrics))
                phase["levels"][str(n)] = level
                print(f"duplexd  N={n:>3}: {json.dumps({k: v for k, v in level.items() if k != 'ttfa_ms'})}",
                      flush=True)
            except Exception as exc:
                results.error(f"duplexd:N={n}", exc, server.logs())
            results.save()
    finally:
        server.stop()


async def server_level(server: Any, client_cls: Any, n: int, args: argparse.Namespace) -> dict[str, Any]:
    clients = [await client_cls.connect(server) for _ in range(n)]
    for c in clients:
        await c.send({"type": "session.update", "session": {"turn_detection": None}})
        await c.wait_for("session.updated")
    ttfa: list[float] = []
    late: list[float] = []
    audio_s: list[float] = []
    statuses: list[str] = []
    for turn in range(args.turns):
        audios = [user_audio(1000 * turn + i, args.user_s, 24000) for i in range(n)]
        await asyncio.gather(*(c.stream(a, frame_ms=100) for c, a in zip(clients, audios, strict=True)))
        marks = [len(c.events) for c in clients]
        t_commit = time.monotonic()

        async def commit(c: Any) -> None:
            await c.send({"type": "input_audio_buffer.commit"})
            await c.send({"type": "response.create"})

        await asyncio.gather(*(commit(c) for c in clients))

        async def collect(c: Any, mark: int, t_commit: float = t_commit) -> None:
            created = await c.wait_for("response.created", within_s=120, start=mark)
            rid = created["response"]["id"]
            done = await c.wait_for(lambda e, r=rid: e["type"] == "response.done" and e["response"]["id"] == r,
                                    within_s=300, start=mark)
            statuses.append(done["response"]["status"])
            frames = [(e["_t"], e["start_ms"], e["bytes"] // 2) for e in c.events[mark:]
                      if e["type"] == "audio" and e.get("response_id") == rid and e["bytes"]]
            if frames:
                ttfa.append(frames[0][0] - t_commit)
                late.append(lateness(frames, args.jitter_ms / 1000))
                audio_s.append(sum(f[2] for f in frames) / 24000)

        await asyncio.gather(*(collect(c, m) for c, m in zip(clients, marks, strict=True)))
    for c in clients:
        await c.close()
    out = summarize(ttfa, late, audio_s, args.jitter_ms / 1000)
    out["statuses"] = {s: statuses.count(s) for s in set(statuses)}
    out["realtime_sessions"] = n if out.get("all_realtime") else 0
    return out


# ---------------------------------------------------------------------- phase 1b: in this process
def run_inproc_levels(args: argparse.Namespace, results: Results) -> None:
    """The two engines driven directly (no bus, no host): a diagnostic fallback."""
    import msgspec

    from duplexd.actors.engines.base import TalkerInput, ThinkerInput
    from duplexd.actors.engines.qwen_omni.options import QwenOmniOptions
    from duplexd.actors.engines.qwen_omni.talker import QwenOmniTalker
    from duplexd.actors.engines.qwen_omni.thinker import QwenOmniThinker
    from duplexd.bus.messages import Action, ChunkKind, HistoryEntry, SessionConfig

    phase = results.data.setdefault("duplexd", {"mode": "inproc", "levels": {}})
    phase["mode"] = "inproc"
    opts = msgspec.convert(engine_options(args), QwenOmniOptions)
    t0 = time.monotonic()
    th, tk = QwenOmniThinker(opts), QwenOmniTalker(opts)
    th.load()
    th.warm_up()
    tk.load()
    tk.warm_up()
    phase["init_s"] = round(time.monotonic() - t0, 1)
    results.save()
    chunk = th.info.chunk_samples
    for n in args.counts:
        if time.monotonic() > args.deadline:
            phase["skipped_from"] = n
            break
        try:
            sids = [f"b{n}-{i}" for i in range(n)]
            for s in sids:
                th.open_session(s, SessionConfig(turn_mode="manual"))
                tk.open_session(s, SessionConfig(turn_mode="manual"))
            ttfa: list[float] = []
            late: list[float] = []
            audio_s: list[float] = []
            for turn in range(args.turns):
                audios = [user_audio(1000 * turn + i, args.user_s, 16000) for i in range(n)]
                parts = [[a[j : j + chunk] for j in range(0, a.size, chunk)] for a in audios]
                t_commit = time.monotonic()
                for j in range(max(len(p) for p in parts)):
                    batch = []
                    for s, p in zip(sids, parts, strict=True):
                        if j < len(p):
                            kind = ChunkKind.UTTERANCE_END if j == len(p) - 1 else ChunkKind.UTTERANCE
                            batch.append(ThinkerInput(s, j, kind, p[j], True))
                    th.step(batch)
                for s in sids:
                    th.set_context(s, (HistoryEntry("user", "", f"{s}-u{turn}"),), "")
                frames: dict[str, list[tuple[float, int, int]]] = {s: [] for s in sids}
                done: set[str] = set()
                made = dict.fromkeys(sids, 0)
                seq = 10_000
                while len(done) < n:
                    seq += 1
                    batch = [ThinkerInput(s, seq, ChunkKind.CONTINUATION, np.zeros(chunk, np.float32),
                                          response_id=f"r{turn}") for s in sids]
                    for s, out in zip(sids, th.step(batch), strict=True):
                        if out.action == Action.SPEAK or out.end_of_turn:
                            tk.feed(s, TalkerInput(out.text, out.end_of_turn, out.tokens, out.hidden,
                                                   turn_key=f"r{turn}"))
                    pend = [s for s in sids if s not in done and tk.pending(s)]
                    if not pend:
                        time.sleep(0.001)
                        continue
                    for s, c in zip(pend, tk.step(pend), strict=True):
                        if c is None:
                            continue
                        if c.pcm.size:
                            frames[s].append((time.monotonic(), made[s] * 1000 // 24000, c.pcm.size))
                            made[s] += c.pcm.size
                        if c.end_of_turn:
                            done.add(s)
                for s in sids:
                    fr = frames[s]
                    if fr:
                        ttfa.append(fr[0][0] - t_commit)
                        late.append(lateness(fr, args.jitter_ms / 1000))
                        audio_s.append(made[s] / 24000)
                    reply = th._s[s].reply
                    said = reply.pieces.text if reply is not None and reply.pieces is not None else ""
                    hist = (HistoryEntry("user", "", f"{s}-u{turn}"), HistoryEntry("assistant", said, f"{s}-a{turn}"))
                    th.set_context(s, hist, "")
            for s in sids:
                th.close_session(s)
                tk.close_session(s)
            level = summarize(ttfa, late, audio_s, args.jitter_ms / 1000)
            level["realtime_sessions"] = n if level.get("all_realtime") else 0
            phase["levels"][str(n)] = level
            print(f"inproc   N={n:>3}: {json.dumps({k: v for k, v in level.items() if k != 'ttfa_ms'})}", flush=True)
        except Exception as exc:
            results.error(f"inproc:N={n}", exc)
        results.save()
    del th, tk
    free_gpu()


def free_gpu() -> None:
    import gc

    gc.collect()
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------- phase 2: stock generate()
def run_stock(args: argparse.Namespace, results: Results) -> None:
    import torch
    import transformers
    from transformers import Qwen2_5OmniForConditionalGeneration

    from duplexd.actors.engines.qwen_omni.configs import omni_config
    from duplexd.actors.engines.qwen_omni.loading import fix_config, speaker_raw, synthetic_speakers
    from duplexd.actors.engines.qwen_omni.mel import StreamingMel, mel_filters
    from duplexd.actors.engines.qwen_omni.options import QWEN_SYSTEM_PROMPT
    from duplexd.actors.engines.qwen_omni.tokens import ChatTokens, word_tokenizer

    transformers.logging.set_verbosity_error()
    phase = results.data.setdefault("stock", {"levels": {}})
    size = "tiny" if args.tiny else "full"
    dev = torch.device("cpu" if args.tiny else "cuda:0")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    if args.tiny:
        torch.set_num_threads(1)
    t0 = time.monotonic()
    cfg = fix_config(omni_config(size))
    torch.manual_seed(0)
    with torch.device(dev):
        model = Qwen2_5OmniForConditionalGeneration._from_config(cfg, dtype=dtype)
    model.token2wav.float()
    model.eval()
    model.speaker_map = speaker_raw(synthetic_speakers(cfg, 0, torch.device("cpu")))  # random init has none
    phase["init_s"] = round(time.monotonic() - t0, 1)
    tok = ChatTokens(word_tokenizer(size), cfg.thinker_config)
    mel = StreamingMel(mel_filters())
    feats = np.concatenate([*mel.push(user_audio(0, args.user_s, 16000)), mel.flush()], axis=1)
    n_audio = ((feats.shape[1] - 1) // 2 + 1 - 2) // 2 + 1
    prompt = [*tok.header("system"), *tok.encode(QWEN_SYSTEM_PROMPT), *tok.footer(), *tok.header("user"),
              tok.audio_start, *[tok.audio] * n_audio, tok.audio_end, *tok.footer(), *tok.header("assistant")]
    num_embeds = int(cfg.token2wav_config.dit_config.num_embeds)
    vocab = int(cfg.talker_config.vocab_size)
    # Codes the DiT cannot embed (and the end tokens) are banned, as the engine suppresses them:
    # both paths then make exactly codec_tokens codes.
    banned = [[i] for i in range(num_embeds, vocab)]
    results.save()
    for n in args.counts[: args.stock_levels]:
        if time.monotonic() > args.deadline:
            phase["skipped_from"] = n
            break
        try:
            ids = torch.tensor([prompt] * n, device=dev)
            kwargs = dict(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                input_features=torch.from_numpy(feats)[None].repeat(n, 1, 1).to(dev, dtype),
                feature_attention_mask=torch.ones(n, feats.shape[1], dtype=torch.long, device=dev),
                speaker=sorted(model.speaker_map)[0],
                thinker_max_new_tokens=args.reply_tokens,
                thinker_min_new_tokens=args.reply_tokens,
                talker_max_new_tokens=args.codec_tokens,
                talker_bad_words_ids=banned,
            )
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t = time.monotonic()
            with torch.no_grad():
                _, wavs = model.generate(**kwargs)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            took = time.monotonic() - t
            wavs = [wavs] if isinstance(wavs, torch.Tensor) else wavs
            audio = float(np.mean([w.numel() / 24000 for w in wavs]))
            level = summarize([took] * n, [], [audio] * n, 0.0)
            level["call_s"] = round(took, 2)
            level["rtf"] = round(took / audio, 3) if audio else None  # < 1: faster than real time
            level["realtime_sessions"] = n if took <= audio else 0  # (all audio comes at the end anyway)
            phase["levels"][str(n)] = level
            print(f"stock    N={n:>3}: {json.dumps({k: v for k, v in level.items() if k != 'ttfa_ms'})}", flush=True)
        except Exception as exc:
            results.error(f"stock:N={n}", exc)
            if "out of memory" in str(exc).lower():
                break
        results.save()
    del model
    free_gpu()


# ---------------------------------------------------------------------- report
def table(results: Results, args: argparse.Namespace) -> str:
    from tests.bench.table import print_table

    d = results.data
    ours = d.get("duplexd", {}).get("levels", {})
    stock = d.get("stock", {}).get("levels", {})
    gpu = ", ".join(g["name"] for g in d.get("env", {}).get("gpus", [])) or "CPU"
    rows = []
    for n in args.counts:
        o, s = ours.get(str(n), {}), stock.get(str(n), {})
        st = o.get("steps", {})
        ratio = ""
        if o.get("first_audio_p50_ms") and s.get("first_audio_p50_ms"):
            ratio = f"{s['first_audio_p50_ms'] / o['first_audio_p50_ms']:.1f}x"
        rows.append([
            str(n),
            f"{o.get('first_audio_p50_ms', '-')} / {o.get('first_audio_p99_ms', '-')}",
            f"{s.get('first_audio_p50_ms', '-')}",
            ratio,
            f"{o.get('realtime_responses', '-')}/{o.get('responses', '-')}",
            f"{o.get('max_lateness_ms', '-')}",
            f"{st.get('stage0_decode_ms', '-')}",
            f"{st.get('stage1_decode_ms', '-')}",
            f"{st.get('stage1_token2wav_ms', '-')} ({st.get('stage1_token2wav_rows', '-')})",
        ])
    rt = [n for n in args.counts if ours.get(str(n), {}).get("all_realtime")]
    title = (f"qwen-omni on {gpu} [{args.placement}, {d.get('duplexd', {}).get('mode', '?')}] — "
             f"{d['note']}; replies {args.reply_tokens} text / {args.codec_tokens} codec tokens")
    header = ["sessions", "first audio p50/p99 ms", "stock generate() ms", "stock/ours", "real-time replies",
              "max lateness ms", "thinker decode ms", "talker decode ms", "token2wav ms (rows)"]
    print_table(title, header, rows)
    line = f"largest session count with every reply real-time: {max(rt) if rt else 'none'} (of {args.counts})"
    print(line, flush=True)
    d["largest_realtime_sessions"] = max(rt) if rt else 0
    results.save()
    return line


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("qwen_omni_bench.json"))
    p.add_argument("--tiny", action="store_true", help="tiny config on the CPU (script check)")
    p.add_argument("--placement", choices=("single", "split"), default="single",
                   help="split: stage0 on cuda:0, stage1 on cuda:1")
    p.add_argument("--mode", choices=("auto", "processes", "inproc"), default="auto")
    p.add_argument("--counts", type=lambda s: [int(x) for x in s.split(",")], default=None)
    p.add_argument("--turns", type=int, default=2)
    p.add_argument("--user-s", type=float, default=2.0)
    p.add_argument("--reply-tokens", type=int, default=40)
    p.add_argument("--codec-tokens", type=int, default=250)
    p.add_argument("--jitter-ms", type=float, default=200.0)
    p.add_argument("--continuation-pace", type=float, default=0.25,
                   help="[host] continuation_pace: how often (x chunk_ms) the thinker's new text goes to the talker")
    p.add_argument("--stock-levels", type=int, default=4, help="how many of --counts the stock baseline runs")
    p.add_argument("--skip-stock", action="store_true")
    p.add_argument("--no-graphs", action="store_true")
    p.add_argument("--budget-s", type=float, default=420.0, help="stop starting new levels after this long")
    args = p.parse_args(argv)
    if args.counts is None:
        args.counts = [1, 2] if args.tiny else [1, 4, 8, 16, 24, 32]
    if args.tiny:
        args.reply_tokens = min(args.reply_tokens, 8)
        args.codec_tokens = min(args.codec_tokens, 48)
        args.turns = min(args.turns, 1)
    args.deadline = time.monotonic() + args.budget_s
    how = bootstrap()
    results = Results(args.out, args)
    env = environment(args)
    env["duplexd_import"] = how
    results.data["env"] = env
    results.save()
    print(f"environment: {json.dumps(env)}", flush=True)
    if not args.tiny and not env.get("cuda"):
        results.error("env", RuntimeError("no CUDA device (use --tiny for the CPU check)"))
        return 2
    if args.placement == "split" and len(env.get("gpus", [])) < 2 and not args.tiny:
        results.error("env", RuntimeError("--placement split needs two GPUs"))
        return 2
    mode = args.mode
    if mode == "auto":
        mode = "inproc" if env["server_deps_missing"] else "processes"
        if env["server_deps_missing"]:
            print(f"server packages missing ({', '.join(env['server_deps_missing'])}): in-process mode", flush=True)
    try:
        if mode == "processes":
            asyncio.run(run_server_levels(args, results))
        else:
            run_inproc_levels(args, results)
    except Exception as exc:
        results.error(f"duplexd:{mode}", exc)
        if mode == "processes" and args.mode == "auto":
            print("falling back to the in-process mode", flush=True)
            try:
                run_inproc_levels(args, results)
            except Exception as exc2:
                results.error("duplexd:inproc", exc2)
    free_gpu()
    if not args.skip_stock:
        try:
            run_stock(args, results)
        except Exception as exc:
            results.error("stock", exc)
    table(results, args)
    print(f"results: {args.out}", flush=True)
    return 0 if not results.data["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
