"""Stage0 of the Moshi engine: the whole model, one lockstep step per 80 ms frame.

Each session holds a slot of the runner's batch. Every step feeds every slot one frame:
the session's queued chunk, or silence when it has none (so one late client never holds
the others back for long and every stream stays continuous). The step returns each
slot's output frame; this module turns frames into decisions:

* a frame is *active* when its text token is a word (not the pad / end-of-pad tokens)
  or its audio is at least ``speech_rms``; the model speaks from its first active frame
  until ``hangover_frames`` quiet frames in a row, so pauses between words do not end
  the turn. Speaking frames are SPEAK decisions carrying their audio and text delta;
  the session actor opens a response on the first and ends it on the next LISTEN.
* frames the model produced for a session on silence (it sent nothing in time) are kept,
  at most ``carry_frames``, and go out with its next answer, so its audio has no holes.
* ``force_listen`` (the first chunks of a stream) and a cancel force the text stream to
  pad through the logits; after a cancel the engine also keeps quiet until the model's
  own audio falls silent (or ``cancel_mute_frames`` passed), so the cancelled utterance
  does not resume as a new response.
* ``listen_prob_scale`` multiplies the pad token's probability (a logit bias).
"""

from __future__ import annotations

import logging
import math
import os
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from prometheus_client import Counter, Gauge

from duplexd.actors.engines.base import EngineError, Thinker, ThinkerInput, ThinkerOutput
from duplexd.actors.engines.moshi.options import MoshiOptions
from duplexd.actors.engines.moshi.slots import SlotsExhausted, SlotTable
from duplexd.actors.engines.moshi.text import TextStream
from duplexd.bus.log import get_logger, log
from duplexd.bus.messages import Action, ChunkKind, EngineInfo, SessionConfig
from duplexd.bus.metrics import REGISTRY

if TYPE_CHECKING:  # torch stays out of this module's imports until load()
    from duplexd.actors.engines.moshi.runner import MoshiRunner

_log = get_logger(__name__)

SLOTS_IN_USE = Gauge("duplexd_moshi_slots_in_use", "Moshi model slots leased by sessions", registry=REGISTRY)
SILENCE_FED = Counter(
    "duplexd_moshi_silence_frames",
    "Frames a session was fed silence for: its chunk was not there in time, or it stopped sending",
    registry=REGISTRY,
)

SAMPLE_RATE = 24000
FRAME_SAMPLES = 1920
_DEFAULT_TEMPERATURE = 0.8  # SessionConfig's default: the engine's temperatures apply as set


@dataclass(slots=True)
class Frame:
    """One output frame of one slot."""

    text: int
    pcm: np.ndarray
    rms: float
    listen_prob: float
    codes: np.ndarray


@dataclass(slots=True)
class _Session:
    sid: str
    slot: int
    config: SessionConfig
    text: TextStream
    speaking: bool = False
    quiet: int = 0  # quiet frames in a row while speaking
    mute: int = 0  # frames left forced quiet after a cancel
    spoke_for: str = ""  # turn modes: the response this turn already spoke for
    seed: int = 0
    started: bool = False  # the stream starts (frame 0) with the session's first chunk
    carry: deque[Frame] = field(default_factory=deque)
    frames: int = 0


class MoshiThinker(Thinker):
    """Moshi full duplex on stage0 (see module docstring)."""

    def __init__(self, opts: MoshiOptions) -> None:
        self.opts = opts
        self.info = EngineInfo(
            name="moshi",
            input_rate=SAMPLE_RATE,
            chunk_samples=FRAME_SAMPLES,
            max_sessions=opts.max_sessions,
        )
        self.lockstep_grace_s = opts.tick_grace_ms / 1000
        self.lockstep_idle_s = opts.idle_after_ms / 1000
        self.slots = SlotTable(opts.max_sessions)
        self.sessions: dict[str, _Session] = {}
        self.runner: MoshiRunner | None = None
        self.tokenizer: Any = None
        self._quiet_ids = frozenset({opts.text_pad_id, opts.text_epad_id})

    # ------------------------------------------------------------------ lifecycle
    def load(self) -> None:
        from duplexd.actors.engines.moshi.loading import load_model
        from duplexd.actors.engines.moshi.runner import MoshiRunner, StepConfig

        model, self.tokenizer = load_model(self.opts)
        o = self.opts
        cfg = StepConfig(
            slots=o.max_sessions,
            context=o.context_frames,
            buckets=o.batch_buckets(),
            cuda_graphs=o.cuda_graphs,
            temp_text=o.temp_text,
            temp_audio=o.temp_audio,
            top_k_text=o.top_k_text,
            top_k_audio=o.top_k_audio,
            text_pad_id=o.text_pad_id,
        )
        self.runner = MoshiRunner(model, cfg)
        if self.runner.frame_samples != FRAME_SAMPLES:
            raise ValueError(f"the codec's frame is {self.runner.frame_samples} samples; this engine needs 1920")

    def warm_up(self) -> None:
        runner = self._runner()
        if not self.opts.warm_up:
            return  # the first steps pay for lazy init, and run without CUDA graphs
        spent = runner.capture(lambda msg: log(_log, logging.INFO, f"moshi: {msg}"))
        mode = "CUDA graphs" if runner.use_graphs else "eager"
        log(_log, logging.INFO, "moshi: warm", mode=mode, buckets=list(runner.buckets), warm_up_s=round(spent, 2))

    def _runner(self) -> MoshiRunner:
        if self.runner is None:
            raise EngineError("the moshi engine is not loaded")
        return self.runner

    # ------------------------------------------------------------------ sessions
    def open_session(self, session_id: str, config: SessionConfig) -> None:
        self._runner()
        try:
            slot = self.slots.lease(session_id)
        except SlotsExhausted:
            raise EngineError(
                f"all {self.opts.max_sessions} model slots are in use (engines.moshi.max_sessions); try again later",
                session_id,
                code="capacity_exceeded",
            ) from None
        seed = self.opts.seed if self.opts.seed >= 0 else int.from_bytes(os.urandom(4), "little")
        text = TextStream(self.tokenizer, self._quiet_ids)
        self.sessions[session_id] = _Session(session_id, slot, config, text, seed=seed)
        SLOTS_IN_USE.set(len(self.sessions))
        log(_log, logging.INFO, "moshi slot leased", session_id=session_id, slot=slot, seed=seed)

    def update_session(self, session_id: str, config: SessionConfig) -> None:
        s = self.sessions.get(session_id)
        if s is not None:
            s.config = config

    def close_session(self, session_id: str) -> None:
        if self.sessions.pop(session_id, None) is not None:
            slot = self.slots.release(session_id)
            SLOTS_IN_USE.set(len(self.sessions))
            log(_log, logging.INFO, "moshi slot released", session_id=session_id, slot=slot)

    def discard_pending(self, session_id: str) -> None:
        s = self.sessions.get(session_id)
        if s is None:
            return
        s.carry.clear()
        if s.speaking:
            s.mute = self.opts.cancel_mute_frames
        s.speaking, s.quiet = False, 0
        s.text.reset()

    def _controls(self, s: _Session, force: bool) -> None:
        scale = max(0.0, s.config.temperature) / _DEFAULT_TEMPERATURE
        bias = math.log(max(s.config.listen_prob_scale, 1e-6))  # x scale on P(pad), before renormalising
        self._runner().set_controls(s.slot, bias, force or s.mute > 0, scale)

    # ------------------------------------------------------------------ step
    def step(self, batch: list[ThinkerInput]) -> list[ThinkerOutput]:
        runner = self._runner()
        given = {x.session_id: x for x in batch}
        unknown = [sid for sid in given if sid not in self.sessions]
        if unknown:
            raise EngineError(f"session {unknown[0]} has no model slot", unknown[0])
        for x in batch:
            if x.pcm.size != FRAME_SAMPLES:
                raise EngineError(f"chunk of {x.pcm.size} samples; moshi takes {FRAME_SAMPLES}", x.session_id)
        for s in self.sessions.values():
            x_in = given.get(s.sid)
            if x_in is not None and not s.started:
                # Its stream joins the lockstep now: until its first chunk, its row computed
                # nothing of its own (a fresh frame 0 makes the slot's old state unread).
                s.started = True
                runner.reset_slot(s.slot, s.seed)
            runner.set_input(s.slot, x_in.pcm if x_in is not None else None)
            self._controls(s, force=x_in is not None and x_in.force_listen)
        held = set(self.slots.held.values())
        for slot in range(self.slots.rows()):
            if slot not in held:
                runner.set_input(slot, None)  # a free row inside the bucket: silence
        out = runner.step(self.slots.rows())
        results: list[ThinkerOutput] = []
        for s in self.sessions.values():
            if not s.started:
                continue
            frame = Frame(
                int(out.text[s.slot]),
                out.pcm[s.slot],
                float(out.rms[s.slot]),
                float(out.listen_prob[s.slot]),
                out.codes[s.slot],
            )
            s.frames += 1
            s.carry.append(frame)
            if s.sid not in given:
                SILENCE_FED.inc()
                while len(s.carry) > max(1, self.opts.carry_frames):
                    s.carry.popleft()  # a session that stopped sending stops hearing
                if self.opts.carry_frames == 0:
                    s.carry.clear()
        for x in batch:
            s = self.sessions[x.session_id]
            frames = list(s.carry)
            s.carry.clear()
            results.append(self._decide(s, x, frames))
        return results

    def _decide(self, s: _Session, x: ThinkerInput, frames: list[Frame]) -> ThinkerOutput:
        quiet_ids = self._quiet_ids
        spoken: list[Frame] = []
        for f in frames:
            active = f.text not in quiet_ids or f.rms >= self.opts.speech_rms
            if s.mute > 0:
                s.mute -= 1
                if f.rms < self.opts.speech_rms:
                    s.mute = 0  # the cancelled utterance has stopped
                continue
            if x.force_listen or x.kind in (ChunkKind.UTTERANCE, ChunkKind.UTTERANCE_END):
                continue
            if active:
                if not s.speaking:
                    s.text.reset()
                s.speaking, s.quiet = True, 0
            elif s.speaking:
                s.quiet += 1
                if s.quiet >= self.opts.hangover_frames:
                    s.speaking = False
            if s.speaking or active:
                spoken.append(f)
        listen_prob = float(np.mean([f.listen_prob for f in frames])) if frames else 1.0
        if spoken:
            delta = s.text.feed([f.text for f in spoken])
            pcm = np.concatenate([f.pcm for f in spoken]).astype(np.float32, copy=False)
            tokens = np.stack([np.concatenate(([f.text], f.codes)) for f in spoken]).astype(np.int32)
            if x.kind == ChunkKind.CONTINUATION:
                s.spoke_for = x.response_id
            return ThinkerOutput(Action.SPEAK, text=delta, listen_prob=listen_prob, tokens=tokens, hidden=pcm)
        end = x.kind == ChunkKind.CONTINUATION and s.spoke_for == x.response_id and bool(x.response_id)
        return ThinkerOutput(Action.LISTEN, listen_prob=listen_prob, end_of_turn=end)
