"""How the thinker's context follows the committed history (binding, rollback, edits,
eviction), the lease table, text pieces, options, and the lease's idle release."""

from __future__ import annotations

import subprocess
import sys

import msgspec
import numpy as np
import pytest

pytest.importorskip("transformers")

from duplexd.actors.engines.qwen_omni.configs import omni_config  # noqa: E402
from duplexd.actors.engines.qwen_omni.context import Context, Kind, Turn  # noqa: E402
from duplexd.actors.engines.qwen_omni.lease import LeaseTable, NoSlotFree  # noqa: E402
from duplexd.actors.engines.qwen_omni.options import QwenOmniOptions  # noqa: E402
from duplexd.actors.engines.qwen_omni.tokens import ChatTokens, Pieces, word_tokenizer  # noqa: E402
from duplexd.bus.messages import HistoryEntry as H  # noqa: E402
from tests.harness import REPO  # noqa: E402


@pytest.fixture(scope="module")
def tokens() -> ChatTokens:
    return ChatTokens(word_tokenizer("tiny"), omni_config("tiny").thinker_config)


def heard(ctx: Context, audio: int = 10) -> Turn:
    t = ctx.open_audio()
    t.audio_tokens = audio
    t.complete = True
    return t


def said(ctx: Context, tokens: ChatTokens, ids: list[int], key: str = "r") -> Turn:
    r = ctx.open_reply(key)
    for i in ids:
        r.body.append(i)
        assert r.pieces is not None
        r.pieces.add(i)
    r.complete = True
    return r


def materialize(ctx: Context) -> None:
    _, todo = ctx.sync()
    for turn, _, b in todo:
        ctx.mark_written(turn, b)
    assert ctx.sync()[1] == []


def test_pieces_join_to_the_text_and_map_a_cut_back_to_tokens(tokens: ChatTokens) -> None:
    p = Pieces(tokens)
    for i in (5, 6, 7, 253, 9):  # 253 (<|im_end|>) decodes to nothing
        p.add(i)
    assert p.pieces == ["w5", " w6", " w7", "", " w9"] and p.text == tokens.decode([5, 6, 7, 9])
    assert p.tokens_within("w5 w6") == 2
    assert p.tokens_within("") == 0
    assert p.tokens_within(" w5 w6 w7 w9 ") == 5
    assert p.tokens_within("w5 w8") is None  # not what was said
    assert tokens.encode(tokens.decode([5, 6, 7])) == [5, 6, 7]  # the word tokenizer round-trips


def test_cut_history_rolls_the_reply_back_and_only_its_tail_is_rewritten(tokens: ChatTokens) -> None:
    ctx = Context(tokens, "be brief", 1024, 32)
    u = heard(ctx)
    r = said(ctx, tokens, [5, 6, 7, 8, 9])
    materialize(ctx)
    full = ctx.kv_len
    ctx.reconcile((H("user", "", "u1"), H("assistant", "w5 w6", "a1")), "be brief")
    assert (u.item_id, r.item_id, r.cut) == ("u1", "a1", 2)
    valid, todo = ctx.sync()
    # The slot stays valid up to the last heard token; only the closing tokens are rewritten.
    assert valid == r.kv_start + len(ctx.head(r)) + 2
    assert [(t, a, b) for t, a, b in todo] == [(r, len(ctx.head(r)) + 2, ctx.length(r))]
    assert ctx.rollbacks == 1 and ctx.dropped == 3
    materialize(ctx)
    assert ctx.kv_len == full - 3


def test_history_edits_become_text_turns_and_deletions_leave_the_context(tokens: ChatTokens) -> None:
    ctx = Context(tokens, "", 1024, 32)
    u1 = heard(ctx)
    a1 = said(ctx, tokens, [5, 6])
    materialize(ctx)
    hist = (H("user", "", "u1"), H("assistant", "w5 w6", "a1"), H("user", "w40 w41", "t1"))
    ctx.reconcile(hist, "")
    assert [t.kind for t in ctx.turns] == [Kind.SYSTEM, Kind.AUDIO, Kind.REPLY, Kind.TEXT]
    assert ctx.turns[3].body == [40, 41]
    materialize(ctx)
    # The client deletes the first exchange: the text turn moves up and is prefilled again.
    ctx.reconcile((H("user", "w40 w41", "t1"),), "")
    assert ctx.turns[1].item_id == "t1" and u1 not in ctx.turns and a1 not in ctx.turns
    valid, todo = ctx.sync()
    assert valid == ctx.length(ctx.turns[0]) and todo[0][0].item_id == "t1"
    # New instructions: a new system prompt, everything after it rewritten.
    ctx.reconcile((H("user", "w40 w41", "t1"),), "speak slowly")
    assert ctx.sync()[0] == 0


def test_live_turns_wait_for_the_history_and_out_of_band_replies_are_dropped(tokens: ChatTokens) -> None:
    ctx = Context(tokens, "", 1024, 32)
    heard(ctx)
    oob = said(ctx, tokens, [5], key="oob")  # a response with conversation "none"
    live = ctx.open_audio()  # the user's next turn, still being heard
    ctx.reconcile((H("user", "", "u1"),), "")  # (sent before the host knew of either)
    assert ctx.turns[-2:] == [oob, live]
    live.complete = True
    ctx.reconcile((H("user", "", "u1"), H("user", "", "u2")), "")
    assert oob not in ctx.turns and ctx.turns[-1] is live and live.item_id == "u2"


def test_a_full_context_leaves_out_its_oldest_turns(tokens: ChatTokens) -> None:
    ctx = Context(tokens, "", 200, 40)
    hist = []
    for i in range(6):
        heard(ctx, audio=30)
        hist.append(H("user", "", f"u{i}"))
    ctx.reconcile(tuple(hist), "")
    assert ctx.total() <= 160 and ctx.evicted_turns >= 1
    assert [t.item_id for t in ctx.turns[1:]] == [f"u{i}" for i in range(6 - len(ctx.turns) + 1, 6)]


def test_lease_table_gives_the_lowest_slot_and_evicts_the_least_recently_used_idle() -> None:
    t = LeaseTable(2)
    for sid, now in (("a", 1.0), ("b", 2.0), ("c", 3.0)):
        t.add(sid, now)
    assert t.acquire("a", 1.0, lambda s: True) == (0, None)
    assert t.acquire("b", 2.0, lambda s: True) == (1, None)
    with pytest.raises(NoSlotFree):
        t.acquire("c", 3.0, lambda s: False)  # everyone busy
    assert t.acquire("c", 3.0, lambda s: True) == (0, "a")
    assert t.idle(10.0, 5.0) == ["b", "c"] and t.idle(10.0, 0) == []
    t.remove("b")
    assert t.acquire("a", 11.0, lambda s: True) == (1, None)


def test_options_are_checked() -> None:
    with pytest.raises(msgspec.ValidationError, match="stage1_device"):
        msgspec.convert({"stage1_device": "gpu0"}, QwenOmniOptions)
    with pytest.raises(msgspec.ValidationError, match="random_size"):
        msgspec.convert({"random_size": "huge"}, QwenOmniOptions)
    assert msgspec.convert({"stage0_device": "cuda:0", "stage1_device": "cuda:1"}, QwenOmniOptions).stage1_device


def test_importing_the_registry_does_not_import_torch() -> None:
    code = "import sys; import duplexd.actors.engines.registry as r; r.build_thinker; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "False"


def test_an_idle_lease_is_released_and_the_context_rebuilt_exactly() -> None:
    import time

    from duplexd.actors.engines.base import ThinkerInput
    from duplexd.actors.engines.qwen_omni.thinker import QwenOmniThinker
    from duplexd.bus.messages import ChunkKind, SessionConfig

    th = QwenOmniThinker(QwenOmniOptions(random_init=True, random_size="tiny", greedy=True, max_sessions=2,
                                         max_context=512, max_reply_tokens=6, warm_up=False, lease_idle_s=0.2,
                                         cpu_threads=1))
    th.load()
    n = th.info.chunk_samples
    rng = np.random.default_rng(0)

    def turn(sid: str, seq: int, audio: np.ndarray, rid: str) -> list[int]:
        chunks = [audio[i : i + n] for i in range(0, audio.size, n)]
        for i, c in enumerate(chunks):
            kind = ChunkKind.UTTERANCE_END if i == len(chunks) - 1 else ChunkKind.UTTERANCE
            th.step([ThinkerInput(sid, seq + i, kind, c, True)])
        for j in range(30):
            out = th.step([ThinkerInput(sid, seq + 100 + j, ChunkKind.CONTINUATION, np.zeros(n, np.float32),
                                        response_id=rid)])[0]
            if out.end_of_turn:
                break
        th.step([])  # the reply's closing tokens
        return list(th._s[sid].reply.body)

    a1, a2 = (0.1 * rng.standard_normal(16000)).astype(np.float32), (0.1 * rng.standard_normal(20000)).astype(
        np.float32
    )
    for sid in ("kept", "released"):
        th.open_session(sid, SessionConfig())
        turn(sid, 0, a1, "r1")
    th.lease_updates()
    time.sleep(0.3)
    assert th.next_due_s() == 0.0 and th.has_background_work()
    th.leases.leases["kept"].last_used = time.monotonic()  # (as if it had just been used)
    th.step([])  # housekeeping: "released" has been idle past lease_idle_s
    leases = {x.session_id: x for x in th.lease_updates()}
    assert leases["released"].state == "released" and leases["released"].slot == -1
    assert th.leases.leases["released"].slot is None and th.leases.leases["kept"].slot is not None
    # "kept" speaks first, re-leasing; "released" gets a slot again and its turns are re-prefilled.
    assert turn("kept", 1000, a2, "r2") == turn("released", 1000, a2, "r2")
    after = {x.session_id: x for x in th.lease_updates()}
    assert after["released"].state == "leased" and after["released"].tokens == after["kept"].tokens
