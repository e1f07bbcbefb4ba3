"""``[engines.moshi]`` settings. Torch-free: the registry and config loading import this."""

from __future__ import annotations

import msgspec

DTYPES = ("auto", "bfloat16", "float16", "float32")
DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128)


class MoshiOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Settings of the Moshi full-duplex engine (``configs/default.toml`` documents each key)."""

    # weights: a local checkpoint directory (MoshiForConditionalGeneration.from_pretrained)
    model_path: str = ""
    random_init: bool = False  # random weights (benchmarks): config from model_path, else full size
    tokenizer_path: str = ""  # "" = model_path; no tokenizer: text shows as <id> tokens
    device: str = "auto"  # auto (cuda if available) | cpu | cuda | cuda:N
    dtype: str = "auto"  # LM and depth decoder: auto (bfloat16 on cuda, float32 on cpu)
    mimi_dtype: str = "auto"  # the Mimi codec: auto (as dtype)
    cpu_threads: int = 2  # torch intra-op threads (0: torch's default, every core)
    # batch: one slot per session, preallocated
    max_sessions: int = 64
    context_frames: int = 3000  # LM context window (80 ms frames); older positions slide out
    cuda_graphs: bool = True  # capture each step in CUDA graphs, one set per batch bucket
    buckets: tuple[int, ...] = DEFAULT_BUCKETS  # batch sizes captured (capped at max_sessions)
    # lockstep: one model step per 80 ms frame for every session
    tick_grace_ms: float = 40.0  # how long a step waits for a late session before feeding it silence
    idle_after_ms: float = 500.0  # a session silent this long no longer holds the step back
    carry_frames: int = 3  # model output of silence-fed frames delivered with the next answer
    # sampling (Kyutai's defaults); the session temperature scales both (0.8 = as set here)
    temp_text: float = 0.7
    temp_audio: float = 0.8
    top_k_text: int = 25
    top_k_audio: int = 250
    seed: int = -1  # -1: a random stream per session; >= 0: every session samples from this seed
    # text stream and turn-taking
    text_pad_id: int = 3  # Moshi's inner-monologue padding token
    text_epad_id: int = 0  # end-of-padding token (a word follows)
    speech_rms: float = 0.01  # an output frame at or above this RMS is non-silent audio
    hangover_frames: int = 6  # quiet frames after which a turn ends (480 ms)
    cancel_mute_frames: int = 25  # after a cancel: forced quiet for at most this many frames
    warm_up: bool = True

    def __post_init__(self) -> None:
        for name in ("dtype", "mimi_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{name} {getattr(self, name)!r} is not one of {', '.join(DTYPES)}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"device {self.device!r} is not auto, cpu, cuda or cuda:N")
        if not 1 <= self.max_sessions <= 4096:
            raise ValueError("max_sessions must be 1..4096")
        if self.context_frames < 2:
            raise ValueError("context_frames must be at least 2")
        if not self.buckets or any(b < 1 for b in self.buckets) or list(self.buckets) != sorted(set(self.buckets)):
            raise ValueError("buckets must be increasing positive batch sizes")
        if self.top_k_text < 1 or self.top_k_audio < 1:
            raise ValueError("top_k_text and top_k_audio must be at least 1")
        if self.tick_grace_ms < 0 or self.idle_after_ms < 0 or self.carry_frames < 0:
            raise ValueError("tick_grace_ms, idle_after_ms and carry_frames must not be negative")
        if self.hangover_frames < 1:
            raise ValueError("hangover_frames must be at least 1")

    def batch_buckets(self) -> tuple[int, ...]:
        """The captured batch sizes: the configured ones up to max_sessions, and max_sessions."""
        out = [b for b in self.buckets if b < self.max_sessions]
        return (*out, self.max_sessions)
