"""``[engines.qwen-omni]`` settings of the two-stage Qwen2.5-Omni engine.

Torch-free on purpose: the registry and the config loader import this module, and
``duplexd check-config`` must work on a machine without torch.
"""

from __future__ import annotations

import msgspec

# Qwen's recommended system prompt: the released checkpoints only speak reliably with it.
QWEN_SYSTEM_PROMPT = (
    "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving "
    "auditory and visual inputs, as well as generating text and speech."
)
DTYPES = ("bfloat16", "float16", "float32")
RANDOM_SIZES = ("full", "tiny")


class QwenOmniOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Settings of the qwen-omni engine (``configs/default.toml`` documents each key)."""

    # weights
    model_path: str = ""  # local directory: config.json, *.safetensors, tokenizer files, spk_dict.pt
    random_init: bool = False  # no weights: a config of ``random_size`` with random weights (benchmarks)
    random_size: str = "full"  # random_init: "full" (the 7B release's shapes) | "tiny" (tests, CPU)
    seed: int = 0  # random_init weights, sampling and token2wav noise
    dtype: str = "bfloat16"  # thinker and talker weights and activations (CPU: float32 is used)
    token2wav_dtype: str = "float32"  # DiT + BigVGAN (the release asks for float32)
    stage0_device: str = "auto"  # "auto" (cuda:0 if present, else cpu) | "cpu" | "cuda" | "cuda:N"
    stage1_device: str = "auto"
    tf32: bool = True  # CUDA: TF32 matmuls and convolutions for the float32 token2wav
    cuda_graphs: bool = True  # CUDA: decode steps and token2wav run as captured graphs
    cpu_threads: int = 0  # CPU: torch intra-op threads (0: torch's default; small models run best on 1)
    # stage0: input, cache slots, the KV lease
    chunk_ms: int = 100  # one listen/speak decision per chunk of input audio
    max_sessions: int = 16  # KV cache slots per stage: sessions that can hold a lease at once
    max_context: int = 8192  # thinker positions per session (older turns are dropped beyond it)
    lease_idle_s: float = 600.0  # release an idle session's KV slot after this long (0: keep until close)
    max_prefill_tokens: int = 4096  # positions prefilled per thinker step, all sessions together
    system_prompt: str = QWEN_SYSTEM_PROMPT  # used when the session has no instructions
    # thinker decoding (the session's temperature applies unless greedy)
    greedy: bool = False
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    max_reply_tokens: int = 512
    min_reply_tokens: int = 0  # end-of-reply tokens are suppressed before this many
    max_user_turn_s: float = 120.0  # audio of one user turn beyond this is not heard
    # stage1: talker
    voice: str = "Chelsie"  # speaker when the session names none (or one the model lacks)
    talker_greedy: bool = False
    talker_temperature: float = 0.9
    talker_top_k: int = 40
    talker_top_p: float = 0.8
    talker_repetition_penalty: float = 1.05
    max_codec_tokens: int = 1500  # codec tokens per reply (50 per second of speech)
    min_codec_tokens: int = 0  # codec end tokens are suppressed before this many
    # stage1: streaming token2wav, sizes in codec tokens (12 = one DiT block = 240 ms)
    t2w_first_chunk: int = 12  # the first audio of a reply: small, so it starts early
    t2w_chunk: int = 48  # later chunks
    t2w_lookahead: int = 12  # codec tokens after a chunk the DiT sees before it is final
    t2w_context: int = 12  # codec tokens before a chunk the DiT sees again
    t2w_steps: int = 10  # ODE steps of the flow-matching DiT
    t2w_guidance: float = 0.5
    t2w_sway: float = -1.0
    vocoder_context: int = 16  # mel frames of overlap on each side of a BigVGAN chunk
    out_chunk_ms: int = 80  # assistant audio message size
    speech_chars_per_s: float = 15.0  # text-to-audio alignment estimate (transcript per chunk)
    # duplex turn detection (turn_mode = "duplex"): the engine's own Silero endpointing
    vad_threshold: float = 0.5
    end_silence_ms: int = 600
    min_speech_ms: int = 250
    interrupt_ms: int = 600  # user speech this long over the reply makes it yield
    pre_roll_ms: int = 300
    warm_up: bool = True  # one throwaway turn (and every graph captured) before READY

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES or self.token2wav_dtype not in DTYPES:
            raise ValueError(f"dtype and token2wav_dtype must be one of {', '.join(DTYPES)}")
        if self.random_size not in RANDOM_SIZES:
            raise ValueError(f"random_size {self.random_size!r} is not one of {', '.join(RANDOM_SIZES)}")
        for name in ("stage0_device", "stage1_device"):
            dev = getattr(self, name)
            if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
                raise ValueError(f"{name} {dev!r} is not auto, cpu, cuda or cuda:N")
        if not 20 <= self.chunk_ms <= 1000:
            raise ValueError("chunk_ms must be 20..1000")
        if self.cpu_threads < 0:
            raise ValueError("cpu_threads must be >= 0")
        if self.max_sessions < 1 or self.max_context < 256 or self.max_context % 64:
            raise ValueError("max_sessions must be >= 1 and max_context a multiple of 64, >= 256")
        if self.max_reply_tokens < 1 or self.max_codec_tokens < 12:
            raise ValueError("max_reply_tokens must be >= 1 and max_codec_tokens >= 12")
        if self.min_reply_tokens >= self.max_reply_tokens or self.min_codec_tokens >= self.max_codec_tokens:
            raise ValueError("min_reply_tokens/min_codec_tokens must be below their maximum")
        for name in ("t2w_first_chunk", "t2w_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.t2w_lookahead < 0 or self.t2w_context < 0 or self.vocoder_context < 0:
            raise ValueError("t2w_lookahead, t2w_context and vocoder_context must be >= 0")
        if self.t2w_steps < 2:
            raise ValueError("t2w_steps must be >= 2")
        if not 10 <= self.out_chunk_ms <= 1000:
            raise ValueError("out_chunk_ms must be 10..1000")
