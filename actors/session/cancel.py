"""Client cancels, which overtake data (cancel fences).

A cancel travels on the control plane, so it may arrive before data commands the client
sent earlier (the adapter stamps ``after_seq``, its last data seq). What is active is
cancelled at once; while commands up to ``after_seq`` are still queued, a response they
create is cancelled as soon as it appears; if none appears by the time ``after_seq`` has
been applied, the cancel is answered with ``response_cancel_not_active``. Each cancel
cancels something or errors exactly once — except one that crossed the server's own
cancel: when turn detection cancelled the newest response (``speech_started`` during
playback), a client cancel of it (by id, or without one) is already satisfied and is
answered with nothing, since clients such as LiveKit's send it on ``speech_started``.
"""

from __future__ import annotations

from dataclasses import dataclass

from duplexd.actors.session.core import SessionCore
from duplexd.actors.session.lifecycle import ResponseLifecycle
from duplexd.bus.messages import ResponseCancel


@dataclass(slots=True)
class CancelFence:
    """A client cancel that overtook data commands up to ``after_seq`` on the bus."""

    after_seq: int
    event_id: str
    applied: bool = False  # it cancelled something (else: an error once resolved)


class CancelFences:
    """Applies client cancels in client order, whatever order the bus delivered them in."""

    def __init__(self, core: SessionCore, responses: ResponseLifecycle) -> None:
        self._core = core
        self._responses = responses
        self._fences: list[CancelFence] = []
        self._seq_done = 0  # newest client data command applied (adapter seqs start at 1)

    def clear(self) -> None:
        self._fences.clear()

    def on_cancel(self, msg: ResponseCancel, now: float) -> None:
        core, rl = self._core, self._responses
        r = rl.response
        if msg.response_id:
            # Ids come from the server: one not active now cannot be created by queued commands.
            if r is None or msg.response_id != r.id:
                if msg.response_id == rl.cancelled_by_turn:
                    return  # the server cancelled it already (see module docstring)
                core.error(
                    "response_cancel_not_active",
                    f"response {msg.response_id!r} is not in progress",
                    msg.event_id,
                    param="response_id",
                )
                return
            rl.cancel(now, "client_cancelled")
            return
        if r is not None:
            rl.cancel(now, "client_cancelled")
            if self._seq_done < msg.after_seq:
                self._fences.append(CancelFence(msg.after_seq, msg.event_id, applied=True))
            return
        if self._seq_done >= msg.after_seq:
            if not rl.cancelled_by_turn:
                core.error("response_cancel_not_active", "there is no response in progress to cancel", msg.event_id)
            return
        self._fences.append(CancelFence(msg.after_seq, msg.event_id))

    def command_done(self, seq: int, now: float) -> None:
        """Client data command ``seq`` has been applied: resolve the fences it reaches."""
        self._seq_done = max(self._seq_done, seq)
        if not self._fences:
            return
        r = self._responses.response
        if r is not None and r.origin_seq is not None:
            covering = [f for f in self._fences if f.after_seq >= r.origin_seq]
            if covering:
                f = next((f for f in covering if not f.applied), covering[0])
                f.applied = True
                self._responses.cancel(now, "client_cancelled")
        keep: list[CancelFence] = []
        for f in self._fences:
            if self._seq_done < f.after_seq:
                keep.append(f)
            elif not f.applied:
                self._core.error(
                    "response_cancel_not_active", "there is no response in progress to cancel", f.event_id
                )
        self._fences = keep
