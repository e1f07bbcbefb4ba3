"""Stage0 of qwen-omni: the Qwen2.5-Omni thinker, streaming, batched, with a KV lease.

Per step, for all sessions with work together:

1. input chunks update each session: user audio goes into a streaming log-mel
   (:mod:`mel`) that releases 2 s encoder windows as they complete; the end of a user
   turn releases the tail window; a CONTINUATION unit (turn modes) or the engine's own
   endpointing (duplex) opens a reply;
2. one audio-encoder call encodes every completed window of every session;
3. one prefill writes every session's new positions into its KV slot (audio tokens as
   they are encoded, so a turn's end costs only its tail window and the template);
4. one decode step feeds every generating reply its next token (a CUDA graph per
   batch/length bucket on GPU);
5. each chunk gets its decision: a speak carries the reply's new rows for the talker
   (:mod:`handoff`): the prompt's hidden rows on a reply's first unit, then one row
   per fed token.

Replies keep generating between chunks (background steps), so text never waits for the
pacing of CONTINUATION units. Each session leases a KV slot (:mod:`lease`); the slot's
content follows the committed history (:mod:`context`): after a barge-in, the reply's
unheard tokens leave the context when the cut history arrives.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from duplexd.actors.engines.base import EngineError, Thinker, ThinkerInput, ThinkerOutput
from duplexd.actors.engines.qwen_omni import handoff as hf
from duplexd.actors.engines.qwen_omni.context import Context, map_audio
from duplexd.actors.engines.qwen_omni.duplex_endpointing import feed_vad, ring_audio
from duplexd.actors.engines.qwen_omni.lease import LeaseTable, NoSlotFree, lease_report
from duplexd.actors.engines.qwen_omni.mel import RATE, StreamingMel, mel_filters, tokens_for_frames
from duplexd.actors.engines.qwen_omni.metrics import (
    GRAPHS,
    LEASE_RELEASES,
    LEASE_TOKENS,
    MODEL_BATCH,
    MODEL_STEP,
    ROLLBACK_TOKENS,
    ROLLBACKS,
    forget_lease_series,
    show_slots,
)
from duplexd.actors.engines.qwen_omni.options import QwenOmniOptions
from duplexd.actors.engines.qwen_omni.prefill_plan import plan_prefill
from duplexd.actors.engines.qwen_omni.thinker_session import ThinkerSession
from duplexd.bus.log import get_logger, log
from duplexd.bus.messages import Action, ChunkKind, EngineInfo, HistoryEntry, KvLease, SessionConfig

_log = get_logger(__name__)


class QwenOmniThinker(Thinker):
    """The thinker stage (see module docstring)."""

    def __init__(self, opts: QwenOmniOptions) -> None:
        self.opts = opts
        self.info = EngineInfo(
            name="qwen-omni", input_rate=RATE, chunk_samples=RATE * opts.chunk_ms // 1000
        )
        self._s: dict[str, ThinkerSession] = {}
        self._closed: list[KvLease] = []
        self.leases = LeaseTable(opts.max_sessions)
        self._loaded = False

    # ================================================================== loading
    def load(self) -> None:
        import torch

        from duplexd.actors.engines.qwen_omni.decoder import DecoderShape, SlotDecoder, buckets
        from duplexd.actors.engines.qwen_omni.graphs import GraphCache
        from duplexd.actors.engines.qwen_omni.loading import (
            load_config,
            load_speakers,
            load_thinker,
            load_tokens,
            resolve_device,
            resolve_dtype,
            set_threads,
        )
        from duplexd.actors.engines.qwen_omni.sampling import Sampler

        o = self.opts
        self.torch = torch
        self.device = resolve_device(o.stage0_device)
        set_threads(o, self.device)
        self.dtype = resolve_dtype(o.dtype, self.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        torch.set_grad_enabled(False)
        config = load_config(o)
        self.tok = load_tokens(o, config)
        self.speakers = load_speakers(o, config, torch.device("cpu"))
        parts = load_thinker(o, config, self.device, self.dtype)
        self.parts = parts
        self.audio_tower = parts.audio
        self.embed = parts.text.embed_tokens
        self.lm_head = parts.lm_head
        shape = DecoderShape.of(config.thinker_config.text_config)
        self.hidden = shape.hidden
        self.vocab = int(config.thinker_config.text_config.vocab_size)
        n_window = int(config.thinker_config.audio_config.n_window)
        self.window_frames = 2 * n_window
        self.filters = mel_filters()
        L = o.max_context
        self.dec = SlotDecoder(parts.text.layers, parts.text.norm, shape, o.max_sessions, L, self.device, self.dtype)
        # The talker's per-position input (last hidden + embedding), kept for every slot position.
        self.rows = torch.zeros(o.max_sessions, L + 1, shape.hidden, device=self.device, dtype=self.dtype)
        self.ids = np.zeros((o.max_sessions, L + 1), dtype=np.int32)
        self.sampler = Sampler(self.vocab, self.tok.suppress, list(self.tok.eos), self.device, o.top_k, o.top_p,
                               seed=o.seed)
        # System prompt + the longest user turn + a reply must fit: cap the user turn to it.
        system_len = len(self.tok.encode(o.system_prompt)) + 8
        room = L - o.max_reply_tokens - system_len - 16
        if room < 64:
            raise ValueError(f"max_context {L} leaves no room for a user turn beside {o.max_reply_tokens} reply tokens")
        self.max_audio_tokens = min(int(25 * o.max_user_turn_s), room)
        # Special rows every reply's first unit carries: each speaker's text start, text end, pad.
        names = sorted(self.speakers)
        tcfg = config.talker_config
        special_ids = [self.speakers[n].bos_token for n in names]
        special_ids += [int(tcfg.tts_text_end_token_id), int(tcfg.tts_text_pad_token_id)]
        emb = self.embed(torch.tensor(special_ids, device=self.device))
        self.special_rows = hf.to_wire(emb)
        roles = [hf.SPEAKER_BOS] * len(names) + [hf.TEXT_EOS, hf.TEXT_PAD]
        index = list(range(len(names))) + [0, 0]
        self.special_tokens = np.array(
            [[t, i, r, 0] for t, i, r in zip(special_ids, index, roles, strict=True)], dtype=np.int32
        )
        # Decode step: rows = slots 0..B-1, static inputs, one graph per (B, span) bucket.
        self._tok = torch.zeros(o.max_sessions, dtype=torch.long, device=self.device)
        self._pos = torch.full((o.max_sessions,), L, dtype=torch.long, device=self.device)
        self.b_buckets = buckets(o.max_sessions)
        self.span_buckets = buckets(L, start=min(256, L))
        self.graphs = GraphCache(self.device, o.cuda_graphs, "thinker-decode")
        self._loaded = True
        show_slots(0, o.max_sessions)
        log(_log, logging.INFO, "qwen-omni thinker loaded", device=str(self.device), slots=o.max_sessions,
            max_context=L, kv_cache_mb=round(self.dec.cache_bytes / 2**20, 1), speakers=",".join(names))

    def warm_up(self) -> None:
        if not self.opts.warm_up:
            return
        t0 = time.perf_counter()
        if self.graphs.enabled:
            n = 0
            for b in self.b_buckets:
                for span in self.span_buckets:
                    self.graphs.capture((b, span), self._decode_fn(b, span))
                    n += 1
            GRAPHS.labels(stage="stage0", state="captured").set(len(self.graphs))
            GRAPHS.labels(stage="stage0", state="failed").set(int(bool(self.graphs.failed)))
            log(_log, logging.INFO, "qwen-omni thinker graphs captured", graphs=len(self.graphs), of=n,
                capture_s=round(self.graphs.capture_s, 2), failed=self.graphs.failed or None)
        self._throwaway_turn(lambda j, s: setattr(s, "max_tokens", min(s.max_tokens, 4)))
        log(_log, logging.INFO, "qwen-omni thinker warm", warm_up_s=round(time.perf_counter() - t0, 2))

    def _throwaway_turn(self, each_step: Callable[[int, ThinkerSession], object]) -> None:
        """One throwaway turn through every phase (mel, encoder, prefill, decode, handoff rows);
        ``each_step`` runs after every reply step (j, the session)."""
        sid = "__warm_up__"
        self.open_session(sid, SessionConfig())
        s = self._s[sid]
        rng = np.random.default_rng(0)
        audio = (0.05 * rng.standard_normal(int(RATE * 2.3))).astype(np.float32)
        n = self.info.chunk_samples
        chunks = [audio[i : i + n] for i in range(0, audio.size - n + 1, n)]
        for i, c in enumerate(chunks):
            kind = ChunkKind.UTTERANCE_END if i == len(chunks) - 1 else ChunkKind.UTTERANCE
            self.step([ThinkerInput(sid, i, kind, c, force_listen=True)])
        for j in range(64):
            out = self.step([ThinkerInput(sid, 100 + j, ChunkKind.CONTINUATION, np.zeros(n, np.float32),
                                          response_id="warm")])[0]
            each_step(j, s)
            if out.end_of_turn or (s.reply is not None and s.reply.complete and s.eot_sent):
                break
        self.close_session(sid)
        self._closed.clear()

    # ================================================================== sessions
    def open_session(self, session_id: str, config: SessionConfig) -> None:
        if session_id in self._s:
            self._s[session_id].config = config
            return
        o = self.opts
        ctx = Context(self.tok, config.instructions or o.system_prompt, o.max_context, o.max_reply_tokens + 8)
        s = self._s[session_id] = ThinkerSession(session_id, config, ctx)
        self.leases.add(session_id, time.monotonic())
        try:
            self._lease(s, time.monotonic())  # the lease is taken at open
        except EngineError:
            self.leases.remove(session_id)
            del self._s[session_id]
            raise

    def update_session(self, session_id: str, config: SessionConfig) -> None:
        s = self._s.get(session_id)
        if s is not None:
            s.config = config

    def close_session(self, session_id: str) -> None:
        s = self._s.pop(session_id, None)
        if s is None:
            return
        lease = self.leases.leases.get(session_id)
        slot = lease.slot if lease else None
        self.leases.remove(session_id)
        if slot is not None:
            forget_lease_series(session_id, slot)
            LEASE_RELEASES.labels(reason="closed").inc()
        show_slots(self.leases.used, self.leases.slots)
        self._closed.append(KvLease(session_id, "closed", turns=len(s.ctx.turns), rollbacks=s.ctx.rollbacks,
                                    dropped_tokens=s.ctx.dropped, evicted_turns=s.ctx.evicted_turns))

    def set_context(self, session_id: str, history: tuple[HistoryEntry, ...], instructions: str) -> None:
        s = self._s.get(session_id)
        if s is None:
            return
        before_r, before_d = s.ctx.rollbacks, s.ctx.dropped
        s.ctx.reconcile(history, instructions)
        if s.ctx.rollbacks > before_r:
            ROLLBACKS.inc(s.ctx.rollbacks - before_r)
        if s.ctx.dropped > before_d:
            ROLLBACK_TOKENS.inc(s.ctx.dropped - before_d)
        self._park_evicted(s)
        r = s.reply
        if r is not None and r.complete:
            s.next_token = None  # the host ended its response: stop generating
        if r is not None and r not in s.ctx.turns:
            s.reply, s.next_token = None, None

    def discard_pending(self, session_id: str) -> None:
        s = self._s.get(session_id)
        if s is None:
            return
        r = s.reply
        if r is not None:
            if not r.complete:
                r.complete = True
                s.next_token = None
            s.dead.append(r.key)
            s.unsent.clear()
            s.extra_text = ""
            s.eot_sent = True

    # ================================================================== leases
    def _busy(self, s: ThinkerSession) -> bool:
        r = s.reply
        return bool(s.windows) or (r is not None and not r.complete) or (s.audio_turn is not None)

    def _lease(self, s: ThinkerSession, now: float) -> None:
        lease = self.leases.leases[s.sid]
        had = lease.slot
        try:
            slot, victim = self.leases.acquire(s.sid, now, lambda sid: not self._busy(self._s[sid]))
        except NoSlotFree as exc:
            raise EngineError(str(exc), s.sid, "kv_capacity") from exc
        if victim is not None:
            v = self._s[victim]
            self._release(v, "evicted", slot)
        if had is None:
            s.ctx.forget_slot()
            for t in s.ctx.turns:
                map_audio(t, lambda a: a.to(self.device))
            show_slots(self.leases.used, self.leases.slots)

    def _release(self, s: ThinkerSession, reason: str, slot: int | None = None) -> None:
        """The session's slot was given back (``slot``: the one it held, when already freed)."""
        lease = self.leases.leases[s.sid]
        held = lease.slot if lease.slot is not None else slot
        self.leases.release(s.sid)
        s.ctx.forget_slot()
        for t in s.ctx.turns:
            map_audio(t, lambda a: a.cpu())
        if held is not None:
            forget_lease_series(s.sid, held)
        LEASE_RELEASES.labels(reason=reason).inc()
        show_slots(self.leases.used, self.leases.slots)
        log(_log, logging.INFO, "kv lease released", session_id=s.sid, reason=reason, turns=len(s.ctx.turns))

    def _park_evicted(self, s: ThinkerSession) -> None:
        for t in s.ctx.evicted:
            map_audio(t, lambda a: a.cpu())
        s.ctx.evicted.clear()

    def lease_updates(self) -> list[KvLease]:
        out, self._closed = self._closed, []
        now = time.monotonic()
        for s in self._s.values():
            lease = self.leases.leases[s.sid]
            if s.sid.startswith("__"):
                continue
            if lease.slot is not None:
                LEASE_TOKENS.labels(session_id=s.sid, slot=str(lease.slot)).set(s.ctx.kv_len)
            key, report = lease_report(lease, s.ctx, self.opts.max_context, self._busy(s), now)
            if key != s.reported:  # when the lease changes, not per token
                s.reported = key
                out.append(report)
        return out

    def next_due_s(self) -> float | None:
        idle = self.opts.lease_idle_s
        if idle <= 0:
            return None
        held = [x.last_used for x in self.leases.leases.values() if x.slot is not None]
        return max(0.0, min(held) + idle - time.monotonic()) if held else None

    def _expire(self, now: float) -> None:
        for sid in self.leases.idle(now, self.opts.lease_idle_s):
            s = self._s[sid]
            if self._busy(s):
                self.leases.leases[sid].last_used = now
            else:
                self._release(s, "idle")

    # ================================================================== the step
    def has_background_work(self) -> bool:
        if self.next_due_s() == 0.0:
            return True
        for s in self._s.values():
            if self.leases.leases[s.sid].slot is None:
                continue
            if s.windows or self._can_decode(s) or s.ctx.sync()[1]:
                return True
        return False

    def step(self, batch: list[ThinkerInput]) -> list[ThinkerOutput]:
        now = time.monotonic()
        # Fail first, change after: stage0 re-steps the rest of a batch after an EngineError.
        for x in batch:
            s = self._s.get(x.session_id)
            if s is None:
                raise EngineError("session is not open in stage0", x.session_id, "session_not_open")
            if s.error:
                msg, s.error = s.error, ""
                raise EngineError(msg, x.session_id, "engine_error")
            self._lease(s, now)
        for x in batch:
            self._consume(self._s[x.session_id], x)
        try:
            self._model_work()
        except Exception as exc:
            log(_log, logging.ERROR, "thinker model step failed", exc_info=True)
            for s in self._s.values():
                if s.reply is not None and not s.reply.complete:
                    s.reply.complete = True
                    s.next_token = None
                    s.dead.append(s.reply.key)
                    s.error = f"{type(exc).__name__}: {exc}"
            raise
        outs = [self._decide(self._s[x.session_id], x) for x in batch]
        self._expire(now)
        return outs

    # ------------------------------------------------------------------ inputs
    def _consume(self, s: ThinkerSession, x: ThinkerInput) -> None:
        if x.kind in (ChunkKind.UTTERANCE, ChunkKind.UTTERANCE_END):
            self._hear(s, x.pcm)
            if x.kind == ChunkKind.UTTERANCE_END:
                self._end_turn(s)
        elif x.kind == ChunkKind.CONTINUATION:
            if not x.force_listen and x.response_id not in s.dead:
                r = s.reply
                if r is None or r.key != x.response_id:
                    self._start_reply(s, x.response_id)
        else:
            self._live(s, x)

    def _hear(self, s: ThinkerSession, pcm: np.ndarray) -> None:
        """Audio of the user's turn: opens it if needed, releases completed windows."""
        if s.audio_turn is None:
            s.audio_turn = s.ctx.open_audio()
            max_samples = self.max_audio_tokens * RATE // 25
            s.mel = StreamingMel(self.filters, self.window_frames, max_samples)
            s.closing = False
        assert s.mel is not None
        s.windows += s.mel.push(pcm)

    def _end_turn(self, s: ThinkerSession) -> None:
        if s.audio_turn is None or s.mel is None:
            return
        tail = s.mel.flush()
        if tokens_for_frames(tail.shape[1]) > 0:
            s.windows.append(tail)
        s.closing = True
        s.mel = None
        if not s.windows:
            self._close_audio(s)

    def _close_audio(self, s: ThinkerSession) -> None:
        if s.audio_turn is not None:
            s.audio_turn.complete = True
        s.audio_turn, s.closing = None, False

    def _start_reply(self, s: ThinkerSession, key: str) -> None:
        r = s.reply
        if r is not None and not r.complete:
            r.complete = True  # a reply for another response: that one is over
        if s.audio_turn is not None:
            self._end_turn(s)
        s.reply = s.ctx.open_reply(key)
        limit = s.config.max_output_tokens
        s.max_tokens = min(self.opts.max_reply_tokens, limit) if limit else self.opts.max_reply_tokens
        s.next_token = None
        s.sent_context = s.spoke = s.eot_sent = False
        s.unsent.clear()
        s.extra_text = ""
        s.spoken_ms = 0.0

    # ------------------------------------------------------------------ model work
    def _model_work(self) -> None:
        active = [s for s in self._s.values() if self.leases.leases[s.sid].slot is not None]
        self._encode([s for s in active if s.windows])
        self._prefill(active)
        self._decode([s for s in active if self._can_decode(s)])

    def _encode(self, sessions: list[ThinkerSession]) -> None:
        if not sessions:
            return
        torch = self.torch
        t0 = time.perf_counter()
        windows = [(s, w) for s in sessions for w in s.windows]
        feats = np.concatenate([w for _, w in windows], axis=1)
        lens = [w.shape[1] for _, w in windows]
        out = self.audio_tower(
            input_features=torch.from_numpy(feats).to(self.device, self.dtype),
            feature_lens=torch.tensor(lens, dtype=torch.long, device=self.device),
        ).last_hidden_state
        start = 0
        for (s, _), frames in zip(windows, lens, strict=True):
            n = tokens_for_frames(frames)
            turn = s.audio_turn
            if turn is not None and n:
                turn.audio.append(out[start : start + n].to(self.dtype))
                turn.audio_tokens += n
            start += n
        for s in sessions:
            s.windows.clear()
            if s.closing:
                self._close_audio(s)
        MODEL_STEP.labels(stage="stage0", phase="encode").observe(time.perf_counter() - t0)
        MODEL_BATCH.labels(stage="stage0", phase="encode").observe(len(windows))

    def _prefill(self, sessions: list[ThinkerSession]) -> None:
        torch = self.torch
        plans = plan_prefill(sessions, self.opts.max_prefill_tokens, self.tok.audio, self.device)
        if not plans:
            return
        t0 = time.perf_counter()
        T = max(p[2] for p in plans)
        ids = torch.zeros(len(plans), T, dtype=torch.long)
        audio_at: list[tuple[int, int, Any]] = []
        for i, (_, _, _, segs, _) in enumerate(plans):
            at = 0
            for run, rows in segs:
                ids[i, at : at + len(run)] = torch.tensor(run, dtype=torch.long)
                if rows is not None:
                    audio_at.append((i, at, rows))
                at += len(run)
        ids = ids.to(self.device)
        emb = self.embed(ids)
        x = emb.clone()
        e = emb.clone()
        for i, at, rows in audio_at:
            x[i, at : at + rows.shape[0]] = rows.to(self.dtype)
            e[i, at : at + rows.shape[0]] = 0  # the talker sees no embedding at audio positions
        slots = torch.tensor([self.leases.leases[p[0].sid].slot for p in plans], device=self.device)
        pos0 = torch.tensor([p[1] for p in plans], device=self.device)
        lens = torch.tensor([p[2] for p in plans], device=self.device)
        h = self.dec.prefill(x, slots, pos0, lens)
        ar = torch.arange(T, device=self.device)
        scratch = torch.full_like(ar[None], self.dec.max_len)
        wpos = torch.where(ar[None] < lens[:, None], pos0[:, None] + ar[None], scratch)
        self.rows[slots[:, None], wpos] = (h + e).to(self.dtype)
        ids_cpu = ids.cpu().numpy()
        want = []
        for i, (s, start, n, _, marks) in enumerate(plans):
            slot = self.leases.leases[s.sid].slot
            self.ids[slot, start : start + n] = ids_cpu[i, :n]
            for turn, upto in marks:
                s.ctx.mark_written(turn, upto)
            r = s.reply
            # The reply's last position was (re)computed: its next token comes from here.
            at_end = s.ctx.kv_len == start + n
            if r is not None and not r.complete and r.kv_start >= 0 and r.kv_len == s.ctx.length(r) and at_end:
                want.append((i, s))
        if want:
            rows_idx = torch.tensor([i for i, _ in want], device=self.device)
            last = (lens[rows_idx] - 1)
            logits = self.lm_head(h[rows_idx, last])
            self._sample([s for _, s in want], logits)
        MODEL_STEP.labels(stage="stage0", phase="prefill").observe(time.perf_counter() - t0)
        MODEL_BATCH.labels(stage="stage0", phase="prefill").observe(len(plans))

    def _can_decode(self, s: ThinkerSession) -> bool:
        r = s.reply
        return (
            r is not None
            and not r.complete
            and s.next_token is not None
            and r.kv_start >= 0
            and r.kv_len == s.ctx.length(r)
            and s.ctx.kv_len == r.kv_start + r.kv_len
        )

    def _decode_fn(self, b: int, span: int) -> Any:
        def fn() -> Any:
            tok, pos = self._tok[:b], self._pos[:b]
            e = self.embed(tok)
            h = self.dec.decode(e, pos, span)
            self.rows[self.dec.rows[:b], pos] = h + e
            return self.lm_head(h)

        return fn

    def _decode(self, sessions: list[ThinkerSession]) -> None:
        if not sessions:
            return
        torch = self.torch
        from duplexd.actors.engines.qwen_omni.decoder import bucket_for

        t0 = time.perf_counter()
        slots: list[int] = []
        for s in sessions:
            slot = self.leases.leases[s.sid].slot
            assert slot is not None  # a session with a reply holds its lease
            slots.append(slot)
        b = bucket_for(max(slots) + 1, self.b_buckets)
        tok = np.zeros(self.opts.max_sessions, dtype=np.int64)
        pos = np.full(self.opts.max_sessions, self.dec.max_len, dtype=np.int64)
        for s, slot in zip(sessions, slots, strict=True):
            r = s.reply
            assert r is not None and s.next_token is not None
            tok[slot] = s.next_token
            pos[slot] = r.kv_start + r.kv_len
        span = bucket_for(int(max(pos[sl] for sl in slots)) + 1, self.span_buckets)
        self._tok.copy_(torch.from_numpy(tok))
        self._pos.copy_(torch.from_numpy(pos))
        logits = self.graphs.run((b, span), self._decode_fn(b, span))
        for s, slot in zip(sessions, slots, strict=True):
            r = s.reply
            assert r is not None and r.pieces is not None and s.next_token is not None
            t = s.next_token
            self.ids[slot, pos[slot]] = t
            r.body.append(t)
            r.pieces.add(t)
            s.ctx.mark_written(r, r.kv_len + 1)
            s.unsent.append(len(r.body) - 1)
        self._sample(sessions, logits[torch.tensor(slots, device=self.device)])
        MODEL_STEP.labels(stage="stage0", phase="decode").observe(time.perf_counter() - t0)
        MODEL_BATCH.labels(stage="stage0", phase="decode").observe(len(sessions))

    def _sample(self, sessions: list[ThinkerSession], logits: Any) -> None:
        greedy = [self.opts.greedy or s.config.temperature <= 0 for s in sessions]
        temps = [s.config.temperature for s in sessions]
        no_eos = [len(s.reply.body) < self.opts.min_reply_tokens for s in sessions]  # type: ignore[union-attr]
        chosen = self.sampler(logits, greedy, temps, no_eos)
        for s, t in zip(sessions, chosen, strict=True):
            r = s.reply
            assert r is not None
            end_pos = r.kv_start + s.ctx.length(r) + len(self.tok.footer()) + 1
            if t in self.tok.eos or len(r.body) >= s.max_tokens or end_pos >= self.opts.max_context:
                self._finish_reply(s)
            else:
                s.next_token = t

    def _finish_reply(self, s: ThinkerSession) -> None:
        r = s.reply
        assert r is not None and r.pieces is not None
        r.complete = True  # its footer is prefilled next, so the context is ready for the next turn
        s.next_token = None
        s.extra_text += r.pieces.flush()

    # ------------------------------------------------------------------ decisions
    def _decide(self, s: ThinkerSession, x: ThinkerInput) -> ThinkerOutput:
        if x.kind in (ChunkKind.UTTERANCE, ChunkKind.UTTERANCE_END):
            return ThinkerOutput(Action.LISTEN)
        if x.kind == ChunkKind.CONTINUATION:
            r = s.reply
            if x.force_listen or r is None or r.key != x.response_id or x.response_id in s.dead or s.eot_sent:
                return ThinkerOutput(Action.LISTEN)
            return self._reply_output(s, duplex=False)
        return self._live_decision(s, x)

    def _reply_output(self, s: ThinkerSession, duplex: bool) -> ThinkerOutput:
        r = s.reply
        assert r is not None
        if not s.spoke and not s.unsent:
            if r.complete:
                s.eot_sent = True
                # Nothing to say at all: the turn ends without audio.
                return ThinkerOutput(Action.LISTEN, end_of_turn=not duplex, listen_prob=0.5)
            return ThinkerOutput(Action.LISTEN, listen_prob=0.2)
        text, tokens, hidden = self._unit(s)
        end = r.complete
        s.spoke = True
        s.eot_sent = end
        return ThinkerOutput(Action.SPEAK, text=text, end_of_turn=end, listen_prob=0.05, tokens=tokens, hidden=hidden)

    def _unit(self, s: ThinkerSession) -> tuple[str, np.ndarray | None, np.ndarray | None]:
        """The handoff rows not sent yet (see handoff.py)."""
        r = s.reply
        assert r is not None
        slot = self.leases.leases[s.sid].slot
        assert slot is not None
        return hf.pending_unit(s, self.rows[slot], s.ctx.body_start(r), lambda p: int(self.ids[slot, p]),
                               self.special_rows, self.special_tokens)

    # ------------------------------------------------------------------ duplex
    def _live(self, s: ThinkerSession, x: ThinkerInput) -> None:
        """Duplex: the engine's own endpointing decides when the user's turn ends."""
        o = self.opts
        s.chunks += 1
        s.interrupted = s.transcript_due = False
        pcm = np.asarray(x.pcm, dtype=np.float32)
        started, stopped = feed_vad(s, pcm, o)
        r = s.reply
        live_reply = r is not None and not (s.eot_sent and s.spoken_ms >= self._play_estimate_ms(s))
        if r is not None and s.spoke:
            s.spoken_ms += o.chunk_ms
        if s.audio_turn is not None:
            self._hear(s, pcm)
            if stopped is not None:
                self._end_turn(s)
                s.transcript_due = True
                p_listen = min(1.0, 0.1 * s.config.listen_prob_scale)
                if not (x.force_listen or s.chunks <= s.config.force_listen_count) and p_listen < 0.5:
                    s.duplex_turns += 1
                    self._start_reply(s, f"duplex-{s.duplex_turns}")
            return
        if live_reply:
            if started is not None:
                s.overlap_ms = started
            if s.overlap_ms is not None and s.voiced_ms >= o.interrupt_ms:
                # The user talks over the reply: yield; their speech is the next turn.
                self.discard_pending(s.sid)
                s.interrupted = True
                self._open_from_ring(s, s.overlap_ms)
                s.overlap_ms = None
            elif stopped is not None:
                s.overlap_ms = None  # a backchannel: not a turn
            return
        s.overlap_ms = None
        if started is not None:
            self._open_from_ring(s, started)

    def _open_from_ring(self, s: ThinkerSession, start_ms: float) -> None:
        """Opens the user turn with the audio heard since ``start_ms`` (minus the pre-roll)."""
        s.audio_turn = None
        self._hear(s, ring_audio(s, start_ms - self.opts.pre_roll_ms))

    def _play_estimate_ms(self, s: ThinkerSession) -> float:
        r = s.reply
        chars = len(r.pieces.text) if r is not None and r.pieces is not None else 0
        return chars / self.opts.speech_chars_per_s * 1000 + 500

    def _live_decision(self, s: ThinkerSession, x: ThinkerInput) -> ThinkerOutput:
        transcript = "" if s.transcript_due else None
        if s.interrupted:
            return ThinkerOutput(Action.LISTEN, interrupt=True, listen_prob=0.95, input_transcript=transcript)
        forced = x.force_listen or s.chunks <= s.config.force_listen_count
        r = s.reply
        if forced or r is None or s.eot_sent or r.key in s.dead:
            speaking = s.detector is not None and s.detector.speaking
            return ThinkerOutput(Action.LISTEN, listen_prob=0.95 if speaking else 0.9, input_transcript=transcript)
        if not s.spoke and not s.unsent:
            if r.complete:
                s.eot_sent = True
            return ThinkerOutput(Action.LISTEN, listen_prob=0.3, input_transcript=transcript)
        out = self._reply_output(s, duplex=True)
        out.input_transcript = transcript
        return out

