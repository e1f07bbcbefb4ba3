"""Realtime server-event names per dialect and the response object builder.

GA and beta differ in a handful of event names (``response.output_audio.delta`` vs
``response.audio.delta``, ``conversation.item.added`` vs ``conversation.item.created``)
and in the response object's field names (``output_modalities`` vs ``modalities``,
nested ``audio.output`` vs flat ``voice``/``output_audio_format``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from duplexd.adapters.realtime_session import RealtimeSettings, render_format, render_item
from duplexd.bus.messages import ResponseInfo, ResponseStatus, SessionConfig


@dataclass(frozen=True, slots=True)
class EventNames:
    """Server event names that differ between the dialects."""

    audio_delta: str
    audio_done: str
    transcript_delta: str
    transcript_done: str
    text_delta: str
    text_done: str
    item_added: str  # conversation item appears in the conversation
    item_done: str | None  # GA only: the item is final


GA_NAMES = EventNames(
    audio_delta="response.output_audio.delta",
    audio_done="response.output_audio.done",
    transcript_delta="response.output_audio_transcript.delta",
    transcript_done="response.output_audio_transcript.done",
    text_delta="response.output_text.delta",
    text_done="response.output_text.done",
    item_added="conversation.item.added",
    item_done="conversation.item.done",
)

BETA_NAMES = EventNames(
    audio_delta="response.audio.delta",
    audio_done="response.audio.done",
    transcript_delta="response.audio_transcript.delta",
    transcript_done="response.audio_transcript.done",
    text_delta="response.text.delta",
    text_done="response.text.done",
    item_added="conversation.item.created",
    item_done=None,
)


def status_details(info: ResponseInfo) -> dict[str, Any] | None:
    """``status_details``: null when completed; the reason, or the error, otherwise."""
    match info.status:
        case ResponseStatus.COMPLETED | ResponseStatus.IN_PROGRESS:
            return None
        case ResponseStatus.FAILED:
            return {
                "type": "failed",
                "error": {"type": "server_error", "code": info.error_code or None, "message": info.error_message},
            }
    return {"type": info.status.value, "reason": info.reason or None}


def usage(info: ResponseInfo, transcript: str, audio_chunks: int) -> dict[str, Any] | None:
    """Usage in the engine's units (README "Realtime conformance"): input tokens are the
    stage0 input chunks the response consumed, output text tokens are words (the unit
    ``max_output_tokens`` limits), output audio tokens are audio chunks delivered."""
    if info.status == ResponseStatus.IN_PROGRESS:
        return None
    words = len(transcript.split())
    inp = info.usage.input_chunks
    return {
        "total_tokens": inp + words + audio_chunks,
        "input_tokens": inp,
        "output_tokens": words + audio_chunks,
        "input_token_details": {"text_tokens": 0, "audio_tokens": inp, "cached_tokens": 0},
        "output_token_details": {"text_tokens": words, "audio_tokens": audio_chunks},
    }


def render_response(
    info: ResponseInfo,
    settings: RealtimeSettings,
    config: SessionConfig,
    beta: bool,
    conversation_id: str,
    transcript: str = "",
    audio_chunks: int = 0,
) -> dict[str, Any]:
    """The ``response`` object of response.created / response.done."""
    audio = "audio" in info.modalities
    out: dict[str, Any] = {
        "object": "realtime.response",
        "id": info.id,
        "status": info.status.value,
        "status_details": status_details(info),
        "output": [render_item(it, beta) for it in info.output],
        "conversation_id": conversation_id if info.conversation != "none" else None,
        "max_output_tokens": config.max_output_tokens or "inf",
        "metadata": info.metadata,
        "usage": usage(info, transcript, audio_chunks),
    }
    voice = config.voice or None
    if beta:
        out["modalities"] = ["audio", "text"] if audio else ["text"]
        out["voice"] = voice
        out["output_audio_format"] = render_format(settings.output_format, True)
        out["temperature"] = config.temperature
    else:
        out["output_modalities"] = ["audio"] if audio else ["text"]
        out["audio"] = {"output": {"format": render_format(settings.output_format, False), "voice": voice}}
    return out
