"""A session as the session host holds it: its actor, the processes that serve it, and
what the host notes as the session's messages leave (cursors, the response log line,
latency histograms)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from duplexd.actors.session import Out, SessionActor
from duplexd.bus.log import get_logger, log
from duplexd.bus.messages import (
    AudioChunk,
    AudioOut,
    Decision,
    ErrorEvent,
    InputCommitted,
    KvLease,
    ResponseCreated,
    ResponseDone,
    SpeechStopped,
)
from duplexd.bus.metrics import FIRST_AUDIO_SECONDS, RESPONSES, SPEECH_END_TO_AUDIO_SECONDS

_log = get_logger("duplexd.actors.host")


@dataclass(slots=True)
class Bound:
    """One session and the peers it is bound to (identities; None: that stage is gone)."""

    actor: SessionActor
    adapter: bytes
    stage0: bytes | None
    stage1: bytes | None
    first_audio_logged: str = ""
    chunk_sent: int = -1  # newest chunk_seq sent to stage0
    decision_shown: int = -1  # newest chunk_seq whose Decision reached the adapter
    speech_end_at: float | None = None  # the user's turn ended (speech stopped, or committed)
    turn_response: str = ""  # the response that answers that turn
    kv_lease: KvLease | None = None  # the newest lease report of its stage0

    def observe(self, out: Out, now: float) -> None:
        """``out`` has just left for its peer."""
        msg = out.msg
        if isinstance(msg, AudioChunk):
            self.chunk_sent = msg.chunk_seq
        elif isinstance(msg, Decision):
            self.decision_shown = msg.chunk_seq
        elif isinstance(msg, SpeechStopped | InputCommitted):
            if self.speech_end_at is None or self.turn_response:
                self.speech_end_at, self.turn_response = now, ""
        elif isinstance(msg, ResponseCreated):
            if self.speech_end_at is not None and not self.turn_response:
                self.turn_response = msg.response.id
        elif isinstance(msg, ResponseDone):
            if msg.response.id == self.turn_response:
                self.speech_end_at, self.turn_response = None, ""
            RESPONSES.labels(status=msg.response.status.value).inc()
            log(
                _log,
                logging.INFO,
                "response done",
                session_id=msg.session_id,
                response_id=msg.response.id,
                epoch=msg.epoch,
                status=msg.response.status.value,
                reason=msg.response.reason,
            )
        elif isinstance(msg, AudioOut) and msg.response_id != self.first_audio_logged:
            self.first_audio_logged = msg.response_id
            r = self.actor.response
            if r is not None and r.id == msg.response_id:
                FIRST_AUDIO_SECONDS.observe(max(0.0, now - r.created_at))
            if msg.response_id == self.turn_response and self.speech_end_at is not None:
                SPEECH_END_TO_AUDIO_SECONDS.observe(max(0.0, now - self.speech_end_at))
                self.speech_end_at, self.turn_response = None, ""
        elif isinstance(msg, ErrorEvent):
            # The adapter logs the one INFO line per error event a client gets ("client error").
            log(
                _log,
                logging.DEBUG,
                "error event",
                session_id=msg.session_id,
                response_id=msg.response_id,
                epoch=msg.epoch,
                code=msg.code,
                error=msg.message,
            )
