"""Turn detection (server VAD): speech start and stop, backchannels, barge-in, idle timeout.

User speech that starts while the assistant is audible is an *overlap*, judged by how much
of it is voiced (see docs/session-semantics.md, "Overlap policy"). Short speech that stops
is a backchannel and leaves no trace. Speech that reaches ``overlap.short_ack_ms`` is an
interruption: ``speech_started`` is sent then, and with ``interrupt_response`` the reply is
cancelled in the same step, so a client that stops playback at ``speech_started`` never gets
another byte of it. The force flag always barges in. Audio of every turn mode enters here
(:meth:`TurnDetector.on_audio`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from duplexd.actors.session.core import SessionCore
from duplexd.actors.session.idle import IdleTimer
from duplexd.actors.session.lifecycle import ResponseLifecycle
from duplexd.actors.session.playback import Playback
from duplexd.actors.session.user_input import UserInput
from duplexd.actors.vad import SpeechDetector, make_detector
from duplexd.bus.messages import (
    AudioIn,
    IdleTimeout,
    ResponseOptions,
    SessionConfig,
    SpeechStarted,
    SpeechStopped,
    TurnMode,
)

# Server VAD keeps at most this much audio before a speech start (prefix padding + slack):
# silence the detector has ruled out is not kept for 15 minutes.
_VAD_KEEP_SLACK_MS = 1000
_VAD_TRIM_AFTER_MS = 5000


@dataclass(slots=True)
class Overlap:
    """User speech heard while the assistant is audible (server VAD)."""

    start_ms: float
    announced: bool = False  # speech_started sent (reached the short-ack threshold)


class TurnDetector:
    """Who has the floor, as server VAD hears it."""

    def __init__(
        self,
        core: SessionCore,
        user_input: UserInput,
        responses: ResponseLifecycle,
        playback: Playback,
        idle: IdleTimer,
        detector: SpeechDetector | None,
    ) -> None:
        self._core = core
        self._input = user_input
        self._responses = responses
        self._playback = playback
        self._idle = idle
        self.detector = detector
        self.speech_item: str | None = None  # the user item being spoken (announced)
        self._speech_start_ms = 0.0
        self.overlap: Overlap | None = None

    @property
    def user_speaking(self) -> bool:
        return self.speech_item is not None or self.overlap is not None

    # ------------------------------------------------------------------ configuration
    def reset(self) -> None:
        """(Re)start detection at the current input position (open, turn-mode switch)."""
        cfg = self._core.config
        if cfg.turn_mode == TurnMode.SERVER_VAD:
            v = cfg.vad
            floor = cfg.overlap.silence_rms
            if self.detector is None:
                self.detector = make_detector(self._core.settings.vad, v.threshold, v.silence_duration_ms, floor)
            else:
                self.detector.threshold = v.threshold
                self.detector.silence_ms = v.silence_duration_ms
                self.detector.floor_rms = floor
            self.detector.reset(self._input.input_ms)
        self.speech_item = None
        self.overlap = None

    def retune(self, cfg: SessionConfig) -> None:
        """New thresholds apply from the next window; speech in progress is kept."""
        if self.detector is not None:
            self.detector.threshold = cfg.vad.threshold
            self.detector.silence_ms = cfg.vad.silence_duration_ms
            self.detector.floor_rms = cfg.overlap.silence_rms

    def clear(self) -> None:
        """The input buffer was cleared: any speech in progress is forgotten."""
        if self.detector is not None:
            self.detector.reset(self._input.input_ms)
        self.speech_item = None
        self.overlap = None

    # ------------------------------------------------------------------ audio in
    def on_audio(self, msg: AudioIn, now: float) -> None:
        pcm = np.asarray(msg.pcm, dtype=np.float32).reshape(-1)
        if msg.force:
            self.interrupt(now)  # the explicit interrupt flag always wins
        mode = self._core.config.turn_mode
        if mode == TurnMode.DUPLEX:
            self._input.stream(pcm)
            return
        if not self._input.append(pcm):
            return
        d = self.detector
        if mode == TurnMode.SERVER_VAD and d is not None:
            for ev in d.feed(pcm, self._core.engine.input_rate):
                if ev.speaking:
                    self._speech_start(ev.at_ms, now)
                else:
                    self._speech_stop(ev.at_ms, now)
            self._overlap_progress(now)
            self._trim_buffer()

    def _trim_buffer(self) -> None:
        """Server VAD only commits from a speech start: drop old silence it ruled out."""
        d, buf, settings = self.detector, self._input.buffer, self._core.settings
        if (
            buf.ms < min(_VAD_TRIM_AFTER_MS, settings.max_input_buffer_ms / 2)
            or (d is not None and d.speaking)
            or self.user_speaking
        ):
            return
        keep_ms = self._core.config.vad.prefix_padding_ms + _VAD_KEEP_SLACK_MS
        buf.keep_tail(int(keep_ms * self._core.engine.input_rate / 1000), self._input.input_ms)

    # ------------------------------------------------------------------ speech start / stop
    def _speech_start(self, at_ms: float, now: float) -> None:
        self._idle.restart(now)
        self._speech_start_ms = at_ms
        if self._responses.assistant_audible(now):
            # Not announced yet: a backchannel must not make clients stop playback.
            self.overlap = Overlap(at_ms)
            return
        self._announce_speech(at_ms)

    def _announce_speech(self, at_ms: float) -> None:
        # audio_start_ms is where speech began on the input clock; the commit still takes
        # prefix_padding_ms before it (what the model hears), but the event does not move.
        core = self._core
        self.speech_item = core.new_id("item")
        core.event(SpeechStarted(core.session_id, core.epoch, self.speech_item, int(at_ms)))

    def _speech_stop(self, at_ms: float, now: float) -> None:
        self._idle.touch(now)
        if self.overlap is not None:
            # A single large append may start and stop speech at once: judge the full span.
            self._overlap_check(at_ms - self.overlap.start_ms, now)
            ov, self.overlap = self.overlap, None
            if ov is not None and not ov.announced:
                # A backchannel ("mm-hmm"): not a turn, not an interruption; forget its audio.
                self._core.counters.backchannels += 1
                self._input.drop_buffer()
                return
        if self.speech_item is None:
            self._announce_speech(self._speech_start_ms)  # keep started/stopped paired
        item = self.speech_item
        assert item is not None
        self.speech_item = None
        core = self._core
        core.event(SpeechStopped(core.session_id, core.epoch, item, int(at_ms)))
        if not self._input.commit(now, "", explicit=False, item_id=item, start_ms=self._speech_start_ms):
            return
        if core.config.vad.create_response:
            self._responses.answer_turn(now)

    # ------------------------------------------------------------------ overlap policy
    def _overlap_progress(self, now: float) -> None:
        ov, d = self.overlap, self.detector
        if ov is None or d is None or not d.speaking:
            return
        # Voiced time only: the hangover silence before a stop is not "sustained speech".
        self._overlap_check(d.voiced_until_ms - ov.start_ms, now)

    def _overlap_check(self, heard_ms: float, now: float) -> None:
        """The backchannel decision, made before anything is sent: an overlap that reaches
        ``short_ack_ms`` is announced, and with ``interrupt_response`` interrupts at once."""
        ov = self.overlap
        if ov is None or ov.announced or heard_ms < self._core.config.overlap.short_ack_ms:
            return
        ov.announced = True
        self._announce_speech(ov.start_ms)
        if self._core.config.vad.interrupt_response:
            self.interrupt(now)

    def _promote_overlap(self) -> None:
        """The assistant was interrupted: the overlapping speech is the user's turn."""
        ov, self.overlap = self.overlap, None
        if ov is not None and not ov.announced:
            self._announce_speech(ov.start_ms)

    def interrupt(self, now: float) -> None:
        """The user took the floor. A response still generating is cancelled; a finished
        one whose tail the client is still playing (up to stage1's lead) is silenced by an
        epoch advance, which tells clients to flush what they buffered."""
        if self._responses.response is not None:
            self._core.counters.barge_ins += 1
            self._promote_overlap()
            self._responses.cancel(now, "turn_detected")
        elif self._playback.tail_playing(now):
            self._core.counters.barge_ins += 1
            self._promote_overlap()
            self._core.advance_epoch("turn_detected")
            self._playback.silence_tail(now)

    # ------------------------------------------------------------------ idle timeout
    def idle_deadline(self) -> float | None:
        cfg = self._core.config
        if (
            cfg.turn_mode != TurnMode.SERVER_VAD
            or self._responses.response is not None
            or self.user_speaking
            or self._responses.owed
        ):
            return None
        return self._idle.deadline(cfg.vad.idle_timeout_ms, self._playback.play_end_at)

    def idle_check(self, now: float) -> None:
        deadline = self.idle_deadline()
        if deadline is None or now < deadline:
            return
        core = self._core
        self._idle.fired = True
        item = core.new_id("item")
        start, end = int(self._input.buffer.start_ms), int(self._input.input_ms)
        core.event(IdleTimeout(core.session_id, core.epoch, item, start, end))
        # Realtime commits the buffer even if empty, then asks the model to respond.
        self._input.commit(now, "", explicit=False, item_id=item, allow_empty=True)
        self._responses.create(now, ResponseOptions(), "")
