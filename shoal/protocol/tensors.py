"""Tensors as raw buffers: numpy arrays <-> (spec, bytes), shared by the worker link and the Open
Inference Protocol's binary extension. Pure functions, no I/O.

BYTES tensors (strings, encoded images) use the Open Inference Protocol's binary layout: each element
is a 4-byte little-endian length followed by that many bytes.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import numpy as np

from shoal.protocol.interface import DATATYPES
from shoal.protocol.link_messages import TensorDesc

NP_DTYPES: dict[str, np.dtype] = {k: np.dtype(v) for k, v in DATATYPES.items() if k != "BYTES"}
DATATYPE_OF: dict[np.dtype, str] = {v: k for k, v in NP_DTYPES.items()}

# A shape read from the network has at most this many dimensions (numpy's own limit is 64).
MAX_DIMS = 32
# What a BYTES element is counted as against a limit on tensor bytes, whatever its length (which is
# counted too): its Python object, its slot in an array and the decoder's bookkeeping are about 100
# bytes; the rest bounds how many of them one request can make a gateway or a worker build (65 536
# under the default 64 MB limits, far more than any batch of images or strings).
BYTES_ELEMENT_COST = 1024
_U32 = struct.Struct("<I")


class TensorError(ValueError):
    """A tensor whose declared datatype, shape and size do not agree (``status`` 400), or one larger
    than a decoder takes (413)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def datatype_of(arr: np.ndarray) -> str:
    if arr.dtype == object or arr.dtype.kind in ("S", "U"):
        return "BYTES"
    try:
        return DATATYPE_OF[arr.dtype.newbyteorder("=")]
    except KeyError:
        raise TensorError(f"numpy dtype {arr.dtype} has no Open Inference Protocol datatype") from None


def check_shape(shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, (list, tuple)) or len(shape) > MAX_DIMS:
        raise TensorError(f"shape must be a list of at most {MAX_DIMS} integers")
    for s in shape:
        if not isinstance(s, int) or isinstance(s, bool) or s < 0:
            raise TensorError(f"shape {list(shape)} must hold non-negative integers")
    return tuple(shape)


def element_count(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def encode_bytes_elements(items: list[bytes] | np.ndarray) -> bytes:
    out = bytearray()
    for it in np.asarray(items, dtype=object).reshape(-1):
        b = it.encode() if isinstance(it, str) else bytes(it)
        out += _U32.pack(len(b))
        out += b
    return bytes(out)


def decode_bytes_elements(buf: bytes | memoryview, count: int, max_elements: int | None = None) -> np.ndarray:
    """Split a BYTES buffer into exactly ``count`` elements (at most ``max_elements``: each becomes a
    Python object); every length is checked first."""
    if max_elements is not None and count > max_elements:
        raise TensorError(f"a BYTES tensor of {count} elements; at most {max_elements} are taken", 413)
    mv = memoryview(buf)
    items: list[bytes] = []
    pos = 0
    n = len(mv)
    for _ in range(count):
        if pos + 4 > n:
            raise TensorError(f"BYTES buffer ends after {len(items)} of {count} elements")
        (ln,) = _U32.unpack_from(mv, pos)
        pos += 4
        if pos + ln > n:
            raise TensorError(f"BYTES element {len(items)} claims {ln} bytes but only {n - pos} remain")
        items.append(bytes(mv[pos : pos + ln]))
        pos += ln
    if pos != n:
        raise TensorError(f"BYTES buffer has {n - pos} bytes after its {count} elements")
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    return arr


def to_buffer(arr: np.ndarray) -> tuple[str, tuple[int, ...], bytes | memoryview]:
    """Datatype, shape and contiguous little-endian bytes of an array (no copy when already so)."""
    dt = datatype_of(arr)
    if dt == "BYTES":
        return dt, tuple(arr.shape), encode_bytes_elements(arr)
    a = np.ascontiguousarray(arr)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return dt, tuple(a.shape), a.data.cast("B")


def from_buffer(
    datatype: str, shape: tuple[int, ...], buf: bytes | memoryview, max_bytes_elements: int | None = None
) -> np.ndarray:
    """The array a (datatype, shape, bytes) triple describes, after checking that they agree."""
    count = element_count(shape)
    if datatype == "BYTES":
        return decode_bytes_elements(buf, count, max_bytes_elements).reshape(shape)
    dt = NP_DTYPES.get(datatype)
    if dt is None:
        raise TensorError(f"unknown datatype '{datatype}'")
    expected = count * dt.itemsize
    if len(buf) != expected:
        raise TensorError(f"{datatype} tensor of shape {list(shape)} needs {expected} bytes, got {len(buf)}")
    return np.frombuffer(buf, dtype=dt.newbyteorder("<")).reshape(shape)


def pack_tensors(arrays: dict[str, np.ndarray]) -> tuple[list[TensorDesc], list[bytes | memoryview]]:
    """Descriptions for a frame header and the buffers for its payload, in the same order."""
    specs: list[TensorDesc] = []
    bufs: list[bytes | memoryview] = []
    for name, arr in arrays.items():
        dt, shape, buf = to_buffer(np.asarray(arr) if not isinstance(arr, np.ndarray) else arr)
        specs.append(TensorDesc(name, dt, list(shape), len(buf)))
        bufs.append(buf)
    return specs, bufs


def unpack_tensors(
    specs: list[TensorDesc], payload: bytes | memoryview, max_bytes_elements: int | None = None
) -> dict[str, np.ndarray]:
    """Inverse of ``pack_tensors``; sizes must add up to the payload exactly, and BYTES tensors hold
    at most ``max_bytes_elements`` elements in all. (The descriptions' types were checked when their
    header was decoded; sizes and shapes are checked here.)"""
    left = max_bytes_elements
    mv = memoryview(payload)
    out: dict[str, np.ndarray] = {}
    pos = 0
    for s in specs:
        size = s.size
        if size < 0:
            raise TensorError(f"tensor '{s.name}' has a negative size")
        shape = check_shape(s.shape)
        if pos + size > len(mv):
            raise TensorError(f"tensor '{s.name}' claims {size} bytes beyond the payload")
        out[s.name] = a = from_buffer(s.datatype, shape, mv[pos : pos + size], left)
        if left is not None and s.datatype == "BYTES":
            left -= a.size
        pos += size
    if pos != len(mv):
        raise TensorError(f"payload has {len(mv) - pos} bytes not claimed by any tensor")
    return out
