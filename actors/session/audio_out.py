"""Stage1's audio and the stale-audio rule at this hop.

Audio is forwarded to the client only if it carries the current epoch *and* the active
response's id, and that response's talker has not ended. The two checks cover each other:
a completed response does not advance the epoch, so its late chunks are stopped by the id;
a stage that stamps an old epoch on the active response is stopped by the epoch.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from duplexd.actors.session.core import Dest, SessionCore
from duplexd.actors.session.lifecycle import ResponseLifecycle
from duplexd.actors.session.playback import Playback
from duplexd.actors.session.transcript import Segment
from duplexd.bus.messages import AudioOut, pcm_ms


class AudioForwarder:
    """Forwards the active response's audio and keeps its alignment and timing."""

    def __init__(self, core: SessionCore, responses: ResponseLifecycle, playback: Playback) -> None:
        self._core = core
        self._responses = responses
        self._playback = playback

    def on_audio_out(self, msg: AudioOut, now: float, frames: list[Any] | None = None) -> bool:
        """Returns whether the chunk was forwarded to the client."""
        core = self._core
        r = self._responses.response
        if (
            core.closed
            or msg.epoch != core.epoch
            or r is None
            or msg.response_id != r.id
            or r.talker_done
            or not r.has_audio
        ):
            core.counters.dropped_stale += 1
            return False
        n = int(np.asarray(msg.pcm).size)
        if n:
            if r.first_audio_at is None:
                r.first_audio_at = now
            start = r.generated_ms
            rate = core.settings.output_rate
            r.generated_samples += n
            r.generated_ms = r.sent_ms = pcm_ms(r.generated_samples, rate)
            # The client plays at real time from the first chunk; a late chunk resumes after a gap.
            r.play_end_at = max(r.play_end_at, now) + n / rate
            r.segments.append(Segment(start, r.generated_ms, msg.text))
            self._playback.audio_sent(r)
            core.emit(Dest.ADAPTER, msg, frames=frames)
        elif msg.text:
            r.segments.append(Segment(r.generated_ms, r.generated_ms, msg.text))
        if msg.end_of_turn:
            if n == 0:
                core.emit(Dest.ADAPTER, msg, frames=frames)
            r.talker_done = True
            # stage1 finished what it was given: the turn is over, whatever stage0 still says.
            r.thinker_done = True
            self._responses.maybe_finish(now)
        return True
