"""Stage1 of qwen-omni: the Qwen2.5-Omni talker and streaming token2wav, batched.

A reply's first handoff unit brings the thinker's prompt rows; the talker prefills them
(its own KV slot per session keeps the prompt across turns, so only the rows that
changed since the last reply are prefilled again), then the text start of the voice and
the first reply row, exactly as ``generate()`` builds the talker's input. Every later
codec step feeds the previous codec token plus the next reply row — the thinker's rows
arrive while the talker runs, one step needs one row, and after the last row come the
text-end and then pad embeddings. One decode step serves every session (a CUDA graph per
bucket on GPU).

As soon as a chunk's codec tokens exist (12 for the first: 240 ms of audio), the chunk
goes to :class:`~duplexd.actors.engines.qwen_omni.token2wav.Token2Wav`, batched with the
other sessions' ready chunks, asynchronously on CUDA. Its audio leaves in
``out_chunk_ms`` pieces, each carrying the words it is estimated to speak (text pieces
spread at ``speech_chars_per_s``; the last piece carries whatever is left), so a cut at
any playback position maps back to a token count on the thinker's side.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from duplexd.actors.engines.base import EngineError, TalkerChunk, TalkerInput, TurnTalker
from duplexd.actors.engines.qwen_omni import handoff as hf
from duplexd.actors.engines.qwen_omni.lease import LeaseTable, NoSlotFree
from duplexd.actors.engines.qwen_omni.metrics import GRAPHS, MODEL_BATCH, MODEL_STEP, TALKER_PROMPT_ROWS
from duplexd.actors.engines.qwen_omni.options import QwenOmniOptions
from duplexd.bus.log import get_logger, log
from duplexd.bus.messages import SessionConfig

_log = get_logger(__name__)
OUTPUT_RATE = 24000


@dataclass(eq=False)
class _Turn:
    key: str
    voice: int
    flushed: bool = False
    thinker_done: bool = False
    # inputs from the thinker
    prompt: Any = None  # [n, E] rows to prefill (the changed prompt, the voice's text start, reply row 0)
    prompt_at: int = 0  # talker position of its first row
    rows: list[Any] = field(default_factory=list)  # reply rows [E] (device)
    pieces: list[str] = field(default_factory=list)  # text of each reply row
    extra_text: str = ""
    eos_e: Any = None
    pad_e: Any = None
    # codec generation
    started: bool = False
    codes: list[int] = field(default_factory=list)
    next_code: int | None = None  # sampled, not yet fed
    pos: int = 0  # talker position of the next input
    codec_done: bool = False
    seen: Any = None  # [V] bool: codec ids used (repetition penalty)
    # audio
    coded: int = 0  # codec tokens turned into audio
    inflight: bool = False
    left_mel: Any = None
    audio: deque[np.ndarray] = field(default_factory=deque)  # pcm pieces ready to leave
    rest: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # < one piece
    samples_out: int = 0
    text_i: int = 0  # pieces handed out
    chars_out: int = 0
    limit: int = 0  # codec tokens at most (0: max_codec_tokens)


@dataclass(eq=False)
class _Sess:
    sid: str
    prompt_rows: Any = None  # [P, E] prompt rows whose KV fills positions [0, P) of the slot


class QwenOmniTalker(TurnTalker[_Turn]):
    """The talker stage (see module docstring)."""

    polls_pending = True  # token2wav results land asynchronously; slots free up across sessions

    def __init__(self, opts: QwenOmniOptions) -> None:
        super().__init__()
        self.opts = opts
        self.output_rate = OUTPUT_RATE
        self._sess: dict[str, _Sess] = {}
        self.leases = LeaseTable(opts.max_sessions)

    # ================================================================== loading
    def load(self) -> None:
        import torch

        from duplexd.actors.engines.qwen_omni.decoder import DecoderShape, SlotDecoder, buckets
        from duplexd.actors.engines.qwen_omni.graphs import GraphCache
        from duplexd.actors.engines.qwen_omni.loading import (
            load_config,
            load_speakers,
            load_talker,
            resolve_device,
            resolve_dtype,
            set_threads,
        )
        from duplexd.actors.engines.qwen_omni.sampling import Sampler
        from duplexd.actors.engines.qwen_omni.token2wav import Token2Wav

        o = self.opts
        self.torch = torch
        torch.set_grad_enabled(False)
        self.device = resolve_device(o.stage1_device)
        set_threads(o, self.device)
        self.dtype = resolve_dtype(o.dtype, self.device)
        t2w_dtype = resolve_dtype(o.token2wav_dtype, self.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            if o.tf32:
                torch.backends.cuda.matmul.allow_tf32 = True
                torch.backends.cudnn.allow_tf32 = True
        config = load_config(o)
        parts = load_talker(o, config, self.device, self.dtype, t2w_dtype)
        tk = parts.talker
        self.talker = tk
        self.proj = tk.thinker_to_talker_proj
        self.codec_embed = tk.model.embed_tokens
        self.codec_head = tk.codec_head
        tc = config.talker_config
        self.embedding = int(tc.embedding_size)
        self.vocab = int(tc.vocab_size)
        shape = DecoderShape.of(tc)
        # (a multiple of 64: attention masks stay aligned for the fused kernels)
        self.max_len = -(-(o.max_context + 2 + o.max_codec_tokens) // 64) * 64
        self.dec = SlotDecoder(tk.model.layers, tk.model.norm, shape, o.max_sessions, self.max_len, self.device,
                               self.dtype)
        self.codec_pad = int(tc.tts_codec_pad_token_id)
        self.codec_bos = int(tc.tts_codec_start_token_id)
        self.codec_eos = (self.codec_pad, int(tc.tts_codec_end_token_id))  # generate()'s talker eos ids
        mask = int(tc.tts_codec_mask_token_id)
        num_embeds = int(config.token2wav_config.dit_config.num_embeds)
        # Speech codes are the DiT's vocabulary; beyond it only the two end tokens may be chosen.
        suppress = [i for i in range(self.vocab) if i >= num_embeds and i not in self.codec_eos]
        self.sampler = Sampler(self.vocab, suppress, list(self.codec_eos), self.device, o.talker_top_k,
                               o.talker_top_p, o.talker_repetition_penalty, seed=o.seed + 2)
        self._seen0 = torch.zeros(self.vocab, dtype=torch.bool, device=self.device)
        self._seen0[[mask, self.codec_pad, self.codec_bos]] = True  # generate() penalises the prompt's ids too
        emb = self.codec_embed(torch.tensor([self.codec_pad, self.codec_bos], device=self.device))
        self.pad_bos_codec = emb  # added to the last two prompt rows
        speakers = load_speakers(o, config, self.device)
        self.voice_names = sorted(speakers)
        self.t2w = Token2Wav(
            parts.token2wav, self.device, t2w_dtype, o.max_sessions, o.t2w_chunk, o.t2w_first_chunk,
            o.t2w_lookahead, o.t2w_context, o.vocoder_context, o.t2w_steps, o.t2w_guidance, o.t2w_sway,
            o.cuda_graphs,
        )
        self.voices = [
            (speakers[n].cond.to(self.device, t2w_dtype), self.t2w.speaker_features(speakers[n].ref_mel))
            for n in self.voice_names
        ]
        self.noise = self.t2w.noise_for_reply(o.max_codec_tokens + o.t2w_lookahead, o.seed)
        self.out_samples = OUTPUT_RATE * o.out_chunk_ms // 1000
        # Decode step: rows = slots 0..B-1, static inputs, one graph per (B, span) bucket.
        self._tok = torch.zeros(o.max_sessions, dtype=torch.long, device=self.device)
        self._row = torch.zeros(o.max_sessions, self.embedding, dtype=self.dtype, device=self.device)
        self._pos = torch.full((o.max_sessions,), self.max_len, dtype=torch.long, device=self.device)
        self.b_buckets = buckets(o.max_sessions)
        self.span_buckets = buckets(self.max_len, start=min(256, self.max_len))
        self.graphs = GraphCache(self.device, o.cuda_graphs, "talker-decode")
        log(_log, logging.INFO, "qwen-omni talker loaded", device=str(self.device), slots=o.max_sessions,
            max_len=self.max_len, kv_cache_mb=round(self.dec.cache_bytes / 2**20, 1), voices=",".join(self.voice_names))

    def warm_up(self) -> None:
        if not self.opts.warm_up:
            return
        t0 = time.perf_counter()
        if self.graphs.enabled:
            for b in self.b_buckets:
                for span in self.span_buckets:
                    self.graphs.capture((b, span), self._decode_fn(b, span))
            self.t2w.capture()
            GRAPHS.labels(stage="stage1", state="captured").set(len(self.graphs) + len(self.t2w.graphs))
            GRAPHS.labels(stage="stage1", state="failed").set(int(bool(self.graphs.failed or self.t2w.graphs.failed)))
            log(_log, logging.INFO, "qwen-omni talker graphs captured", decode=len(self.graphs),
                token2wav=len(self.t2w.graphs), capture_s=round(self.graphs.capture_s + self.t2w.graphs.capture_s, 2),
                failed=self.graphs.failed or self.t2w.graphs.failed or None)
        # One throwaway reply through prefill, decode, token2wav and the audio pieces.
        sid = "__warm_up__"
        self.open_session(sid, SessionConfig())
        torch = self.torch
        g = torch.Generator().manual_seed(0)
        rows = (0.1 * torch.randn(24, self.embedding, generator=g)).to(self.dtype)
        tokens = np.zeros((24 + 2 + len(self.voices), 4), dtype=np.int32)
        tokens[20:24, 2] = hf.REPLY
        tokens[20:24, 3] = 1
        tokens[24 : 24 + len(self.voices), 2] = hf.SPEAKER_BOS
        tokens[24 : 24 + len(self.voices), 1] = np.arange(len(self.voices))
        tokens[-2, 2], tokens[-1, 2] = hf.TEXT_EOS, hf.TEXT_PAD
        special = (0.1 * torch.randn(len(self.voices) + 2, self.embedding, generator=g)).to(self.dtype)
        hidden = hf.to_wire(torch.cat([rows, special]))
        self.feed(sid, TalkerInput("abcd", True, tokens, hidden, turn_key="warm"))
        budget = self.opts.max_codec_tokens
        self._turns[sid].limit = min(budget, 2 * self.opts.t2w_first_chunk + self.opts.t2w_chunk)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            turn = self._turns.get(sid)
            if turn is None or turn.flushed:
                break
            out = self.step([sid]) if self.pending(sid) else [None]
            if out[0] is not None and out[0].end_of_turn:
                break
            if not self.pending(sid):
                time.sleep(0.001)
        self.close_session(sid)
        log(_log, logging.INFO, "qwen-omni talker warm", warm_up_s=round(time.perf_counter() - t0, 2))

    # ================================================================== sessions
    def open_session(self, session_id: str, config: SessionConfig) -> None:
        if session_id in self._sess:
            return
        self.leases.add(session_id, time.monotonic())
        try:
            self.leases.acquire(session_id, time.monotonic(), lambda sid: sid not in self._turns)
        except NoSlotFree as exc:
            self.leases.remove(session_id)
            raise EngineError(str(exc), session_id, "kv_capacity") from exc
        self._sess[session_id] = _Sess(session_id)
        self._forget_evicted()

    def _forget_evicted(self) -> None:
        for sid, s in self._sess.items():
            if self.leases.leases[sid].slot is None:
                s.prompt_rows = None  # its slot went to another session: prefill it all next time

    def close_session(self, session_id: str) -> None:
        super().close_session(session_id)
        self._sess.pop(session_id, None)
        self.leases.remove(session_id)

    def _slot(self, sid: str) -> int:
        lease = self.leases.leases[sid]
        if lease.slot is None:
            try:
                self.leases.acquire(sid, time.monotonic(), lambda x: x not in self._turns)
            except NoSlotFree as exc:
                raise EngineError(str(exc), sid, "kv_capacity") from exc
            self._sess[sid].prompt_rows = None
            self._forget_evicted()
        lease.last_used = time.monotonic()
        assert lease.slot is not None
        return lease.slot

    # ================================================================== handoffs
    def feed(self, session_id: str, unit: TalkerInput) -> None:
        torch = self.torch
        turn = self._turns.get(session_id)
        new = turn is None or turn.key != unit.turn_key or turn.flushed
        tok, hid = unit.tokens, unit.hidden
        if tok is not None and hid is not None:
            if hid.ndim != 2 or hid.shape[1] != self.embedding or tok.shape != (hid.shape[0], 4):
                raise EngineError(
                    f"handoff rows {tuple(hid.shape)} / tokens {tuple(tok.shape)} do not fit the talker "
                    f"(hidden width {self.embedding}): are stage0 and stage1 the same model?",
                    session_id,
                    "handoff_mismatch",
                )
            rows = hf.from_wire(hid, self.device, self.dtype)
            role = tok[:, 2]
        else:
            rows, role = None, np.zeros(0, np.int32)
        if new:
            voice = self._voice(unit.voice)
            turn = _Turn(unit.turn_key, voice, seen=self._seen0.clone())
            self._turns[session_id] = turn
            if rows is not None:
                assert tok is not None
                sel = np.flatnonzero(role == hf.SPEAKER_BOS)
                by_voice = {int(tok[i, 1]): rows[i] for i in sel}
                eos = np.flatnonzero(role == hf.TEXT_EOS)
                pad = np.flatnonzero(role == hf.TEXT_PAD)
                if len(eos) != 1 or len(pad) != 1 or voice not in by_voice:
                    raise EngineError("the first handoff unit of a reply lacks its special rows", session_id,
                                      "handoff_mismatch")
                turn.eos_e, turn.pad_e = rows[int(eos[0])], rows[int(pad[0])]
                ctx = rows[torch.from_numpy(np.flatnonzero(role == hf.CONTEXT)).to(self.device)]
                self._plan_prompt(session_id, turn, ctx, by_voice[voice])
        assert turn is not None
        if rows is not None:
            assert tok is not None
            idx = np.flatnonzero(role == hf.REPLY)
            lens = [int(n) for n in tok[idx, 3]]
            text, at = unit.text, 0
            for i, n in zip(idx, lens, strict=True):
                turn.rows.append(rows[int(i)])
                turn.pieces.append(text[at : at + n])
                at += n
            if at < len(text):
                if turn.pieces and len(idx):
                    turn.pieces[-1] += text[at:]
                else:
                    turn.extra_text += text[at:]
        elif unit.text:
            turn.extra_text += unit.text
        if unit.end_of_turn:
            turn.thinker_done = True

    def _voice(self, name: str) -> int:
        for n in (name, self.opts.voice):
            if n in self.voice_names:
                return self.voice_names.index(n)
            low = [v.lower() for v in self.voice_names]
            if n.lower() in low:
                return low.index(n.lower())
        return 0

    def _plan_prompt(self, sid: str, turn: _Turn, ctx: Any, bos: Any) -> None:
        """What to prefill: prompt rows the slot does not hold yet, then the text start."""
        torch = self.torch
        s = self._sess[sid]
        self._slot(sid)
        common = 0
        old = s.prompt_rows
        if old is not None:
            m = min(old.shape[0], ctx.shape[0])
            if m:
                same = (old[:m] == ctx[:m]).all(dim=-1)
                diff = torch.nonzero(~same)
                common = int(diff[0, 0]) if diff.numel() else m
        s.prompt_rows = ctx
        turn.prompt = torch.cat([ctx[common:], bos[None]])
        turn.prompt_at = common
        TALKER_PROMPT_ROWS.labels(reused="true").inc(common)
        TALKER_PROMPT_ROWS.labels(reused="false").inc(ctx.shape[0] - common)

    # ================================================================== the step
    def pending(self, session_id: str) -> bool:
        turn = self._turns.get(session_id)
        if turn is None or turn.flushed:
            return False
        if self.t2w.busy and self.t2w.done():
            return True  # results to collect
        if turn.audio or self._can_start(turn) or self._next_row(turn) is not None:
            return True
        if not self.t2w.busy and self._chunk_ready(turn) is not None:
            return True
        return self._finished(turn)

    def next_due_s(self) -> float | None:
        return 0.002 if self.t2w.busy else None

    def _can_start(self, turn: _Turn) -> bool:
        return not turn.started and turn.prompt is not None and bool(turn.rows)

    def _next_row(self, turn: _Turn) -> Any | None:
        """The reply row the next codec step reads (None: not available yet)."""
        if not turn.started or turn.codec_done or turn.next_code is None:
            return None
        # The m-th decode (feeding codec token m-1; m - 1 = len(codes)) reads reply row m,
        # then the text-end embedding, then pad: generate()'s thinker_reply_part.
        j = len(turn.codes) + 1
        if j < len(turn.rows):
            return turn.rows[j]
        if turn.thinker_done:
            return turn.eos_e if j == len(turn.rows) else turn.pad_e
        return None

    def _limit(self, turn: _Turn) -> int:
        return min(turn.limit or self.opts.max_codec_tokens, self.opts.max_codec_tokens)

    def _chunk_ready(self, turn: _Turn) -> tuple[int, int] | None:
        if turn.inflight:
            return None
        return self.t2w.ready(len(turn.codes), turn.coded, turn.codec_done)

    def _finished(self, turn: _Turn) -> bool:
        if turn.thinker_done and not turn.rows and not turn.started:
            return True  # nothing to say
        return turn.codec_done and turn.coded >= len(turn.codes) and not turn.inflight

    def step(self, session_ids: list[str]) -> list[TalkerChunk | None]:
        self._collect()
        turns = [(sid, self._turns[sid]) for sid in session_ids if sid in self._turns]
        self._prefill([(sid, t) for sid, t in turns if self._can_start(t)])
        self._decode([(sid, t) for sid, t in turns if self._next_row(t) is not None])
        self._launch()
        self._collect()
        return [self._emit(sid) for sid in session_ids]

    # ------------------------------------------------------------------ codec tokens
    def _prefill(self, work: list[tuple[str, _Turn]]) -> None:
        if not work:
            return
        torch = self.torch
        t0 = time.perf_counter()
        inputs = []
        for _, t in work:
            x = torch.cat([t.prompt, t.rows[0][None]])
            x = x.clone()
            x[-2:] += self.pad_bos_codec.to(x.dtype)
            inputs.append(x)
        T = max(x.shape[0] for x in inputs)
        xb = torch.zeros(len(work), T, self.embedding, device=self.device, dtype=self.dtype)
        for i, x in enumerate(inputs):
            xb[i, : x.shape[0]] = x
        slots = torch.tensor([self._slot(sid) for sid, _ in work], device=self.device)
        pos0 = torch.tensor([t.prompt_at for _, t in work], device=self.device)
        lens = torch.tensor([x.shape[0] for x in inputs], device=self.device)
        h = self.dec.prefill(self.proj(xb), slots, pos0, lens)
        logits = self.codec_head(h[torch.arange(len(work), device=self.device), lens - 1])
        for (_, t), x in zip(work, inputs, strict=True):
            t.started = True
            t.pos = t.prompt_at + x.shape[0]
            t.prompt = None
        self._sample([t for _, t in work], logits)
        MODEL_STEP.labels(stage="stage1", phase="prefill").observe(time.perf_counter() - t0)
        MODEL_BATCH.labels(stage="stage1", phase="prefill").observe(len(work))

    def _decode_fn(self, b: int, span: int) -> Any:
        def fn() -> Any:
            x = self.proj(self.codec_embed(self._tok[:b]) + self._row[:b])
            return self.codec_head(self.dec.decode(x, self._pos[:b], span))

        return fn

    def _decode(self, work: list[tuple[str, _Turn]]) -> None:
        if not work:
            return
        torch = self.torch
        from duplexd.actors.engines.qwen_omni.decoder import bucket_for

        t0 = time.perf_counter()
        slots = [self._slot(sid) for sid, _ in work]
        b = bucket_for(max(slots) + 1, self.b_buckets)
        tok = np.zeros(self.opts.max_sessions, dtype=np.int64)
        pos = np.full(self.opts.max_sessions, self.max_len, dtype=np.int64)
        self._row[:b].zero_()
        for (_, t), slot in zip(work, slots, strict=True):
            assert t.next_code is not None
            tok[slot] = t.next_code
            pos[slot] = t.pos
            row = self._next_row(t)
            assert row is not None
            self._row[slot].copy_(row)
        span = bucket_for(int(max(pos[s] for s in slots)) + 1, self.span_buckets)
        self._tok.copy_(torch.from_numpy(tok))
        self._pos.copy_(torch.from_numpy(pos))
        logits = self.graphs.run((b, span), self._decode_fn(b, span))
        for _, t in work:
            assert t.next_code is not None
            t.codes.append(t.next_code)
            t.seen[t.next_code] = True
            t.pos += 1
        self._sample([t for _, t in work], logits[torch.tensor(slots, device=self.device)])
        MODEL_STEP.labels(stage="stage1", phase="decode").observe(time.perf_counter() - t0)
        MODEL_BATCH.labels(stage="stage1", phase="decode").observe(len(work))

    def _sample(self, turns: list[_Turn], logits: Any) -> None:
        o = self.opts
        greedy = [o.talker_greedy] * len(turns)
        temps = [o.talker_temperature] * len(turns)
        no_eos = [len(t.codes) < o.min_codec_tokens for t in turns]
        seen = self.torch.stack([t.seen for t in turns])
        for t, c in zip(turns, self.sampler(logits, greedy, temps, no_eos, seen), strict=True):
            room = self.max_len - t.pos - 1
            if c in self.codec_eos or len(t.codes) >= min(self._limit(t), room):
                t.codec_done = True
                t.next_code = None
            else:
                t.next_code = c

    # ------------------------------------------------------------------ audio
    def _launch(self) -> None:
        if self.t2w.busy:
            return
        from duplexd.actors.engines.qwen_omni.token2wav import ChunkJob

        jobs = []
        for sid, t in self._turns.items():
            if t.flushed or not t.started:
                continue
            span = self._chunk_ready(t)
            if span is None:
                continue
            cond, ecapa = self.voices[t.voice]
            jobs.append(ChunkJob((sid, t), list(t.codes), span[0], span[1], self.noise, cond, ecapa, t.left_mel,
                                 t.codec_done))
            t.inflight = True
            if len(jobs) == self.opts.max_sessions:
                break
        if jobs:
            t0 = time.perf_counter()
            self.t2w.launch(jobs)
            MODEL_STEP.labels(stage="stage1", phase="token2wav_launch").observe(time.perf_counter() - t0)
            MODEL_BATCH.labels(stage="stage1", phase="token2wav").observe(len(jobs))

    def _collect(self) -> None:
        results = self.t2w.poll()
        if results:
            MODEL_STEP.labels(stage="stage1", phase="token2wav").observe(self.t2w.last_s)
        for res in results:
            sid, t = res.key
            assert isinstance(t, _Turn)
            t.inflight = False
            if self._turns.get(sid) is not t:
                continue  # aborted meanwhile
            t.coded = res.c1
            t.left_mel = res.tail_mel
            pcm = np.concatenate([t.rest, res.pcm.numpy().astype(np.float32, copy=False)])
            n = self.out_samples
            k = pcm.size // n
            for i in range(k):
                t.audio.append(pcm[i * n : (i + 1) * n])
            t.rest = pcm[k * n :]

    def _emit(self, sid: str) -> TalkerChunk | None:
        t = self._turns.get(sid)
        if t is None or t.flushed:
            return None
        if t.audio:
            pcm = t.audio.popleft()
            last = self._finished(t) and not t.audio and t.rest.size == 0
        elif self._finished(t):
            pcm, t.rest = t.rest, np.zeros(0, np.float32)
            last = True
        else:
            return None
        t.samples_out += pcm.size
        text = self._text_until(t, t.samples_out * 1000 / OUTPUT_RATE, everything=last)
        if last:
            t.flushed = True
        return TalkerChunk(pcm, text=text, end_of_turn=last)

    def _text_until(self, t: _Turn, ms: float, everything: bool) -> str:
        out = []
        cps = self.opts.speech_chars_per_s
        while t.text_i < len(t.pieces):
            piece = t.pieces[t.text_i]
            if not everything and (t.chars_out + len(piece.strip())) / cps * 1000 > ms:
                break
            out.append(piece)
            t.chars_out += len(piece.strip())
            t.text_i += 1
        if everything:
            out.append(t.extra_text)
            t.extra_text = ""
        return "".join(out)
