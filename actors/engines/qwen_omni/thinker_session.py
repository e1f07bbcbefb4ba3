"""Per-session state of the qwen-omni thinker (stage0)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from duplexd.actors.engines.qwen_omni.context import Context, Turn
from duplexd.actors.engines.qwen_omni.mel import StreamingMel
from duplexd.bus.messages import SessionConfig


@dataclass(eq=False)
class ThinkerSession:
    """What the thinker keeps per session: its context, the user turn being heard, the
    reply, and the duplex endpointing state."""

    sid: str
    config: SessionConfig
    ctx: Context
    # the user turn being heard
    audio_turn: Turn | None = None
    mel: StreamingMel | None = None
    windows: list[np.ndarray] = field(default_factory=list)  # released, not yet encoded
    closing: bool = False  # its end arrived: complete once the windows are encoded
    # the reply
    reply: Turn | None = None
    next_token: int | None = None  # sampled, not yet fed
    max_tokens: int = 0
    sent_context: bool = False
    unsent: list[int] = field(default_factory=list)  # body indices fed, not yet handed off
    extra_text: str = ""  # text the detokenizer released at the end, not yet handed off
    spoke: bool = False
    eot_sent: bool = False
    dead: deque[str] = field(default_factory=lambda: deque(maxlen=64))  # cancelled reply keys
    error: str = ""  # a background failure, reported with the session's next chunk
    reported: tuple[Any, ...] = ()
    # duplex
    chunks: int = 0
    detector: Any = None
    pos_ms: float = 0.0
    ring: deque[tuple[float, np.ndarray]] = field(default_factory=deque)
    speech_start_ms: float | None = None
    voiced_ms: float = 0.0
    vad_pending: int = 0
    overlap_ms: float | None = None  # speech start heard over a live reply (maybe a backchannel)
    duplex_turns: int = 0
    spoken_ms: float = 0.0  # duplex: since the reply's first speak
    interrupted: bool = False  # this chunk made the reply yield
    transcript_due: bool = False  # this chunk ended a user turn the host must record
