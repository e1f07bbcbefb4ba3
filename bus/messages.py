"""Every wire type of the duplexd bus.

Two planes, one tagged union each:

* **control** (`ControlMessage`): small, latency-critical messages that must never wait
  behind audio: handshake, heartbeats, session open/close, epoch advances, cancels,
  stage errors, cluster status.
* **data** (`DataMessage`): audio in and out, stage results, handoffs, and every client
  command or session event whose order relative to audio matters (append → commit,
  audio deltas → response.done).

Every session-scoped message carries ``session_id`` and ``epoch``. Arrays (pcm, token
ids, hidden states) are numpy arrays; the codec ships large ones as raw zero-copy frames.
"""

from __future__ import annotations

import enum
from typing import Literal

import msgspec
import numpy as np

# 2 (main): HistoryEntry.item_id, KvLeaseReport; 3 (main): OverlapParams without barge_in_ms;
# 4 (reliability): Hello.instance, Ready.pid/hostname, SessionClosed.cause, admission fields.
PROTOCOL_VERSION = 4

# Array fields: msgspec has no numpy support of its own, so the codec
# supplies hooks that ship an np.ndarray as an Ext (inline) or a raw frame (large).
Array = np.ndarray


class _Wire(msgspec.Struct, frozen=True, omit_defaults=True, gc=False, array_like=True, tag_field="t"):
    """Base of every bus message: frozen, compact, tagged by class name."""


# --------------------------------------------------------------------------- enums


class Role(enum.StrEnum):
    ADAPTER = "adapter"
    HOST = "host"
    STAGE0 = "stage0"
    STAGE1 = "stage1"


class Action(enum.IntEnum):
    LISTEN = 0
    SPEAK = 1


class ChunkKind(enum.IntEnum):
    """What an audio chunk sent to stage0 is."""

    LIVE = 0  # duplex: continuous microphone stream; the model decides
    UTTERANCE = 1  # part of a committed user turn: the model must listen
    UTTERANCE_END = 2  # last chunk of a committed user turn
    CONTINUATION = 3  # silence unit after commit so the model can finish its reply


class ResponseStatus(enum.StrEnum):
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    INCOMPLETE = "incomplete"
    FAILED = "failed"


class TurnMode(enum.StrEnum):
    SERVER_VAD = "server_vad"
    MANUAL = "manual"
    DUPLEX = "duplex"


class CommitPolicy(enum.StrEnum):
    COMMIT_ALL_ON_DONE = "commit_all_on_done"
    ACK_ONLY = "ack_only"


class TurnState(enum.StrEnum):
    IDLE = "idle"
    USER_SPEAKING = "user_speaking"
    USER_COMMITTED = "user_committed"
    ASSISTANT_GENERATING = "assistant_generating"
    ASSISTANT_PLAYING = "assistant_playing"
    BARGE_IN = "barge_in"


# --------------------------------------------------------------------------- shared structs


class BackendStatus(msgspec.Struct, frozen=True, omit_defaults=True):
    """A service the engine relies on (e.g. the chat endpoint of a reply policy), as
    probed when the engine loaded."""

    name: str  # what it is, e.g. "chat endpoint"
    url: str  # where (credentials removed)
    ok: bool
    detail: str = ""  # the error, or what answered


class EngineInfo(msgspec.Struct, frozen=True, omit_defaults=True):
    """What the engine needs from the adapter (its native input format) and what users
    should know about it (``notice``, its ``backends``). Output needs no field: it always
    reaches the adapter in the bus format, bus/audio_format.py."""

    name: str
    input_rate: int = 16000
    chunk_samples: int = 1600
    notice: str = ""  # how it behaves, shown to users (e.g. "echo mode: I repeat what you say")
    backends: tuple[BackendStatus, ...] = ()
    max_sessions: int = 0  # sessions one stage0 process can hold (model slots); 0 = unbounded


class VadParams(msgspec.Struct, frozen=True, omit_defaults=True, forbid_unknown_fields=True):
    """Server VAD settings (Realtime `server_vad`)."""

    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500
    create_response: bool = True
    interrupt_response: bool = True
    idle_timeout_ms: int = 0  # 0: off


class OverlapParams(msgspec.Struct, frozen=True, omit_defaults=True, forbid_unknown_fields=True):
    """What user speech during assistant playback does (turn modes).

    Voiced speech that reaches ``short_ack_ms`` is an interruption: ``speech_started`` is sent
    then, and with ``VadParams.interrupt_response`` the response is cancelled at once. Shorter
    speech that stops is a backchannel ("mm-hmm"): no event at all. The default comes from
    tests/bench/bench_overlap.py (real speech through Silero).
    """

    short_ack_ms: int = 450
    silence_rms: float = 0.003


class SessionConfig(msgspec.Struct, frozen=True, omit_defaults=True, forbid_unknown_fields=True):
    """The protocol-neutral session settings the adapter keeps and the host applies."""

    turn_mode: TurnMode = TurnMode.SERVER_VAD
    vad: VadParams = VadParams()
    overlap: OverlapParams = OverlapParams()
    commit_policy: CommitPolicy = CommitPolicy.COMMIT_ALL_ON_DONE
    instructions: str = ""
    voice: str = ""
    output_modalities: tuple[str, ...] = ("audio",)
    force_listen_count: int = 3
    listen_prob_scale: float = 1.0
    continuation_cap_ms: int = 8000
    max_output_tokens: int = 0  # 0: unlimited
    temperature: float = 0.8


class ResponseOptions(msgspec.Struct, frozen=True, omit_defaults=True):
    """Per-response overrides from response.create."""

    instructions: str | None = None
    output_modalities: tuple[str, ...] | None = None
    voice: str | None = None
    max_output_tokens: int | None = None
    metadata: dict[str, str] | None = None
    conversation: str | None = None  # "none": out-of-band response, not added to history


class ContentPart(msgspec.Struct, frozen=True, omit_defaults=True):
    """One content part of a conversation item (Realtime shapes)."""

    type: str  # input_text | input_audio | output_text | output_audio | text | audio
    text: str | None = None
    transcript: str | None = None


class Item(msgspec.Struct, frozen=True, omit_defaults=True):
    """A conversation item as the session actor keeps it."""

    id: str
    role: str  # user | assistant | system
    type: str = "message"
    status: str = "completed"
    content: tuple[ContentPart, ...] = ()
    audio_ms: int = 0


class Usage(msgspec.Struct, frozen=True, omit_defaults=True):
    input_chunks: int = 0
    output_audio_ms: int = 0
    output_text_chars: int = 0


class ResponseInfo(msgspec.Struct, frozen=True, omit_defaults=True):
    id: str
    status: ResponseStatus
    reason: str = ""  # turn_detected | client_cancelled | max_output_tokens | error | ...
    error_code: str = ""
    error_message: str = ""
    output: tuple[Item, ...] = ()
    usage: Usage = Usage()
    modalities: tuple[str, ...] = ("audio",)
    metadata: dict[str, str] | None = None
    conversation: str = "auto"


class PlaybackCursor(msgspec.Struct, frozen=True, omit_defaults=True):
    generated_ms: int = 0
    sent_ms: int = 0
    played_ms: int = 0
    committed_ms: int = 0


class KvLease(msgspec.Struct, frozen=True, omit_defaults=True):
    """A session's lease on a KV cache slot of its stage0 (engines with a persistent context).

    ``state``: ``leased`` (the slot holds the session's context), ``released`` (given up
    after ``idle_s`` of idleness or for a busier session: the context is re-prefilled from
    the kept turns when the session speaks again) or ``closed``."""

    session_id: str
    state: str
    slot: int = -1
    tokens: int = 0  # positions of the slot in use
    capacity: int = 0  # positions a slot holds
    turns: int = 0  # turns of the conversation in the context
    rollbacks: int = 0  # replies cut back to what the user heard
    dropped_tokens: int = 0  # positions given up by rollbacks and history edits
    evicted_turns: int = 0  # old turns left out because the context was full
    cached_tokens: int = 0  # vLLM backend: positions of the newest request served by the prefix cache
    leased_s: float = 0.0  # how long the current lease has been held
    idle_s: float = 0.0  # since the session last used it
    holder: str = ""  # the stage0 process (filled in by the host)


class SessionSnapshot(msgspec.Struct, frozen=True, omit_defaults=True):
    """Everything the session actor knows, for inspection by clients and tests."""

    session_id: str
    epoch: int
    turn_state: TurnState
    turn_mode: TurnMode
    response: ResponseInfo | None = None
    cursor: PlaybackCursor = PlaybackCursor()
    history: tuple[Item, ...] = ()
    input_buffer_ms: int = 0
    chunks_sent: int = 0
    chunk_results: int = 0
    dropped_stale: int = 0
    responses: int = 0
    stage0: str = ""  # identity of the stage0 / stage1 process serving the session
    stage1: str = ""
    chunks_lost: int = 0  # sent to a stage0 that died before answering
    backchannels: int = 0
    barge_ins: int = 0
    stage_errors: int = 0
    kv_lease: KvLease | None = None  # the session's thinker KV lease, when its engine keeps one


class RoleStatus(msgspec.Struct, frozen=True, omit_defaults=True):
    role: Role
    identity: str
    pid: int
    state: str  # ready | starting | dead
    protocol_version: int = PROTOCOL_VERSION
    host: str = ""
    sessions: int = -1  # stages: sessions this host bound there
    capacity: int = 0  # stages: sessions it admits (0: no limit)
    load: int = -1  # stages: sessions open there, as its last heartbeat reported (-1: none yet)


class MetricSample(msgspec.Struct, frozen=True, array_like=True):
    """One Prometheus sample as shipped between processes."""

    name: str
    kind: str  # counter | gauge | histogram | summary | untyped
    documentation: str
    sample: str
    labels: tuple[tuple[str, str], ...]
    value: float


# --------------------------------------------------------------------------- control plane


class Hello(_Wire, frozen=True, tag="hello"):
    role: Role
    identity: str
    pid: int
    protocol_version: int
    engine: EngineInfo | None = None
    hostname: str = ""
    # New per connection: a peer that says hello with another one forgot every session
    # it had (it declared the host dead and reconnected), even with the same pid.
    instance: str = ""
    max_sessions: int = 0  # sessions this process admits (its configured cap; 0 = no cap of its own)


class Ready(_Wire, frozen=True, tag="ready"):
    protocol_version: int
    host_instance: str
    pid: int = 0  # the host process: a peer on the same machine knows at once when it exits
    hostname: str = ""


class Refused(_Wire, frozen=True, tag="refused"):
    reason: str
    protocol_version: int = PROTOCOL_VERSION


class HelloRequired(_Wire, frozen=True, tag="hello_required"):
    """The host does not know this peer (it restarted): say hello again."""

    host_instance: str


class Heartbeat(_Wire, frozen=True, tag="hb"):
    seq: int
    sender: str
    protocol_version: int = PROTOCOL_VERSION
    host_instance: str = ""
    metrics: tuple[MetricSample, ...] = ()
    # Stages: sessions open on the sender now, across every host it serves (-1: not reported).
    # With its Hello's max_sessions, the replica's load and capacity as it sees them.
    load: int = -1


class ClusterStatus(_Wire, frozen=True, tag="cluster"):
    """Host → adapters: who is up, the engine's native format, live session count and
    how many more sessions admission takes (``available``; -1: no limit)."""

    host_instance: str
    roles: tuple[RoleStatus, ...]
    sessions: int
    engine: EngineInfo | None = None
    draining: bool = False
    metrics: tuple[MetricSample, ...] = ()
    capacity: int = -1  # sessions admitted in all by the stages ready now (-1: no limit)
    available: int = -1  # sessions admitted now on top of the open ones (-1: no limit)


class Goodbye(_Wire, frozen=True, tag="bye"):
    """A peer leaves on purpose (shutdown) or dies with a reason (fatal error)."""

    identity: str
    reason: str = ""
    fatal: bool = False


class SessionOpen(_Wire, frozen=True, tag="open"):
    session_id: str
    config: SessionConfig
    epoch: int = 0


class SessionClose(_Wire, frozen=True, tag="close"):
    session_id: str
    epoch: int = 0
    reason: str = ""


class EpochAdvance(_Wire, frozen=True, tag="epoch"):
    session_id: str
    epoch: int
    reason: str = ""


class ResponseCancel(_Wire, frozen=True, tag="cancel"):
    """Client cancel. ``after_seq``: the adapter's data seq when the client asked, so
    a response.create still queued on the data plane is cancelled too."""

    session_id: str
    epoch: int
    after_seq: int
    response_id: str = ""
    event_id: str = ""


class StageOpen(_Wire, frozen=True, tag="stage_open"):
    session_id: str
    epoch: int
    config: SessionConfig


class StageClose(_Wire, frozen=True, tag="stage_close"):
    session_id: str
    epoch: int


class StageError(_Wire, frozen=True, tag="stage_error"):
    """A stage failed one session's work; the host fails that session's response."""

    session_id: str
    epoch: int
    code: str
    message: str
    role: Role = Role.STAGE0
    chunk_seq: int = -1  # stage0: the chunk this error answers


class KvLeaseReport(_Wire, frozen=True, tag="kv_lease"):
    """Stage0 → host: a session's KV lease changed (leased, grew, rolled back, released)."""

    session_id: str
    epoch: int
    lease: KvLease



class NoNewSessions(_Wire, frozen=True, tag="no_new_sessions"):
    """Host → every peer: the server is draining (SIGTERM): no new sessions from now on."""

    reason: str = ""


# --------------------------------------------------------------------------- data plane: adapter → host


class AudioIn(_Wire, frozen=True, tag="audio_in"):
    """Client audio, already converted to the engine's native rate (float32 mono)."""

    session_id: str
    epoch: int
    seq: int
    pcm: Array
    force: bool = False  # explicit interrupt flag: always barges in


class InputCommit(_Wire, frozen=True, tag="commit"):
    session_id: str
    epoch: int
    seq: int
    event_id: str = ""


class InputClear(_Wire, frozen=True, tag="clear"):
    session_id: str
    epoch: int
    seq: int
    event_id: str = ""


class ResponseCreate(_Wire, frozen=True, tag="create"):
    session_id: str
    epoch: int
    seq: int
    options: ResponseOptions = ResponseOptions()
    event_id: str = ""


class SessionUpdate(_Wire, frozen=True, tag="update"):
    session_id: str
    epoch: int
    seq: int
    config: SessionConfig
    event_id: str = ""


class PlaybackAck(_Wire, frozen=True, tag="ack"):
    session_id: str
    epoch: int
    seq: int
    response_id: str
    item_id: str
    played_ms: int
    event_id: str = ""


class ItemTruncate(_Wire, frozen=True, tag="truncate"):
    session_id: str
    epoch: int
    seq: int
    item_id: str
    audio_end_ms: int
    content_index: int = 0
    event_id: str = ""


class ItemCreate(_Wire, frozen=True, tag="item_create"):
    session_id: str
    epoch: int
    seq: int
    item: Item
    previous_item_id: str | None = None
    event_id: str = ""


class ItemDelete(_Wire, frozen=True, tag="item_delete"):
    session_id: str
    epoch: int
    seq: int
    item_id: str
    event_id: str = ""


class ItemRetrieve(_Wire, frozen=True, tag="item_retrieve"):
    session_id: str
    epoch: int
    seq: int
    item_id: str
    event_id: str = ""


class SnapshotRequest(_Wire, frozen=True, tag="snapshot_req"):
    session_id: str
    epoch: int
    seq: int
    event_id: str = ""


# --------------------------------------------------------------------------- data plane: host ↔ stages


class HistoryEntry(msgspec.Struct, frozen=True, array_like=True):
    role: str
    text: str
    item_id: str = ""  # the conversation item, so an engine can match its own turns to history


class ContextUpdate(_Wire, frozen=True, tag="context"):
    """Host → stage0: the committed conversation, as text, for engines that use it."""

    session_id: str
    epoch: int
    history: tuple[HistoryEntry, ...]
    instructions: str = ""


class AudioChunk(_Wire, frozen=True, tag="chunk"):
    """Host → stage0: one native-rate chunk. Exactly one Stage0Result answers it."""

    session_id: str
    epoch: int
    chunk_seq: int
    kind: ChunkKind
    pcm: Array
    response_id: str = ""
    force_listen: bool = False


class Stage0Result(_Wire, frozen=True, tag="result"):
    """Stage0 → host: the decision for one chunk; a speak carries the handoff payload."""

    session_id: str
    epoch: int
    chunk_seq: int
    action: Action
    end_of_turn: bool = False
    interrupt: bool = False  # the model yields the floor: the user took it
    listen_prob: float = 1.0
    text: str = ""
    input_transcript: str | None = None
    tokens: Array | None = None
    hidden: Array | None = None
    cost_ms: float = 0.0


class Handoff(_Wire, frozen=True, tag="handoff"):
    """Host → stage1: what to say next for a response."""

    session_id: str
    epoch: int
    response_id: str
    item_id: str
    unit_seq: int
    text: str = ""
    end_of_turn: bool = False
    tokens: Array | None = None
    hidden: Array | None = None
    voice: str = ""


class AudioOut(_Wire, frozen=True, tag="audio_out"):
    """Stage1 → host → adapter: assistant pcm16 at the output rate."""

    session_id: str
    epoch: int
    response_id: str
    item_id: str
    seq: int
    pcm: Array
    text: str = ""  # the transcript this chunk speaks (per-chunk alignment)
    end_of_turn: bool = False
    start_ms: int = 0


# --------------------------------------------------------------------------- data plane: host → adapter events


class SessionOpened(_Wire, frozen=True, tag="opened"):
    session_id: str
    epoch: int
    engine: EngineInfo


class CloseCause(enum.StrEnum):
    """Why a session ended, for the websocket close code the adapter picks."""

    NORMAL = ""  # closed by the client, or by a session rule: 1000
    REFUSED = "refused"  # admission refused it (capacity, draining): try again later, 1013
    FAILED = "failed"  # the server failed it (a stage refused it, the host was lost): 1011
    SLOW_CLIENT = "slow_client"  # the client did not read its events: 1008
    SHUTDOWN = "shutdown"  # the server is going away (drain): 1001


class SessionClosed(_Wire, frozen=True, tag="closed"):
    session_id: str
    epoch: int
    reason: str = ""
    cause: CloseCause = CloseCause.NORMAL


class SessionUpdated(_Wire, frozen=True, tag="updated"):
    session_id: str
    epoch: int
    config: SessionConfig
    event_id: str = ""


class SpeechStarted(_Wire, frozen=True, tag="speech_started"):
    session_id: str
    epoch: int
    item_id: str
    audio_start_ms: int


class SpeechStopped(_Wire, frozen=True, tag="speech_stopped"):
    session_id: str
    epoch: int
    item_id: str
    audio_end_ms: int


class InputCommitted(_Wire, frozen=True, tag="committed"):
    session_id: str
    epoch: int
    item_id: str
    previous_item_id: str | None = None


class InputCleared(_Wire, frozen=True, tag="cleared"):
    session_id: str
    epoch: int


class IdleTimeout(_Wire, frozen=True, tag="idle_timeout"):
    session_id: str
    epoch: int
    item_id: str
    audio_start_ms: int
    audio_end_ms: int


class ItemAdded(_Wire, frozen=True, tag="item_added"):
    session_id: str
    epoch: int
    item: Item
    previous_item_id: str | None = None


class ItemDone(_Wire, frozen=True, tag="item_done"):
    session_id: str
    epoch: int
    item: Item
    previous_item_id: str | None = None


class InputTranscript(_Wire, frozen=True, tag="input_transcript"):
    session_id: str
    epoch: int
    item_id: str
    transcript: str


class Decision(_Wire, frozen=True, tag="decision"):
    """One stage0 decision, shown to native clients."""

    session_id: str
    epoch: int
    chunk_seq: int
    action: Action
    listen_prob: float = 1.0
    text: str = ""
    end_of_turn: bool = False
    response_id: str = ""
    cost_ms: float = 0.0


class ChunksAnswered(_Wire, frozen=True, tag="chunks_answered"):
    """Host → adapter: every stage0 chunk of the session up to ``through_seq`` has had its
    one answer (stage0 answers in order).

    A :class:`Decision` answers its own chunk; this event covers the answers no Decision
    shows: a result of an epoch a barge-in ended, a stage error, chunks lost with a dead
    stage0. An adapter that paces its output by its input (the demo bridge) learns how
    far stage0 got from the two, without asking.
    """

    session_id: str
    epoch: int
    through_seq: int


class ResponseCreated(_Wire, frozen=True, tag="response_created"):
    session_id: str
    epoch: int
    response: ResponseInfo
    item: Item


class TextOut(_Wire, frozen=True, tag="text_out"):
    """Text delta of a text-modality response (or the transcript ahead of audio)."""

    session_id: str
    epoch: int
    response_id: str
    item_id: str
    delta: str


class ResponseDone(_Wire, frozen=True, tag="response_done"):
    session_id: str
    epoch: int
    response: ResponseInfo
    transcript: str = ""


class ItemTruncated(_Wire, frozen=True, tag="item_truncated"):
    session_id: str
    epoch: int
    item_id: str
    audio_end_ms: int
    content_index: int = 0
    event_id: str = ""


class ItemDeleted(_Wire, frozen=True, tag="item_deleted"):
    session_id: str
    epoch: int
    item_id: str
    event_id: str = ""


class ItemRetrieved(_Wire, frozen=True, tag="item_retrieved"):
    session_id: str
    epoch: int
    item: Item
    event_id: str = ""


class PlaybackCommitted(_Wire, frozen=True, tag="playback_committed"):
    session_id: str
    epoch: int
    response_id: str
    item_id: str
    played_ms: int
    history: tuple[Item, ...]
    event_id: str = ""


class Snapshot(_Wire, frozen=True, tag="snapshot"):
    session_id: str
    epoch: int
    snapshot: SessionSnapshot
    event_id: str = ""


CAPACITY_EXCEEDED = "capacity_exceeded"  # the error code of every admission refusal for capacity


class ErrorEvent(_Wire, frozen=True, tag="error"):
    """An error for the client; the session stays open unless ``fatal``."""

    session_id: str
    epoch: int
    code: str
    message: str
    type: str = "invalid_request_error"  # Realtime error.type
    param: str = ""
    event_id: str = ""
    response_id: str = ""
    fatal: bool = False


ControlMessage = (
    Hello
    | Ready
    | Refused
    | HelloRequired
    | Heartbeat
    | ClusterStatus
    | Goodbye
    | SessionOpen
    | SessionClose
    | EpochAdvance
    | ResponseCancel
    | StageOpen
    | StageClose
    | StageError
    | NoNewSessions
    | KvLeaseReport
)

# Commands from the adapter that travel in order with the audio on the data plane.
ClientCommand = (
    AudioIn
    | InputCommit
    | InputClear
    | ResponseCreate
    | SessionUpdate
    | PlaybackAck
    | ItemTruncate
    | ItemCreate
    | ItemDelete
    | ItemRetrieve
    | SnapshotRequest
)

# Between the host and the stages (data plane).
StageData = ContextUpdate | AudioChunk | Stage0Result | Handoff | AudioOut

# Events from the host to the adapter (data plane, in order; AudioOut is forwarded as is).
SessionEvent = (
    SessionOpened
    | SessionClosed
    | SessionUpdated
    | SpeechStarted
    | SpeechStopped
    | InputCommitted
    | InputCleared
    | IdleTimeout
    | ItemAdded
    | ItemDone
    | InputTranscript
    | Decision
    | ChunksAnswered
    | ResponseCreated
    | AudioOut
    | TextOut
    | ResponseDone
    | ItemTruncated
    | ItemDeleted
    | ItemRetrieved
    | PlaybackCommitted
    | Snapshot
    | ErrorEvent
)

# What a protocol handler receives from its session link: the session events, in order, plus
# the epoch advances the link takes off the control plane (flush playback now).
AdapterEvent = SessionEvent | EpochAdvance

# Hello travels on the data plane too: the host learns the peer's data route from it.
DataMessage = Hello | ClientCommand | StageData | SessionEvent

Message = ControlMessage | DataMessage

Plane = Literal["control", "data"]

CONTROL_TYPES: tuple[type, ...] = ControlMessage.__args__
DATA_TYPES: tuple[type, ...] = DataMessage.__args__

def pcm_ms(samples: int, rate: int) -> int:
    """Duration in whole milliseconds of ``samples`` at ``rate``."""
    return samples * 1000 // rate

