"""The user's audio: the input clock, the turn buffer and its commit, the duplex stream.

Turn modes keep the audio since the last commit in an :class:`InputBuffer`; a commit
makes it a user item in history and sends it to stage0 as utterance chunks. Duplex sends
every complete chunk to stage0 at once as a ``LIVE`` chunk (the first
``force_listen_count`` of a stream forced to listen); only the partial chunk is kept.
"""

from __future__ import annotations

import numpy as np

from duplexd.actors.session.chunks import ChunkLedger
from duplexd.actors.session.core import SessionCore
from duplexd.actors.session.input_buffer import InputBuffer, Pcm
from duplexd.actors.session.lifecycle import ResponseLifecycle
from duplexd.bus.messages import ChunkKind, ContentPart, InputCommitted, Item, ItemAdded, ItemDone, TurnMode, pcm_ms


class UserInput:
    """Input audio of one session, positioned on its input clock (ms received)."""

    def __init__(self, core: SessionCore, chunks: ChunkLedger, responses: ResponseLifecycle) -> None:
        self._core = core
        self._chunks = chunks
        self._responses = responses
        self.input_ms = 0.0  # stream position: ms of input audio received
        self.buffer = InputBuffer(core.engine.input_rate)
        self._live = np.zeros(0, dtype=np.float32)  # duplex: partial chunk
        self._live_chunks = 0  # duplex chunks sent (force_listen_count)

    def duration_ms(self, pcm: Pcm) -> float:
        return pcm.size * 1000 / self._core.engine.input_rate

    def append(self, pcm: Pcm) -> bool:
        """Turn modes: ``pcm`` joins the buffer (False: refused, the buffer would overflow)."""
        dur = self.duration_ms(pcm)
        limit = self._core.settings.max_input_buffer_ms
        if self.buffer.ms + dur > limit:
            # Dropped whole: the stream position does not move, so VAD positions stay true.
            self._core.error(
                "input_audio_buffer_full", f"input buffer would exceed {limit} ms; commit or clear it"
            )
            return False
        self.buffer.append(pcm, self.input_ms)
        self.input_ms += dur
        return True

    def stream(self, pcm: Pcm) -> None:
        """Duplex: every complete chunk goes to stage0 now."""
        self.input_ms += self.duration_ms(pcm)
        n = self._core.engine.chunk_samples
        buf = np.concatenate((self._live, pcm)) if self._live.size else pcm
        k = buf.size // n
        for i in range(k):
            force = self._live_chunks < self._core.config.force_listen_count
            self._live_chunks += 1
            self._chunks.send(ChunkKind.LIVE, buf[i * n : (i + 1) * n], force_listen=force)
        self._live = buf[k * n :].copy()

    def restart_stream(self) -> None:
        """The duplex stream (re)starts: ``force_listen_count`` applies again."""
        self._live_chunks = 0

    def drop_buffer(self) -> None:
        self.buffer.drop(self.input_ms)

    def clear(self) -> None:
        """Nothing uncommitted is kept: the turn buffer and the duplex partial chunk go."""
        self.drop_buffer()
        self._live = np.zeros(0, dtype=np.float32)

    def commit(
        self,
        now: float,
        event_id: str,
        explicit: bool,
        item_id: str | None = None,
        start_ms: float | None = None,
        allow_empty: bool = False,
    ) -> bool:
        """The buffer becomes a user item (from ``start_ms`` minus the prefix padding, if
        given) and goes to stage0. False if there was nothing to commit."""
        core = self._core
        if not self.buffer.samples and not allow_empty:
            if explicit:
                msg = "cannot commit an empty input audio buffer"
                if core.config.turn_mode == TurnMode.DUPLEX:
                    msg += " (duplex mode streams input to the model; there is nothing to commit)"
                core.error("input_audio_buffer_commit_empty", msg, event_id)
            return False
        # Server VAD commits from the speech start minus the prefix padding.
        pcm = self.buffer.take(
            None if start_ms is None else start_ms - core.config.vad.prefix_padding_ms, self.input_ms
        )
        item_id = item_id or core.new_id("item")
        audio_ms = pcm_ms(pcm.size, core.engine.input_rate)
        item = Item(id=item_id, role="user", content=(ContentPart(type="input_audio"),), audio_ms=audio_ms)
        prev = core.conversation.append(item)
        self._responses.turn_committed()
        core.event(InputCommitted(core.session_id, core.epoch, item_id, prev))
        core.event(ItemAdded(core.session_id, core.epoch, item, prev))
        core.event(ItemDone(core.session_id, core.epoch, item, prev))
        self._chunks.send_utterance(pcm, item_id)
        return True
