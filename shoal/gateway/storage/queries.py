"""Reading stored results back: lists of rows, one result with its outputs, one stored file's bytes.
Only the byte ranges a row lists are ever read from its segment file."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from shoal.gateway.storage.schema import results_table
from shoal.gateway.storage.segments import INLINE_OUTPUT_MAX, decode_output, pick_file

_t = results_table.c


async def list_rows(
    engine: AsyncEngine,
    cluster: str,
    model: str | None = None,
    version: str | None = None,
    since: float | None = None,
    until: float | None = None,
    status: int | None = None,
    limit: int = 100,
    before_id: int | None = None,
    request_id: str | None = None,
) -> list[dict[str, Any]]:
    """Stored requests, newest first; page with ``before_id`` = the last ``id`` seen."""
    q = select(results_table).where(_t.cluster == cluster)
    for column, value in ((_t.model, model), (_t.version, version), (_t.status, status), (_t.request_id, request_id)):
        if value is not None:
            q = q.where(column == value)
    if since is not None:
        q = q.where(_t.time >= since)
    if until is not None:
        q = q.where(_t.time < until)
    if before_id is not None:
        q = q.where(_t.id < before_id)
    q = q.order_by(_t.id.desc()).limit(max(1, min(int(limit), 1000)))
    async with engine.connect() as conn:
        rows = (await conn.execute(q)).mappings().all()
    out = []
    for r in rows:
        d = summary(r)
        d["inputs"] = [x["name"] for x in orjson.loads(r["inputs"])]
        d["outputs"] = [x["name"] for x in orjson.loads(r["outputs"])]
        out.append(d)
    return out


async def newest_row(engine: AsyncEngine, cluster: str, request_id: str) -> Any:
    """The newest row with this request id (a client may reuse one), or None."""
    q = (
        select(results_table)
        .where(_t.cluster == cluster, _t.request_id == request_id)
        .order_by(_t.id.desc())
        .limit(1)
    )
    async with engine.connect() as conn:
        return (await conn.execute(q)).mappings().first()


async def count_rows(engine: AsyncEngine, cluster: str, request_id: str) -> int:
    """How many times a request with this id was stored (more than once: it was answered more than
    once, by this gateway or another of the cluster: a device retried it after its first gateway went
    away, or reused its id)."""
    q = select(func.count()).select_from(results_table).where(_t.cluster == cluster, _t.request_id == request_id)
    async with engine.connect() as conn:
        return int((await conn.execute(q)).scalar_one())


async def result(folder: Path, row: Any) -> dict[str, Any]:
    """One stored request: metadata, the stored inputs (names, types, files) and the outputs with
    their data (outputs over ``INLINE_OUTPUT_MAX`` bytes: files only)."""
    d = summary(row)
    d["inputs"] = orjson.loads(row["inputs"])
    for i in d["inputs"]:
        del i["at"]
    d["outputs"] = await asyncio.to_thread(_with_data, folder, row["path"], orjson.loads(row["outputs"]))
    return d


async def stored_file(folder: Path, row: Any, kind: str, name: str) -> tuple[str, bytes] | None:
    """(file name, bytes) of one stored input or output of ``row``, by file or tensor name."""
    chosen = pick_file(orjson.loads(row["inputs" if kind == "input" else "outputs"]), name)
    if chosen is None:
        return None
    try:
        return chosen[0], await asyncio.to_thread(read_range, folder, row["path"], chosen[1])
    except FileNotFoundError:
        return None


def read_range(folder: Path, rel: str, at: list[int]) -> bytes:
    with open(folder / rel, "rb") as fh:
        fh.seek(at[0])
        b = fh.read(at[1])
    if len(b) != at[1]:
        raise OSError(f"{rel} is shorter than its rows say")
    return b


def _with_data(folder: Path, rel: str, outs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for o in outs:
        at = o.pop("at", [])
        try:
            if sum(size for _, size in at) > INLINE_OUTPUT_MAX:
                continue
            o["data"] = decode_output(o["datatype"], [read_range(folder, rel, x) for x in at])
        except (OSError, ValueError, IndexError):
            o["missing"] = True
    return outs


def summary(r: Any) -> dict[str, Any]:
    return {
        "id": r["id"],
        "request_id": r["request_id"],
        "model": r["model"],
        "version": r["version"],
        "time": r["time"],
        "time_iso": datetime.fromtimestamp(r["time"], timezone.utc).isoformat(timespec="milliseconds"),
        "status": r["status"],
        "latency_ms": round(r["latency_ms"], 3),
        "error": r["error"],
        "client": r["client"],
        "bytes": r["bytes"],
    }
