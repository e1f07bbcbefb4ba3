"""The Moshi thinker and talker around a tiny checkpoint loaded from disk: slots, the
stage-side refusal, decisions, carried frames, text deltas, the pass-through talker."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from duplexd.actors.engines.base import EngineError, TalkerInput, ThinkerInput  # noqa: E402
from duplexd.actors.engines.moshi import MoshiOptions  # noqa: E402
from duplexd.actors.engines.moshi.talker import MoshiTalker  # noqa: E402
from duplexd.actors.engines.moshi.text import TextStream  # noqa: E402
from duplexd.actors.engines.moshi.thinker import MoshiThinker  # noqa: E402
from duplexd.bus.messages import Action, ChunkKind, SessionConfig, TurnMode  # noqa: E402
from tests.moshi_tiny import save_tiny, tiny_tokenizer  # noqa: E402

F = 1920
DUPLEX = SessionConfig(turn_mode=TurnMode.DUPLEX, listen_prob_scale=30.0)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("moshi") / "tiny")


def thinker(ckpt: Path, **kw: object) -> MoshiThinker:
    opts = {"model_path": str(ckpt), "device": "cpu", "cpu_threads": 1, "max_sessions": 2, "seed": 5,
            "speech_rms": 1e9, "hangover_frames": 1, "context_frames": 32, **kw}
    th = MoshiThinker(MoshiOptions(**opts))  # type: ignore[arg-type]
    th.load()
    th.warm_up()
    return th


def chunk(sid: str, seq: int, force: bool = False, seed: int = 0) -> ThinkerInput:
    pcm = (0.1 * np.random.default_rng(seed * 1000 + seq).standard_normal(F)).astype(np.float32)
    return ThinkerInput(sid, seq, ChunkKind.LIVE, pcm, force)


def test_importing_the_registry_does_not_import_torch() -> None:
    code = "import sys, duplexd.actors.engines.registry as r; r.engine_names(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_slots_are_leased_refused_when_full_and_reused(ckpt: Path) -> None:
    th = thinker(ckpt)
    th.open_session("a", DUPLEX)
    th.open_session("b", DUPLEX)
    with pytest.raises(EngineError) as err:
        th.open_session("c", DUPLEX)
    assert err.value.code == "capacity_exceeded" and "all 2 model slots are in use" in str(err.value)
    th.close_session("a")
    th.open_session("c", DUPLEX)
    assert th.slots.slot("c") == 0  # the lowest free slot


def test_decisions_text_and_audio_come_from_the_models_frames(ckpt: Path) -> None:
    th = thinker(ckpt)
    th.open_session("a", DUPLEX)
    outs = [th.step([chunk("a", i, force=i < 3)])[0] for i in range(40)]
    assert all(o.action == Action.LISTEN for o in outs[:4])  # 3 forced + Moshi's empty frame 0
    speaks = [o for o in outs if o.action == Action.SPEAK]
    assert speaks and len(speaks) < 36  # the pad bias makes it listen too
    for o in speaks:
        assert o.hidden is not None and o.hidden.shape == (F,) and o.hidden.dtype == np.float32
        assert o.tokens is not None and o.tokens.shape == (1, 9)
        assert o.text.strip() == f"w{int(o.tokens[0, 0])}"  # hangover 1: a turn per word
    assert all(0.0 <= o.listen_prob <= 1.0 for o in outs)


def test_silence_fed_frames_go_out_with_the_next_answer(ckpt: Path) -> None:
    th = thinker(ckpt, speech_rms=0.0)
    th.open_session("a", SessionConfig(turn_mode=TurnMode.DUPLEX))
    th.open_session("b", SessionConfig(turn_mode=TurnMode.DUPLEX))
    for i in range(4):
        th.step([chunk("a", i), chunk("b", i)])
    for i in range(4, 6):  # b is late twice: fed silence, its frames are kept
        th.step([chunk("a", i)])
    out = th.step([chunk("a", 6), chunk("b", 4)])
    assert out[0].hidden is not None and out[0].hidden.size == F
    assert out[1].action == Action.SPEAK and out[1].hidden is not None and out[1].hidden.size == 3 * F


def test_a_cancel_mutes_the_utterance_in_progress(ckpt: Path) -> None:
    th = thinker(ckpt, speech_rms=0.0, cancel_mute_frames=4)  # type: ignore[arg-type]
    th.open_session("a", SessionConfig(turn_mode=TurnMode.DUPLEX))
    for i in range(5):
        th.step([chunk("a", i)])
    assert th.sessions["a"].speaking  # random codec audio: always loud
    th.discard_pending("a")
    outs = [th.step([chunk("a", 5 + i)])[0] for i in range(6)]
    assert [o.action for o in outs[:4]] == [Action.LISTEN] * 4  # muted, text forced to pad
    assert outs[4].action == Action.SPEAK  # the cap passed: the model's own turn-taking again


def test_text_stream_gives_deltas_of_whole_words() -> None:
    ts = TextStream(tiny_tokenizer(), frozenset({0, 3}))
    assert ts.feed([5]) == "w5"
    assert ts.feed([3, 0]) == ""
    assert ts.feed([7, 9]) == " w7 w9"
    ts.reset()
    assert ts.feed([11]) == "w11"
    raw = TextStream(None, frozenset({3}))
    assert raw.feed([4]) == "<4>" and raw.feed([8]) == " <8>"


def test_talker_plays_frames_with_their_words_and_flushes() -> None:
    t = MoshiTalker(MoshiOptions())
    pcm = np.arange(2 * F, dtype=np.float32) / (2 * F)
    t.feed("s", TalkerInput(text="w1", hidden=pcm, turn_key="r1"))
    t.feed("s", TalkerInput(end_of_turn=True, turn_key="r1"))
    chunks = []
    while t.pending("s"):
        chunks.append(t.step(["s"])[0])
    assert [c.pcm.size for c in chunks] == [F, F]
    assert [c.text for c in chunks] == ["w1", ""]
    assert [c.end_of_turn for c in chunks] == [False, True]
    np.testing.assert_array_equal(np.concatenate([c.pcm for c in chunks]), pcm)
    t.feed("s", TalkerInput(text="w2", hidden=pcm[:F], turn_key="r2"))
    t.abort("s")
    assert not t.pending("s")
