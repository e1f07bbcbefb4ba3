"""Reads a GGUF file's metadata and tensor views: struct for the header, numpy for the data.

``gguf.GGUFReader`` builds a numpy view for every part of every field: on a 100k-token
vocabulary that alone takes seconds (most of a conversion). This reads the same layout
(GGUF v2/v3, little-endian) in one pass over the header, decodes string arrays directly,
and memory-maps the tensor data; dequantization stays with the ``gguf`` package.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

_MAGIC = b"GGUF"
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9


class GgufFormatError(ValueError):
    """Not a GGUF file this reader understands."""


@dataclass(frozen=True, slots=True)
class GgufTensor:
    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # as GGUF lists it: innermost dimension first
    data: np.ndarray  # raw: float arrays for F32/F16, bytes (rows, row bytes) for block types


class _Cursor:
    def __init__(self, buf: memoryview) -> None:
        self.buf = buf
        self.pos = 0

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise GgufFormatError("truncated header")
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return v

    def string(self) -> str:
        n = self.take("<Q")
        if self.pos + n > len(self.buf):
            raise GgufFormatError("truncated string")
        s = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8", "replace")
        self.pos += n
        return s

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.take("<I"), self.take("<Q")
            if etype == _STRING:
                return [self.string() for _ in range(count)]
            if etype in _NUMPY:
                dt = np.dtype(_NUMPY[etype])
                end = self.pos + dt.itemsize * count
                if end > len(self.buf):
                    raise GgufFormatError("truncated array")
                arr = np.frombuffer(self.buf[self.pos : end], dt).tolist()
                self.pos = end
                return arr
            return [self.value(etype) for _ in range(count)]
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        raise GgufFormatError(f"unknown value type {vtype}")


def read_gguf_file(path: str | Path) -> tuple[dict[str, Any], list[GgufTensor]]:
    """The metadata (key → value) and the tensors of a GGUF file (data memory-mapped)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import quant_shape_to_byte_shape

    mm = np.memmap(path, mode="r")
    buf = memoryview(mm.data)
    cur = _Cursor(buf)
    if bytes(buf[:4]) != _MAGIC:
        raise GgufFormatError("no GGUF magic")
    cur.pos = 4
    version = cur.take("<I")
    if version not in (2, 3):
        raise GgufFormatError(f"GGUF version {version} (big-endian or unknown) is not supported")
    n_tensors, n_kv = cur.take("<Q"), cur.take("<Q")
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        meta[key] = cur.value(cur.take("<I"))
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        dims = tuple(cur.take("<Q") for _ in range(cur.take("<I")))
        infos.append((name, GGMLQuantizationType(cur.take("<I")), dims, cur.take("<Q")))
    align = int(meta.get("general.alignment", 32))
    start = cur.pos + (-cur.pos) % align
    tensors = []
    for name, qtype, dims, offset in infos:
        np_shape = tuple(reversed(dims))
        block, type_size = GGML_QUANT_SIZES[qtype]
        n_bytes = int(np.prod(dims, dtype=np.int64)) * type_size // block
        at = start + offset
        if at + n_bytes > len(mm):
            raise GgufFormatError(f"tensor {name} runs past the end of the file")
        if qtype == GGMLQuantizationType.F32:
            data = mm[at : at + n_bytes].view(np.float32).reshape(np_shape)
        elif qtype == GGMLQuantizationType.F16:
            data = mm[at : at + n_bytes].view(np.float16).reshape(np_shape)
        else:
            data = mm[at : at + n_bytes].reshape(quant_shape_to_byte_shape(np_shape, qtype))
        tensors.append(GgufTensor(name, qtype, dims, data))
    return meta, tensors
