"""Transcript cuts: the words of exactly the audio that was played."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from duplexd.actors.session.transcript import Segment, cut_text, full_text


def segs(*parts: tuple[int, str]) -> list[Segment]:
    """Consecutive segments from (duration ms, text)."""
    out, t = [], 0
    for dur, text in parts:
        out.append(Segment(t, t + dur, text))
        t += dur
    return out


def test_whole_segments_then_the_heard_share_of_the_cut_one_rounded_down() -> None:
    s = segs((100, "Hello"), (100, " there, how"), (200, " are you doing today"))
    assert cut_text(s, 0) == ""
    assert cut_text(s, 99) == ""  # "Hello" was not fully played
    assert cut_text(s, 100) == "Hello"
    assert cut_text(s, 150) == "Hello there,"  # half of 2 words
    assert cut_text(s, 249) == "Hello there, how"  # 49/200 of 4 words: none yet
    assert cut_text(s, 300) == "Hello there, how are you"
    assert cut_text(s, 400) == "Hello there, how are you doing today" == full_text(s)
    assert cut_text(s, 10_000) == full_text(s)


def test_spacing_is_kept_so_a_cut_is_a_true_prefix() -> None:
    s = segs((100, "one  two\tthree"), (100, " four"))
    assert cut_text(s, 67) == "one  two"
    assert full_text(s).startswith(cut_text(s, 67))


def test_text_without_audio_is_heard_once_playback_passes_it_or_at_the_end() -> None:
    s = [Segment(0, 0, "Intro"), Segment(0, 100, " body"), Segment(100, 100, " mid"), Segment(100, 200, " tail")]
    s.append(Segment(200, 200, " outro"))
    assert cut_text(s, 0) == ""  # nothing played: not even the text that came first
    assert cut_text(s, 1) == "Intro"
    assert cut_text(s, 100) == "Intro body"
    assert cut_text(s, 101) == "Intro body mid"
    assert cut_text(s, 200) == "Intro body mid tail outro" == full_text(s)
    # No audio at all: all text counts (there is nothing to cut).
    assert cut_text([Segment(0, 0, "only text")], 0) == "only text"


def test_subword_segments() -> None:
    s = segs((40, "Hel"), (40, "lo"), (40, " world"))
    assert cut_text(s, 40) == "Hel"
    assert cut_text(s, 80) == "Hello"
    assert cut_text(s, 100) == "Hello"


segment_lists = st.lists(
    st.tuples(
        st.sampled_from([0, 0, 20, 40, 40, 100]),
        st.text(alphabet=st.sampled_from("ab c\n"), max_size=12),
    ),
    max_size=12,
).map(lambda parts: segs(*parts))


@given(segment_lists, st.integers(-10, 1000), st.integers(0, 1000))
def test_cut_is_a_prefix_grows_with_ms_and_is_everything_at_the_end(s: list[Segment], ms: int, more: int) -> None:
    full = full_text(s)
    a, b = cut_text(s, ms), cut_text(s, ms + more)
    assert full.startswith(a) and full.startswith(b)
    assert b.startswith(a)
    total = max((x.end_ms for x in s), default=0)
    assert cut_text(s, total) == full
    if ms <= 0 and total > 0:
        assert a == ""
