"""Header frame + zero-copy buffer frames for bus messages.

Frame 0 is the msgpack body of one message. A numpy array inside it travels either
inline as a msgpack Ext (small arrays: one frame is cheaper than two) or, above
``inline_threshold`` bytes, as its own raw frame referenced from the body by index.
On the receiving side both kinds become ``np.frombuffer`` views onto the received
memory: no copy is made where the frame allows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec
import numpy as np

from duplexd.bus.messages import ControlMessage, DataMessage, Message

EXT_INLINE = 1
EXT_FRAME = 2
DEFAULT_INLINE_THRESHOLD = 4096

# Only plain numeric dtypes may cross the bus: never object arrays.
_ALLOWED_DTYPES = frozenset(
    np.dtype(d).str for d in ("int8", "uint8", "int16", "int32", "int64", "float16", "float32", "float64", "bool")
)

Buffer = bytes | memoryview | bytearray | np.ndarray


class CodecError(Exception):
    """A frame sequence that does not decode to a known message of the plane."""


class Encoder:
    """Encodes messages into a list of frames; not thread-safe (one per thread)."""

    def __init__(self, inline_threshold: int = DEFAULT_INLINE_THRESHOLD) -> None:
        self._inline_threshold = inline_threshold
        self._aux: list[Buffer] = []
        self._meta: dict[tuple[np.dtype, tuple[int, ...]], bytes] = {}  # (dtype, shape) → packed header
        self._enc = msgspec.msgpack.Encoder(enc_hook=self._enc_hook)

    def encode(self, msg: Message) -> list[Buffer]:
        aux = self._aux = [b""]  # placeholder for the body, so indices start at 1
        try:
            aux[0] = self._enc.encode(msg)
        finally:
            self._aux = []
        return aux

    def _enc_hook(self, obj: Any) -> Any:
        if not isinstance(obj, np.ndarray):
            raise TypeError(f"cannot encode {type(obj).__name__} on the bus")
        arr = np.ascontiguousarray(obj)
        if arr.nbytes <= self._inline_threshold:
            # Hot path (every audio chunk): the packed (dtype, shape) header is cached.
            key = (arr.dtype, arr.shape)
            head = self._meta.get(key)
            if head is None:
                _check_dtype(arr.dtype)
                meta = msgspec.msgpack.encode((arr.dtype.str, arr.shape))
                head = bytes((len(meta),)) + meta
                if len(self._meta) < 256:  # audio comes in few shapes; bound it anyway
                    self._meta[key] = head
            return msgspec.msgpack.Ext(EXT_INLINE, head + arr.tobytes())
        _check_dtype(arr.dtype)
        self._aux.append(arr.data if arr.ndim else arr.tobytes())
        index = len(self._aux) - 1
        return msgspec.msgpack.Ext(EXT_FRAME, msgspec.msgpack.encode((arr.dtype.str, arr.shape, index)))


def _check_dtype(dt: np.dtype) -> None:
    if dt.str not in _ALLOWED_DTYPES:
        raise TypeError(f"dtype {dt} may not cross the bus")


class Decoder:
    """Decodes frames of one plane; arrays become views onto the frames' memory."""

    def __init__(self, plane_type: Any) -> None:
        self._frames: Sequence[Any] = ()
        self._meta: dict[bytes, tuple[np.dtype, tuple[int, ...], int]] = {}  # packed header → parsed
        self._dec = msgspec.msgpack.Decoder(plane_type, ext_hook=self._ext_hook, dec_hook=self._dec_hook)

    def decode(self, frames: Sequence[Any]) -> Message:
        """Decode ``frames`` (bytes, memoryviews or zmq.Frame objects)."""
        if not frames:
            raise CodecError("empty message")
        views = frames if len(frames) == 1 and isinstance(frames[0], bytes) else [_view(f) for f in frames]
        self._frames = views
        try:
            msg: Message = self._dec.decode(views[0])
            return msg
        except CodecError:
            raise
        except (msgspec.DecodeError, ValueError, TypeError, IndexError) as exc:
            raise CodecError(str(exc)) from exc
        finally:
            self._frames = ()

    def _ext_hook(self, code: int, data: memoryview) -> np.ndarray:
        if code == EXT_INLINE:
            if not data:
                raise CodecError("truncated inline array")
            n = data[0]
            head = bytes(data[: 1 + n])
            meta = self._meta.get(head)
            if meta is None:
                dtype, shape = msgspec.msgpack.decode(data[1 : 1 + n])
                meta = _parse_meta(dtype, shape)
                if len(self._meta) < 256:
                    self._meta[head] = meta
            dt, shape, nbytes = meta
            body = data[1 + n :]
            if len(body) != nbytes:
                raise CodecError(f"array of {shape} {dt} does not fit {len(body)} bytes")
            return np.frombuffer(body, dtype=dt).reshape(shape)
        if code == EXT_FRAME:
            dtype, shape, index = msgspec.msgpack.decode(data)
            if not 0 < index < len(self._frames):
                raise CodecError(f"array frame {index} missing (have {len(self._frames)})")
            return _array(self._frames[index], dtype, shape)
        raise CodecError(f"unknown ext code {code}")

    @staticmethod
    def _dec_hook(typ: type, obj: Any) -> Any:
        if typ is np.ndarray and isinstance(obj, np.ndarray):
            return obj
        raise TypeError(f"expected an array for {typ}, got {type(obj).__name__}")


def _view(frame: Any) -> memoryview:
    buf = getattr(frame, "buffer", None)  # zmq.Frame: zero-copy view of the message
    if isinstance(buf, memoryview):
        return buf
    return memoryview(frame)


def _parse_meta(dtype: Any, shape: Any) -> tuple[np.dtype, tuple[int, ...], int]:
    if not isinstance(dtype, str) or dtype not in _ALLOWED_DTYPES:
        raise CodecError(f"dtype {dtype!r} not allowed")
    if not isinstance(shape, list | tuple) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise CodecError(f"bad array shape {shape!r}")
    dt = np.dtype(dtype)
    count = 1
    for s in shape:
        count *= s
    return dt, tuple(shape), count * dt.itemsize


def _array(buf: memoryview, dtype: str, shape: Sequence[int]) -> np.ndarray:
    dt, shp, nbytes = _parse_meta(dtype, shape)
    if nbytes != len(buf):
        raise CodecError(f"array of {shp} {dt} does not fit {len(buf)} bytes")
    return np.frombuffer(buf, dtype=dt).reshape(shp)


def control_decoder() -> Decoder:
    return Decoder(ControlMessage)


def data_decoder() -> Decoder:
    return Decoder(DataMessage)
