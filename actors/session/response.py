"""One response in progress, and how it is shown to the client (item, response info)."""

from __future__ import annotations

from dataclasses import dataclass, field

from duplexd.actors.session.transcript import Segment, full_text
from duplexd.bus.messages import ContentPart, Item, ResponseInfo, ResponseOptions, ResponseStatus, Usage


@dataclass(slots=True)
class Response:
    """The active response: what it is, how far each stage got, what the client was sent."""

    id: str
    item_id: str
    options: ResponseOptions
    modalities: tuple[str, ...]
    created_at: float
    previous_item_id: str | None
    in_history: bool
    origin_seq: int | None  # the client command that created it (cancel fences)
    thinker_done: bool = False
    talker_done: bool = False
    incomplete_reason: str = ""
    unit_seq: int = 0  # handoffs sent to stage1
    words: int = 0
    text: list[str] = field(default_factory=list)  # text modality deltas
    segments: list[Segment] = field(default_factory=list)
    generated_samples: int = 0
    generated_ms: int = 0
    sent_ms: int = 0
    first_audio_at: float | None = None
    play_end_at: float = 0.0  # when the client will have played what was sent (estimate)
    continuation_sent: int = 0
    next_unit_at: float = 0.0
    input_chunks: int = 0
    truncated_ms: int | None = None  # conversation.item.truncate on the item in progress

    @property
    def has_audio(self) -> bool:
        return "audio" in self.modalities

    def text_so_far(self) -> str:
        return full_text(self.segments) if self.has_audio else "".join(self.text)


def assistant_item(r: Response, status: str, transcript: str, audio_ms: int = 0) -> Item:
    if r.has_audio:
        part = ContentPart(type="output_audio", transcript=transcript)
    else:
        part = ContentPart(type="output_text", text=transcript)
    return Item(id=r.item_id, role="assistant", status=status, content=(part,), audio_ms=audio_ms)


def response_info(
    r: Response,
    status: ResponseStatus,
    reason: str = "",
    output: tuple[Item, ...] = (),
    error: tuple[str, str] = ("", ""),
) -> ResponseInfo:
    return ResponseInfo(
        id=r.id,
        status=status,
        reason=reason,
        error_code=error[0],
        error_message=error[1],
        output=output,
        usage=Usage(
            input_chunks=r.input_chunks,
            output_audio_ms=r.generated_ms,
            output_text_chars=sum(len(t) for t in r.text) or len(full_text(r.segments)),
        ),
        modalities=r.modalities,
        metadata=r.options.metadata,
        conversation="auto" if r.in_history else "none",
    )
