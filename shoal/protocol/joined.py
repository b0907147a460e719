"""Several requests in one frame, and their results in one frame: the gateway joins requests that
arrive together for the same worker into one REQUESTS; the worker runs them as one item of its batch
and answers with one RESULTS, which the gateway cuts back into one result per request. Pure
functions, no I/O.

Under load this is what keeps a worker's core on the model: a worker that gets sixty requests in one
frame decodes one header and one set of tensors, queues one item and sends one answer, instead of
sixty of each.

Only requests that a batch could hold together are joined: the same input names, datatypes and
non-batch dimensions, the same outputs asked for, one first dimension shared by all inputs, and no
BYTES input (those hold encoded images, which the worker decodes one request at a time so that one
bad image fails only its own request).
"""

from __future__ import annotations

from typing import Any

from shoal.protocol.link_messages import Requests, Result, Results, TensorDesc
from shoal.protocol.tensors import NP_DTYPES, check_shape

JoinKey = tuple  # what requests must share to be joined


def join_key(inputs: list[TensorDesc], outputs: list[str] | None) -> tuple[JoinKey | None, int]:
    """The key of a request that can be joined with others (None when it cannot), and its rows."""
    if not inputs:
        return None, 1
    rows = inputs[0].shape[0] if inputs[0].shape else -1
    if rows < 1:
        return None, 1
    parts = []
    for t in inputs:
        if t.datatype not in NP_DTYPES or not t.shape or t.shape[0] != rows:
            return None, rows
        parts.append((t.name, t.datatype, tuple(t.shape[1:])))
    return (tuple(parts), tuple(outputs) if outputs is not None else None), rows


def join_requests(
    requests: list[tuple[int, list[TensorDesc], list[Any], int, str | None]], outputs: list[str] | None
) -> tuple[Requests, list[Any]]:
    """One REQUESTS header and its payload buffers (not copied) for requests of one join key, each
    given as (id, input descriptions, payload buffers in the same order, rows, device request id)."""
    first = requests[0][1]
    inputs = []
    bufs: list[Any] = []
    total = sum(r[3] for r in requests)
    for k, t in enumerate(first):
        inputs.append(
            TensorDesc(t.name, t.datatype, [total, *t.shape[1:]], sum(r[1][k].size for r in requests))
        )
        bufs.extend(r[2][k] for r in requests)
    rids = [r[4] for r in requests]
    return Requests(
        [r[0] for r in requests],
        [r[3] for r in requests],
        inputs,
        outputs,
        rids if any(x is not None for x in rids) else [],
    ), bufs


class JoinError(ValueError):
    """A REQUESTS or RESULTS whose parts do not add up."""


def check_rows(ids: list[int], rows: list[int], tensors: list[TensorDesc]) -> int:
    """The total rows of a joined frame, after checking that ids, rows and every tensor agree."""
    if not ids or len(ids) != len(rows):
        raise JoinError(f"{len(ids)} ids and {len(rows)} row counts")
    if any(n < 1 for n in rows):
        raise JoinError("every request needs at least one row")
    total = sum(rows)
    for t in tensors:
        shape = check_shape(t.shape)
        if not shape or shape[0] != total:
            raise JoinError(f"tensor '{t.name}' has shape {list(shape)}; the requests hold {total} rows")
    return total


def split_results(msg: Results, payload: bytes | memoryview) -> list[tuple[Result, bytes | memoryview]]:
    """One (RESULT, payload) per request of a RESULTS, as if each had been answered alone. Raises
    ``JoinError`` when the parts do not add up (the worker is broken; each request fails)."""
    total = check_rows(msg.ids, msg.rows, msg.outputs)
    mv = memoryview(payload)
    starts = []  # where each output's bytes begin, and the bytes of one row
    pos = 0
    for t in msg.outputs:
        dt = NP_DTYPES.get(t.datatype)
        if dt is None:
            raise JoinError(f"output '{t.name}' is {t.datatype}; joined results carry fixed-size types only")
        row = dt.itemsize
        for d in t.shape[1:]:
            row *= d
        if t.size != row * total:
            raise JoinError(
                f"output '{t.name}' of shape {list(t.shape)} needs {row * total} bytes, has {t.size}"
            )
        starts.append((pos, row))
        pos += t.size
    if pos != len(mv):
        raise JoinError(f"payload of {len(mv)} bytes; the outputs claim {pos}")
    out = []
    at = 0  # the first row of this request
    for rid, n in zip(msg.ids, msg.rows, strict=True):
        descs = []
        pieces = []
        for t, (start, row) in zip(msg.outputs, starts, strict=True):
            descs.append(TensorDesc(t.name, t.datatype, [n, *t.shape[1:]], n * row))
            pieces.append(mv[start + at * row : start + (at + n) * row])
        at += n
        body = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        out.append((Result(rid, descs, msg.compute_ms, msg.batch, msg.queue_ms, msg.input_ms, msg.output_ms), body))
    return out


MAX_JOINED = 256  # requests in one REQUESTS at most (keeps its header far below the header limit)


def plan_joins(
    requests: list[tuple[JoinKey | None, int, int]],
    max_rows: int,
    max_bytes: int,
    max_count: int = MAX_JOINED,
) -> list[list[int]]:
    """How to send requests queued for one worker, in order: runs of the given indices, each run one
    frame. ``requests`` are (join key, rows, payload bytes); a run holds consecutive requests of one
    key, at most ``max_rows`` rows (the worker's batch), ``max_bytes`` bytes and ``max_count``
    requests. A request that cannot be joined (key None) runs alone."""
    runs: list[list[int]] = []
    run: list[int] = []
    key = None
    rows = size = 0
    for i, (k, n, b) in enumerate(requests):
        full = rows + n > max_rows or size + b > max_bytes or len(run) >= max_count
        if run and (k is None or k != key or full):
            runs.append(run)
            run, rows, size = [], 0, 0
        run.append(i)
        key, rows, size = k, rows + n, size + b
    if run:
        runs.append(run)
    return runs
