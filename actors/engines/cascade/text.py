"""Text helpers of the cascade: sentence splitting (streaming) and word-to-audio timing.

Replies are spoken sentence by sentence so the first sentence can play while the rest
is still being generated; these functions decide where a sentence ends.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

# Words ending in "." that do not end a sentence.
_ABBREV = frozenset(
    ("mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "etc", "e.g", "i.e", "a.m", "p.m", "approx", "dept")
    + ("est", "fig", "inc", "ltd", "no", "mt", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct")
    + ("nov", "dec")
)
_END = re.compile(r"[.!?…]+[\"')\]]*\s|\n+")
_MARKDOWN = re.compile(r"[*#`]+|^\s*[-•]\s+", re.MULTILINE)
_SPACES = re.compile(r"\s+")


def clean_for_speech(text: str) -> str:
    """Drops markdown markup (emphasis, headings, bullets) a voice should not read out."""
    return _MARKDOWN.sub("", text)


def _ends_sentence(text: str, end: int) -> bool:
    """Whether the terminator match ending at ``end`` closes a sentence."""
    head = text[:end].rstrip()
    if not head or head[-1] != ".":
        return True
    word = head.rsplit(None, 1)[-1].rstrip(".").lower().lstrip("\"'([")
    if word in _ABBREV:
        return False
    # A single-letter initial ("J. Smith") does not end a sentence either.
    return not (len(word) == 1 and word.isalpha())


def _cut_long(text: str, max_chars: int) -> int:
    """Where to cut ``text`` (longer than ``max_chars``): after a clause mark or a space."""
    window = text[:max_chars]
    # Prefer a clause mark late enough to leave a useful piece; else any space: a word is
    # cut only when it alone is longer than max_chars.
    for marks, floor in (((", ", "; ", ": ", " - "), max_chars // 3), ((" ",), 0)):
        pos = max(window.rfind(m) for m in marks)
        if pos > floor:
            return pos + 1
    return max_chars


class SentenceSplitter:
    """Streaming splitter: ``push`` text deltas, get back the sentences they complete.

    A sentence ends at ``.``, ``!``, ``?`` or ``…`` followed by whitespace (so "3.5" and
    a trailing "." still waiting for its space do not split), or at a newline. A run
    without an end longer than ``max_chars`` is cut at a comma or a space, bounding how
    long the voice waits for text.
    """

    def __init__(self, max_chars: int = 200) -> None:
        self.max_chars = max_chars
        self._buf = ""

    def push(self, delta: str) -> list[str]:
        self._buf += delta
        out: list[str] = []
        start = 0
        for m in _END.finditer(self._buf):
            if m.group(0).startswith("\n") or _ends_sentence(self._buf, m.end()):
                self._add(out, self._buf[start : m.end()])
                start = m.end()
        self._buf = _SPACES.sub(" ", self._buf[start:]).lstrip()
        while len(self._buf) > self.max_chars:
            cut = _cut_long(self._buf, self.max_chars)
            self._add(out, self._buf[:cut])
            self._buf = self._buf[cut:].lstrip()
        return out

    def take_clause(self, min_words: int = 3) -> str:
        """The pending text up to its first clause mark (", " "; " ": "), if at least
        ``min_words`` words precede it; "" otherwise. Lets a reply's first words reach the
        voice before its first sentence is complete."""
        for m in _CLAUSE.finditer(self._buf):
            head = self._buf[: m.start() + 1].strip()
            if len(head.split()) >= min_words:
                self._buf = self._buf[m.end() :]
                return head
        return ""

    def flush(self) -> list[str]:
        out: list[str] = []
        self._add(out, self._buf)
        self._buf = ""
        return out

    def _add(self, out: list[str], piece: str) -> None:
        s = _SPACES.sub(" ", piece).strip()
        while len(s) > self.max_chars:
            cut = _cut_long(s, self.max_chars)
            out.append(s[:cut].strip())
            s = s[cut:].strip()
        if s:
            out.append(s)


def split_sentences(text: str, max_chars: int = 200) -> list[str]:
    """All sentences of a complete text."""
    sp = SentenceSplitter(max_chars)
    return sp.push(text) + sp.flush()


_STRESS = "ˈˌ"  # IPA stress marks: letters to Python, silent to the ear
_CLAUSE = re.compile(r"[,;:]\s")


def split_first_clause(sentence: str, min_head_words: int = 2, min_tail_words: int = 3) -> list[str]:
    """The sentence cut after its first clause mark ("You said: | What is..."), when
    both sides are long enough to sound natural: the first audio of a turn then waits
    for a short clause, not a whole sentence, to be synthesised."""
    for m in _CLAUSE.finditer(sentence):
        head, tail = sentence[: m.start() + 1].strip(), sentence[m.end() :].strip()
        if len(head.split()) >= min_head_words:
            return [head, tail] if len(tail.split()) >= min_tail_words else [sentence]
    return [sentence]


def word_weights(words: Sequence[str], phonemes: Sequence[str] | None) -> list[float]:
    """Relative speaking time of each word: its phoneme count when the phonemizer's
    word groups line up with the words, else its letter count."""
    if phonemes:
        groups = [g for g in "".join(phonemes).split(" ") if g]
        if len(groups) == len(words):
            return [float(max(1, sum(ch.isalpha() and ch not in _STRESS for ch in g))) for g in groups]
    return [float(max(1, sum(ch.isalnum() for ch in w))) for w in words]


def words_per_chunk(
    words: Sequence[str], weights: Sequence[float], audio: np.ndarray, chunk_samples: int, level: float = 0.02
) -> list[str]:
    """The words each ``chunk_samples`` chunk of ``audio`` finishes speaking.

    Words are spread over the voiced span of the audio (leading and trailing silence
    excluded) in proportion to ``weights``; a word belongs to the chunk in which it ends,
    so a transcript cut at a chunk boundary never holds a word that was not fully heard.
    """
    n_chunks = max(1, -(-audio.size // chunk_samples))
    out = [""] * n_chunks
    if not words:
        return out
    voiced = np.flatnonzero(np.abs(audio) >= level)
    first, last = (int(voiced[0]), int(voiced[-1]) + 1) if voiced.size else (0, audio.size)
    ends = first + (last - first) * np.cumsum(weights) / float(sum(weights))
    per: list[list[str]] = [[] for _ in range(n_chunks)]
    for word, end in zip(words, ends, strict=True):
        idx = min(n_chunks - 1, max(0, int(np.ceil(end)) - 1) // chunk_samples)
        per[idx].append(word)
    return [" ".join(p) for p in per]
