"""Per-chunk transcript alignment, so cutting assistant audio cuts the right words."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Segment:
    """The text spoken by assistant audio in [start_ms, end_ms)."""

    start_ms: int
    end_ms: int
    text: str


def full_text(segments: list[Segment]) -> str:
    return "".join(s.text for s in segments).strip()


def cut_text(segments: list[Segment], ms: int) -> str:
    """The transcript of the first ``ms`` of audio. A segment cut midway keeps the
    fraction of its words that was heard (rounded down): never more than was played."""
    out: list[str] = []
    for s in segments:
        if ms >= s.end_ms:
            out.append(s.text)
            continue
        if ms > s.start_ms and s.end_ms > s.start_ms:
            words = s.text.split()
            keep = len(words) * (ms - s.start_ms) // (s.end_ms - s.start_ms)
            if keep:
                lead = " " if s.text[:1].isspace() else ""
                out.append(lead + " ".join(words[:keep]))
        break
    return "".join(out).strip()
