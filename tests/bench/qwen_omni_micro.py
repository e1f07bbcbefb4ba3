"""Micro-profile of the qwen-omni engine (a child phase of ``gpu_qwen_omni``): where time goes.

Loads both stages in this process (as the server's stage0 and stage1 would, with the
same options), then, each bounded by the phase deadline and written to JSON at once:

1. ``init``: load and warm-up seconds per stage, every captured graph and its capture
   time, graph failures, the DiT field's check against transformers;
2. ``micro``: device times (CUDA events; wall clock on the CPU) of the thinker's prefill
   of a 2 s user turn, one thinker and one talker decode step at batch 1/8/16 (graph
   replay, and the eager step at batch 1), one token2wav chunk (DiT per window length,
   BigVGAN) at batch 1/8, a thinker step while a DiT call runs beside it, and the DiT in
   bfloat16 against float32;
3. ``timeline``: one reply at one session, both engines stepped in this process: when
   the turn's end was processed, the first reply token, the talker's start, the codec
   tokens of the first chunk, the first token2wav call and the first audio;
4. ``inproc``: end of user turn → first audio at each session count, both engines
   stepped in this process (no bus, no second process on the GPU): the comparison for
   the server's numbers.
"""

from __future__ import annotations

import faulthandler
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


class PhaseOut:
    """A child phase's results, written to its JSON file after every change."""

    def __init__(self, path: Path, deadline: float) -> None:
        self.path = path
        self.deadline = deadline  # time.time() by which the phase must have ended
        self.data: dict[str, Any] = {"errors": []}
        self.save()

    def left(self) -> float:
        return self.deadline - time.time()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.path)

    def error(self, what: str, exc: BaseException) -> None:
        self.data["errors"].append({"phase": what, "error": f"{type(exc).__name__}: {exc}",
                                    "traceback": traceback.format_exc()[-3000:]})
        print(f"!! {what} failed: {type(exc).__name__}: {exc}", flush=True)
        self.save()

    def put(self, section: str, key: str, value: Any) -> None:
        self.data.setdefault(section, {})[key] = value
        self.save()
        print(f"{section:>8} {key}: {json.dumps(value, default=str)}", flush=True)


def device_ms(fn: Callable[[], Any], reps: int, device: Any, warm: int = 1) -> dict[str, float]:
    """Median / min milliseconds per call of ``fn`` on the device's stream (CUDA events)."""
    import torch

    for _ in range(warm):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1000)
    return {"ms": round(statistics.median(times), 3), "min_ms": round(min(times), 3), "reps": reps}


def wall_ms(fn: Callable[[], Any], device: Any) -> float:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return round((time.perf_counter() - t0) * 1000, 3)


def graph_info(cache: Any) -> dict[str, Any]:
    return {
        "captured": len(cache),
        "capture_s": round(cache.capture_s, 2),
        "failures": {str(k): v for k, v in cache.failures.items()},
        "per_key_s": {str(k): round(v, 3) for k, v in cache.times.items()},
    }


# ---------------------------------------------------------------------- the phase
def run(args: Any) -> int:
    from tests.bench.gpu_qwen_omni import engine_options

    out = PhaseOut(Path(args.phase_out), args.phase_deadline)
    faulthandler.enable()
    import msgspec
    import torch

    from duplexd.actors.engines.qwen_omni.options import QwenOmniOptions
    from duplexd.actors.engines.qwen_omni.talker import QwenOmniTalker
    from duplexd.actors.engines.qwen_omni.thinker import QwenOmniThinker

    opts = msgspec.convert(engine_options(args), QwenOmniOptions)
    t0 = time.monotonic()
    th, tk = QwenOmniThinker(opts), QwenOmniTalker(opts)
    init: dict[str, Any] = {}
    try:
        th.load()
        init["thinker_load_s"] = round(time.monotonic() - t0, 2)
        t1 = time.monotonic()
        th.warm_up()
        init["thinker_warm_up_s"] = round(time.monotonic() - t1, 2)
        t1 = time.monotonic()
        tk.load()
        init["talker_load_s"] = round(time.monotonic() - t1, 2)
        t1 = time.monotonic()
        tk.warm_up()
        init["talker_warm_up_s"] = round(time.monotonic() - t1, 2)
    except Exception as exc:
        out.error("micro:load", exc)
        return 1
    init["init_s"] = round(time.monotonic() - t0, 2)
    init["graphs"] = {"thinker": graph_info(th.graphs), "talker": graph_info(tk.graphs),
                      "token2wav": graph_info(tk.t2w.graphs)}
    init["dit_field_check"] = tk.t2w.check_error
    init["dit_field_used"] = tk.t2w.field is not None
    init["t2w_windows_frames"] = [w * tk.t2w.repeats for w in tk.t2w.windows]
    if th.device.type == "cuda":
        init["gpu_memory_gib"] = round(torch.cuda.max_memory_allocated(th.device) / 2**30, 2)
    out.data["init"] = init
    out.save()
    print(f"    init {json.dumps({k: v for k, v in init.items() if k != 'graphs'})}", flush=True)
    for name, g in init["graphs"].items():
        print(f"    graphs {name}: {g['captured']} captured in {g['capture_s']} s, failures {len(g['failures'])}",
              flush=True)
    steps: list[tuple[str, Callable[[], None], float]] = [
        ("prefill", lambda: micro_prefill(th, tk, args, out), 15),
        ("decode", lambda: micro_decode(th, tk, out), 10),
        ("token2wav", lambda: micro_token2wav(tk, out), 15),
        ("contention", lambda: micro_contention(th, tk, out), 5),
        ("timeline", lambda: timeline(th, tk, args, out), 15),
        ("inproc", lambda: inproc_levels(th, tk, args, out), 20),
        ("dit_bf16", lambda: micro_dit_bf16(tk, out), 15),
    ]
    for name, fn, need in steps:
        if out.left() < need:
            out.data.setdefault("skipped", []).append(name)
            out.save()
            print(f"   micro {name}: skipped ({out.left():.0f} s left)", flush=True)
            continue
        try:
            fn()
        except Exception as exc:
            out.error(f"micro:{name}", exc)
    return 0


# ---------------------------------------------------------------------- thinker / talker steps
def micro_prefill(th: Any, tk: Any, args: Any, out: PhaseOut) -> None:
    """A 2 s user turn through the thinker's real path, twice (the second: shapes seen)."""
    import torch

    from duplexd.actors.engines.base import ThinkerInput
    from duplexd.bus.messages import ChunkKind, HistoryEntry, SessionConfig
    from tests.bench.gpu_qwen_omni import user_audio

    dev = th.device
    n = th.info.chunk_samples
    for attempt in ("cold", "warm"):
        sid = f"__micro_{attempt}__"
        th.open_session(sid, SessionConfig(turn_mode="manual"))
        audio = user_audio(7, args.user_s, 16000)
        chunks = [audio[i : i + n] for i in range(0, audio.size, n)]
        for i, c in enumerate(chunks[:-1]):
            th.step([ThinkerInput(sid, i, ChunkKind.UTTERANCE, c, True)])
        last = ThinkerInput(sid, len(chunks), ChunkKind.UTTERANCE_END, chunks[-1], True)
        end = wall_ms(lambda x=last: th.step([x]), dev)
        th.set_context(sid, (HistoryEntry("user", "", f"{sid}-u"),), "")
        unit = ThinkerInput(sid, 999, ChunkKind.CONTINUATION, np.zeros(n, np.float32), response_id="r")
        first = wall_ms(lambda x=unit: th.step([x]), dev)
        s = th._s[sid]
        out.put("micro", f"thinker_turn_end_{attempt}", {
            "turn_end_step_ms": end, "reply_start_step_ms": first, "prompt_positions": s.ctx.kv_len,
            "note": "wall ms of the stage0 step that ends a 2 s turn (tail window encode + prefill), then of "
                    "the step that opens the reply (template prefill + first token)"})
        th.close_session(sid)
    th._closed.clear()
    # The model calls alone, with device timing.
    window = th.window_frames
    feats = torch.randn(128, window, device=dev, dtype=th.dtype)
    lens = torch.tensor([window], device=dev)
    out.put("micro", "thinker_encoder_window", device_ms(
        lambda: th.audio_tower(input_features=feats, feature_lens=lens), 5, dev))
    for t in (64, 128):
        x = 0.02 * torch.randn(1, t, th.hidden, device=dev, dtype=th.dtype)
        slots, pos0, ln = (torch.tensor([v], device=dev) for v in (0, 0, t))
        out.put("micro", f"thinker_prefill_T{t}", device_ms(lambda x=x, s=slots, p=pos0, n=ln: th.dec.prefill(
            x, s, p, n), 5, dev))
    rows = 0.05 * torch.randn(1, 128, tk.embedding, device=tk.device, dtype=tk.dtype)
    slots, pos0, ln = (torch.tensor([v], device=tk.device) for v in (0, 0, 128))
    out.put("micro", "talker_prefill_T128", device_ms(lambda: tk.dec.prefill(tk.proj(rows), slots, pos0, ln), 5,
                                                     tk.device))


def micro_decode(th: Any, tk: Any, out: PhaseOut) -> None:
    """One decode step at batch 1/8/16: the graph replay, the eager step, and the host path
    around it (inputs to the device, sampling, the ids back)."""

    from duplexd.actors.engines.qwen_omni.decoder import bucket_for

    for name, eng, span0 in (("thinker", th, th.span_buckets[0]), ("talker", tk, tk.span_buckets[0])):
        dev = eng.device
        for b in sorted({1, 8, 16} & set(range(1, eng.opts.max_sessions + 1)) | {min(16, eng.opts.max_sessions)}):
            bb = bucket_for(b, eng.b_buckets)
            eng._pos[:bb] = 100
            eng._tok[:bb] = 5
            if name == "talker":
                eng._row[:bb] = 0.01
            key = (bb, span0)
            fn = eng._decode_fn(bb, span0)
            res = device_ms(lambda k=key, f=fn, e=eng: e.graphs.run(k, f), 20, dev)
            res["graph"] = key in eng.graphs
            if b == 1:
                res["eager_ms"] = device_ms(fn, 3, dev)["ms"]
            path = host_path(eng, key, fn, b, talker=name == "talker")
            res["step_with_sampling_wall_ms"] = round(statistics.median(wall_ms(path, dev) for _ in range(10)), 3)
            out.put("micro", f"{name}_decode_b{b}", res)
        big = (bucket_for(min(16, eng.opts.max_sessions), eng.b_buckets), eng.span_buckets[-1])
        fn = eng._decode_fn(*big)
        r = device_ms(lambda k=big, f=fn, e=eng: e.graphs.run(k, f), 10, dev)
        r["graph"] = big in eng.graphs
        out.put("micro", f"{name}_decode_b{big[0]}_span{big[1]}", r)
        eng._pos.fill_(eng.dec.max_len)


def host_path(eng: Any, key: Any, fn: Any, n: int, talker: bool) -> Callable[[], None]:
    """A decode step as the engine runs it: ids to the device, the graph, sampling, ids back."""
    import torch

    def step() -> None:
        eng._tok.copy_(torch.from_numpy(np.full(eng.opts.max_sessions, 5, np.int64)))
        logits = eng.graphs.run(key, fn)
        seen = eng._seen0[None].expand(n, -1) if talker else None
        eng.sampler(logits[torch.arange(n, device=eng.device)], [False] * n, [0.8] * n, [False] * n, seen)

    return step


def micro_token2wav(tk: Any, out: PhaseOut) -> None:
    """One token2wav call: the DiT per window length, BigVGAN, at batch 1 and 8."""
    from duplexd.actors.engines.qwen_omni.decoder import bucket_for
    from duplexd.actors.engines.qwen_omni.dit import reference_ode_mel

    t2w = tk.t2w
    dev = tk.device
    for b in sorted({1, min(8, tk.opts.max_sessions)}):
        bb = bucket_for(b, t2w.b_buckets)
        for w in t2w.windows:
            fr = w * t2w.repeats
            key = ("dit", bb, fr)
            f = t2w.dit_fn(bb, fr)
            r = device_ms(lambda k=key, f=f: t2w.graphs.run(k, f), 3, dev)
            r.update(graph=key in t2w.graphs, frames=fr, codec_tokens=w)
            out.put("micro", f"dit_b{b}_frames{fr}", r)
        key = ("voc", bb)
        f = t2w.voc_fn(bb)
        r = device_ms(lambda k=key, f=f: t2w.graphs.run(k, f), 3, dev)
        r.update(graph=key in t2w.graphs, mel_frames=t2w.vframes)
        out.put("micro", f"vocoder_b{b}", r)
    fr = t2w.windows[0] * t2w.repeats
    out.put("micro", f"dit_b1_frames{fr}_eager", device_ms(t2w.dit_fn(1, fr), 1, dev, warm=0))
    if out.left() > 10:
        half = t2w._ecapa.shape[0] // 2
        ec = t2w._ecapa[[0, half]]
        args = (t2w._noise[:1, :fr], t2w._code[:1, : fr // t2w.repeats], t2w._spk[:1], ec, t2w._bid[:1, :fr])
        r = device_ms(lambda: reference_ode_mel(t2w.dit, *args, t2w.steps, t2w.guidance, t2w.sway), 1, dev, warm=0)
        r["note"] = "the DiT through the transformers layers, eagerly (what the field replaces)"
        out.put("micro", f"dit_b1_frames{fr}_eager_reference", r)


def micro_contention(th: Any, tk: Any, out: PhaseOut) -> None:
    """A thinker decode step while a DiT call runs on token2wav's stream (one process, one GPU)."""
    import torch

    if th.device.type != "cuda" or th.device != tk.device:
        out.put("micro", "contention", {"skipped": "needs both stages on one CUDA device"})
        return
    from duplexd.actors.engines.qwen_omni.decoder import bucket_for

    t2w = tk.t2w
    b = bucket_for(min(8, tk.opts.max_sessions), t2w.b_buckets)
    fr = t2w.frames
    dit_key = ("dit", b, fr)
    key = (1, th.span_buckets[0])
    th._pos[:1] = 100
    fn = th._decode_fn(*key)
    solo = device_ms(lambda: th.graphs.run(key, fn), 10, th.device)
    torch.cuda.synchronize()
    d0, d1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.cuda.stream(t2w.stream):
        d0.record()
        t2w.graphs.run(dit_key, t2w.dit_fn(b, fr))
        d1.record()
    times = []
    for _ in range(10):
        a, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        th.graphs.run(key, fn)
        e.record()
        e.synchronize()
        times.append(a.elapsed_time(e))
    torch.cuda.synchronize()
    th._pos.fill_(th.dec.max_len)
    out.put("micro", "contention", {
        "thinker_decode_alone_ms": solo["ms"], "thinker_decode_beside_dit_ms": round(statistics.median(times), 3),
        "dit_batch": b, "dit_ms_with_thinker_beside": round(d0.elapsed_time(d1), 3)})


def micro_dit_bf16(tk: Any, out: PhaseOut) -> None:
    """The DiT in bfloat16 (the release runs it in float32): time and difference to float32."""
    import copy

    import torch

    from duplexd.actors.engines.qwen_omni.dit import DiTField
    from duplexd.actors.engines.qwen_omni.graphs import GraphCache

    t2w = tk.t2w
    dev = tk.device
    if t2w.dtype != torch.float32:
        out.put("micro", "dit_bf16", {"skipped": f"token2wav already runs in {t2w.dtype}"})
        return
    dit16 = copy.deepcopy(t2w.dit).to(torch.bfloat16)
    field16 = DiTField(dit16, t2w.steps, t2w.sway, t2w.guidance)
    res: dict[str, Any] = {"field_check": field16.check()}
    cache = GraphCache(dev, tk.opts.cuda_graphs, "dit-bf16")
    fr = t2w.frames
    g = torch.Generator(device="cpu").manual_seed(3)
    for b in sorted({1, min(8, tk.opts.max_sessions)}):
        noise = torch.randn(b, fr, t2w.mel_dim, generator=g).to(dev)
        code = torch.randint(0, t2w.num_embeds, (b, fr // t2w.repeats), generator=g).to(dev)
        spk = 0.1 * torch.randn(b, t2w._spk.shape[1], generator=g).to(dev)
        ec = 0.1 * torch.randn(2 * b, t2w._ecapa.shape[1], generator=g).to(dev)
        bid = (torch.arange(fr, device=dev) // t2w.block)[None].expand(b, fr).contiguous()
        ins16 = [t.to(torch.bfloat16) if t.is_floating_point() else t for t in (noise, code, spk, ec, bid)]
        fn = ode_fn(field16, ins16)
        cache.capture(b, fn)
        r = device_ms(lambda k=b, f=fn: cache.run(k, f), 3, dev)
        ref = (t2w.field or DiTField(t2w.dit, t2w.steps, t2w.sway, t2w.guidance)).ode(noise, code, spk, ec, bid)
        got = field16.ode(*ins16).float()
        r["rel_diff_to_fp32"] = round(float((got - ref).abs().max() / ref.abs().max()), 4)
        r["graph"] = b in cache
        res[f"b{b}"] = r
    out.put("micro", f"dit_bf16_frames{fr}", res)


def ode_fn(field: Any, inputs: list[Any]) -> Callable[[], Any]:
    return lambda: field.ode(*inputs)


# ---------------------------------------------------------------------- one reply, step by step
def timeline(th: Any, tk: Any, args: Any, out: PhaseOut) -> None:
    """One session's reply with both engines stepped here, every milestone timed from the
    step that ends the user's turn."""
    from duplexd.actors.engines.base import TalkerInput, ThinkerInput
    from duplexd.bus.messages import Action, ChunkKind, HistoryEntry, SessionConfig
    from tests.bench.gpu_qwen_omni import user_audio

    sid = "__timeline__"
    n = th.info.chunk_samples
    th.open_session(sid, SessionConfig(turn_mode="manual"))
    tk.open_session(sid, SessionConfig(turn_mode="manual"))
    audio = user_audio(11, args.user_s, 16000)
    chunks = [audio[i : i + n] for i in range(0, audio.size, n)]
    for i, c in enumerate(chunks[:-1]):
        th.step([ThinkerInput(sid, i, ChunkKind.UTTERANCE, c, True)])
    marks: dict[str, float] = {}
    t0 = time.perf_counter()

    def mark(name: str) -> None:
        if name not in marks:
            marks[name] = round((time.perf_counter() - t0) * 1000, 1)

    th.step([ThinkerInput(sid, len(chunks), ChunkKind.UTTERANCE_END, chunks[-1], True)])
    th.set_context(sid, (HistoryEntry("user", "", "tl-u"),), "")
    mark("turn_end_processed")
    need = tk.t2w.first + tk.t2w.la
    calls0 = tk.t2w.calls
    seq = 10_000
    deadline = time.monotonic() + min(30.0, out.left() - 5)
    while time.monotonic() < deadline:
        seq += 1
        o = th.step([ThinkerInput(sid, seq, ChunkKind.CONTINUATION, np.zeros(n, np.float32), response_id="tl")])[0]
        s = th._s[sid]
        if s.reply is not None and s.reply.body:
            mark("first_reply_token")
        if o.action == Action.SPEAK or o.end_of_turn:
            mark("first_handoff")
            tk.feed(sid, TalkerInput(o.text, o.end_of_turn, o.tokens, o.hidden, turn_key="tl"))
        if not tk.pending(sid):
            continue
        c = tk.step([sid])[0]
        turn = tk._turns.get(sid)
        if turn is not None and turn.started:
            mark("talker_prefilled")
        if turn is not None and len(turn.codes) >= tk.t2w.first:
            mark(f"codec_{tk.t2w.first}")
        if turn is not None and len(turn.codes) >= need:
            mark(f"codec_{need}")
            marks.setdefault("thinker_tokens_at_first_chunk", len(s.reply.body) if s.reply is not None else 0)
        if tk.t2w.calls > calls0:
            mark("token2wav_launched")
        if c is not None and c.pcm.size:
            mark("first_audio")
            break
    th.close_session(sid)
    tk.close_session(sid)
    th._closed.clear()
    out.put("timeline", "n1", {**marks, "note": "ms from the start of the step that ends a 2 s user turn; "
                                                 "one session, both engines in one process"})


# ---------------------------------------------------------------------- end to end, in this process
def inproc_levels(th: Any, tk: Any, args: Any, out: PhaseOut) -> None:
    """N sessions commit at once; both engines stepped here. One turn per level."""
    from duplexd.actors.engines.base import TalkerInput, ThinkerInput
    from duplexd.bus.messages import Action, ChunkKind, HistoryEntry, SessionConfig
    from duplexd.bus.metrics import REGISTRY
    from tests.bench.gpu_qwen_omni import lateness, parse_metrics, step_means, summarize, user_audio

    def metrics() -> dict:
        from prometheus_client import generate_latest

        return parse_metrics(generate_latest(REGISTRY).decode())

    chunk = th.info.chunk_samples
    levels = out.data.setdefault("inproc", {"levels": {}})["levels"]
    for n in args.counts:
        if out.left() < 12:
            out.data["inproc"]["skipped_from"] = n
            out.save()
            break
        cap = min(45.0, out.left() - 6)
        sids = [f"b{n}-{i}" for i in range(n)]
        before = metrics()
        try:
            for s in sids:
                th.open_session(s, SessionConfig(turn_mode="manual"))
                tk.open_session(s, SessionConfig(turn_mode="manual"))
            audios = [user_audio(1000 + i, args.user_s, 16000) for i in range(n)]
            parts = [[a[j : j + chunk] for j in range(0, a.size, chunk)] for a in audios]
            for j in range(len(parts[0]) - 1):
                th.step([ThinkerInput(s, j, ChunkKind.UTTERANCE, p[j], True) for s, p in zip(sids, parts, strict=True)])
            t_commit = time.monotonic()
            th.step([ThinkerInput(s, len(p), ChunkKind.UTTERANCE_END, p[-1], True) for s, p in zip(sids, parts,
                                                                                                   strict=True)])
            for s in sids:
                th.set_context(s, (HistoryEntry("user", "", f"{s}-u"),), "")
            frames: dict[str, list[tuple[float, int, int]]] = {s: [] for s in sids}
            made = dict.fromkeys(sids, 0)
            done: set[str] = set()
            seq, last_progress = 10_000, time.monotonic()
            stalled = ""
            while len(done) < n:
                now = time.monotonic()
                if now - t_commit > cap:
                    stalled = f"level cap {cap:.0f} s reached"
                    break
                if now - last_progress > 20:
                    stalled = "no progress for 20 s"
                    break
                faulthandler.dump_traceback_later(40, exit=False)  # a step that blocks: show where
                seq += 1
                batch = [ThinkerInput(s, seq, ChunkKind.CONTINUATION, np.zeros(chunk, np.float32), response_id="r")
                         for s in sids]
                for s, o in zip(sids, th.step(batch), strict=True):
                    if o.action == Action.SPEAK or o.end_of_turn:
                        tk.feed(s, TalkerInput(o.text, o.end_of_turn, o.tokens, o.hidden, turn_key="r"))
                        last_progress = now
                pend = [s for s in sids if s not in done and tk.pending(s)]
                if not pend:
                    time.sleep(0.0005)
                    continue
                for s, c in zip(pend, tk.step(pend), strict=True):
                    if c is None:
                        continue
                    last_progress = now
                    if c.pcm.size:
                        frames[s].append((time.monotonic(), made[s] * 1000 // 24000, c.pcm.size))
                        made[s] += c.pcm.size
                    if c.end_of_turn:
                        done.add(s)
            ttfa = [fr[0][0] - t_commit for fr in frames.values() if fr]
            late = [lateness(fr, args.jitter_ms / 1000) for fr in frames.values() if fr]
            level = summarize(ttfa, late, [made[s] / 24000 for s in sids if frames[s]], args.jitter_ms / 1000)
            level["realtime_sessions"] = n if level.get("all_realtime") and len(done) == n else 0
            level["finished"] = len(done)
            level["wall_s"] = round(time.monotonic() - t_commit, 2)
            level["steps"] = step_means(before, metrics())
            if stalled:
                level["stalled"] = stalled
                level["state"] = engine_state(th, tk, sids)
            levels[str(n)] = level
            out.save()
            print(f"  inproc N={n:>3}: {json.dumps({k: v for k, v in level.items() if k not in ('ttfa_ms', 'state')})}",
                  flush=True)
        except Exception as exc:
            out.error(f"inproc:N={n}", exc)
        finally:
            faulthandler.cancel_dump_traceback_later()
            for s in sids:
                th.close_session(s)
                tk.close_session(s)
            th._closed.clear()


def engine_state(th: Any, tk: Any, sids: list[str]) -> dict[str, Any]:
    """What each session's reply looks like in both engines (for a level that stalled)."""
    res: dict[str, Any] = {"t2w_busy": tk.t2w.busy, "t2w_calls": tk.t2w.calls}
    for s in sids:
        ts, tt = th._s.get(s), tk._turns.get(s)
        r = ts.reply if ts is not None else None
        res[s] = {
            "thinker": None if r is None else {"body": len(r.body), "complete": r.complete, "eot_sent": ts.eot_sent,
                                               "next_token": ts.next_token, "unsent": len(ts.unsent)},
            "talker": None if tt is None else {"rows": len(tt.rows), "started": tt.started, "codes": len(tt.codes),
                                               "codec_done": tt.codec_done, "coded": tt.coded,
                                               "inflight": tt.inflight, "audio": len(tt.audio),
                                               "thinker_done": tt.thinker_done, "flushed": tt.flushed},
        }
    return res


if __name__ == "__main__":  # pragma: no cover - run through gpu_qwen_omni --phase micro
    sys.exit("run: python -m tests.bench.gpu_qwen_omni")
