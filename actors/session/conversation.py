"""The committed conversation of one session.

An ordered list of items (what the client may list, retrieve, delete, and what stage0
gets as context), plus the per-chunk transcript alignment of every assistant audio item,
so an item can later be cut to exactly the audio the client played.
"""

from __future__ import annotations

from duplexd.actors.session.transcript import Segment, cut_text
from duplexd.bus.messages import ContentPart, HistoryEntry, Item

_AUDIO_PARTS = ("output_audio", "audio", "input_audio")


class Conversation:
    """Items in order; the session actor is its only writer."""

    def __init__(self) -> None:
        self.items: list[Item] = []
        self._alignments: dict[str, list[Segment]] = {}
        self._generated: dict[str, int] = {}  # assistant item id → ms of audio generated

    @property
    def last_id(self) -> str | None:
        return self.items[-1].id if self.items else None

    def index(self, item_id: str) -> int | None:
        return next((i for i, it in enumerate(self.items) if it.id == item_id), None)

    def find(self, item_id: str) -> Item | None:
        i = self.index(item_id)
        return None if i is None else self.items[i]

    def append(self, item: Item) -> str | None:
        """Adds ``item`` at the end; returns the id of the item before it."""
        prev = self.last_id
        self.items.append(item)
        return prev

    def insert(self, item: Item, previous_item_id: str | None) -> str | None:
        """Adds ``item`` after ``previous_item_id`` (None: at the end, "root": first);
        returns the id of the item before it. KeyError if ``previous_item_id`` is unknown."""
        if previous_item_id is None:
            return self.append(item)
        if previous_item_id == "root":
            pos = 0
        else:
            idx = self.index(previous_item_id)
            if idx is None:
                raise KeyError(previous_item_id)
            pos = idx + 1
        self.items.insert(pos, item)
        return self.items[pos - 1].id if pos > 0 else None

    def replace(self, item: Item) -> bool:
        """Puts ``item`` in place of the item with its id (False if it was deleted)."""
        i = self.index(item.id)
        if i is None:
            return False
        self.items[i] = item
        return True

    def delete(self, item_id: str) -> bool:
        i = self.index(item_id)
        if i is None:
            return False
        del self.items[i]
        return True

    def set_transcript(self, item_id: str, transcript: str) -> bool:
        """The ASR transcript of a user audio item."""
        i = self.index(item_id)
        if i is None:
            return False  # the client deleted it meanwhile
        it = self.items[i]
        parts = tuple(
            ContentPart(type=p.type, text=p.text, transcript=transcript) if p.type == "input_audio" else p
            for p in it.content
        )
        self.items[i] = Item(
            id=it.id, role=it.role, type=it.type, status=it.status, content=parts, audio_ms=it.audio_ms
        )
        return True

    def record_audio(self, item_id: str, segments: list[Segment], generated_ms: int) -> None:
        """Remembers how an assistant item's words align to its audio."""
        self._alignments[item_id] = segments
        self._generated[item_id] = generated_ms

    def generated_ms(self, item_id: str) -> int | None:
        return self._generated.get(item_id)

    def cut_assistant(self, item_id: str, ms: int) -> bool:
        """The assistant item reduced to its first ``ms`` of audio, transcript cut to the
        words heard. A client-made item has no alignment: its words stay as given."""
        i = self.index(item_id)
        if i is None or self.items[i].role != "assistant":
            return False
        it = self.items[i]
        segments = self._alignments.get(item_id)
        if segments is None:
            content = it.content
        else:
            text = cut_text(segments, ms)
            content = tuple(
                ContentPart(type=p.type, text=p.text, transcript=text) if p.type in _AUDIO_PARTS else p
                for p in it.content
            ) or (ContentPart(type="output_audio", transcript=text),)
        self.items[i] = Item(id=it.id, role=it.role, type=it.type, status=it.status, content=content, audio_ms=ms)
        return True

    def context(self) -> tuple[HistoryEntry, ...]:
        """The conversation as text for stage0. The assistant item in progress is the
        model's own output, not context yet."""
        return tuple(HistoryEntry(i.role, item_text(i), i.id) for i in self.items if i.status != "in_progress")


def item_text(item: Item) -> str:
    for part in item.content:
        if part.transcript:
            return part.transcript
        if part.text:
            return part.text
    return ""
