"""Sentence splitting and word timing of the cascade engine (pure functions)."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from duplexd.actors.engines.cascade.text import (
    SentenceSplitter,
    clean_for_speech,
    split_first_clause,
    split_sentences,
    word_weights,
    words_per_chunk,
)


def test_sentences_end_at_terminators_followed_by_space() -> None:
    assert split_sentences("Hello there. How are you? I'm fine! Thanks…  Bye") == [
        "Hello there.",
        "How are you?",
        "I'm fine!",
        "Thanks…",
        "Bye",
    ]


def test_abbreviations_initials_and_decimals_do_not_end_a_sentence() -> None:
    text = "Dr. Smith met J. Doe at 3.5 p.m. today. It went well, e.g. the talk."
    assert split_sentences(text) == ["Dr. Smith met J. Doe at 3.5 p.m. today.", "It went well, e.g. the talk."]


def test_newlines_and_closing_quotes() -> None:
    assert split_sentences('He said "stop." Then left\nNext line') == ['He said "stop."', "Then left", "Next line"]


def test_streaming_emits_a_sentence_only_once_its_end_is_certain() -> None:
    sp = SentenceSplitter()
    assert sp.push("It is sunny") == []
    assert sp.push(" in Paris.") == []  # the "." may still be "Paris.com" or "3.5": wait for the space
    assert sp.push(" Tomorrow") == ["It is sunny in Paris."]
    assert sp.push(" rain") == []
    assert sp.flush() == ["Tomorrow rain"]
    assert sp.flush() == []


def test_long_runs_without_an_end_are_cut_at_a_comma_or_space() -> None:
    run = "one two three four five, six seven eight nine ten eleven twelve thirteen"
    sp = SentenceSplitter(max_chars=40)
    out = sp.push(run)
    assert out and all(len(s) <= 40 for s in out)
    assert out[0].endswith(",")
    assert " ".join(out + sp.flush()).split() == run.split()
    # A long sentence that arrives complete in one delta is cut too.
    long = "This sentence runs on and on, far past the limit of forty characters. Short one. "
    got = SentenceSplitter(max_chars=40).push(long)
    assert all(len(x) <= 40 for x in got) and got[-1] == "Short one."
    assert " ".join(got).split() == long.split()


_TOKENS = ["Hi", "there", ".", "!", " ", "  ", "Dr.", "3.5", "\n", "ok?", ",", "word"]


@given(st.lists(st.sampled_from(_TOKENS), max_size=40))
def test_splitting_keeps_every_word_in_order_however_the_text_is_streamed(tokens: list[str]) -> None:
    text = "".join(tokens)
    whole = split_sentences(text, max_chars=30)
    sp = SentenceSplitter(max_chars=30)
    streamed = [s for t in tokens for s in sp.push(t)] + sp.flush()
    # Every character is kept in order; words split only when one word alone exceeds max_chars.
    assert "".join("".join(whole).split()) == "".join(text.split())
    assert "".join("".join(streamed).split()) == "".join(text.split())
    if all(len(w) <= 30 for w in text.split()):
        assert " ".join(whole).split() == text.split()
        assert " ".join(streamed).split() == text.split()
    assert all(s and s == s.strip() and len(s) <= 30 for s in streamed)


def test_first_clause_split_needs_enough_words_on_both_sides() -> None:
    assert split_first_clause("You said: What is the weather like in Paris?") == [
        "You said:",
        "What is the weather like in Paris?",
    ]
    assert split_first_clause("Yes, I can.") == ["Yes, I can."]  # head too short
    assert split_first_clause("Well then, ok.") == ["Well then, ok."]  # tail too short
    assert split_first_clause("No clause marks here") == ["No clause marks here"]


def test_markdown_is_not_read_out() -> None:
    assert clean_for_speech("**Bold** and `code`\n- item\n# Title") == "Bold and code\nitem\n Title"


def test_word_weights_follow_phoneme_groups_when_they_line_up() -> None:
    words = ["Hello", "there."]
    assert word_weights(words, list("həlˈoʊ ðˈɛɹ.")) == [5.0, 3.0]
    # Mismatched groups (numbers expanded by the phonemizer): letters instead.
    assert word_weights(["$3", "ok"], list("θɹˈiː dˈɑːlɚz oʊkˈeɪ")) == [1.0, 2.0]


def test_words_belong_to_the_chunk_where_they_end_within_the_voiced_span() -> None:
    audio = np.zeros(1000, np.float32)
    audio[200:800] = 0.5  # voiced span 200..800
    texts = words_per_chunk(["a", "b", "c"], [1.0, 1.0, 1.0], audio, 100)
    assert len(texts) == 10
    # Word ends at 400, 600, 800: chunks 3, 5 and 7 (end is exclusive).
    assert texts == ["", "", "", "a", "", "b", "", "c", "", ""]
    assert " ".join(t for t in texts if t).split() == ["a", "b", "c"]


def test_words_per_chunk_covers_every_chunk_and_word() -> None:
    rng = np.random.default_rng(1)
    audio = (0.3 * rng.standard_normal(22050)).astype(np.float32)
    ws = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog"]
    texts = words_per_chunk(ws, word_weights(ws, None), audio, 882)
    assert len(texts) == -(-22050 // 882)
    assert " ".join(t for t in texts if t).split() == ws
    assert words_per_chunk([], [], audio, 882) == [""] * len(texts)


def test_take_clause_hands_out_a_first_clause_before_its_sentence_ends() -> None:
    sp = SentenceSplitter()
    assert sp.push("Paris is") == [] and sp.take_clause() == ""
    assert sp.push(" a city of light, with") == []
    assert sp.take_clause() == "Paris is a city of light,"
    assert sp.push(" old streets. Go") == ["with old streets."]
    assert sp.take_clause() == "" and sp.flush() == ["Go"]
    short = SentenceSplitter()
    short.push("Yes, it is")
    assert short.take_clause() == ""  # "Yes," alone is too short to say first
