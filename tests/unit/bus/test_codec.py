"""Codec: every message type round-trips; arrays arrive as views of the received frames;
bad frames raise CodecError (and a Channel skips them without stopping)."""

from __future__ import annotations

import enum
import tempfile
import types
import typing
from collections.abc import Iterator
from typing import Any

import msgspec
import numpy as np
import pytest
import zmq

from duplexd.bus.addresses import ipc_addresses
from duplexd.bus.codec import CodecError, Encoder, control_decoder, data_decoder
from duplexd.bus.messages import CONTROL_TYPES, DATA_TYPES, AudioChunk, AudioOut, ChunkKind, Heartbeat, Hello, Role
from duplexd.bus.sockets import CONTROL, DATA, Channel, bind_host, connect_peer


def sample(tp: Any, depth: int = 0) -> Any:
    """A non-default value of type ``tp`` (so omit_defaults cannot hide a field)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return sample(args[0], depth)
    if tp is np.ndarray:
        return np.arange(6, dtype=np.float32).reshape(2, 3)
    if tp is str:
        return "x"
    if tp is bool:
        return True
    if tp is int:
        return 7
    if tp is float:
        return 0.25
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return list(tp)[-1]
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return (sample(args[0], depth + 1),)
        return tuple(sample(a, depth + 1) for a in args)
    if origin is dict:
        return {"k": "v"}
    if origin is list:
        return [sample(typing.get_args(tp)[0], depth + 1)]
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        hints = typing.get_type_hints(tp)
        return tp(**{f: sample(hints[f], depth + 1) for f in tp.__struct_fields__})
    raise TypeError(f"no sample for {tp!r}")


def _eq(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    if isinstance(a, msgspec.Struct):
        return type(a) is type(b) and all(_eq(getattr(a, f), getattr(b, f)) for f in a.__struct_fields__)
    if isinstance(a, tuple | list):
        return len(a) == len(b) and all(_eq(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _all_types() -> Iterator[tuple[str, type]]:
    for t in CONTROL_TYPES:
        yield "control", t
    for t in DATA_TYPES:
        yield "data", t


@pytest.mark.parametrize(("plane", "tp"), list(_all_types()), ids=lambda v: getattr(v, "__name__", v))
def test_every_message_type_round_trips(plane: str, tp: type) -> None:
    msg = sample(tp)
    frames = Encoder().encode(msg)
    dec = control_decoder() if plane == "control" else data_decoder()
    out = dec.decode([bytes(memoryview(f).cast("B")) for f in frames])
    assert _eq(msg, out)


def test_defaults_are_omitted_and_still_round_trip() -> None:
    msg = Heartbeat(seq=1, sender="s")
    out = control_decoder().decode(Encoder().encode(msg))
    assert out == msg


def test_large_arrays_travel_as_separate_frames_small_ones_inline() -> None:
    enc = Encoder(inline_threshold=4096)
    small = AudioOut("s", 0, "r", "i", 0, np.zeros(480, np.int16))
    big = AudioOut("s", 0, "r", "i", 0, np.zeros(48000, np.int16))
    assert len(enc.encode(small)) == 1
    frames = enc.encode(big)
    assert len(frames) == 2 and memoryview(frames[1]).nbytes == 96000


@pytest.fixture
def pair() -> Iterator[tuple[Channel, Channel]]:
    with tempfile.TemporaryDirectory(prefix="dxc-") as d:
        addrs = ipc_addresses(d)
        ctx = zmq.Context()
        host = bind_host(addrs, ctx)
        peer = connect_peer(addrs, "peer-1", ctx)
        yield host, peer
        peer.close(0)
        host.close(0)
        ctx.term()


def _recv(chan: Channel, plane: str = DATA) -> Any:
    for _ in range(100):
        chan.poll(100)
        r = chan.recv_nowait(plane)  # type: ignore[arg-type]
        if r is not None:
            return r
    raise AssertionError("nothing received")


@pytest.mark.parametrize("samples", [480, 240_000], ids=["inline", "frame"])
def test_received_arrays_are_views_of_the_received_frames(pair: tuple[Channel, Channel], samples: int) -> None:
    host, peer = pair
    pcm = (np.arange(samples) % 1000).astype(np.float32)
    peer.send(DATA, AudioChunk("s", 1, 5, ChunkKind.LIVE, pcm))
    r = _recv(host)
    arr = r.msg.pcm
    assert np.array_equal(arr, pcm)
    assert not arr.flags.owndata  # no copy was made on the receiving side
    frame = r.frames[-1]  # the header frame (bytes) holding an inline array, or the array's own frame
    frame_bytes = np.frombuffer(getattr(frame, "buffer", frame), dtype=np.uint8)
    assert np.shares_memory(arr, frame_bytes)
    assert r.identity == b"peer-1"


def test_channel_skips_undecodable_messages_and_counts_them(pair: tuple[Channel, Channel]) -> None:
    host, peer = pair
    peer.data.send_multipart([b"\xc1garbage"])  # not msgpack
    peer.data.send_multipart([msgspec.msgpack.encode(["no_such_tag", 1])])
    peer.ctl.send_multipart([Encoder().encode(AudioOut("s", 0, "r", "i", 0, np.zeros(1, np.int16)))[0]])  # wrong plane
    peer.send(DATA, AudioChunk("s", 0, 1, ChunkKind.LIVE, np.zeros(4, np.float32)))
    peer.send(CONTROL, Hello(Role.STAGE0, "peer-1", 1, 1))
    r = _recv(host)
    assert isinstance(r.msg, AudioChunk)
    rc = _recv(host, CONTROL)
    assert isinstance(rc.msg, Hello)
    assert host.bad_frames.count == 3


def _frames(msg: Any, threshold: int = 4096) -> list[bytes]:
    return [bytes(memoryview(f).cast("B")) for f in Encoder(threshold).encode(msg)]


@pytest.mark.parametrize(
    "mangle",
    [
        pytest.param(lambda fr: [], id="empty"),
        pytest.param(lambda fr: [fr[0][: len(fr[0]) // 2]], id="truncated-body"),
        pytest.param(lambda fr: [fr[0]], id="missing-array-frame"),
        pytest.param(lambda fr: [fr[0], fr[1][:-3]], id="truncated-array-frame"),
        pytest.param(lambda fr: [fr[0].replace(b"<f4", b"|O8")], id="object-dtype"),
        pytest.param(lambda fr: [b"\x93\xa6nosuch\x01\x02"], id="unknown-tag"),
        pytest.param(lambda fr: [b"\xff\xff\xff"], id="garbage"),
    ],
)
def test_bad_frames_raise_codec_error(mangle: Any) -> None:
    msg = AudioChunk("s", 0, 1, ChunkKind.LIVE, np.zeros(2000, np.float32))
    with pytest.raises(CodecError):
        data_decoder().decode(mangle(_frames(msg, threshold=16)))


def test_encoder_refuses_object_arrays() -> None:
    with pytest.raises(TypeError):
        Encoder().encode(AudioChunk("s", 0, 1, ChunkKind.LIVE, np.array([object()])))
