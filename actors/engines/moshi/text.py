"""Moshi's inner-monologue text tokens → transcript deltas, one turn at a time."""

from __future__ import annotations

from typing import Any


class TextStream:
    """Incremental detokenizer: feed token ids, get the new text they add to the turn.

    A turn is decoded whole each time and the delta is what grew, so SentencePiece word
    boundaries ("▁") come out right; a trailing incomplete UTF-8 sequence waits for the
    token that completes it. Without a tokenizer, tokens show as ``<id>``.
    """

    def __init__(self, tokenizer: Any | None, skip: frozenset[int]) -> None:
        self.tokenizer = tokenizer
        self.skip = skip
        self.ids: list[int] = []
        self.sent = ""

    def reset(self) -> None:
        self.ids.clear()
        self.sent = ""

    def feed(self, tokens: list[int]) -> str:
        new = [t for t in tokens if t not in self.skip]
        if not new:
            return ""
        self.ids.extend(new)
        if self.tokenizer is None:
            text = " ".join(f"<{t}>" for t in self.ids)
        else:
            text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(self.sent):
            return ""  # mid-character, or a re-segmentation: wait for the next token
        delta, self.sent = text[len(self.sent) :], text
        return delta
