"""Stage0's answers: one result per chunk, applied as the model's listen/speak decision.

A result is applied only if it answers a chunk awaiting an answer, and only if neither it
nor its chunk is of an older epoch (then it is counted stale) — except the words the
model heard the user say (``input_transcript``), which are never stale. Forced chunks
always listen, whatever the engine said. In duplex a speak with no response in progress
opens one (its decision goes out first: cause, then ``response.created``).
"""

from __future__ import annotations

from duplexd.actors.session.chunks import ChunkLedger, PendingChunk
from duplexd.actors.session.core import Dest, Out, SessionCore
from duplexd.actors.session.lifecycle import ResponseLifecycle
from duplexd.actors.session.turn_detection import TurnDetector
from duplexd.bus.messages import (
    Action,
    ChunkKind,
    ContentPart,
    Decision,
    InputTranscript,
    Item,
    ItemAdded,
    ItemDone,
    ResponseOptions,
    Stage0Result,
    TurnMode,
)


class Stage0Decisions:
    """Applies each stage0 result to the session."""

    def __init__(
        self, core: SessionCore, chunks: ChunkLedger, responses: ResponseLifecycle, turns: TurnDetector
    ) -> None:
        self._core = core
        self._chunks = chunks
        self._responses = responses
        self._turns = turns

    def on_result(self, res: Stage0Result, now: float) -> None:
        core, rl = self._core, self._responses
        c = self._chunks.answer(res.chunk_seq)
        if c is None:
            core.error(
                "stage_protocol_error",
                f"stage0 answered chunk {res.chunk_seq}, which is not awaiting an answer",
                type_="server_error",
            )
            return
        if res.input_transcript is not None:
            # The user's words are never stale: stage0 keeps them across epochs, so does history.
            self._on_transcript(c, res.input_transcript)
        if res.epoch < core.epoch or c.epoch < core.epoch:
            core.counters.dropped_stale += 1
            return
        r = rl.response
        action = res.action
        if c.force_listen and action == Action.SPEAK:
            action = Action.LISTEN  # forced chunks always listen, whatever the engine said
        refused, opens_at = False, len(core.outbox)
        if (
            c.kind == ChunkKind.LIVE
            and action == Action.SPEAK
            and not res.interrupt
            and r is None
            and core.config.turn_mode == TurnMode.DUPLEX
        ):
            # Duplex: this speak opens a response. It is created first so the decision can
            # name it, and the decision goes out first: cause, then response.created.
            r = rl.create(now, ResponseOptions(), "")
            refused = r is None  # (stage restarting: its error event was sent once)
        deferred = c.kind == ChunkKind.LIVE and action == Action.SPEAK and r is not None and r.thinker_done
        decision = Decision(
            core.session_id,
            core.epoch,
            res.chunk_seq,
            action,
            res.listen_prob,
            res.text if action == Action.SPEAK else "",
            res.end_of_turn,
            c.response_id or (r.id if r and not deferred else ""),
            res.cost_ms,
        )
        core.outbox.insert(opens_at, Out(Dest.ADAPTER, "data", decision))
        if refused or c.kind in (ChunkKind.UTTERANCE, ChunkKind.UTTERANCE_END):
            return  # (utterances: the model must listen while the user's committed turn plays in)
        if c.kind == ChunkKind.CONTINUATION:
            if r is None or r.id != c.response_id:
                return  # a unit of a response that already ended
            r.input_chunks += 1
            if not r.thinker_done:
                if action == Action.SPEAK:
                    rl.speak(res, now)
                elif res.end_of_turn:
                    rl.thinker_finished(r, now)
            rl.pump(now)
            return
        # LIVE (duplex): the model's decision governs.
        if res.interrupt:
            self._turns.interrupt(now)
            rl.deferred.clear()
            return
        if action == Action.SPEAK:
            rl.speak(res, now)
        elif r is not None and not r.thinker_done and r.unit_seq > 0:
            rl.thinker_finished(r, now)  # duplex: a listen after speaking ends the turn

    def _on_transcript(self, c: PendingChunk, transcript: str) -> None:
        core = self._core
        if c.kind == ChunkKind.CONTINUATION:
            return  # silence units carry no user words
        if c.kind == ChunkKind.LIVE:
            # Duplex: the model heard a user turn; it enters history as its own user item.
            item_id = core.new_id("item")
            item = Item(id=item_id, role="user", content=(ContentPart(type="input_audio", transcript=transcript),))
            prev = core.conversation.append(item)
            core.event(ItemAdded(core.session_id, core.epoch, item, prev))
            core.event(ItemDone(core.session_id, core.epoch, item, prev))
        else:
            item_id = c.item_id
            if not core.conversation.set_transcript(item_id, transcript):
                return  # the client deleted the item meanwhile
        core.event(InputTranscript(core.session_id, core.epoch, item_id, transcript))
