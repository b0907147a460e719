"""``ResultStore``: one per gateway; its life (open, migrate, write, expire, close), its counters, and
the calls the gateway and the results API make. Each job is in its own module: the table in
``schema.py``, the file layout in ``segments.py``, writing in ``writer.py``, expiry in
``retention.py``, reading in ``queries.py``.

A database or folder that is not usable yet is logged and retried with every batch: the gateway
serves meanwhile. Every failure is counted (``stats``) and logged at most once per ``LOG_EVERY_S``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from shoal.database import async_url, create_engine, dialect_of, migrate, redact, sqlite_path
from shoal.gateway.storage import queries, retention
from shoal.gateway.storage.schema import MIGRATION_LOCK
from shoal.gateway.storage.writer import Writer

log = logging.getLogger("shoal.gateway.storage")

LOG_EVERY_S = 10.0  # at most one warning per this many seconds, however many records fail
MIGRATIONS = Path(__file__).parent / "migrations"


class ResultStore:
    """Stores requests' inputs and outputs. ``record`` is safe to call at any rate."""

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
        self.dialect = dialect_of(self.url)
        self.folder = Path(folder)
        self.max_age_s = max_age_s
        self.max_bytes = max_bytes
        self.cluster = cluster[:128]
        self.janitor_s = janitor_s
        self.flush_timeout_s = flush_timeout_s
        self.stored = 0
        self.errors = 0
        self.bytes = 0  # bytes of the files of this cluster's rows
        self._engine: AsyncEngine | None = None
        self._schema_ready = False
        self._writer = Writer(
            self.folder,
            self.cluster,
            self._ready,
            self._stored,
            self._fail,
            queue_size,
            max_queue_bytes,
            linger_s,
        )
        self.record = self._writer.record  # the request path's one call
        self._tasks: list[asyncio.Task] = []
        self._last_log = 0.0
        self._unlogged = 0

    # ----------------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Open the database and start the writer and the janitor."""
        path = sqlite_path(self.url)
        if path is not None:
            with contextlib.suppress(OSError):
                Path(path).parent.mkdir(parents=True, exist_ok=True)
        # Results may lose their last commits in a power cut; the database itself stays whole.
        self._engine = create_engine(self.url, durable=False, pool_size=3)
        try:
            await asyncio.to_thread(self.folder.mkdir, parents=True, exist_ok=True)
            await self._ready()
        except Exception as e:
            self._fail(1, "cannot open result storage", e)
        self._tasks = [
            asyncio.create_task(self._writer.run(), name="results-writer"),
            asyncio.create_task(self._janitor(), name="results-janitor"),
        ]
        log.info(
            "storing results in %s, files in %s (max age %s, max size %s)",
            redact(self.url),
            self.folder,
            f"{self.max_age_s:g} s" if self.max_age_s else "none",
            f"{self.max_bytes / 2**20:g} MB" if self.max_bytes else "none",
        )

    async def stop(self) -> None:
        """Write what is queued (at most ``flush_timeout_s``), then stop the tasks and close."""
        self._writer.close()
        if self._tasks:
            writer, janitor = self._tasks
            try:
                await asyncio.wait_for(asyncio.shield(writer), self.flush_timeout_s)
            except (asyncio.TimeoutError, Exception):
                writer.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await writer
            janitor.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await janitor
        left = self._writer.discard()
        if left:
            log.warning("result storage: %d queued records not written at shutdown", left)
        if self._engine is not None:
            await self._engine.dispose()

    async def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything recorded so far is written (or has failed); False on timeout."""
        end = time.monotonic() + timeout
        while self._writer.queued or self._writer.busy:
            if time.monotonic() > end:
                return False
            await asyncio.sleep(0.01)
        return True

    async def _ready(self) -> AsyncEngine:
        """The engine, once the table is migrated; what this cluster stored before a restart counts
        toward the size limit."""
        assert self._engine is not None
        if not self._schema_ready:
            await migrate(self._engine, MIGRATIONS, MIGRATION_LOCK)
            self.bytes += await retention.stored_bytes(self._engine, self.cluster)
            self._schema_ready = True
        return self._engine

    @property
    def stats(self) -> dict[str, int]:
        return {
            "stored": self.stored,
            "dropped": self._writer.dropped,
            "errors": self.errors,
            "bytes": self.bytes,
            "queued": self._writer.queued,
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

    def _stored(self, rows: int, nbytes: int) -> None:
        self.stored += rows
        self.bytes += nbytes

    # ---------------------------------------------------------------------------- retention

    async def _janitor(self) -> None:
        while True:
            await asyncio.sleep(self.janitor_s)
            try:
                await self.enforce_retention()
            except Exception as e:
                self._fail(1, "cannot apply result retention", e)

    async def enforce_retention(self) -> int:
        """Apply the age limit, then the size limit; how many rows went."""
        if not self._schema_ready or self._engine is None:
            return 0
        gone = 0
        if self.max_age_s is not None:
            cutoff = time.time() - self.max_age_s
            while paths := await retention.expired_files(self._engine, self.cluster, cutoff):
                gone += await self._drop(paths)
            await asyncio.to_thread(retention.sweep_hours, self.folder, cutoff, time.time())
        if self.max_bytes is not None:
            while self.bytes > self.max_bytes:
                paths = await retention.oldest_files(self._engine, self.cluster, self.bytes - self.max_bytes)
                if paths is None:
                    self.bytes = 0
                    break
                gone += await self._drop(paths)
        return gone

    async def _drop(self, paths: list[str]) -> int:
        assert self._engine is not None
        n, freed = await retention.drop_rows(self._engine, self.cluster, paths)
        self.bytes = max(0, self.bytes - freed)
        for e in await retention.remove_files(self.folder, paths):
            self._fail(1, "cannot remove result files", e)
        return n

    # -------------------------------------------------------------------------------- reads

    async def list(self, **filters: Any) -> list[dict[str, Any]]:
        """Stored requests, newest first (filters: ``queries.list_rows``)."""
        return await queries.list_rows(await self._ready(), self.cluster, **filters)

    async def _row(self, request_id: str) -> Any:
        return await queries.newest_row(await self._ready(), self.cluster, request_id)

    async def get(self, request_id: str) -> dict[str, Any] | None:
        """One stored request (the newest with this id), its outputs with their data, and ``stored``:
        how many requests with this id were stored (retries on another gateway count)."""
        r = await self._row(request_id)
        if r is None:
            return None
        out = await queries.result(self.folder, r)
        out["stored"] = await queries.count_rows(await self._ready(), self.cluster, request_id)
        return out

    async def payload_file(
        self, request_id: str, kind: str, name: str, owner: str | None = None
    ) -> tuple[str, bytes] | None:
        """(file name, bytes) of one stored input or output; with ``owner``, only a request that
        client sent is found."""
        if kind not in ("input", "output"):
            raise ValueError("kind is 'input' or 'output'")
        r = await self._row(request_id)
        if r is None or (owner is not None and r["client"] != owner):
            return None
        return await queries.stored_file(self.folder, r, kind, name)

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
            more = f" ({self._unlogged - 1} more failures since the last report)" if self._unlogged > 1 else ""
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
