"""Stage1 of the cascade: streaming Piper TTS, sentence by sentence, in small chunks.

Each handoff's text is split into sentences. A step synthesises the next sentence only
when the previous one's audio has been handed out, then emits one ``tts_chunk_ms``
chunk per step, each carrying the words it finishes speaking, so the first audio
leaves after one sentence of synthesis and an abort drops at most what is queued
(all of it, at once). Audio is at the voice's rate (22.05 kHz); stage1 resamples.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from duplexd.actors.engines.base import TalkerChunk, TalkerInput, TurnTalker
from duplexd.actors.engines.cascade.options import CascadeOptions
from duplexd.actors.engines.cascade.text import (
    split_first_clause,
    split_sentences,
    word_weights,
    words_per_chunk,
)
from duplexd.actors.engines.cascade.tts import PiperTTS, Speech
from duplexd.bus.log import get_logger, log

_log = get_logger(__name__)


@dataclass(slots=True)
class _Turn:
    key: str
    sentences: deque[str] = field(default_factory=deque)  # to synthesise
    chunks: deque[TalkerChunk] = field(default_factory=deque)  # synthesised, not yet handed out
    ended: bool = False  # saw end_of_turn
    flushed: bool = False  # emitted the end_of_turn chunk
    said_words: bool = False  # a chunk with text went out (the next one gets a leading space)
    started: bool = False  # text arrived for this turn


class CascadeTalker(TurnTalker[_Turn]):
    """Piper voice; one turn per session at a time (see module docstring)."""

    def __init__(self, opts: CascadeOptions) -> None:
        super().__init__()
        self.opts = opts
        self.tts = PiperTTS(opts.tts_model, opts.tts_config, opts.tts_threads, opts.tts_length_scale, opts.tts_volume)
        self.output_rate = self.tts.sample_rate

    def load(self) -> None:
        t0 = time.perf_counter()
        log(_log, logging.INFO, "cascade: loading TTS (piper)", path=self.opts.tts_model or "(wheel)")
        self.tts.load()
        self.output_rate = self.tts.sample_rate
        log(
            _log,
            logging.INFO,
            "cascade: TTS loaded",
            path=self.tts.model_path,
            sample_rate=self.output_rate,
            load_s=round(time.perf_counter() - t0, 3),
        )

    def warm_up(self) -> None:
        if not self.opts.warm_up:
            return
        t0 = time.perf_counter()
        self.tts.synthesize("Hello, ready to talk.")
        log(_log, logging.INFO, "cascade: talker warm", warm_up_s=round(time.perf_counter() - t0, 3))

    @property
    def chunk_samples(self) -> int:
        return max(1, self.output_rate * self.opts.tts_chunk_ms // 1000)

    def feed(self, session_id: str, unit: TalkerInput) -> None:
        turn = self._turn_for(session_id, unit, lambda: _Turn(unit.turn_key))
        if unit.text.strip():
            sentences = split_sentences(unit.text, self.opts.tts_max_sentence_chars)
            if self.opts.tts_first_clause and not turn.started and sentences:
                sentences[:1] = split_first_clause(sentences[0])
            turn.started = True
            turn.sentences.extend(sentences)
        turn.ended = turn.ended or unit.end_of_turn

    def pending(self, session_id: str) -> bool:
        turn = self._turns.get(session_id)
        return turn is not None and (bool(turn.chunks) or bool(turn.sentences) or (turn.ended and not turn.flushed))

    def step(self, session_ids: list[str]) -> list[TalkerChunk | None]:
        return [self._next(sid) for sid in session_ids]

    def _next(self, sid: str) -> TalkerChunk | None:
        turn = self._turns.get(sid)
        if turn is None:
            return None
        while not turn.chunks and turn.sentences:
            self._synthesize(turn, turn.sentences.popleft())
        if turn.chunks:
            chunk = turn.chunks.popleft()
            chunk.end_of_turn = turn.ended and not turn.chunks and not turn.sentences
        elif turn.ended and not turn.flushed:
            chunk = TalkerChunk(np.zeros(0, dtype=np.float32), end_of_turn=True)
        else:
            return None
        turn.flushed = chunk.end_of_turn
        return chunk

    def _synthesize(self, turn: _Turn, sentence: str) -> None:
        n = self.chunk_samples
        speeches = [sp for sp in self.tts.synthesize(sentence) if sp.pcm.size]
        words = sentence.split()
        for speech, piece in zip(speeches, _allot(words, speeches), strict=True):
            pcm = speech.pcm
            log(
                _log,
                logging.DEBUG,
                "cascade: synthesised",
                audio_s=round(pcm.size / self.output_rate, 2),
                cost_s=round(speech.cost_s, 3),
            )
            texts = words_per_chunk(piece, word_weights(piece, speech.phonemes), pcm, n)
            for i, words_said in enumerate(texts):
                # Chunks after the turn's first words start with a space: clients concatenate deltas.
                text = " " + words_said if words_said and turn.said_words else words_said
                turn.said_words = turn.said_words or bool(text)
                turn.chunks.append(TalkerChunk(pcm[i * n : (i + 1) * n].copy(), text=text))


def _allot(words: list[str], speeches: list[Speech]) -> list[list[str]]:
    """Which words each piece of audio speaks. Piper may split our sentence further (its
    phonemizer ends a sentence at "Dr."): follow its word groups when they add up, else
    share the words out by audio length."""
    if len(speeches) <= 1:
        return [words] * len(speeches)
    groups = [len([g for g in "".join(sp.phonemes).split(" ") if g]) for sp in speeches]
    if sum(groups) != len(words):
        total = float(sum(sp.pcm.size for sp in speeches))
        bounds = np.round(np.cumsum([sp.pcm.size for sp in speeches]) / total * len(words)).astype(int)
        groups = list(np.diff(np.concatenate(([0], bounds))))
    out, at = [], 0
    for g in groups:
        out.append(words[at : at + int(g)])
        at += int(g)
    out[-1] = out[-1] + words[at:]
    return out
