"""Stage0 of the cascade: VAD + Whisper ASR + a reply policy, one decision per chunk.

Turn modes (server_vad, manual): the committed user turn arrives as UTTERANCE chunks;
the last one is transcribed and answered with ``input_transcript``. After the host
creates the response it feeds CONTINUATION units; each one polls the reply policy and
speaks whatever sentences are ready (``end_of_turn`` on the last), or listens while
the policy is still thinking. A reply belongs to one response id, so units of a
cancelled response never start a new reply.

Duplex mode: LIVE chunks run through this engine's own Silero VAD. When the user
stops talking, the turn is transcribed and the reply starts; while the reply is
generated and (by estimate) still playing, sustained user speech makes the engine
yield with ``interrupt``, and that speech begins the user's next turn.

``step`` stays bounded: ASR runs inside it (it is the model step) on at most
``max_utterance_ms`` of audio at a time; the policy never blocks it (see policy.py).
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field

import msgspec
import numpy as np

from duplexd.actors.engines.base import EngineError, Thinker, ThinkerInput, ThinkerOutput
from duplexd.actors.engines.cascade.asr import ASR_RATE, WhisperASR
from duplexd.actors.engines.cascade.local_policy import LocalPolicy
from duplexd.actors.engines.cascade.options import CascadeOptions
from duplexd.actors.engines.cascade.policy import (
    ChatMessage,
    EchoPolicy,
    FixedReply,
    OpenAIChatPolicy,
    ReplyPolicy,
    ReplyStream,
)
from duplexd.actors.engines.cascade.text import split_sentences
from duplexd.actors.vad import SileroDetector, SpeechDetector, VadEvent
from duplexd.bus.log import get_logger, log
from duplexd.bus.messages import Action, ChunkKind, EngineInfo, HistoryEntry, SessionConfig

_log = get_logger(__name__)
ECHO_NOTICE = "echo mode: I repeat what you say"
TINY_MODEL_NOTICE = "built-in tiny model (SmolLM2-135M): it makes things up"
_ROLES = ("system", "user", "assistant")
VAD_WINDOW = 512  # Silero's window at 16 kHz


@dataclass(slots=True)
class _Reply:
    """One reply being spoken: its sentences come from a policy stream."""

    key: str  # the response id (turn modes) or a local turn id (duplex)
    stream: ReplyStream
    pending: list[str] = field(default_factory=list)  # polled, not yet spoken
    stream_done: bool = False
    error: str | None = None
    failed: bool = False  # the error was reported
    spoke: bool = False  # a speak went out
    ended: bool = False  # the end of turn went out
    chars: int = 0  # text handed to the voice
    spoken_ms: float = 0.0  # duplex: time since the first speak

    def absorb(self) -> None:
        """Move what the stream has into ``pending``. Idempotent and retry-safe."""
        if self.stream_done or self.error is not None:
            return
        got = self.stream.poll()
        self.pending.extend(got.sentences)
        self.error = got.error
        self.stream_done = got.done and got.error is None


@dataclass(slots=True)
class _Session:
    config: SessionConfig
    sid: str = ""
    history: tuple[HistoryEntry, ...] = ()
    instructions: str = ""
    utterance: list[np.ndarray] = field(default_factory=list)  # turn modes: the committed turn so far
    utterance_samples: int = 0
    partial: list[str] = field(default_factory=list)  # text of already transcribed blocks of a long turn
    transcript: str | None = None  # newest ASR result not yet answered
    reply: _Reply | None = None
    dead: deque[str] = field(default_factory=lambda: deque(maxlen=32))  # cancelled response ids
    # duplex
    detector: SpeechDetector | None = None
    chunks: int = 0
    pos_ms: float = 0.0  # input stream position (end of the newest chunk)
    ring: deque[tuple[float, np.ndarray]] = field(default_factory=deque)  # (start ms, pcm) of recent input
    speech_start_ms: float | None = None
    endpoint_ms: float | None = None  # the user stopped talking here: transcribe
    vad_pending: int = 0  # samples the detector holds short of a full window
    voiced_ms: float = 0.0  # voiced time of the current speech run (hangover and pauses excluded)
    turns: int = 0


class CascadeThinker(Thinker):
    """VAD + ASR + reply policy (see module docstring)."""

    def __init__(self, opts: CascadeOptions) -> None:
        self.opts = opts
        self.info = EngineInfo(
            name="cascade",
            input_rate=opts.input_rate,
            chunk_samples=opts.input_rate * opts.chunk_ms // 1000,
        )
        self.asr = WhisperASR(
            opts.asr_model, opts.asr_compute_type, opts.asr_threads, opts.asr_beam_size, opts.asr_language
        )
        self.policy: ReplyPolicy = self._make_policy()
        self._s: dict[str, _Session] = {}

    def _make_policy(self) -> ReplyPolicy:
        o = self.opts
        if o.policy == "local":
            return LocalPolicy(
                o.local_model,
                o.local_cache_dir,
                o.local_threads,
                o.local_compute_type,
                o.local_max_tokens,
                o.local_temperature_cap,
                o.local_context_tokens,
                o.local_max_batch,
                o.tts_max_sentence_chars,
                o.local_history_tokens,
                o.openai_system_prompt,
            )
        if o.policy == "openai-chat":
            key = o.openai_api_key or (os.environ.get(o.openai_api_key_env, "") if o.openai_api_key_env else "")
            return OpenAIChatPolicy(
                o.openai_url, o.openai_model, key, o.openai_max_tokens, o.openai_timeout_s, o.tts_max_sentence_chars
            )
        return EchoPolicy(o.echo_template, o.empty_reply, o.tts_max_sentence_chars)

    # ------------------------------------------------------------------ lifecycle
    def load(self) -> None:
        t0 = time.perf_counter()
        log(_log, logging.INFO, "cascade: loading ASR (faster-whisper)", path=self.opts.asr_model or "(wheel)")
        self.asr.load()
        t1 = time.perf_counter()
        log(
            _log,
            logging.INFO,
            "cascade: ASR loaded",
            path=self.asr.model_path,
            compute_type=self.opts.asr_compute_type,
            load_s=round(t1 - t0, 3),
        )
        SileroDetector(self.opts.vad_threshold, self.opts.end_silence_ms)  # fails here, not on the first client
        log(_log, logging.INFO, "cascade: VAD loaded (Silero)", load_s=round(time.perf_counter() - t1, 3))
        self.policy.load()
        self._announce_policy()

    def _announce_policy(self) -> None:
        """Say how it will answer: in the log, and to every client (EngineInfo)."""
        notice = ""
        if self.policy.name == "echo":
            notice = ECHO_NOTICE
            log(
                _log,
                logging.WARNING,
                f"{ECHO_NOTICE} (engines.cascade.policy = 'echo'; set 'local' or 'openai-chat' to answer)",
            )
        elif self.policy.name == "local" and not self.opts.local_model:
            notice = TINY_MODEL_NOTICE
            log(_log, logging.WARNING, f"{TINY_MODEL_NOTICE} (set engines.cascade.local_model to a better GGUF)")
        probed = self.policy.probe()
        backends = (probed,) if probed is not None else ()
        if probed is not None:
            level = logging.INFO if probed.ok else logging.ERROR
            what = "ready" if probed.ok else "NOT reachable: every reply will fail until it is"
            log(
                _log,
                level,
                f"cascade: {probed.name} {what}",
                policy=self.policy.name,
                url=probed.url,
                model=self.opts.openai_model,
                detail=probed.detail,
            )
        else:
            log(_log, logging.INFO, "cascade: reply policy ready", policy=self.policy.name, **self.policy.describe())
        self.info = msgspec.structs.replace(self.info, notice=notice, backends=backends)

    def warm_up(self) -> None:
        if not self.opts.warm_up:
            return
        t0 = time.perf_counter()
        rng = np.random.default_rng(0)
        noise = (0.01 * rng.standard_normal(ASR_RATE)).astype(np.float32)
        self.asr.transcribe(noise)
        det = SileroDetector(self.opts.vad_threshold, self.opts.end_silence_ms)
        det.feed(noise)
        self.policy.warm_up()
        log(_log, logging.INFO, "cascade: thinker warm", warm_up_s=round(time.perf_counter() - t0, 3))

    def open_session(self, session_id: str, config: SessionConfig) -> None:
        self._s[session_id] = _Session(config, session_id)

    def update_session(self, session_id: str, config: SessionConfig) -> None:
        s = self._s.get(session_id)
        if s is not None:
            s.config = config

    def close_session(self, session_id: str) -> None:
        s = self._s.pop(session_id, None)
        if s is not None and s.reply is not None:
            s.reply.stream.cancel()

    def set_context(self, session_id: str, history: tuple[HistoryEntry, ...], instructions: str) -> None:
        s = self._s.get(session_id)
        if s is not None:
            s.history = history
            s.instructions = instructions

    def discard_pending(self, session_id: str) -> None:
        s = self._s.get(session_id)
        if s is None:
            return
        r, s.reply = s.reply, None
        if r is not None:
            r.stream.cancel()
            if r.key:
                s.dead.append(r.key)

    # ------------------------------------------------------------------ step
    def step(self, batch: list[ThinkerInput]) -> list[ThinkerOutput]:
        # Fail first, decide after: on an EngineError stage0 re-steps the rest of the batch,
        # so nothing may have been consumed for it yet (absorb is retry-safe).
        for x in batch:
            s = self._s.get(x.session_id)
            if s is None:
                raise EngineError("session is not open in stage0", x.session_id, "session_not_open")
            r = s.reply
            if r is None or r.failed or r.ended or x.kind not in (ChunkKind.CONTINUATION, ChunkKind.LIVE):
                continue
            r.absorb()
            if r.error is not None:
                r.failed = True
                r.stream.cancel()
                raise EngineError(f"reply policy {self.policy.name} failed: {r.error}", x.session_id, "reply_failed")
        return [self._decide(self._s[x.session_id], x) for x in batch]

    def _decide(self, s: _Session, x: ThinkerInput) -> ThinkerOutput:
        if x.kind == ChunkKind.UTTERANCE:
            self._collect(s, x.pcm)
            return ThinkerOutput(Action.LISTEN)
        if x.kind == ChunkKind.UTTERANCE_END:
            self._collect(s, x.pcm)
            text = self._finish_utterance(s)
            return ThinkerOutput(Action.LISTEN, input_transcript=text)
        if x.kind == ChunkKind.CONTINUATION:
            return self._continue(s, x)
        return self._live(s, x)

    # ------------------------------------------------------------------ turn modes
    def _collect(self, s: _Session, pcm: np.ndarray) -> None:
        s.utterance.append(np.asarray(pcm, dtype=np.float32))
        s.utterance_samples += pcm.size
        block = self.opts.max_utterance_ms * ASR_RATE // 1000
        if s.utterance_samples >= block:
            # A long turn is transcribed block by block so no step runs ASR on minutes of audio.
            audio = np.concatenate(s.utterance)
            s.utterance = [audio[block:]] if audio.size > block else []
            s.utterance_samples = audio.size - block
            s.partial.append(self._transcribe(audio[:block], s))

    def _finish_utterance(self, s: _Session) -> str:
        audio = np.concatenate(s.utterance) if s.utterance else np.zeros(0, np.float32)
        s.utterance, s.utterance_samples = [], 0
        parts = [*s.partial, self._transcribe(audio, s) if audio.size else ""]
        s.partial = []
        text = " ".join(p for p in parts if p)
        s.transcript = text
        return text

    def _transcribe(self, audio: np.ndarray, s: _Session) -> str:
        t = self.asr.transcribe(audio)
        log(
            _log,
            logging.DEBUG,
            "cascade: transcribed",
            session_id=s.sid,
            audio_s=round(t.audio_s, 2),
            cost_s=round(t.cost_s, 3),
            chars=len(t.text),
        )
        return t.text

    def _continue(self, s: _Session, x: ThinkerInput) -> ThinkerOutput:
        if x.force_listen:
            return ThinkerOutput(Action.LISTEN)
        r = s.reply
        if r is None or r.key != x.response_id:
            if x.response_id in s.dead:
                return ThinkerOutput(Action.LISTEN)  # a unit of a cancelled response, still queued
            if r is not None:
                r.stream.cancel()
            r = s.reply = self._start_reply(s, x.response_id)
        if r.failed or r.ended:
            return ThinkerOutput(Action.LISTEN)
        return self._speak_next(r, duplex=False)

    # ------------------------------------------------------------------ replies
    def _start_reply(self, s: _Session, key: str) -> _Reply:
        fresh, s.transcript = s.transcript, None
        if fresh == "":
            # The user's newest turn had no words: say so rather than answer an older turn.
            stream: ReplyStream = FixedReply(split_sentences(self.opts.empty_reply, self.opts.tts_max_sentence_chars))
        else:
            stream = self.policy.start(self._messages(s, fresh), s.config.temperature)
        r = _Reply(key, stream)
        r.absorb()
        return r

    def _messages(self, s: _Session, fresh: str | None) -> list[ChatMessage]:
        """System prompt, the committed history, and the newest transcript.

        The history comes from the host and may lag this engine's own ASR: the newest
        user item is often still untranscribed in it, or missing (duplex).
        """
        system = s.instructions or self.opts.openai_system_prompt
        msgs = [ChatMessage("system", system)] if system else []
        hist = list(s.history)
        last_user = max((i for i, h in enumerate(hist) if h.role == "user"), default=-1)
        used = False
        for i, h in enumerate(hist):
            role = h.role if h.role in _ROLES else "user"
            text = h.text.strip()
            if not text and fresh and i == last_user and i == len(hist) - 1:
                text, used = fresh, True
            if text:
                msgs.append(ChatMessage(role, text))
        if fresh and not used and not (msgs and msgs[-1].role == "user" and msgs[-1].content == fresh):
            msgs.append(ChatMessage("user", fresh))
        return msgs

    def _speak_next(self, r: _Reply, duplex: bool) -> ThinkerOutput:
        """The next decision of a reply in progress."""
        r.absorb()
        if r.pending:
            text = " ".join(r.pending)
            r.pending.clear()
            r.spoke = True
            r.chars += len(text)
            r.ended = r.stream_done
            return ThinkerOutput(Action.SPEAK, text=text, end_of_turn=r.ended, listen_prob=0.05)
        if r.stream_done:
            r.ended = True
            if duplex and r.spoke:
                return ThinkerOutput(Action.SPEAK, end_of_turn=True, listen_prob=0.05)
            return ThinkerOutput(Action.LISTEN, end_of_turn=True, listen_prob=0.5)
        # Still thinking. In duplex a listen after a speak would end the turn: keep the floor.
        if duplex and r.spoke:
            return ThinkerOutput(Action.SPEAK, listen_prob=0.1)
        return ThinkerOutput(Action.LISTEN, listen_prob=0.2)

    # ------------------------------------------------------------------ duplex
    def _live(self, s: _Session, x: ThinkerInput) -> ThinkerOutput:
        o = self.opts
        s.chunks += 1
        self._listen(s, x.pcm)
        speaking = s.detector is not None and s.detector.speaking
        if x.force_listen or s.chunks <= s.config.force_listen_count:
            return ThinkerOutput(Action.LISTEN)
        r = s.reply
        if r is not None and r.failed:
            s.reply = r = None  # reported already; listen for the next turn
        if r is not None:
            if r.spoke:
                r.spoken_ms += o.chunk_ms
            if speaking and s.voiced_ms >= o.interrupt_ms:
                # The user talks over the reply: yield. Their speech starts the next turn.
                self.discard_pending(x.session_id)
                return ThinkerOutput(Action.LISTEN, interrupt=True, listen_prob=0.95)
            if s.endpoint_ms is not None:
                # Speech over the reply that stopped before interrupt_ms: a backchannel, not a turn.
                s.speech_start_ms = s.endpoint_ms = None
            if not r.ended:
                return self._speak_next(r, duplex=True)
            if r.spoken_ms < r.chars / o.speech_chars_per_s * 1000 + 500:
                return ThinkerOutput(Action.LISTEN, listen_prob=0.9)  # the reply is still playing
            s.reply = None
        if s.endpoint_ms is None:
            return ThinkerOutput(Action.LISTEN, listen_prob=0.95 if speaking else 0.9)
        text = self._take_turn(s)
        if not text:
            return ThinkerOutput(Action.LISTEN, listen_prob=0.9)
        s.transcript = text
        p_listen = min(1.0, 0.1 * s.config.listen_prob_scale)
        if p_listen >= 0.5:
            # Biased towards listening: the turn is heard (it enters history) but not answered.
            s.transcript = None
            return ThinkerOutput(Action.LISTEN, input_transcript=text, listen_prob=p_listen)
        s.turns += 1
        r = s.reply = self._start_reply(s, f"duplex-{s.turns}")
        out = self._speak_next(r, duplex=True)
        out.input_transcript = text
        return out

    def _listen(self, s: _Session, pcm: np.ndarray) -> None:
        """Feed the session's VAD; track where the user's turn starts and ends."""
        o = self.opts
        if s.detector is None:
            s.detector = SileroDetector(o.vad_threshold, o.end_silence_ms, o.min_speech_ms)
        det = s.detector
        pcm = np.asarray(pcm, dtype=np.float32)
        start = s.pos_ms
        s.pos_ms += pcm.size * 1000 / ASR_RATE
        s.ring.append((start, pcm))
        events: list[VadEvent] = []
        # Window by window, to see each window's probability: only voiced windows count
        # towards an interruption, not the hangover or the pauses between words.
        for i in range(0, pcm.size, VAD_WINDOW):
            piece = pcm[i : i + VAD_WINDOW]
            got = det.feed(piece)
            events += got
            if any(ev.speaking for ev in got):
                s.voiced_ms = float(o.min_speech_ms)  # the windows that confirmed the start
            s.vad_pending += piece.size
            if s.vad_pending >= VAD_WINDOW:
                s.vad_pending -= VAD_WINDOW
                if det.speaking and det.last_prob >= o.vad_threshold:
                    s.voiced_ms += VAD_WINDOW * 1000 / ASR_RATE
            if not det.speaking:
                s.voiced_ms = 0.0
        for ev in events:
            if ev.speaking:
                if s.speech_start_ms is None:
                    s.speech_start_ms = ev.at_ms
                s.endpoint_ms = None
            elif s.speech_start_ms is not None:
                s.endpoint_ms = ev.at_ms
        started = s.speech_start_ms
        if started is not None and s.endpoint_ms is None and s.pos_ms - started >= o.max_utterance_ms:
            s.endpoint_ms = s.pos_ms  # a turn this long is transcribed now
        if s.speech_start_ms is None:
            # Nobody talks: keep only what a start event may still reach back to, plus the pre-roll.
            keep = o.pre_roll_ms + o.min_speech_ms + 2 * o.chunk_ms
            while s.ring and s.ring[0][0] + o.chunk_ms < s.pos_ms - keep:
                s.ring.popleft()

    def _take_turn(self, s: _Session) -> str:
        """Transcribe the user's finished turn from the ring; reset the endpointing."""
        o = self.opts
        assert s.speech_start_ms is not None and s.endpoint_ms is not None
        lo = s.speech_start_ms - o.pre_roll_ms
        hi = s.endpoint_ms + 200  # the tail of the last word
        audio = np.concatenate([pcm for _, pcm in s.ring]) if s.ring else np.zeros(0, np.float32)
        base = s.ring[0][0] if s.ring else s.pos_ms
        a = max(0, int((lo - base) * ASR_RATE / 1000))
        b = max(a, int((hi - base) * ASR_RATE / 1000))
        turn = audio[a:b]
        speech_ms = s.endpoint_ms - s.speech_start_ms
        # Keep what followed the endpoint: it may be the start of the next turn.
        keep_from = s.endpoint_ms
        while s.ring and s.ring[0][0] + o.chunk_ms <= keep_from - o.pre_roll_ms:
            s.ring.popleft()
        still = s.detector is not None and s.detector.speaking
        s.speech_start_ms = s.pos_ms if still else None
        s.endpoint_ms = None
        if speech_ms < o.min_speech_ms:
            return ""
        return self._transcribe(turn, s)
