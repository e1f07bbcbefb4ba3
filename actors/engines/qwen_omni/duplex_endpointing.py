"""Duplex endpointing of the qwen-omni thinker: its own Silero VAD over the live stream.

Qwen2.5-Omni is turn-based; in duplex mode the engine detects where the user's turn starts
and ends itself, and keeps a short ring of recent audio so a turn detected late still
starts with its first words (the pre-roll).
"""

from __future__ import annotations

import numpy as np

from duplexd.actors.engines.qwen_omni.mel import RATE
from duplexd.actors.engines.qwen_omni.options import QwenOmniOptions
from duplexd.actors.engines.qwen_omni.thinker_session import ThinkerSession

VAD_WINDOW = 512  # Silero's window at 16 kHz


def ring_audio(s: ThinkerSession, since_ms: float) -> np.ndarray:
    """The audio of the ring from ``since_ms`` on."""
    audio = [
        pcm[max(0, int((since_ms - t) * RATE / 1000)) :] for t, pcm in s.ring if t + pcm.size * 1000 / RATE > since_ms
    ]
    return np.concatenate(audio) if audio else np.zeros(0, np.float32)


def feed_vad(s: ThinkerSession, pcm: np.ndarray, o: QwenOmniOptions) -> tuple[float | None, float | None]:
    """Feeds the session's Silero VAD; returns (speech start ms, speech stop ms) events, and
    keeps the ring of recent audio a turn opened late starts from."""
    if s.detector is None:
        from duplexd.actors.vad import SileroDetector

        s.detector = SileroDetector(o.vad_threshold, o.end_silence_ms, o.min_speech_ms)
    det = s.detector
    start_ms = s.pos_ms
    s.pos_ms += pcm.size * 1000 / RATE
    s.ring.append((start_ms, pcm))
    keep = o.pre_roll_ms + o.interrupt_ms + o.min_speech_ms + 4 * o.chunk_ms
    while s.ring and s.ring[0][0] < s.pos_ms - keep:
        s.ring.popleft()
    started = stopped = None
    for i in range(0, pcm.size, VAD_WINDOW):
        piece = pcm[i : i + VAD_WINDOW]
        for ev in det.feed(piece):
            if ev.speaking:
                started = ev.at_ms
                s.voiced_ms = float(o.min_speech_ms)
            else:
                stopped = ev.at_ms
        s.vad_pending += piece.size
        if s.vad_pending >= VAD_WINDOW:
            s.vad_pending -= VAD_WINDOW
            if det.speaking and det.last_prob >= o.vad_threshold:
                s.voiced_ms += VAD_WINDOW * 1000 / RATE
        if not det.speaking:
            s.voiced_ms = 0.0
    return started, stopped
