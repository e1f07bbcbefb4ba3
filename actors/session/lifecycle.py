"""The response lifecycle: created, fed, spoken, and ended exactly once.

At most one response is active. It ends in exactly one place (:meth:`finish`), which
commits the assistant item to history (cut to what was played, see playback.py) and sends
the one terminal ``response.done``; a cancel or a failure advances the epoch first. A user
turn committed while a reply plays is *owed* an answer once the reply ends normally; in
duplex a speak for the next turn while the last one still plays is *deferred* and replayed
in order.
"""

from __future__ import annotations

from duplexd.actors.session.continuation import ContinuationPacer
from duplexd.actors.session.core import Dest, SessionCore
from duplexd.actors.session.idle import IdleTimer
from duplexd.actors.session.playback import Playback
from duplexd.actors.session.response import Response, assistant_item, response_info
from duplexd.actors.session.transcript import cut_text, full_text
from duplexd.bus.messages import (
    Handoff,
    ItemDone,
    ResponseCreated,
    ResponseDone,
    ResponseInfo,
    ResponseOptions,
    ResponseStatus,
    Stage0Result,
    TextOut,
    TurnMode,
)


class ResponseLifecycle:
    """The active response and the rules of its life."""

    def __init__(self, core: SessionCore, playback: Playback, pacer: ContinuationPacer, idle: IdleTimer) -> None:
        self._core = core
        self._playback = playback
        self._pacer = pacer
        self._idle = idle
        self.response: Response | None = None
        self.owed = False  # a response is owed once the active one ends
        self.awaiting_reply = False  # a user turn was committed and not answered yet
        self.deferred: list[Stage0Result] = []  # duplex: speaks of the next turn, held
        # The newest response, if the server's turn detection cancelled it and no response
        # came after it: a client cancel of it that crossed the server's is not an error.
        self.cancelled_by_turn = ""

    def assistant_audible(self, now: float) -> bool:
        return self.response is not None or self._playback.tail_playing(now)

    def turn_committed(self) -> None:
        self.awaiting_reply = True

    def answer_turn(self, now: float) -> None:
        """A committed user turn wants an answer: now, or once the current reply ends."""
        if self.response is None:
            self.create(now, ResponseOptions(), "")
        else:
            self.owed = True

    # ------------------------------------------------------------------ start
    def create(self, now: float, opts: ResponseOptions, event_id: str) -> Response | None:
        core = self._core
        if self.response is not None:
            core.error(
                "conversation_already_has_active_response",
                f"response {self.response.id} is still in progress",
                event_id,
            )
            return None
        if not (core.stage0_ready and core.stage1_ready):
            msg = "the model is restarting; try again shortly"
            core.error("stage_unavailable", msg, event_id, type_="server_error")
            return None
        modalities = opts.output_modalities or core.config.output_modalities
        r = Response(
            id=core.new_id("resp"),
            item_id=core.new_id("item"),
            options=opts,
            modalities=tuple(modalities),
            created_at=now,
            previous_item_id=core.conversation.last_id,
            in_history=opts.conversation != "none",
            origin_seq=core.command_seq,
            next_unit_at=now,
        )
        self.response = r
        self.cancelled_by_turn = ""
        core.counters.responses += 1
        self.owed = False
        self.awaiting_reply = False
        item = assistant_item(r, "in_progress", "")
        if r.in_history:
            # The item takes its place in the conversation now (Realtime: output_item.added),
            # so user turns committed while it plays come after it.
            core.conversation.append(item)
        core.send_context(opts.instructions)
        core.event(ResponseCreated(core.session_id, core.epoch, response_info(r, ResponseStatus.IN_PROGRESS), item))
        if core.config.turn_mode != TurnMode.DUPLEX:
            self.pump(now)
        return r

    # ------------------------------------------------------------------ progress
    def pump(self, now: float) -> None:
        """Continuation units due by ``now``; a capped turn that got all its answers ends."""
        r = self.response
        if r is not None and self._pacer.pump(r, now):
            self.thinker_finished(r, now, incomplete="turn_cap")

    def deadline(self) -> float | None:
        return None if self.response is None else self._pacer.deadline(self.response)

    def speak(self, res: Stage0Result, now: float) -> None:
        """A speak decision: its words go to stage1 (audio) or to the client (text)."""
        core = self._core
        r = self.response
        if r is None:
            if core.config.turn_mode != TurnMode.DUPLEX:
                return
            r = self.create(now, ResponseOptions(), "")
            if r is None:
                return
        elif r.thinker_done:
            if core.config.turn_mode == TurnMode.DUPLEX:
                self.deferred.append(res)  # a new turn while the last one still plays
            return
        text, end = res.text, res.end_of_turn
        limit = r.options.max_output_tokens or core.config.max_output_tokens
        if limit and text:
            words = text.split()
            if r.words + len(words) > limit:
                text = " ".join(words[: max(0, limit - r.words)])
                end = True
                r.incomplete_reason = "max_output_tokens"
            r.words += len(text.split())
        if r.has_audio:
            core.emit(
                Dest.STAGE1,
                Handoff(
                    core.session_id,
                    core.epoch,
                    r.id,
                    r.item_id,
                    r.unit_seq,
                    text=text,
                    end_of_turn=end,
                    tokens=res.tokens,
                    hidden=res.hidden,
                    voice=self._voice(r),
                ),
            )
            r.unit_seq += 1
        elif text:
            r.text.append(text)
            core.event(TextOut(core.session_id, core.epoch, r.id, r.item_id, text))
        if end:
            r.thinker_done = True
            if not r.has_audio:
                r.talker_done = True
            self.maybe_finish(now)

    def thinker_finished(self, r: Response, now: float, incomplete: str = "") -> None:
        """The model ended its turn (or the cap did): stage1 is told to flush."""
        if r.thinker_done:
            return
        core = self._core
        r.thinker_done = True
        r.incomplete_reason = r.incomplete_reason or incomplete
        if r.has_audio and r.unit_seq > 0:
            core.emit(
                Dest.STAGE1,
                Handoff(
                    core.session_id, core.epoch, r.id, r.item_id, r.unit_seq, end_of_turn=True, voice=self._voice(r)
                ),
            )
            r.unit_seq += 1
        else:
            r.talker_done = True
        self.maybe_finish(now)

    def _voice(self, r: Response) -> str:
        return r.options.voice or self._core.config.voice

    # ------------------------------------------------------------------ end
    def maybe_finish(self, now: float) -> None:
        r = self.response
        if r is not None and r.thinker_done and r.talker_done:
            status = ResponseStatus.INCOMPLETE if r.incomplete_reason else ResponseStatus.COMPLETED
            self.finish(status, now, reason=r.incomplete_reason)

    def cancel(self, now: float, reason: str) -> None:
        if self.response is None:
            return
        self._core.advance_epoch(reason)
        self.deferred.clear()
        self.finish(ResponseStatus.CANCELLED, now, reason=reason)

    def fail(self, now: float, code: str, message: str) -> None:
        """A stage failed: the client is told, naming the response it failed (if any)."""
        r = self.response
        self._core.error(code, message, response_id=r.id if r else "", type_="server_error")
        if r is not None:
            self._core.advance_epoch("stage_error")
            self.deferred.clear()
            self.finish(ResponseStatus.FAILED, now, reason="error", error=(code, message))

    def finish(self, status: ResponseStatus, now: float, reason: str = "", error: tuple[str, str] = ("", "")) -> None:
        """The one place a response ends: item into history, ItemDone, ResponseDone."""
        r = self.response
        if r is None:
            return
        core, conv = self._core, self._core.conversation
        self.response = None
        self.cancelled_by_turn = r.id if status == ResponseStatus.CANCELLED and reason == "turn_detected" else ""
        item_status = "completed" if status == ResponseStatus.COMPLETED else "incomplete"
        if r.has_audio:
            full = full_text(r.segments)
            committed = self._playback.reply_ended(r, status, now)
            transcript = full if committed >= r.generated_ms else cut_text(r.segments, committed)
            conv.record_audio(r.item_id, r.segments, r.generated_ms)
            item = assistant_item(r, item_status, transcript, committed)
        else:
            full = transcript = "".join(r.text)
            item = assistant_item(r, item_status, transcript)
        if r.in_history and conv.replace(item):  # (unless the client deleted it meanwhile)
            core.send_context()
        core.event(ItemDone(core.session_id, core.epoch, item, r.previous_item_id))
        core.counters.done_events += 1
        core.event(
            ResponseDone(
                core.session_id, core.epoch, response_info(r, status, reason, (item,), error), transcript=full
            )
        )
        self._idle.restart(now)
        owed = self.owed and status in (ResponseStatus.COMPLETED, ResponseStatus.INCOMPLETE)
        self.owed = False
        if core.closed:
            return
        if owed:
            # A user turn committed while this reply played: answer it now.
            self.create(now, ResponseOptions(), "")
        duplex = core.config.turn_mode == TurnMode.DUPLEX
        if self.deferred and self.response is None and duplex:
            # The model started its next turn while this one still played: replay it, in
            # order; a speak that ends that turn defers the rest again.
            speaks, self.deferred = self.deferred, []
            for res in speaks:
                self.speak(res, now)
        elif not duplex:
            self.deferred.clear()

    # ------------------------------------------------------------------ inspection
    def info_so_far(self) -> ResponseInfo | None:
        """The response in progress with its item as it stands (snapshot)."""
        r = self.response
        if r is None:
            return None
        item = assistant_item(r, "in_progress", r.text_so_far(), r.generated_ms)
        return response_info(r, ResponseStatus.IN_PROGRESS, output=(item,))
