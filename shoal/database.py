"""What central's database and the gateway's result store share: database URLs, one engine factory
with the SQLite settings both use, and Alembic migrations run under a lock.

SQLite through ``aiosqlite``, PostgreSQL through ``asyncpg``; plain ``sqlite:///`` and
``postgresql://`` URLs are accepted and given the async driver. Each component keeps its own schema,
migrations and Alembic version table; several processes starting together on one database migrate
it once (a PostgreSQL advisory lock, or a lock file next to a SQLite database).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

log = logging.getLogger("shoal.database")

# Seconds a SQLite connection waits for another writer's lock before failing (busy_timeout).
SQLITE_BUSY_S = 30.0


def async_url(url: str) -> str:
    """Accept plain ``sqlite:///`` and ``postgresql://`` URLs and pick the async drivers for them."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError(f"not a database URL: {url!r} (e.g. sqlite:///central.db, postgresql://host/db)")
    base = scheme.split("+")[0]
    if base == "sqlite":
        return f"sqlite+aiosqlite://{rest}"
    if base in ("postgresql", "postgres"):
        return f"postgresql+asyncpg://{rest}"
    raise ValueError(f"unsupported database {scheme!r}: use sqlite:/// or postgresql://")


def dialect_of(url: str) -> str:
    return "sqlite" if url.startswith("sqlite") else "postgresql"


def redact(url: str) -> str:
    """The URL without its password, for logs and status APIs."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not at:
        return url
    user = creds.split(":")[0]
    return f"{scheme}{sep}{user}:***@{host}"


def sqlite_path(url: str) -> str | None:
    """The file of a SQLite URL; None for an in-memory database or another dialect."""
    if dialect_of(url) != "sqlite":
        return None
    rest = url.partition("://")[2]
    if not rest.startswith("/") or rest in ("/", "/:memory:"):
        return None
    return rest[1:].split("?")[0]


def create_engine(
    url: str, *, timeout_s: float = SQLITE_BUSY_S, durable: bool = True, pool_size: int = 10
) -> AsyncEngine:
    """An async engine for ``url`` (already ``async_url``). SQLite runs in WAL mode, so readers (other
    replicas, the API, the command line) work while one connection writes; ``durable=False`` lets a
    commit return before the disk has it (``synchronous=NORMAL``: a power cut may lose the last
    commits, never the database). PostgreSQL gets a pool that checks connections before use and gives
    up on a connection or a statement after ``timeout_s``."""
    kw: dict[str, Any] = {}
    if dialect_of(url) == "sqlite":
        kw["connect_args"] = {"timeout": timeout_s}
    else:
        kw.update(
            pool_size=pool_size,
            max_overflow=pool_size,
            pool_pre_ping=True,
            pool_timeout=timeout_s,
            connect_args={"timeout": timeout_s, "command_timeout": timeout_s},
        )
    engine = create_async_engine(url, **kw)
    if dialect_of(url) == "sqlite":

        def pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            if not durable:
                cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_S * 1000)}")
            cur.close()

        event.listen(engine.sync_engine, "connect", pragmas)
    return engine


def private_sqlite_file(path: str, what: str, why: str) -> None:
    """Create the SQLite file readable by its owner only (SQLite gives its -wal and -shm files the
    same mode), and warn when an existing one is readable by others."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        return
    except FileExistsError:
        pass
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        log.warning("%s %s is readable by other users (mode %o): %s; chmod 600 it", what, path, mode, why)


@contextlib.contextmanager
def _file_lock(url: str) -> Iterator[None]:
    # SQLite has no advisory locks; a lock file next to the database serialises migrations.
    path = sqlite_path(url)
    if path is None:
        yield
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path + ".migrate-lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _upgrade(connection: Any, script_location: Path, revision: str) -> None:
    # Alembic narrates every plugin at INFO as it is imported; the callers log what they migrate.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(script_location))
    cfg.attributes["connection"] = connection
    command.upgrade(cfg, revision)


async def migrate(engine: AsyncEngine, script_location: Path, lock_id: int, revision: str = "head") -> None:
    """Bring the database to ``revision`` with the Alembic scripts in ``script_location`` (whose
    ``env.py`` names the version table), holding a lock so that concurrent starters migrate once.
    ``lock_id`` names the PostgreSQL advisory lock (any constant, one per schema)."""
    url = engine.url.render_as_string(hide_password=False)
    with _file_lock(url):
        async with engine.begin() as conn:
            if dialect_of(url) == "postgresql":
                await conn.execute(text(f"SELECT pg_advisory_xact_lock({int(lock_id)})"))
            await conn.run_sync(_upgrade, script_location, revision)


def run_env(context: Any, target_metadata: Any, version_table: str) -> None:
    """The body of an Alembic ``env.py``: migrate the connection handed in by ``migrate`` or, run from
    the ``alembic`` command, the URL in ``sqlalchemy.url`` (offline: print the SQL)."""

    def run(connection: Any) -> None:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            version_table=version_table,
            render_as_batch=connection.dialect.name == "sqlite",
        )
        with context.begin_transaction():
            context.run_migrations()

    config = context.config
    if context.is_offline_mode():
        context.configure(
            url=config.get_main_option("sqlalchemy.url"),
            target_metadata=target_metadata,
            version_table=version_table,
            literal_binds=True,
        )
        with context.begin_transaction():
            context.run_migrations()
    elif config.attributes.get("connection") is not None:
        run(config.attributes["connection"])
    else:
        import asyncio

        async def from_url() -> None:
            engine = create_async_engine(async_url(config.get_main_option("sqlalchemy.url") or ""))
            async with engine.begin() as conn:
                await conn.run_sync(run)
            await engine.dispose()

        asyncio.run(from_url())
