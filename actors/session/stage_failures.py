"""Stage failures: errors, lost stages and their return, sends the host could not make, and
a client the host cannot deliver to in time.

A stage error about current work fails the response in progress (epoch advanced, named in
the error event); one about an older epoch is only reported. A stage that refuses the
session, or misses a control message, closes it: its epoch would otherwise diverge.
"""

from __future__ import annotations

from collections.abc import Callable

from duplexd.actors.session.chunks import ChunkLedger
from duplexd.actors.session.core import Dest, Out, SessionCore
from duplexd.actors.session.lifecycle import ResponseLifecycle
from duplexd.bus.messages import AudioChunk, CloseCause, Handoff, Role, StageError, StageOpen

CloseSession = Callable[[float, str, CloseCause], None]


class StageFailures:
    """What the session does when a stage fails it."""

    def __init__(
        self, core: SessionCore, chunks: ChunkLedger, responses: ResponseLifecycle, close: CloseSession
    ) -> None:
        self._core = core
        self._chunks = chunks
        self._responses = responses
        self._close = close
        self._overload_reported = -1e9

    def on_stage_error(self, err: StageError, now: float, chunk_seq: int | None = None) -> None:
        core = self._core
        core.counters.stage_errors += 1
        if err.role == Role.STAGE0 and chunk_seq is not None:
            self._chunks.answer(chunk_seq)  # the error is that chunk's one answer
        message = f"{err.role.value}: {err.message}"
        if err.code == "stage_open_failed":
            # The stage refused the session: nothing sent there would ever be answered.
            core.error(err.code, message + "; the session is closed", type_="server_error")
            self._close(now, "model stage refused the session", CloseCause.FAILED)
            return
        if err.epoch < core.epoch:
            # About work of an older epoch: the response it served has already ended.
            core.error(err.code, message, type_="server_error")
            return
        self._responses.fail(now, err.code, message)

    def on_send_failed(self, out: Out, now: float) -> None:
        """The host could not hand ``out`` to a stage (queue full or peer gone)."""
        core, msg = self._core, out.msg
        if out.plane == "control":
            # An epoch/open/close the stage never saw: its epoch would diverge from ours.
            core.error(
                "stage_unreachable",
                "the model stage did not accept a control message; the session is closed to keep it consistent",
                type_="server_error",
            )
            self._close(now, "stage unreachable", CloseCause.FAILED)
        elif isinstance(msg, AudioChunk):
            self._chunks.refused(msg.chunk_seq)
            if now - self._overload_reported >= 1.0:
                self._overload_reported = now
                core.error("overloaded", "the model is overloaded; input audio was dropped", type_="server_error")
            self._responses.pump(now)  # a capped turn may have been waiting for that unit
        elif isinstance(msg, Handoff):
            r = self._responses.response
            if r is not None and msg.response_id == r.id:
                self._responses.fail(now, "overloaded", "speech synthesis is overloaded")

    def on_client_overloaded(self, now: float) -> None:
        """The adapter cannot take this session's events as fast as they come: fail the
        response (error, epoch advance, ``response.done`` failed), or close the session
        when none is active."""
        if self._responses.response is not None:
            message = "the server could not deliver this response in time; it was stopped"
            self._responses.fail(now, "overloaded", message)
            return
        self._core.error(
            "overloaded", "the server could not deliver this session's events in time", type_="server_error"
        )
        self._close(now, "overloaded", CloseCause.FAILED)

    def on_stage_lost(self, role: Role, now: float) -> None:
        """The stage serving this session died: fail what it was doing."""
        if role == Role.STAGE0:
            self._core.stage0_ready = False
            self._chunks.lose_all()
        else:
            self._core.stage1_ready = False
        self._responses.fail(now, "stage_unavailable", f"{role.value} stopped; the session recovers when it is back")

    def on_stage_bound(self, role: Role, now: float) -> None:
        """A (new) stage serves this session: open the session there."""
        core = self._core
        dest = Dest.STAGE0 if role == Role.STAGE0 else Dest.STAGE1
        core.emit(dest, StageOpen(core.session_id, core.epoch, core.config), "control")
        if role == Role.STAGE0:
            core.stage0_ready = True
            core.send_context()
        else:
            core.stage1_ready = True
