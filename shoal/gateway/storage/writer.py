"""The writer: ``record`` (the request path's only call) appends to a bounded queue and returns; a
background task takes up to ``BATCH_MAX`` records at a time, writes their segment file (in a thread)
and their rows (one transaction). Nothing here raises into the request path: records that do not fit
the queue are dropped and counted, failures are handed to ``on_failed``."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from shoal.gateway.storage.retention import remove_files
from shoal.gateway.storage.schema import COLUMNS, results_table
from shoal.gateway.storage.segments import HELD, Item, encode_batch, held_bytes, segment_name

BATCH_MAX = 256  # records written per thread hop and per database transaction


class Writer:
    def __init__(
        self,
        folder: Path,
        cluster: str,
        schema_ready: Callable[[], Awaitable[AsyncEngine]],
        on_stored: Callable[[int, int], None],
        on_failed: Callable[[int, str, BaseException], None],
        queue_size: int,
        max_queue_bytes: int,
        linger_s: float,
    ) -> None:
        self.folder = folder
        self.cluster = cluster
        self.schema_ready = schema_ready
        self.on_stored = on_stored
        self.on_failed = on_failed
        self.queue_size = queue_size
        self.max_queue_bytes = max_queue_bytes
        self.linger_s = linger_s
        self.dropped = 0
        self.busy = False  # a batch taken off the queue is being written
        self._queue: deque[Item] = deque()
        self._queued_bytes = 0
        self._wake = asyncio.Event()
        self._closing = False

    @property
    def queued(self) -> int:
        return len(self._queue)

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
            size = held_bytes(inputs) + held_bytes(outputs) + (len(raw_input) if raw_input else 0)
            if (
                self._closing
                or len(self._queue) >= self.queue_size
                or self._queued_bytes + size > self.max_queue_bytes
            ):
                self.dropped += 1
                return
            self._queue.append(
                (time.time(), request_id, model, version, inputs, raw_input, outputs, status, latency_ms, error, client, size)
            )
            self._queued_bytes += size
            self._wake.set()
        except Exception as e:  # never into the request path
            self.on_failed(1, "cannot queue a result", e)

    def close(self) -> None:
        """Take nothing more; the loop ends once the queue is written."""
        self._closing = True
        self._wake.set()

    def discard(self) -> int:
        """Drop what is still queued (counted); how many."""
        left = len(self._queue)
        self.dropped += left
        self._queue.clear()
        self._queued_bytes = 0
        return left

    async def run(self) -> None:
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
            self._queued_bytes -= sum(it[HELD] for it in batch)
            self.busy = True
            try:
                await self._write(batch)
            except Exception as e:
                self.on_failed(len(batch), "cannot store results", e)
            finally:
                self.busy = False

    async def _write(self, batch: list[Item]) -> None:
        rel = segment_name(batch[0][0])
        parts, rows, failed = encode_batch(batch, self.cluster, rel)
        for err in failed:
            self.on_failed(1, "cannot store a result", err)
        if not rows:
            return
        try:
            await asyncio.to_thread(self._write_file, rel, parts)
        except Exception as e:
            self.on_failed(len(rows), "cannot write result files", e)
            return
        try:
            engine = await self.schema_ready()
            async with engine.begin() as conn:
                await insert_rows(conn, rows)
        except Exception as e:
            self.on_failed(len(rows), "cannot write result rows", e)
            # A file no row points to would never be found nor expired by size: take it back.
            for err in await remove_files(self.folder, [rel]):
                self.on_failed(1, "cannot remove result files", err)
            return
        self.on_stored(len(rows), sum(r["bytes"] for r in rows))

    def _write_file(self, rel: str, parts: list[Any]) -> None:
        """Runs in a thread: the segment's bytes, in one new file (removed if anything fails)."""
        path = self.folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(path, "wb") as fh:
                for b in parts:
                    fh.write(b)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise


async def insert_rows(conn: Any, rows: list[dict[str, Any]]) -> None:
    """One executemany straight to the driver: SQLAlchemy's per-row parameter processing cost more
    than the insert itself (10 against 3 microseconds a row here). Other drivers: a Core insert."""
    style = conn.dialect.paramstyle
    if style == "qmark":
        marks = ", ".join("?" for _ in COLUMNS)
    elif style == "numeric_dollar":
        marks = ", ".join(f"${i + 1}" for i in range(len(COLUMNS)))
    else:
        await conn.execute(insert(results_table), rows)
        return
    sql = f"INSERT INTO {results_table.name} ({', '.join(COLUMNS)}) VALUES ({marks})"
    await conn.exec_driver_sql(sql, [tuple(r[c] for c in COLUMNS) for r in rows])
