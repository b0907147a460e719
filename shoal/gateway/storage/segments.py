"""Segment files: how one write batch's tensors are laid out in one file, and described in its rows.
Pure functions; the writer writes what they produce, the queries read what the rows point to.

Each tensor is stored in a self-describing form: numeric tensors as ``.npy`` bytes (what
``numpy.save`` writes; read back with ``numpy.load``, no pickle), BYTES tensors (encoded images,
text) as their raw bytes, one per element, named by what they hold (``.png``, ``.jpg``, ``.gif``,
``.webp``, else ``.bin``). The tensors of the batch lie one after another in one
``<YYYYMMDDHH>/<ms>-<random>.results`` file, and each row lists its tensors with name, datatype, shape,
file names and (offset, size) in that file. One file per batch, not per tensor: on the machines
measured, creating a file costs 60-150 microseconds, more than everything else a record costs.
"""

from __future__ import annotations

import io
import re
import uuid
from datetime import datetime, timezone
from typing import Any

import numpy as np
import orjson

from shoal.protocol.tensors import datatype_of

SUFFIX = ".results"
HOUR_DIR = re.compile(r"\d{10}")  # YYYYMMDDHH
INLINE_OUTPUT_MAX = 1 << 20  # outputs larger than this are left out of a result's JSON (fetch the file)
_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")

# One queued record, as the store got it: (time, request_id, model, version, inputs, raw_input,
# outputs, status, latency_ms, error, client, bytes held in memory). A plain tuple: it is built on the
# request path.
Item = tuple[Any, ...]
HELD = 11  # index of the bytes held


def held_bytes(arrays: dict[str, np.ndarray] | None) -> int:
    n = 0
    if arrays:
        for a in arrays.values():
            n += sum(len(x) for x in a.flat) if a.dtype.hasobject else a.nbytes
    return n


def hour_of(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y%m%d%H")


def segment_name(t: float) -> str:
    """A new segment's path under the folder, in the folder of its first request's hour."""
    return f"{hour_of(t)}/{int(t * 1000)}-{uuid.uuid4().hex[:12]}{SUFFIX}"


def encode_batch(
    batch: list[Item], cluster: str, rel: str
) -> tuple[list[Any], list[dict[str, Any]], list[Exception]]:
    """The bytes of segment ``rel`` (buffers to write one after another, not copied), the rows to
    insert, and the errors of records that could not be serialised (left out)."""
    out: list[Any] = []
    rows: list[dict[str, Any]] = []
    failed: list[Exception] = []
    pos = 0
    for t, rid, model, version, inputs, raw, outputs, status, lat, error, client, _ in batch:
        try:
            parts: list[Any] = []
            ins: list[dict[str, Any]] = []
            used: set[str] = set()
            end = pos
            if inputs:
                end = describe(inputs, ins, used, parts, end)
            if raw is not None:
                end = describe({"raw": bytes_array([raw])}, ins, used, parts, end)
            outs: list[dict[str, Any]] = []
            if outputs:
                end = describe(outputs, outs, set(), parts, end)
        except Exception as e:  # an array that cannot be stored: skip this record only
            failed.append(e)
            continue
        out += parts
        rows.append(
            {
                "cluster": cluster,
                "request_id": str(rid)[:256],
                "model": model[:128],
                "version": version[:64],
                "time": t,
                "status": int(status),
                "latency_ms": float(lat),
                "error": error[:4000] if error else None,
                "client": client[:256] if client else None,
                "path": rel,
                "bytes": end - pos,
                "inputs": orjson.dumps(ins).decode(),
                "outputs": orjson.dumps(outs).decode(),
            }
        )
        pos = end
    return out, rows, failed


def bytes_array(items: list[bytes]) -> np.ndarray:
    a = np.empty(len(items), dtype=object)
    a[:] = items
    return a


def sniff(b: bytes) -> str:
    if b.startswith(b"\x89PNG\r\n\x1a\n"):
        return ".png"
    if b.startswith(b"\xff\xd8\xff"):
        return ".jpg"
    if b[:6] in (b"GIF87a", b"GIF89a"):
        return ".gif"
    if b[:4] == b"RIFF" and b[8:12] == b"WEBP":
        return ".webp"
    return ".bin"


def describe(
    arrays: dict[str, np.ndarray], out: list[dict[str, Any]], used: set[str], parts: list[Any], pos: int
) -> int:
    """Serialise each array (``.npy`` bytes, or raw bytes per BYTES element) into ``parts`` without
    copying its data, describe it in ``out`` with where it lands from ``pos``; returns the new end."""
    for i, (name, a) in enumerate(arrays.items()):
        if a.dtype == object or a.dtype.kind in "SU":
            base = _base_name(name, i)
            files: list[str] = []
            at: list[list[int]] = []
            flat = a.reshape(-1)
            for j, x in enumerate(flat):
                b = x.encode() if isinstance(x, str) else bytes(x)
                files.append(_unique(f"{base}{sniff(b)}" if flat.size == 1 else f"{base}.{j}{sniff(b)}", used))
                at.append([pos, len(b)])
                parts.append(b)
                pos += len(b)
            out.append({"name": name, "datatype": "BYTES", "shape": list(a.shape), "files": files, "at": at})
            continue
        if not a.flags.c_contiguous:
            a = np.ascontiguousarray(a)
        key = (name, i, a.dtype, a.shape)
        known = _numeric.get(key)
        if known is None:
            if len(_numeric) >= 4096:
                _numeric.clear()
            known = _numeric[key] = (f"{_base_name(name, i)}.npy", datatype_of(a), _npy_header(a))
        f, dt, head = known
        if f in used:
            f = _unique(f, used)
        used.add(f)
        size = len(head) + a.nbytes
        out.append({"name": name, "datatype": dt, "shape": list(a.shape), "files": [f], "at": [[pos, size]]})
        parts += (head, a)
        pos += size
    return pos


# (tensor name, position, dtype, shape) -> (file name, datatype, .npy header): most requests of a
# model repeat a few of these, and working them out is most of the cost of a small tensor.
_numeric: dict[tuple[str, int, np.dtype, tuple[int, ...]], tuple[str, str, bytes]] = {}


def _base_name(name: str, i: int) -> str:
    return name if _SAFE_NAME.fullmatch(name) else f"tensor-{i}"


def _npy_header(a: np.ndarray) -> bytes:
    """The ``.npy`` header numpy.save writes for this C-ordered array."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(a.dtype), "fortran_order": False, "shape": a.shape}
    )
    return buf.getvalue()


def _unique(f: str, used: set[str]) -> str:
    while f in used:
        f = "_" + f
    used.add(f)
    return f


def decode_output(datatype: str, chunks: list[bytes]) -> list[Any]:
    """An output's values from its stored bytes (one chunk per file), for a result's JSON."""
    if datatype == "BYTES":
        return [c.decode("utf-8", "replace") for c in chunks]
    return np.load(io.BytesIO(chunks[0]), allow_pickle=False).reshape(-1).tolist()


def pick_file(tensors: list[dict[str, Any]], name: str) -> tuple[str, list[int]] | None:
    """(file name, [offset, size]) of a stored file, by its file name or by the tensor's name when
    the tensor is one file."""
    for t in tensors:
        for f, at in zip(t["files"], t["at"], strict=True):
            if f == name or (t["name"] == name and len(t["files"]) == 1):
                return f, at
    return None
