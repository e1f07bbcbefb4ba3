"""Stage0 of qwen-omni on vLLM: the Qwen2.5-Omni thinker as requests of one vLLM engine.

The session side is the transformers backend's (:class:`QwenOmniThinker`): turn taking,
duplex endpointing, the committed-history :class:`Context` with its rollback to what the
user heard, one decision per chunk, the handoff units. What changes is where the model
runs. Per stage0 step:

1. every session whose reply is due gets one vLLM request: the context's token ids
   (``<|AUDIO|>`` once per 2 s audio item, which vLLM expands and encodes) with the
   items themselves and their stable ``multi_modal_uuids``; a session still being heard
   gets a *listen* request (prefill only, ``max_tokens=1``) each time another 2 s of its
   audio completes, so the turn's end finds all but its tail in the prefix cache;
2. one ``engine.step()`` runs every request together (continuous batching: prefill
   chunks beside other sessions' decode steps);
3. the runner tap (:mod:`.runner_tap`) hands over the hidden rows the step computed;
   they go to the session's row store (``rows[slot, position]`` = last hidden state + the
   token's embedding, zero at audio positions: the talker's input); a reply token is
   *fed* when its row arrives, and only fed tokens enter the reply (as in the
   transformers backend, the final sampled token is never fed).

**The KV lease is the prefix cache.** A session's requests carry a ``cache_salt`` of
their own, so each request finds the blocks of the session's earlier ones (the next
turn's prompt extends the previous one; after a barge-in the prompt is the history cut
to what was played, and only the tail past the cut is recomputed), and never another
session's: positions served from cache produce no hidden rows, so the rows must come
from the session's own store. The lease table's slot is the row store's slot; releasing
it (idle, eviction) drops the rows and changes the salt, so the next request recomputes.
``num_cached_tokens`` of each request is reported with the lease. Cancel and barge-in
abort the request at once (``abort_request`` before the next step).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from duplexd.actors.engines.base import EngineError
from duplexd.actors.engines.qwen_omni import handoff as hf
from duplexd.actors.engines.qwen_omni.context import Kind, Turn
from duplexd.actors.engines.qwen_omni.lease import NoSlotFree
from duplexd.actors.engines.qwen_omni.mel import HOP, RATE, tokens_for_frames
from duplexd.actors.engines.qwen_omni.metrics import (
    LEASE_RELEASES,
    LEASE_TOKENS,
    MODEL_BATCH,
    MODEL_STEP,
    forget_lease_series,
    show_slots,
)
from duplexd.actors.engines.qwen_omni.options import QwenOmniOptions
from duplexd.actors.engines.qwen_omni.thinker import QwenOmniThinker
from duplexd.actors.engines.qwen_omni.thinker_session import ThinkerSession
from duplexd.actors.engines.qwen_omni_vllm.metrics import LEASE_CACHED, PROMPT_TOKENS, REQUESTS, RUNNING
from duplexd.bus.log import get_logger, log
from duplexd.bus.messages import HistoryEntry, KvLease, SessionConfig

_log = get_logger(__name__)
ITEM_SAMPLES = 2 * RATE  # one audio item per encoder window (2 s)
MIN_ITEM_SAMPLES = 3 * HOP + 1  # shorter tails make no audio token: dropped


def item_tokens(samples: int) -> int:
    """Audio positions vLLM expands one item of ``samples`` into (Whisper frames, then the
    encoder's two stride-2 stages); checked against vLLM's own count on every request."""
    return tokens_for_frames(-(-samples // HOP))


@dataclass(eq=False)
class _Request:
    rid: str  # vLLM's internal id
    ext: str  # the id we gave it
    sid: str
    kind: str  # "reply" | "listen"
    ids: list[int]  # expanded prompt ids, one per position
    reply: Turn | None = None
    gen: list[int] = field(default_factory=list)  # sampled ids (reply), gen[k] sits at len(ids) + k
    first: bool = True  # no output seen yet


@dataclass(eq=False)
class _Store:
    """A session's vLLM-side state: what its row store holds and its request in flight."""

    serial: int  # distinguishes sessions that reuse an id (audio uuids, cache salt)
    salt: int = 0  # bumped when the rows are dropped: old cache entries become unreachable
    ids: list[int] = field(default_factory=list)  # expanded ids of the positions whose rows are held
    pending: list[np.ndarray] = field(default_factory=list)  # the user turn's audio short of a 2 s item
    pending_n: int = 0
    heard: int = 0  # samples of the current user turn heard (capped by max_user_turn_s)
    listened: int = 0  # audio items of the current user turn already prefilled
    req: _Request | None = None
    body_start: int = 0  # position of the reply's first body token
    cached: int = 0  # prefix-cache hit of the newest request
    requests: int = 0


class VllmQwenThinker(QwenOmniThinker):
    """The qwen-omni thinker on vLLM (see module docstring)."""

    def __init__(self, opts: QwenOmniOptions) -> None:
        super().__init__(opts)
        self._v: dict[str, _Store] = {}
        self._req: dict[str, _Request] = {}  # by internal id
        self._ext: dict[str, str] = {}  # our id -> internal id
        self._serial = 0

    # ================================================================== loading
    def load(self) -> None:
        from duplexd.actors.engines.qwen_omni_vllm import runner_tap
        from duplexd.actors.engines.qwen_omni_vllm.engine import VllmEngine, require_vllm, set_environment

        require_vllm()
        set_environment()
        import torch
        from transformers import AutoTokenizer, Qwen2_5OmniConfig

        from duplexd.actors.engines.qwen_omni.configs import fix_config
        from duplexd.actors.engines.qwen_omni.loading import load_speakers, resolve_device
        from duplexd.actors.engines.qwen_omni.tokens import ChatTokens
        from duplexd.actors.engines.qwen_omni_vllm.model_dir import check_model_dir, synthetic_model_dir

        o = self.opts
        self.torch = torch
        torch.set_grad_enabled(False)
        if o.random_init:
            model_dir = synthetic_model_dir(o)
        else:
            if not o.model_path:
                raise ValueError("engines.qwen-omni: set model_path to a local Qwen2.5-Omni directory, or random_init")
            from pathlib import Path

            model_dir = check_model_dir(Path(o.model_path).expanduser())
        config = fix_config(Qwen2_5OmniConfig.from_pretrained(str(model_dir), local_files_only=True))
        self.tok = ChatTokens(AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True),
                              config.thinker_config)
        self.speakers = load_speakers(o, config, torch.device("cpu"))
        device = str(resolve_device(o.stage0_device))
        text = config.thinker_config.text_config
        suppress = [i for i in self.tok.suppress if i < int(text.vocab_size)]
        self.eng = VllmEngine(model_dir, o, device, "dummy" if o.random_init else "auto", suppress)
        self.tap = runner_tap.install(self.eng.engine)
        self.embed_w = runner_tap.embedding_table(self.eng.engine)
        self.device = self.embed_w.device
        self.dtype = self.embed_w.dtype
        text = config.thinker_config.text_config
        self.hidden = int(text.hidden_size)
        self.vocab = int(text.vocab_size)
        L = o.max_context
        self.rows = torch.zeros(o.max_sessions, L + 1, self.hidden, device=self.device, dtype=self.dtype)
        system_len = len(self.tok.encode(o.system_prompt)) + 8
        room = L - o.max_reply_tokens - system_len - 16
        if room < 64:
            raise ValueError(f"max_context {L} leaves no room for a user turn beside {o.max_reply_tokens} reply tokens")
        self.max_audio_tokens = min(int(25 * o.max_user_turn_s), room)
        names = sorted(self.speakers)
        tcfg = config.talker_config
        special_ids = [self.speakers[n].bos_token for n in names]
        special_ids += [int(tcfg.tts_text_end_token_id), int(tcfg.tts_text_pad_token_id)]
        self.special_rows = hf.to_wire(self.embed_w[torch.tensor(special_ids, device=self.device)])
        roles = [hf.SPEAKER_BOS] * len(names) + [hf.TEXT_EOS, hf.TEXT_PAD]
        index = list(range(len(names))) + [0, 0]
        self.special_tokens = np.array(
            [[t, i, r, 0] for t, i, r in zip(special_ids, index, roles, strict=True)], dtype=np.int32
        )
        self._loaded = True
        show_slots(self.leases.used, self.leases.slots)
        log(_log, logging.INFO, "qwen-omni thinker on vllm loaded", vllm=self.eng.version, device=str(self.device),
            model_dir=str(model_dir), slots=o.max_sessions, max_context=L, speakers=",".join(names))

    def warm_up(self) -> None:
        if not self.opts.warm_up:
            return
        t0 = time.perf_counter()
        # The abort path too: the reply is discarded after its fourth step.
        self._throwaway_turn(lambda j, s: self.discard_pending(s.sid) if j == 3 else None)
        log(_log, logging.INFO, "qwen-omni thinker on vllm warm", warm_up_s=round(time.perf_counter() - t0, 2))

    # ================================================================== sessions
    def open_session(self, session_id: str, config: SessionConfig) -> None:
        if session_id not in self._s:
            self._serial += 1
            self._v[session_id] = _Store(self._serial)
        try:
            super().open_session(session_id, config)
        except EngineError:
            self._v.pop(session_id, None)
            raise

    def close_session(self, session_id: str) -> None:
        v = self._v.get(session_id)
        if v is not None and v.req is not None:
            self._abort(v.req)
        super().close_session(session_id)
        self._v.pop(session_id, None)
        self._drop_cached_series(session_id)

    def set_context(self, session_id: str, history: tuple[HistoryEntry, ...], instructions: str) -> None:
        super().set_context(session_id, history, instructions)
        s, v = self._s.get(session_id), self._v.get(session_id)
        if s is None or v is None or v.req is None or v.req.kind != "reply":
            return
        r = v.req.reply
        if s.reply is not r or r is None or r.complete:
            self._abort(v.req)  # the host ended the response, or it left the history

    def _start_reply(self, s: ThinkerSession, key: str) -> None:
        v = self._v.get(s.sid)
        if v is not None and v.req is not None and v.req.kind == "reply":
            self._abort(v.req)  # a reply for another response: that one is over
        super()._start_reply(s, key)

    def discard_pending(self, session_id: str) -> None:
        super().discard_pending(session_id)
        v = self._v.get(session_id)
        if v is not None and v.req is not None and v.req.kind == "reply":
            self._abort(v.req)

    # ================================================================== leases
    def _busy(self, s: ThinkerSession) -> bool:
        v = self._v.get(s.sid)
        return super()._busy(s) or (v is not None and v.req is not None)

    def _lease(self, s: ThinkerSession, now: float) -> None:
        lease = self.leases.leases[s.sid]
        had = lease.slot
        try:
            _, victim = self.leases.acquire(s.sid, now, lambda sid: not self._busy(self._s[sid]))
        except NoSlotFree as exc:
            raise EngineError(str(exc), s.sid, "kv_capacity") from exc
        if victim is not None:
            self._release(self._s[victim], "evicted", lease.slot)
        if had is None:
            self._forget_rows(self._v[s.sid])
            show_slots(self.leases.used, self.leases.slots)

    def _release(self, s: ThinkerSession, reason: str, slot: int | None = None) -> None:
        lease = self.leases.leases[s.sid]
        held = lease.slot if lease.slot is not None else slot
        self.leases.release(s.sid)
        self._forget_rows(self._v[s.sid])
        if held is not None:
            forget_lease_series(s.sid, held)
        self._drop_cached_series(s.sid)
        LEASE_RELEASES.labels(reason=reason).inc()
        show_slots(self.leases.used, self.leases.slots)
        log(_log, logging.INFO, "kv lease released", session_id=s.sid, reason=reason, turns=len(s.ctx.turns))

    def _forget_rows(self, v: _Store) -> None:
        """The rows are gone: requests from now on must not hit the session's old cache blocks."""
        v.ids.clear()
        v.salt += 1

    def _park_evicted(self, s: ThinkerSession) -> None:
        s.ctx.evicted.clear()  # audio items are host arrays already

    def _drop_cached_series(self, sid: str) -> None:
        for labels in [k for k in LEASE_CACHED._metrics if k[0] == sid]:  # noqa: SLF001 - no public listing
            LEASE_CACHED.remove(*labels)

    def lease_updates(self) -> list[KvLease]:
        out, self._closed = self._closed, []
        now = time.monotonic()
        for s in self._s.values():
            if s.sid.startswith("__"):
                continue
            lease = self.leases.leases[s.sid]
            v, c = self._v[s.sid], s.ctx
            held = len(v.ids)
            if lease.slot is not None:
                LEASE_TOKENS.labels(session_id=s.sid, slot=str(lease.slot)).set(held)
                LEASE_CACHED.labels(session_id=s.sid, slot=str(lease.slot)).set(v.cached)
            settled = None if self._busy(s) else held
            key = (lease.slot, settled, v.cached, len(c.turns), c.rollbacks, c.dropped, c.evicted_turns,
                   lease.releases)
            if key == s.reported:
                continue
            s.reported = key
            out.append(
                KvLease(
                    s.sid,
                    "leased" if lease.slot is not None else "released",
                    slot=-1 if lease.slot is None else lease.slot,
                    tokens=held,
                    capacity=self.opts.max_context,
                    turns=len(c.turns),
                    rollbacks=c.rollbacks,
                    dropped_tokens=c.dropped,
                    evicted_turns=c.evicted_turns,
                    cached_tokens=v.cached,
                    leased_s=round(now - lease.leased_at, 3) if lease.slot is not None else 0.0,
                    idle_s=round(now - lease.last_used, 3),
                )
            )
        return out

    # ================================================================== hearing
    def _hear(self, s: ThinkerSession, pcm: np.ndarray) -> None:
        """User audio: cut into 2 s items as it arrives (one vLLM audio item per encoder window)."""
        v = self._v[s.sid]
        if s.audio_turn is None:
            s.audio_turn = s.ctx.open_audio()
            v.pending, v.pending_n, v.heard, v.listened = [], 0, 0, 0
        cap = self.max_audio_tokens * RATE // 25
        pcm = np.asarray(pcm, dtype=np.float32)[: max(0, cap - v.heard)]
        if not pcm.size:
            return
        v.heard += pcm.size
        v.pending.append(pcm)
        v.pending_n += pcm.size
        if v.pending_n >= ITEM_SAMPLES:
            audio = np.concatenate(v.pending)
            k = audio.size // ITEM_SAMPLES * ITEM_SAMPLES
            for i in range(0, k, ITEM_SAMPLES):
                self._add_item(s.audio_turn, audio[i : i + ITEM_SAMPLES])
            rest = audio[k:]
            v.pending, v.pending_n = ([rest] if rest.size else []), rest.size

    def _add_item(self, turn: Turn, item: np.ndarray) -> None:
        turn.audio.append(np.ascontiguousarray(item))
        turn.audio_tokens += item_tokens(item.size)

    def _end_turn(self, s: ThinkerSession) -> None:
        if s.audio_turn is None:
            return
        v = self._v[s.sid]
        if v.pending_n >= MIN_ITEM_SAMPLES:
            self._add_item(s.audio_turn, np.concatenate(v.pending))
        v.pending, v.pending_n = [], 0
        self._close_audio(s)

    # ================================================================== prompts
    def _layout(self, s: ThinkerSession, upto: Turn) -> tuple[list[int], list[int], list[np.ndarray], list[str]]:
        """The context through ``upto`` as (prompt ids with one ``<|AUDIO|>`` per item, the same
        expanded to one id per position, audio items, their uuids)."""
        v = self._v[s.sid]
        ctx, audio_id = s.ctx, self.tok.audio
        ids: list[int] = []
        exp: list[int] = []
        items: list[np.ndarray] = []
        uuids: list[str] = []
        for turn in ctx.turns:
            head, tail = ctx.head(turn), ctx.tail(turn)
            ids += head
            exp += head
            if turn.kind == Kind.AUDIO:
                for k, a in enumerate(turn.audio):
                    ids.append(audio_id)
                    exp += [audio_id] * item_tokens(a.size)
                    items.append(a)
                    uuids.append(f"{s.sid}#{v.serial}/{turn.seq}/{k}")
            else:
                body = turn.body[: turn.kept()] if turn.kind == Kind.REPLY else turn.body
                ids += body
                exp += body
            ids += tail
            exp += tail
            if turn is upto or not turn.complete:
                break
        return ids, exp, items, uuids

    def _submit(self, s: ThinkerSession, kind: str) -> None:
        o, v = self.opts, self._v[s.sid]
        r = s.reply if kind == "reply" else None
        upto = r if r is not None else s.audio_turn
        assert upto is not None
        ids, exp, items, uuids = self._layout(s, upto)
        if kind == "reply":
            assert r is not None
            footer = len(self.tok.footer())
            budget = min(s.max_tokens - len(r.body), o.max_context - len(exp) - footer - 1)
            if budget <= 0:
                self._finish_reply(s)
                return
            greedy = o.greedy or s.config.temperature <= 0
            params = self.eng.sampling(
                max_tokens=budget + 1,  # the last sampled token is never fed (module docstring)
                min_tokens=max(0, o.min_reply_tokens - len(r.body)),
                temperature=0.0 if greedy else s.config.temperature,
                top_k=o.top_k,
                top_p=o.top_p,
                stop=self.tok.eos,
                seed=o.seed,
            )
            v.body_start = len(exp) - r.kept()
        else:
            params = self.eng.sampling(max_tokens=1)
            v.listened = len(upto.audio)
        # The rows held stay valid only where the new prompt repeats them.
        common = 0
        for a, b in zip(v.ids, exp, strict=False):
            if a != b:
                break
            common += 1
        del v.ids[common:]
        v.requests += 1
        ext = f"{s.sid}/{kind}/{v.requests}"
        try:
            rid = self.eng.add(ext, ids, items, uuids, params, cache_salt=f"{s.sid}#{v.serial}/{v.salt}")
        except Exception as exc:
            raise EngineError(f"vLLM refused the request: {exc}", s.sid, "engine_error") from exc
        req = _Request(rid, ext, s.sid, kind, exp, r)
        v.req = req
        self._req[rid] = req
        self._ext[ext] = rid
        RUNNING.set(len(self._req))

    def _due(self, s: ThinkerSession) -> str | None:
        """Which request the session needs now, if any."""
        v = self._v[s.sid]
        if v.req is not None or self.leases.leases[s.sid].slot is None:
            return None
        r = s.reply
        if r is not None and not r.complete:
            return "reply"
        t = s.audio_turn
        if t is not None and self.opts.vllm.prefill_while_listening and len(t.audio) > v.listened:
            return "listen"
        return None

    def _abort(self, req: _Request, outcome: str = "aborted") -> None:
        self.eng.abort([req.rid])
        self._drop_request(req)
        REQUESTS.labels(kind=req.kind, outcome=outcome).inc()

    def _drop_request(self, req: _Request) -> None:
        self._req.pop(req.rid, None)
        self._ext.pop(req.ext, None)
        v = self._v.get(req.sid)
        if v is not None and v.req is req:
            v.req = None
        RUNNING.set(len(self._req))

    # ================================================================== the step
    def has_background_work(self) -> bool:
        if self.next_due_s() == 0.0 or self._req:
            return True
        return any(self._due(s) for s in self._s.values())

    def _model_work(self) -> None:
        for s in list(self._s.values()):
            kind = self._due(s)
            if kind is not None:
                self._submit(s, kind)
        if not self.eng.busy():
            return
        t0 = time.perf_counter()
        outs = self.eng.step()
        rows = self.tap.take()
        MODEL_STEP.labels(stage="stage0", phase="vllm_step").observe(time.perf_counter() - t0)
        decode = prefill = 0
        writes: list[tuple[int, int, list[int], Any]] = []
        for row in rows:
            req = self._req.get(row.request_id)
            if req is None:
                continue  # aborted after it was scheduled
            if row.hidden.shape[0] == 1 and row.start >= len(req.ids):
                decode += 1
            else:
                prefill += 1
            w = self._store(req, row.start, row.hidden.shape[0])
            if w is not None:
                writes.append((*w, row.hidden))
        self._write_rows(writes)
        if decode:
            MODEL_BATCH.labels(stage="stage0", phase="decode").observe(decode)
        if prefill:
            MODEL_BATCH.labels(stage="stage0", phase="prefill").observe(prefill)
        for out in outs:
            rid = self._ext.get(out.request_id, out.request_id)
            req = self._req.get(rid)
            if req is None:
                continue
            if req.first:
                req.first = False
                self._first_output(req, out.num_cached_tokens or 0, out.prompt_len)
                if self._req.get(rid) is not req:
                    continue  # restarted
            if req.kind == "reply":
                req.gen += out.token_ids
            if out.finished:
                self._finished(req)

    def _first_output(self, req: _Request, cached: int, prompt_len: int | None) -> None:
        v = self._v[req.sid]
        if prompt_len is not None and prompt_len != len(req.ids):
            raise EngineError(
                f"vLLM expanded the prompt to {prompt_len} positions, duplexd counted {len(req.ids)}: audio items are "
                "not expanded as item_tokens() assumes", req.sid, "engine_error")
        v.cached = cached
        PROMPT_TOKENS.labels(cached="true").inc(cached)
        PROMPT_TOKENS.labels(cached="false").inc(len(req.ids) - cached)

    def _store(self, req: _Request, start: int, n: int) -> tuple[int, int, list[int]] | None:
        """The step computed rows for positions ``start..start+n`` of ``req``: the row store
        will hold them (returns where they go and their ids); reply tokens are fed."""
        s, v = self._s[req.sid], self._v[req.sid]
        if start > len(v.ids):
            # The prefix cache served positions whose rows this session no longer holds (an
            # older branch of its history): recompute everything under a fresh salt.
            log(_log, logging.INFO, "vllm request restarted: cached positions without rows", session_id=req.sid,
                cached=start, held=len(v.ids))
            self._abort(req, "restarted")
            self._forget_rows(v)
            return None
        plen = len(req.ids)
        ids = [req.ids[p] if p < plen else req.gen[p - plen] for p in range(start, start + n)]
        slot = self.leases.leases[req.sid].slot
        assert slot is not None  # a session with a request in flight is busy: never released
        del v.ids[start:]
        v.ids += ids
        r = req.reply
        if r is None or r.complete or s.reply is not r:
            return slot, start, ids
        assert r.pieces is not None
        for p in range(max(start, plen), start + n):
            tok = req.gen[p - plen]
            r.body.append(tok)
            r.pieces.add(tok)
            s.unsent.append(len(r.body) - 1)
        return slot, start, ids

    def _write_rows(self, writes: list[tuple[int, int, list[int], Any]]) -> None:
        """One batched write of a step's rows, every request's together: the talker's
        input, last hidden state + the token's embedding (zero at audio positions)."""
        if not writes:
            return
        torch = self.torch
        slots = [w[0] for w in writes for _ in w[2]]
        pos = [p for w in writes for p in range(w[1], w[1] + len(w[2]))]
        ids = [i for w in writes for i in w[2]]
        idx = torch.tensor([slots, pos, ids], dtype=torch.long).to(self.device, non_blocking=True)
        hidden = writes[0][3] if len(writes) == 1 else torch.cat([w[3] for w in writes])
        emb = self.embed_w[idx[2]] * (idx[2] != self.tok.audio).unsqueeze(1).to(self.dtype)
        self.rows[idx[0], idx[1]] = (hidden + emb).to(self.dtype)

    def _finished(self, req: _Request) -> None:
        s = self._s[req.sid]
        self._drop_request(req)
        REQUESTS.labels(kind=req.kind, outcome="finished").inc()
        r = req.reply
        if r is not None and s.reply is r and not r.complete:
            self._finish_reply(s)

    # ------------------------------------------------------------------ the handoff
    def _unit(self, s: ThinkerSession) -> tuple[str, np.ndarray | None, np.ndarray | None]:
        """The handoff rows not sent yet: the prompt's rows on a reply's first unit, then one
        row per fed token (handoff.py)."""
        r = s.reply
        v = self._v[s.sid]
        assert r is not None
        slot = self.leases.leases[s.sid].slot
        assert slot is not None
        if s.unsent and v.body_start + s.unsent[-1] >= len(v.ids):
            raise EngineError(f"row store holds {len(v.ids)} positions, the handoff needs "
                              f"{v.body_start + s.unsent[-1] + 1}", s.sid, "engine_error")
        return hf.pending_unit(s, self.rows[slot], v.body_start, lambda p: v.ids[p], self.special_rows,
                               self.special_tokens)
