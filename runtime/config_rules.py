"""Value rules for every config key: enums, ranges, endpoints; "did you mean" for typos.

Decoding (msgspec) checks types and refuses unknown keys; these rules check what a type
cannot say (``vad.threshold`` is a probability, ``logging.level`` one of five names).
Every numeric and text key of the config has a rule here: a test walks the whole
config struct and fails on a key without one, so new keys cannot slip through unchecked.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import msgspec

from duplexd.actors.engines.cascade.options import POLICIES
from duplexd.actors.engines.moshi.options import DTYPES as MOSHI_DTYPES
from duplexd.actors.engines.qwen_omni.options import DTYPES as QWEN_DTYPES
from duplexd.bus.resample import RESAMPLER_MODES


@dataclass(frozen=True, slots=True)
class Range:
    """A number within [lo, hi]; ``lo_open`` excludes lo itself (strictly positive)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False

    def check(self, v: Any) -> str | None:
        if isinstance(v, list | tuple):  # a list of numbers: each within the range
            return next((err for x in v if (err := self.check(x)) is not None), None)
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return f"{v} is {'not above' if self.lo_open else 'below'} {_num(self.lo)}"
        if self.hi is not None and v > self.hi:
            return f"{v} is above {_num(self.hi)}"
        return None

    def describe(self) -> str:
        lo = "" if self.lo is None else (f"> {_num(self.lo)}" if self.lo_open else f">= {_num(self.lo)}")
        hi = "" if self.hi is None else f"<= {_num(self.hi)}"
        return " and ".join(x for x in (lo, hi) if x)


@dataclass(frozen=True, slots=True)
class OneOf:
    """One of a fixed set of names (``fold``: compared case-insensitively)."""

    choices: tuple[str, ...]
    fold: bool = False

    def check(self, v: Any) -> str | None:
        values = [v] if isinstance(v, str) else list(v)
        for x in values:
            ok = x.upper() in (c.upper() for c in self.choices) if self.fold else x in self.choices
            if not ok:
                return f"{x!r} is not one of {', '.join(self.choices)}{did_you_mean(x, self.choices)}"
        return None


@dataclass(frozen=True, slots=True)
class Pattern:
    """Text matching a regular expression (``what`` names it in the error)."""

    regex: str
    what: str

    def check(self, v: Any) -> str | None:
        return None if re.fullmatch(self.regex, v) else f"{v!r} is not {self.what}"


@dataclass(frozen=True, slots=True)
class Text:
    """Free text, a path or a secret: any string (``why`` says what it is)."""

    why: str = "free text"

    def check(self, v: Any) -> str | None:
        return None


Rule = Range | OneOf | Pattern | Text

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
PORT = Range(0, 65535)
POSITIVE = Range(0, lo_open=True)
NON_NEGATIVE = Range(0)
AT_LEAST_ONE = Range(1)
PROBABILITY = Range(0, 1)
CHUNK_MS = Range(10, 1000)
AUDIO_RATE = Range(8000, 48000)
ENDPOINT = Pattern(r"|(ipc|tcp)://\S+", "an ipc:// or tcp:// endpoint")
HTTP_URL = Pattern(r"https?://[^\s/]+\S*", "an http(s):// URL")
TORCH_DEVICE = Pattern(r"auto|cpu|cuda|cuda:\d+", "auto, cpu, cuda or cuda:N")
CT2_COMPUTE = (
    "default",
    "auto",
    "int8",
    "int8_float32",
    "int8_float16",
    "int8_bfloat16",
    "int16",
    "float16",
    "bfloat16",
    "float32",
)


def _engine_names() -> tuple[str, ...]:
    from duplexd.actors.engines.registry import engine_names

    return tuple(engine_names())


RULES: dict[str, Rule | Callable[[], Rule]] = {
    # [server]
    "server.host": Text("host name or address"),
    "server.port": PORT,
    "server.api_keys": Text("secret"),
    "server.api_key_file": Text("path"),
    "server.max_message_bytes": NON_NEGATIVE,  # 0 = derived; else >= 1024 (config.validate)
    "server.max_audio_bytes": AT_LEAST_ONE,
    "server.input_resampler": OneOf(RESAMPLER_MODES),
    "server.drain_timeout_s": NON_NEGATIVE,
    "server.ping_interval_s": NON_NEGATIVE,
    "server.ping_timeout_s": NON_NEGATIVE,
    "server.slow_client_audio_ms": Range(100),
    "server.slow_client_events": Range(16),
    "server.bridge_port": PORT,
    "server.web_dir": Text("path"),
    # [bus]
    "bus.run_dir": Text("path"),
    "bus.control": ENDPOINT,
    "bus.data": ENDPOINT,
    "bus.data_hwm": AT_LEAST_ONE,
    "bus.hosts": Text("list of {control, data} endpoint tables, checked in config.validate"),
    "bus.handshake_timeout_s": POSITIVE,
    "bus.heartbeat_interval_s": POSITIVE,
    "bus.heartbeat_timeout_s": POSITIVE,
    "bus.curve.secret_key_file": Text("path"),
    "bus.curve.server_key_file": Text("path"),
    "bus.curve.authorized_keys_dir": Text("path"),
    # [host]
    "host.vad": OneOf(("silero", "energy")),
    "host.max_input_buffer_ms": Range(1000),
    "host.continuation_pace": POSITIVE,
    "host.shard": Range(0),
    "host.max_sessions": NON_NEGATIVE,
    "host.backlog_audio_ms": Range(100),
    "host.backlog_events": Range(16),
    # [session]
    "session.vad.threshold": PROBABILITY,
    "session.vad.prefix_padding_ms": NON_NEGATIVE,
    "session.vad.silence_duration_ms": NON_NEGATIVE,
    "session.vad.idle_timeout_ms": NON_NEGATIVE,
    "session.overlap.short_ack_ms": NON_NEGATIVE,
    "session.overlap.silence_rms": PROBABILITY,
    "session.instructions": Text(),
    "session.voice": Text(),
    "session.output_modalities": OneOf(("audio", "text")),
    "session.force_listen_count": NON_NEGATIVE,
    "session.listen_prob_scale": POSITIVE,
    "session.continuation_cap_ms": NON_NEGATIVE,
    "session.max_output_tokens": NON_NEGATIVE,
    "session.temperature": Range(0, 2),
    # [stage0], [stage1]
    "stage0.max_batch": AT_LEAST_ONE,
    "stage0.max_sessions": NON_NEGATIVE,
    "stage1.max_batch": AT_LEAST_ONE,
    "stage1.max_lead_ms": NON_NEGATIVE,
    "stage1.max_sessions": NON_NEGATIVE,
    # [engine]
    "engine.name": lambda: OneOf(_engine_names()),
    # [engines.scripted]
    "engines.scripted.input_rate": AUDIO_RATE,
    "engines.scripted.chunk_ms": CHUNK_MS,
    "engines.scripted.speech_rms": PROBABILITY,
    "engines.scripted.speech_chunks": AT_LEAST_ONE,
    "engines.scripted.interrupt_chunks": AT_LEAST_ONE,
    "engines.scripted.reply_ms": NON_NEGATIVE,
    "engines.scripted.reply_text": Text(),
    "engines.scripted.out_chunk_ms": CHUNK_MS,
    "engines.scripted.think_step_cost_ms": NON_NEGATIVE,
    "engines.scripted.talk_step_cost_ms": NON_NEGATIVE,
    # [engines.cascade]
    "engines.cascade.input_rate": Range(16000, 16000),
    "engines.cascade.chunk_ms": Range(20, 1000),
    "engines.cascade.asr_model": Text("path"),
    "engines.cascade.asr_compute_type": OneOf(CT2_COMPUTE),
    "engines.cascade.asr_threads": NON_NEGATIVE,
    "engines.cascade.asr_beam_size": AT_LEAST_ONE,
    "engines.cascade.asr_language": Pattern(r"|[a-z]{2,3}", "a language code such as 'en' (or '' to detect)"),
    "engines.cascade.tts_model": Text("path"),
    "engines.cascade.tts_config": Text("path"),
    "engines.cascade.tts_threads": NON_NEGATIVE,
    "engines.cascade.tts_chunk_ms": Range(10, 500),
    "engines.cascade.tts_length_scale": POSITIVE,
    "engines.cascade.tts_volume": Range(0, 1, lo_open=True),
    "engines.cascade.tts_max_sentence_chars": Range(20),
    "engines.cascade.policy": OneOf(POLICIES),
    "engines.cascade.echo_template": Text("template with {transcript}"),
    "engines.cascade.empty_reply": Text(),
    "engines.cascade.openai_url": HTTP_URL,
    "engines.cascade.openai_model": Text(),
    "engines.cascade.openai_api_key": Text("secret"),
    "engines.cascade.openai_api_key_env": Pattern(r"|[A-Za-z_][A-Za-z0-9_]*", "an environment variable name"),
    "engines.cascade.openai_max_tokens": NON_NEGATIVE,
    "engines.cascade.openai_timeout_s": POSITIVE,
    "engines.cascade.openai_system_prompt": Text(),
    "engines.cascade.vad_threshold": PROBABILITY,
    "engines.cascade.end_silence_ms": NON_NEGATIVE,
    "engines.cascade.min_speech_ms": NON_NEGATIVE,
    "engines.cascade.interrupt_ms": NON_NEGATIVE,
    "engines.cascade.pre_roll_ms": NON_NEGATIVE,
    "engines.cascade.max_utterance_ms": Range(1000),
    "engines.cascade.speech_chars_per_s": POSITIVE,
    "engines.cascade.local_model": Text("path to a GGUF or a CTranslate2 directory"),
    "engines.cascade.local_cache_dir": Text("path"),
    "engines.cascade.local_threads": NON_NEGATIVE,
    "engines.cascade.local_compute_type": OneOf(CT2_COMPUTE),
    "engines.cascade.local_max_tokens": Range(8, 4096),
    "engines.cascade.local_temperature_cap": Range(0, 2),
    "engines.cascade.local_context_tokens": Range(16),
    "engines.cascade.local_history_tokens": NON_NEGATIVE,
    "engines.cascade.local_max_batch": AT_LEAST_ONE,
    # [engines.moshi]
    "engines.moshi.model_path": Text("path"),
    "engines.moshi.tokenizer_path": Text("path"),
    "engines.moshi.device": TORCH_DEVICE,
    "engines.moshi.dtype": OneOf(MOSHI_DTYPES),
    "engines.moshi.mimi_dtype": OneOf(MOSHI_DTYPES),
    "engines.moshi.cpu_threads": NON_NEGATIVE,
    "engines.moshi.max_sessions": Range(1, 4096),
    "engines.moshi.context_frames": Range(2),
    "engines.moshi.buckets": AT_LEAST_ONE,
    "engines.moshi.tick_grace_ms": NON_NEGATIVE,
    "engines.moshi.idle_after_ms": NON_NEGATIVE,
    "engines.moshi.carry_frames": NON_NEGATIVE,
    "engines.moshi.temp_text": NON_NEGATIVE,
    "engines.moshi.temp_audio": NON_NEGATIVE,
    "engines.moshi.top_k_text": AT_LEAST_ONE,
    "engines.moshi.top_k_audio": AT_LEAST_ONE,
    "engines.moshi.seed": Range(-1),
    "engines.moshi.text_pad_id": NON_NEGATIVE,
    "engines.moshi.text_epad_id": NON_NEGATIVE,
    "engines.moshi.speech_rms": NON_NEGATIVE,
    "engines.moshi.hangover_frames": AT_LEAST_ONE,
    "engines.moshi.cancel_mute_frames": NON_NEGATIVE,
    # [engines.qwen_omni]
    "engines.qwen_omni.model_path": Text("path"),
    "engines.qwen_omni.random_size": OneOf(("full", "tiny")),
    "engines.qwen_omni.seed": NON_NEGATIVE,
    "engines.qwen_omni.dtype": OneOf(QWEN_DTYPES),
    "engines.qwen_omni.token2wav_dtype": OneOf(QWEN_DTYPES),
    "engines.qwen_omni.stage0_device": TORCH_DEVICE,
    "engines.qwen_omni.stage1_device": TORCH_DEVICE,
    "engines.qwen_omni.cpu_threads": NON_NEGATIVE,
    "engines.qwen_omni.chunk_ms": Range(20, 1000),
    "engines.qwen_omni.max_sessions": Range(1, 4096),
    "engines.qwen_omni.max_context": Range(64),
    "engines.qwen_omni.lease_idle_s": NON_NEGATIVE,
    "engines.qwen_omni.max_prefill_tokens": Range(16),
    "engines.qwen_omni.system_prompt": Text(),
    "engines.qwen_omni.top_k": NON_NEGATIVE,
    "engines.qwen_omni.top_p": Range(0, 1, lo_open=True),
    "engines.qwen_omni.max_reply_tokens": AT_LEAST_ONE,
    "engines.qwen_omni.min_reply_tokens": NON_NEGATIVE,
    "engines.qwen_omni.max_user_turn_s": POSITIVE,
    "engines.qwen_omni.voice": Text("speaker name"),
    "engines.qwen_omni.talker_temperature": NON_NEGATIVE,
    "engines.qwen_omni.talker_top_k": NON_NEGATIVE,
    "engines.qwen_omni.talker_top_p": Range(0, 1, lo_open=True),
    "engines.qwen_omni.talker_repetition_penalty": POSITIVE,
    "engines.qwen_omni.max_codec_tokens": AT_LEAST_ONE,
    "engines.qwen_omni.min_codec_tokens": NON_NEGATIVE,
    "engines.qwen_omni.t2w_first_chunk": AT_LEAST_ONE,
    "engines.qwen_omni.t2w_chunk": AT_LEAST_ONE,
    "engines.qwen_omni.t2w_lookahead": NON_NEGATIVE,
    "engines.qwen_omni.t2w_context": NON_NEGATIVE,
    "engines.qwen_omni.t2w_steps": AT_LEAST_ONE,
    "engines.qwen_omni.t2w_guidance": NON_NEGATIVE,
    "engines.qwen_omni.t2w_sway": Range(-1, 1),
    "engines.qwen_omni.vocoder_context": NON_NEGATIVE,
    "engines.qwen_omni.out_chunk_ms": Range(10, 1000),
    "engines.qwen_omni.speech_chars_per_s": POSITIVE,
    "engines.qwen_omni.vad_threshold": PROBABILITY,
    "engines.qwen_omni.end_silence_ms": NON_NEGATIVE,
    "engines.qwen_omni.min_speech_ms": NON_NEGATIVE,
    "engines.qwen_omni.interrupt_ms": NON_NEGATIVE,
    "engines.qwen_omni.pre_roll_ms": NON_NEGATIVE,
    # [engines.qwen_omni] thinker backend and [engines.qwen_omni.vllm]
    "engines.qwen_omni.thinker_backend": OneOf(("transformers", "vllm")),
    "engines.qwen_omni.vllm.kv_cache_gb": POSITIVE,
    "engines.qwen_omni.vllm.compile_mode": OneOf(("graphs", "compile", "eager")),
    "engines.qwen_omni.vllm.gpu_memory_utilization": Range(0, 1, lo_open=True),
    "engines.qwen_omni.vllm.cuda_graph_sizes": AT_LEAST_ONE,
    "engines.qwen_omni.vllm.max_num_batched_tokens": NON_NEGATIVE,
    "engines.qwen_omni.vllm.model_dir": Text("path"),
    # [supervisor]
    "supervisor.restart_max": NON_NEGATIVE,
    "supervisor.restart_window_s": POSITIVE,
    "supervisor.start_timeout_s": POSITIVE,
    "supervisor.stop_timeout_s": POSITIVE,
    "supervisor.watchdog_s": NON_NEGATIVE,  # 0 = off; else >= 1 (config.validate)
    # [logging]
    "logging.level": OneOf(LOG_LEVELS, fold=True),
    "logging.format": OneOf(("json", "text")),
}


def leaves(struct: msgspec.Struct, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every non-struct field, depth first."""
    for name in struct.__struct_fields__:
        value = getattr(struct, name)
        key = f"{prefix}{name}"
        if isinstance(value, msgspec.Struct):
            yield from leaves(value, key + ".")
        else:
            yield key, value


def needs_rule(value: Any) -> bool:
    """Booleans and enum fields (msgspec checks those) need no rule; numbers and text do."""
    if isinstance(value, bool) or hasattr(value, "value"):
        return False
    return isinstance(value, int | float | str | list | tuple)


def rule_for(key: str) -> Rule | None:
    rule = RULES.get(key)
    return rule() if callable(rule) else rule


def check(cfg: msgspec.Struct) -> list[str]:
    """Every rule violation of ``cfg``, as ``key: problem (allowed: ...)``."""
    problems: list[str] = []
    for key, value in leaves(cfg):
        rule = rule_for(key)
        if rule is None or not needs_rule(value):
            continue
        bad = rule.check(value)
        if bad is not None:
            hint = f" (allowed: {rule.describe()})" if isinstance(rule, Range) else ""
            problems.append(f"{key}: {bad}{hint}")
    return problems


def did_you_mean(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


_UNKNOWN = re.compile(r"Object contains unknown field `([^`]+)`(?: - at `\$\.?([^`]*)`)?")
_ENUM = re.compile(r"Invalid enum value '([^']*)' - at `\$\.([^`]+)`")


def explain(message: str, root: type[msgspec.Struct]) -> str:
    """A msgspec decode error with a hint: the key or value meant, and the keys allowed."""
    m = _UNKNOWN.search(message)
    if m:
        field, path = m.group(1), m.group(2) or ""
        struct = _struct_at(root, path)
        if struct is not None:
            known = struct.__struct_fields__
            where = f"[{path}]" if path else "the top level"
            hint = did_you_mean(field, known) or f"; {where} has: {', '.join(known)}"
            return f"{message}{hint}"
    m = _ENUM.search(message)
    if m:
        value, path = m.group(1), m.group(2)
        choices = _enum_values(root, path)
        if choices:
            return f"{message}; one of {', '.join(choices)}{did_you_mean(value, choices)}"
    return message


def _struct_at(root: type[msgspec.Struct], path: str) -> type[msgspec.Struct] | None:
    t: type[msgspec.Struct] = root
    for part in [p for p in path.split(".") if p]:
        info = msgspec.inspect.type_info(t)
        fields = {f.name: f.type for f in getattr(info, "fields", ())}
        ft = fields.get(part)
        if not isinstance(ft, msgspec.inspect.StructType):
            return None
        t = ft.cls
    return t


def _enum_values(root: type[msgspec.Struct], path: str) -> list[str]:
    parent, _, name = path.rpartition(".")
    struct = _struct_at(root, parent)
    if struct is None:
        return []
    info = msgspec.inspect.type_info(struct)
    assert isinstance(info, msgspec.inspect.StructType)
    for f in info.fields:
        if f.name == name and isinstance(f.type, msgspec.inspect.EnumType):
            return [str(m.value) for m in f.type.cls]
    return []


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)
