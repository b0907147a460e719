"""Result storage for a cluster gateway: each request's inputs and outputs, kept for later.

Metadata rows go to a SQL database (SQLite or PostgreSQL, SQLAlchemy 2 async, table
``shoal_results``); tensors go to files under one folder per hour (``<folder>/<YYYYMMDDHH>/``). Each
tensor is stored in a self-describing form: numeric tensors as ``.npy`` bytes (what ``numpy.save``
writes; read back with ``numpy.load``, no pickle), BYTES tensors (encoded images, text) as their raw
bytes, one per element, named by what they hold (``.png``, ``.jpg``, ``.gif``, ``.webp``, else
``.bin``). The tensors of one write batch (up to ``BATCH_MAX`` requests recorded together) are laid
one after another in one ``.results`` file, and each row lists its tensors with name, datatype, shape,
file name and (offset, size) in that file. One file per batch, not per tensor: on the machines
measured, creating a file costs 60-150 microseconds, more than everything else a record costs.

The request path only calls :meth:`ResultStore.record`: it appends to a bounded queue and returns. A
background task writes a batch's file (in a thread) and its rows (one transaction); a janitor applies
retention by age and by total size, a batch file at a time. Nothing here raises into the request
path: every failure is counted (``stats``) and logged at most once per ``LOG_EVERY_S``.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import re
import shutil
import time
import uuid
from collections import deque
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    delete,
    event,
    func,
    insert,
    select,
)
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from shoal.database import async_url, redact
from shoal.protocol.tensors import datatype_of

log = logging.getLogger("shoal.gateway.storage")

LOG_EVERY_S = 10.0  # at most one warning per this many seconds, however many records fail
BATCH_MAX = 256  # records written per thread hop and per database transaction
INLINE_OUTPUT_MAX = 1 << 20  # outputs larger than this are left out of get()'s JSON (fetch the file)
SEGMENT_SUFFIX = ".results"
_HOUR_DIR = re.compile(r"\d{10}")  # YYYYMMDDHH
_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")

metadata = MetaData()
# SQLite only autoincrements INTEGER PRIMARY KEY; PostgreSQL gets a 64-bit identity.
_Id = BigInteger().with_variant(Integer(), "sqlite")

results_table = Table(
    "shoal_results",
    metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("cluster", String(128), nullable=False),  # several clusters may share one database
    Column("request_id", String(256), nullable=False),
    Column("model", String(128), nullable=False),
    Column("version", String(64), nullable=False),
    Column("time", Float, nullable=False),  # unix seconds when the answer was ready
    Column("status", Integer, nullable=False),  # the HTTP status the device got
    Column("latency_ms", Float, nullable=False),
    Column("error", Text, nullable=True),
    Column("client", String(256), nullable=True),
    Column("path", String(128), nullable=False),  # the file holding its tensors, under the folder
    Column("bytes", BigInteger, nullable=False),  # its bytes in that file
    Column("inputs", Text, nullable=False),  # JSON: [{name, datatype, shape, files, at: [[offset, size]]}]
    Column("outputs", Text, nullable=False),
    Index("ix_shoal_results_cluster_time", "cluster", "time"),
    Index("ix_shoal_results_cluster_model_id", "cluster", "model", "id"),
    Index("ix_shoal_results_cluster_request", "cluster", "request_id"),
    Index("ix_shoal_results_cluster_path", "cluster", "path"),  # retention deletes by file
)
_t = results_table.c

# One queued record, as record() got it: (time, request_id, model, version, inputs, raw_input,
# outputs, status, latency_ms, error, client, bytes held in memory). A plain tuple: it is built on the
# request path.
_Item = tuple[Any, ...]
_HELD = 11  # index of the bytes held


class ResultStore:
    """Stores requests' inputs and outputs; one per gateway. ``record`` is safe to call at any rate."""

    def __init__(
        self,
        db_url: str,
        folder: Path,
        max_age_s: float | None,
        max_bytes: int | None,
        queue_size: int = 10000,
        *,
        cluster: str = "cluster",
        max_queue_bytes: int = 256 * 1024 * 1024,
        janitor_s: float = 5.0,
        flush_timeout_s: float = 5.0,
        linger_s: float = 0.05,
    ) -> None:
        self.url = async_url(db_url)  # ValueError for anything but sqlite:/// and postgresql://
        self.dialect = "sqlite" if self.url.startswith("sqlite") else "postgresql"
        self.folder = Path(folder)
        self.max_age_s = max_age_s
        self.max_bytes = max_bytes
        self.queue_size = queue_size
        self.max_queue_bytes = max_queue_bytes
        self.cluster = cluster[:128]
        self.janitor_s = janitor_s
        self.flush_timeout_s = flush_timeout_s
        self.linger_s = linger_s
        self.stored = 0
        self.dropped = 0
        self.errors = 0
        self.bytes = 0  # bytes of the files of this cluster's rows
        self._queue: deque[_Item] = deque()
        self._queued_bytes = 0
        self._wake = asyncio.Event()
        self._closing = False
        self._engine: AsyncEngine | None = None
        self._table_ready = False
        self._writer: asyncio.Task | None = None
        self._busy = False  # a batch taken off the queue is being written
        self._janitor: asyncio.Task | None = None
        self._last_log = 0.0
        self._unlogged = 0

    # ----------------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Open the database and start the writer and the janitor. A database or folder that is not
        usable yet is logged and retried with every batch: the gateway serves meanwhile."""
        kw: dict[str, Any] = {}
        if self.dialect == "sqlite":
            path = self.url.partition("://")[2][1:].split("?")[0]
            if path and path != ":memory:":
                with contextlib.suppress(OSError):
                    Path(path).parent.mkdir(parents=True, exist_ok=True)
            kw["connect_args"] = {"timeout": 30}
        else:
            kw.update(pool_size=3, max_overflow=2, pool_pre_ping=True)
        self._engine = create_async_engine(self.url, **kw)
        if self.dialect == "sqlite":
            event.listen(self._engine.sync_engine, "connect", _sqlite_pragmas)
        try:
            await asyncio.to_thread(self.folder.mkdir, parents=True, exist_ok=True)
            await self._ensure_table()
        except Exception as e:
            self._fail(1, "cannot open result storage", e)
        self._writer = asyncio.create_task(self._write_loop(), name="results-writer")
        self._janitor = asyncio.create_task(self._janitor_loop(), name="results-janitor")
        log.info(
            "storing results in %s, files in %s (max age %s, max size %s)",
            redact(self.url),
            self.folder,
            f"{self.max_age_s:g} s" if self.max_age_s else "none",
            f"{self.max_bytes / 2**20:g} MB" if self.max_bytes else "none",
        )

    async def stop(self) -> None:
        """Write what is queued (at most ``flush_timeout_s``), then stop the tasks and close."""
        self._closing = True
        self._wake.set()
        if self._writer is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._writer), self.flush_timeout_s)
            except (asyncio.TimeoutError, Exception):
                self._writer.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._writer
        left = len(self._queue)
        if left:
            self.dropped += left
            self._queue.clear()
            log.warning("result storage: %d queued records not written at shutdown", left)
        if self._janitor is not None:
            self._janitor.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._janitor
        if self._engine is not None:
            await self._engine.dispose()

    async def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything recorded so far is written (or has failed); False on timeout."""
        end = time.monotonic() + timeout
        while self._queue or self._busy:
            if time.monotonic() > end:
                return False
            await asyncio.sleep(0.01)
        return True

    @property
    def stats(self) -> dict[str, int]:
        return {
            "stored": self.stored,
            "dropped": self.dropped,
            "errors": self.errors,
            "bytes": self.bytes,
            "queued": len(self._queue),
        }

    def describe(self) -> dict[str, Any]:
        """What the status API shows: where results go, the limits and the counters."""
        return {
            "database": redact(self.url),
            "folder": str(self.folder),
            "max_age_s": self.max_age_s,
            "max_bytes": self.max_bytes,
            **self.stats,
        }

    # ---------------------------------------------------------------------------- hot path

    def record(
        self,
        request_id: str,
        model: str,
        version: str,
        inputs: dict[str, np.ndarray] | None,
        raw_input: bytes | None,
        outputs: dict[str, np.ndarray] | None,
        status: int,
        latency_ms: float,
        error: str | None = None,
        client: str | None = None,
    ) -> None:
        """Queue one request for storage and return at once. The arrays are kept as they are (not
        copied): the caller must not change them afterwards. Drops (and counts) when the queue is full
        by count or by bytes."""
        try:
            size = _held_bytes(inputs) + _held_bytes(outputs) + (len(raw_input) if raw_input else 0)
            if (
                self._closing
                or len(self._queue) >= self.queue_size
                or self._queued_bytes + size > self.max_queue_bytes
            ):
                self.dropped += 1
                return
            self._queue.append(
                (
                    time.time(),
                    request_id,
                    model,
                    version,
                    inputs,
                    raw_input,
                    outputs,
                    status,
                    latency_ms,
                    error,
                    client,
                    size,
                )
            )
            self._queued_bytes += size
            self._wake.set()
        except Exception as e:  # never into the request path
            self._fail(1, "cannot queue a result", e)

    # ------------------------------------------------------------------------------ writer

    async def _write_loop(self) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            if len(self._queue) < BATCH_MAX and not self._closing:
                # Let a batch gather: one file and one transaction for many requests, even at
                # moderate rates, where a write per request would cost the gateway more than it serves.
                await asyncio.sleep(self.linger_s)
            batch = [self._queue.popleft() for _ in range(min(BATCH_MAX, len(self._queue)))]
            self._queued_bytes -= sum(it[_HELD] for it in batch)
            self._busy = True
            try:
                await self._write_batch(batch)
            except Exception as e:
                self._fail(len(batch), "cannot store results", e)
            finally:
                self._busy = False

    async def _write_batch(self, batch: list[_Item]) -> None:
        try:
            rel, rows, failed = await asyncio.to_thread(self._write_segment, batch)
        except Exception as e:
            self._fail(len(batch), "cannot write result files", e)
            return
        for err in failed:
            self._fail(1, "cannot store a result", err)
        if not rows:
            await self._remove_files([rel])
            return
        try:
            await self._ensure_table()
            assert self._engine is not None
            async with self._engine.begin() as conn:
                await _insert_rows(conn, rows)
        except Exception as e:
            self._fail(len(rows), "cannot write result rows", e)
            # A file no row points to would never be found nor expired by size: take it back.
            await self._remove_files([rel])
            return
        self.stored += len(rows)
        self.bytes += sum(r["bytes"] for r in rows)

    def _write_segment(self, batch: list[_Item]) -> tuple[str, list[dict[str, Any]], list[Exception]]:
        """Runs in a thread: the batch's tensors, one after the other, in one new file (one file
        per request would cost several file-system calls per request: the bulk of the cost). Returns
        the file, the rows to insert and the errors of records that could not be serialised."""
        hour = datetime.fromtimestamp(batch[0][0], timezone.utc).strftime("%Y%m%d%H")
        rel = f"{hour}/{int(batch[0][0] * 1000)}-{uuid.uuid4().hex[:12]}{SEGMENT_SUFFIX}"
        (self.folder / hour).mkdir(parents=True, exist_ok=True)
        rows: list[dict[str, Any]] = []
        failed: list[Exception] = []
        pos = 0
        fh = open(self.folder / rel, "wb")  # noqa: SIM115 (closed below; removed if anything fails)
        try:
            for t, rid, model, version, inputs, raw, outputs, status, lat, error, client, _ in batch:
                try:
                    parts: list[Any] = []
                    ins: list[dict[str, Any]] = []
                    used: set[str] = set()
                    end = pos
                    if inputs:
                        end = _describe(inputs, ins, used, parts, end)
                    if raw is not None:
                        end = _describe({"raw": _bytes_array([raw])}, ins, used, parts, end)
                    outs: list[dict[str, Any]] = []
                    if outputs:
                        end = _describe(outputs, outs, set(), parts, end)
                except Exception as e:  # an array that cannot be stored: skip this record only
                    failed.append(e)
                    continue
                for b in parts:
                    fh.write(b)
                rows.append(
                    {
                        "cluster": self.cluster,
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
            fh.close()
        except BaseException:
            with contextlib.suppress(OSError):
                fh.close()
            with contextlib.suppress(OSError):
                os.unlink(self.folder / rel)
            raise
        return rel, rows, failed

    async def _ensure_table(self) -> None:
        if self._table_ready:
            return
        assert self._engine is not None
        try:
            async with self._engine.begin() as conn:
                await conn.run_sync(metadata.create_all)
        except Exception:
            # Another gateway on the same database may have created it between check and create.
            async with self._engine.begin() as conn:
                await conn.run_sync(metadata.create_all)
        # What this cluster stored before a restart counts toward the size limit.
        async with self._engine.connect() as conn:
            total = await conn.scalar(
                select(func.coalesce(func.sum(_t.bytes), 0)).where(_t.cluster == self.cluster)
            )
        self.bytes += int(total or 0)
        self._table_ready = True

    # ---------------------------------------------------------------------------- retention

    async def _janitor_loop(self) -> None:
        while True:
            await asyncio.sleep(self.janitor_s)
            try:
                await self.enforce_retention()
            except Exception as e:
                self._fail(1, "cannot apply result retention", e)

    async def enforce_retention(self) -> int:
        """Delete results older than the age limit, then the oldest beyond the size limit. Both work
        on whole files (a write batch: requests recorded within ``linger_s`` of each other). Returns
        how many rows went."""
        if not self._table_ready or self._engine is None:
            return 0
        gone = 0
        if self.max_age_s is not None:
            cutoff = time.time() - self.max_age_s
            while True:
                q = (
                    select(_t.path)
                    .where(_t.cluster == self.cluster, _t.time < cutoff)
                    .group_by(_t.path)
                    .limit(200)
                )
                async with self._engine.connect() as conn:
                    paths = list((await conn.scalars(q)).all())
                if not paths:
                    break
                gone += await self._drop(paths)
            await asyncio.to_thread(self._sweep_hours, cutoff)
        if self.max_bytes is not None:
            while self.bytes > self.max_bytes:
                excess = self.bytes - self.max_bytes
                q = select(_t.path, _t.bytes).where(_t.cluster == self.cluster).order_by(_t.id).limit(2000)
                async with self._engine.connect() as conn:
                    rows = (await conn.execute(q)).all()
                if not rows:
                    self.bytes = 0
                    break
                paths: list[str] = []
                freed = 0
                for r in rows:
                    if r.path not in paths:
                        if freed >= excess:
                            break
                        paths.append(r.path)
                    freed += r.bytes
                gone += await self._drop(paths)
        return gone

    async def _drop(self, paths: list[str]) -> int:
        """Delete every row stored in these files, then the files."""
        assert self._engine is not None
        where = (_t.cluster == self.cluster, _t.path.in_(paths))
        # Rows first: once they are gone nothing serves the files, which may then go at leisure.
        async with self._engine.begin() as conn:
            freed = await conn.scalar(select(func.coalesce(func.sum(_t.bytes), 0)).where(*where))
            n = (await conn.execute(delete(results_table).where(*where))).rowcount or 0
        self.bytes = max(0, self.bytes - int(freed or 0))
        await self._remove_files(paths)
        return n

    async def _remove_files(self, rels: list[str]) -> None:
        def remove() -> list[OSError]:
            errors = []
            for rel in rels:
                try:
                    os.unlink(self.folder / rel)
                except FileNotFoundError:
                    pass
                except OSError as e:
                    errors.append(e)
            return errors

        for e in await asyncio.to_thread(remove):
            self._fail(1, "cannot remove result files", e)

    def _sweep_hours(self, cutoff: float) -> None:
        """Hour folders wholly older than the age limit go, with anything left in them (a file
        whose rows were never written); empty past hours go too."""
        this_hour = datetime.now(timezone.utc).strftime("%Y%m%d%H")
        try:
            names = os.listdir(self.folder)
        except OSError:
            return
        for name in names:
            if not _HOUR_DIR.fullmatch(name) or name >= this_hour:
                continue
            start = datetime.strptime(name, "%Y%m%d%H").replace(tzinfo=timezone.utc).timestamp()
            p = self.folder / name
            # A batch begun just before the hour ended may hold requests of the next minute.
            if start + 3600 + 60 < cutoff:
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    p.rmdir()

    # -------------------------------------------------------------------------------- reads

    async def list(
        self,
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
        assert self._engine is not None
        q = select(results_table).where(_t.cluster == self.cluster)
        if model is not None:
            q = q.where(_t.model == model)
        if version is not None:
            q = q.where(_t.version == version)
        if since is not None:
            q = q.where(_t.time >= since)
        if until is not None:
            q = q.where(_t.time < until)
        if status is not None:
            q = q.where(_t.status == status)
        if before_id is not None:
            q = q.where(_t.id < before_id)
        if request_id is not None:
            q = q.where(_t.request_id == request_id)
        q = q.order_by(_t.id.desc()).limit(max(1, min(int(limit), 1000)))
        await self._ensure_table()
        async with self._engine.connect() as conn:
            rows = (await conn.execute(q)).mappings().all()
        out = []
        for r in rows:
            d = _summary(r)
            d["inputs"] = [x["name"] for x in orjson.loads(r["inputs"])]
            d["outputs"] = [x["name"] for x in orjson.loads(r["outputs"])]
            out.append(d)
        return out

    async def _row(self, request_id: str) -> Any:
        assert self._engine is not None
        await self._ensure_table()
        q = (
            select(results_table)
            .where(_t.cluster == self.cluster, _t.request_id == request_id)
            .order_by(_t.id.desc())
            .limit(1)
        )
        async with self._engine.connect() as conn:
            return (await conn.execute(q)).mappings().first()

    async def get(self, request_id: str) -> dict[str, Any] | None:
        """One stored request (the newest with this id): metadata, the stored inputs (names, types,
        files) and the outputs with their data (outputs over ``INLINE_OUTPUT_MAX`` bytes: files only)."""
        r = await self._row(request_id)
        if r is None:
            return None
        d = _summary(r)
        d["inputs"] = orjson.loads(r["inputs"])
        for i in d["inputs"]:
            del i["at"]
        d["outputs"] = await asyncio.to_thread(self._with_data, r["path"], orjson.loads(r["outputs"]))
        return d

    def _read(self, rel: str, at: list[int]) -> bytes:
        with open(self.folder / rel, "rb") as fh:
            fh.seek(at[0])
            b = fh.read(at[1])
        if len(b) != at[1]:
            raise OSError(f"{rel} is shorter than its rows say")
        return b

    def _with_data(self, rel: str, outs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for o in outs:
            at = o.pop("at", [])
            try:
                if sum(size for _, size in at) > INLINE_OUTPUT_MAX:
                    continue
                if o["datatype"] == "BYTES":
                    o["data"] = [self._read(rel, x).decode("utf-8", "replace") for x in at]
                else:
                    raw = io.BytesIO(self._read(rel, at[0]))
                    o["data"] = np.load(raw, allow_pickle=False).reshape(-1).tolist()
            except (OSError, ValueError, IndexError):
                o["missing"] = True
        return outs

    async def payload_file(
        self, request_id: str, kind: str, name: str, owner: str | None = None
    ) -> tuple[str, bytes] | None:
        """(file name, bytes) of one stored input or output, by its file name or by tensor name
        (when the tensor is one file): ``.npy`` bytes for numeric tensors, the bytes themselves for
        BYTES elements. Only the ranges the row lists are ever read. With ``owner``, only a request
        that client sent is found."""
        if kind not in ("input", "output"):
            raise ValueError("kind is 'input' or 'output'")
        r = await self._row(request_id)
        if r is None or (owner is not None and r["client"] != owner):
            return None
        chosen = None
        for t in orjson.loads(r["inputs" if kind == "input" else "outputs"]):
            for f, at in zip(t["files"], t["at"], strict=True):
                if f == name or (t["name"] == name and len(t["files"]) == 1):
                    chosen = (f, at)
                    break
            if chosen:
                break
        if chosen is None:
            return None
        try:
            return chosen[0], await asyncio.to_thread(self._read, r["path"], chosen[1])
        except FileNotFoundError:
            return None

    async def payload(self, request_id: str, kind: str, name: str) -> bytes | None:
        got = await self.payload_file(request_id, kind, name)
        return None if got is None else got[1]

    # ------------------------------------------------------------------------------ errors

    def count_error(self, what: str, e: BaseException) -> None:
        """Count and (rate-limited) log a storage error found outside the store, e.g. by the API."""
        self._fail(1, what, e)

    def _fail(self, n: int, what: str, e: BaseException) -> None:
        """Count ``n`` failed records; log the first failure of a burst and then at most one line
        per ``LOG_EVERY_S`` saying how many more there were."""
        self.errors += n
        self._unlogged += 1
        now = time.monotonic()
        if now - self._last_log >= LOG_EVERY_S:
            msg = (str(e).splitlines() or [""])[0][:300]
            more = (
                f" ({self._unlogged - 1} more failures since the last report)" if self._unlogged > 1 else ""
            )
            log.warning(
                "result storage: %s: %s: %s%s; %d errors in all; requests are not affected",
                what,
                type(e).__name__,
                msg,
                more,
                self.errors,
            )
            self._last_log = now
            self._unlogged = 0


# ---------------------------------------------------------------------------------- helpers


_COLUMNS = [c.name for c in results_table.columns if c.name != "id"]


async def _insert_rows(conn: Any, rows: list[dict[str, Any]]) -> None:
    """One executemany straight to the driver: SQLAlchemy's per-row parameter processing cost more
    than the insert itself (10 against 3 microseconds a row here). Other drivers: a Core insert."""
    style = conn.dialect.paramstyle
    if style == "qmark":
        marks = ", ".join("?" for _ in _COLUMNS)
    elif style == "numeric_dollar":
        marks = ", ".join(f"${i + 1}" for i in range(len(_COLUMNS)))
    else:
        await conn.execute(insert(results_table), rows)
        return
    sql = f"INSERT INTO {results_table.name} ({', '.join(_COLUMNS)}) VALUES ({marks})"
    await conn.exec_driver_sql(sql, [tuple(r[c] for c in _COLUMNS) for r in rows])


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # WAL: the API reads while the writer writes.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def _held_bytes(arrays: dict[str, np.ndarray] | None) -> int:
    n = 0
    if arrays:
        for a in arrays.values():
            n += sum(len(x) for x in a.flat) if a.dtype.hasobject else a.nbytes
    return n


def _bytes_array(items: list[bytes]) -> np.ndarray:
    a = np.empty(len(items), dtype=object)
    a[:] = items
    return a


def _sniff(b: bytes) -> str:
    if b.startswith(b"\x89PNG\r\n\x1a\n"):
        return ".png"
    if b.startswith(b"\xff\xd8\xff"):
        return ".jpg"
    if b[:6] in (b"GIF87a", b"GIF89a"):
        return ".gif"
    if b[:4] == b"RIFF" and b[8:12] == b"WEBP":
        return ".webp"
    return ".bin"


def _describe(
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
                files.append(
                    _unique(f"{base}{_sniff(b)}" if flat.size == 1 else f"{base}.{j}{_sniff(b)}", used)
                )
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


def _summary(r: Any) -> dict[str, Any]:
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
