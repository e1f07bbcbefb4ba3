"""Per-chunk transcript alignment, so cutting assistant audio cuts the right words.

Every assistant audio chunk arrives with the text it speaks; the session actor keeps one
:class:`Segment` per chunk. When the client reports that only the first ``ms`` of an
item was played (playback ack, ``conversation.item.truncate``), :func:`cut_text` gives the
transcript of exactly that audio: whole segments that were played completely, plus the
share of the words of the segment the cut lands in (rounded down). The result is always
a prefix of :func:`full_text`, character for character, and grows with ``ms``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_WORD = re.compile(r"\S+")


@dataclass(frozen=True, slots=True)
class Segment:
    """The text spoken by assistant audio in [start_ms, end_ms)."""

    start_ms: int
    end_ms: int
    text: str


def full_text(segments: list[Segment]) -> str:
    return "".join(s.text for s in segments).strip()


def cut_text(segments: list[Segment], ms: int) -> str:
    """The transcript of the first ``ms`` of audio (see module docstring).

    Text that arrived without audio (a segment of no duration at position ``p``) is heard
    once playback passes ``p``, or reaches it at the very end of the item: so a cut at 0 ms
    of an item with audio is empty, and a cut at its full length is :func:`full_text`.
    """
    total = max((s.end_ms for s in segments), default=0)
    out: list[str] = []
    for s in segments:
        if s.end_ms <= s.start_ms:
            if ms > s.start_ms or (ms >= s.start_ms >= total):
                out.append(s.text)
                continue
            break
        if ms >= s.end_ms:
            out.append(s.text)
            continue
        if ms > s.start_ms:
            words = list(_WORD.finditer(s.text))
            keep = len(words) * (ms - s.start_ms) // (s.end_ms - s.start_ms)
            if keep:
                # Slice the original text so spacing is kept: a true prefix of full_text.
                out.append(s.text[: words[keep - 1].end()])
        break
    return "".join(out).strip()
