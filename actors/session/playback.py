"""What the client has played: the playback cursor, playback acks and truncates.

History commits only what the client played (under ``ack_only``), and a truncate cuts an
assistant item to where the client stopped: the cursor is where both land. The estimate of
when the client's playback ends (``play_end_at``) tells turn detection whether the
assistant is still audible after its response ended.
"""

from __future__ import annotations

from dataclasses import dataclass

from duplexd.actors.session.core import SessionCore
from duplexd.actors.session.response import Response
from duplexd.bus.messages import (
    CommitPolicy,
    ItemTruncate,
    ItemTruncated,
    PlaybackAck,
    PlaybackCommitted,
    PlaybackCursor,
    ResponseStatus,
)


@dataclass(slots=True)
class Cursor:
    """Playback position of the newest assistant audio item."""

    item_id: str = ""
    generated_ms: int = 0
    sent_ms: int = 0
    played_ms: int = 0
    committed_ms: int = 0

    def view(self) -> PlaybackCursor:
        return PlaybackCursor(self.generated_ms, self.sent_ms, self.played_ms, self.committed_ms)


class Playback:
    """The cursor and the playback-end estimate; applies acks and truncates."""

    def __init__(self, core: SessionCore) -> None:
        self._core = core
        self.cursor = Cursor()
        self.play_end_at = 0.0  # when the client will have played the last reply (estimate)

    def tail_playing(self, now: float) -> bool:
        """The client still plays the end of a reply that has ended on the server."""
        return now < self.play_end_at

    def silence_tail(self, now: float) -> None:
        self.play_end_at = now

    def audio_sent(self, r: Response) -> None:
        """Audio of ``r`` went to the client (the host forwards it as it is generated)."""
        if self.cursor.item_id != r.item_id:
            self.cursor = Cursor(r.item_id)
        self.cursor.generated_ms = self.cursor.sent_ms = r.generated_ms

    def reply_ended(self, r: Response, status: ResponseStatus, now: float) -> int:
        """``r`` ended: how many ms of its audio history keeps; the cursor and the
        playback-end estimate move to match."""
        committed = r.generated_ms
        played = self.cursor.played_ms if self.cursor.item_id == r.item_id else 0
        if self._core.config.commit_policy == CommitPolicy.ACK_ONLY:
            committed = min(played, committed)
        if r.truncated_ms is not None:
            committed = min(committed, r.truncated_ms)
        self.cursor = Cursor(r.item_id, r.generated_ms, r.sent_ms, played, committed if r.in_history else 0)
        if status in (ResponseStatus.CANCELLED, ResponseStatus.FAILED):
            # The epoch advance told the client to flush: nothing of it plays on.
            self.play_end_at = min(self.play_end_at, now)
        else:
            self.play_end_at = max(self.play_end_at, r.play_end_at)
        return committed

    def ack(self, msg: PlaybackAck, active: Response | None) -> None:
        core, conv = self._core, self._core.conversation
        r = active if active is not None and active.item_id == msg.item_id else None
        gen = r.generated_ms if r is not None else conv.generated_ms(msg.item_id)
        if gen is None:
            core.error("item_not_found", f"no assistant audio item {msg.item_id!r}", msg.event_id, param="item_id")
            return
        played = max(0, min(msg.played_ms, gen))
        c = self.cursor
        if c.item_id == msg.item_id:
            played = c.played_ms = max(played, c.played_ms)
        if r is None and core.config.commit_policy == CommitPolicy.ACK_ONLY:
            item = conv.find(msg.item_id)
            if item is not None and item.role == "assistant":
                if played > item.audio_ms:  # acks never shrink history (truncate does)
                    self._cut_assistant(msg.item_id, played)
                played = max(played, item.audio_ms)
                if c.item_id == msg.item_id:
                    c.committed_ms = played
        core.event(
            PlaybackCommitted(
                core.session_id, core.epoch, msg.response_id, msg.item_id, played, tuple(conv.items), msg.event_id
            )
        )

    def truncate(self, msg: ItemTruncate, active: Response | None) -> bool:
        """Applies a truncate; True if it cut the item still playing (``active``'s), whose
        rest the client will never hear: the caller ends that response."""
        core, conv = self._core, self._core.conversation
        item = conv.find(msg.item_id)
        if item is None or item.role != "assistant":
            core.error(
                "item_not_found", f"no assistant item {msg.item_id!r} to truncate", msg.event_id, param="item_id"
            )
            return False
        r = active if active is not None and active.item_id == msg.item_id else None
        gen = r.generated_ms if r is not None else conv.generated_ms(msg.item_id)
        gen = item.audio_ms if gen is None else gen
        if msg.content_index != 0:
            core.error("invalid_value", "content_index must be 0", msg.event_id, param="content_index")
            return False
        if msg.audio_end_ms < 0 or msg.audio_end_ms > gen:
            core.error(
                "invalid_value",
                f"audio_end_ms {msg.audio_end_ms} is outside the item's {gen} ms of audio",
                msg.event_id,
                param="audio_end_ms",
            )
            return False
        c = self.cursor
        if r is not None:
            # Still playing: the item enters history cut here when the response ends (now).
            r.truncated_ms = msg.audio_end_ms
            if c.item_id == msg.item_id:
                c.played_ms = msg.audio_end_ms
        else:
            self._cut_assistant(msg.item_id, msg.audio_end_ms)
            if c.item_id == msg.item_id:
                c.played_ms = c.committed_ms = msg.audio_end_ms
        core.event(
            ItemTruncated(core.session_id, core.epoch, msg.item_id, msg.audio_end_ms, msg.content_index, msg.event_id)
        )
        return r is not None

    def _cut_assistant(self, item_id: str, ms: int) -> None:
        if self._core.conversation.cut_assistant(item_id, ms):
            self._core.send_context()
