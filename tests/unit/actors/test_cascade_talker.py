"""CascadeTalker with the real Piper voice: small chunks, per-chunk words, turns, abort."""

from __future__ import annotations

import time

import numpy as np
import pytest

from duplexd.actors.engines.base import TalkerChunk, TalkerInput
from duplexd.actors.engines.cascade import CascadeOptions, CascadeTalker
from duplexd.actors.session.transcript import Segment, cut_text, full_text
from duplexd.bus.messages import SessionConfig

pytest.importorskip("piper")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]


@pytest.fixture(scope="module")
def talker() -> CascadeTalker:
    tk = CascadeTalker(CascadeOptions())
    tk.load()
    tk.warm_up()
    return tk


def run_turn(tk: CascadeTalker, sid: str) -> list[TalkerChunk]:
    out: list[TalkerChunk] = []
    while tk.pending(sid):
        [c] = tk.step([sid])
        assert c is not None
        out.append(c)
    return out


def test_reply_comes_out_in_small_chunks_carrying_its_words(talker: CascadeTalker) -> None:
    assert talker.output_rate == 22050  # the joe voice; stage1 resamples to 24 kHz
    talker.open_session("s1", SessionConfig())
    text = "You said: What is the weather like in Paris? I do not know yet."
    talker.feed("s1", TalkerInput(text, end_of_turn=True, turn_key="r1"))
    t0 = time.perf_counter()
    [first] = talker.step(["s1"])
    first_s = time.perf_counter() - t0
    chunks = [first, *run_turn(talker, "s1")]
    n = talker.chunk_samples
    assert n == 882  # 40 ms
    assert all(c.pcm.size <= n and c.pcm.dtype == np.float32 for c in chunks)
    assert [c.end_of_turn for c in chunks].count(True) == 1 and chunks[-1].end_of_turn
    assert "".join(c.text for c in chunks) == text  # words in order, spaced for clients that concatenate
    audio = np.concatenate([c.pcm for c in chunks])
    assert 2.5 < audio.size / 22050 < 8.0
    assert 0.3 < float(np.max(np.abs(audio))) <= 0.81  # tts_volume = 0.8
    # The first clause ("You said:") is synthesised alone: the first chunk does not wait for the rest.
    assert first_s < 0.5
    print(f"\nfirst chunk after {first_s * 1000:.0f} ms")
    # Cutting the transcript at any chunk boundary never claims a word that was not heard fully.
    segs, at = [], 0
    for c in chunks:
        dur = c.pcm.size * 1000 // 22050
        segs.append(Segment(at, at + dur, c.text))
        at += dur
    assert full_text(segs) == text
    assert cut_text(segs, 300) in ("", "You")


def test_units_of_one_turn_continue_it_and_a_new_key_starts_a_new_turn(talker: CascadeTalker) -> None:
    talker.open_session("s2", SessionConfig())
    talker.feed("s2", TalkerInput("First part.", turn_key="r1"))
    a = run_turn(talker, "s2")
    assert a and not any(c.end_of_turn for c in a)  # no end yet: the turn stays open
    talker.feed("s2", TalkerInput("", end_of_turn=True, turn_key="r1"))
    [end] = run_turn(talker, "s2")
    assert end.end_of_turn and end.pcm.size == 0
    talker.feed("s2", TalkerInput("Second reply.", end_of_turn=True, turn_key="r2"))
    b = run_turn(talker, "s2")
    assert "".join(c.text for c in b) == "Second reply." and b[-1].end_of_turn


def test_abort_drops_all_pending_audio_at_once(talker: CascadeTalker) -> None:
    talker.open_session("s3", SessionConfig())
    talker.feed("s3", TalkerInput("One sentence here. Another sentence there. And a third.", True, turn_key="r1"))
    got = [talker.step(["s3"])[0] for _ in range(3)]
    assert all(c is not None and c.pcm.size for c in got)
    talker.abort("s3")
    assert not talker.pending("s3")
    assert talker.step(["s3"]) == [None]
    # The next turn is unaffected by what was dropped.
    talker.feed("s3", TalkerInput("Fresh start.", True, turn_key="r2"))
    assert "".join(c.text for c in run_turn(talker, "s3")) == "Fresh start."
    talker.close_session("s3")
    assert talker.step(["s3"]) == [None]


def test_sentences_piper_splits_further_still_carry_every_word(talker: CascadeTalker) -> None:
    talker.open_session("s4", SessionConfig())
    text = "Dr. Smith paid $3.50 for 2 coffees."
    talker.feed("s4", TalkerInput(text, True, turn_key="r1"))
    chunks = run_turn(talker, "s4")
    assert "".join(c.text for c in chunks) == text
