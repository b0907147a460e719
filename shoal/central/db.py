"""The central database: accounts, the master secret and commands for devices (SQLAlchemy 2, async).

SQLite by default (``aiosqlite``), PostgreSQL by URL (``asyncpg``). The schema is managed by Alembic
(``shoal/central/migrations``); ``Store.open()`` brings the database to the newest revision, holding a
lock so that several replicas starting together on one database migrate it once. The live table of
clusters is not here: every replica keeps its own, since clusters report to each of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import json
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import (
    BigInteger,
    Float,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    delete,
    event,
    func,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

log = logging.getLogger("shoal.central")

ACCOUNT_KINDS = ("device", "cluster", "operator")
DEFAULT_TIMEOUT_S = 5.0  # every query; a hung database makes requests 503 instead of hanging them
MIGRATIONS = Path(__file__).parent / "migrations"
VERSION_TABLE = "shoal_alembic_version"
# Any constant works; it names the PostgreSQL advisory lock replicas take while migrating.
_PG_MIGRATION_LOCK = 0x5E0A1


class Base(DeclarativeBase):
    pass


# SQLite only autoincrements INTEGER PRIMARY KEY; PostgreSQL gets a 64-bit identity.
_Id = BigInteger().with_variant(Integer(), "sqlite")


class Account(Base):
    __tablename__ = "shoal_accounts"
    __table_args__ = (UniqueConstraint("kind", "name", name="uq_shoal_accounts_kind_name"),)
    id: Mapped[int] = mapped_column(_Id, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(128))
    password_hash: Mapped[str] = mapped_column(String(256))
    created_at: Mapped[float] = mapped_column(Float)


class Secret(Base):
    __tablename__ = "shoal_secrets"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[bytes] = mapped_column(LargeBinary)


class Command(Base):
    __tablename__ = "shoal_commands"
    __table_args__ = (Index("ix_shoal_commands_device_acked", "device", "acked_at"),)
    id: Mapped[int] = mapped_column(_Id, primary_key=True, autoincrement=True)
    device: Mapped[str] = mapped_column(String(128))
    command: Mapped[str] = mapped_column(String(128))
    args: Mapped[str] = mapped_column(Text)  # JSON object
    created_by: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[float] = mapped_column(Float)
    delivered_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    acked_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    result: Mapped[str | None] = mapped_column(Text, nullable=True)  # JSON, as the device acked it


class AccountExists(Exception):
    pass


@dataclass(frozen=True)
class AccountRow:
    kind: str
    name: str
    created_at: float


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
    """The URL without its password, for logs and the status API."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not at:
        return url
    user = creds.split(":")[0]
    return f"{scheme}{sep}{user}:***@{host}"


def _sqlite_path(url: str) -> str | None:
    rest = url.partition("://")[2]
    if not rest.startswith("/") or rest in ("/", "/:memory:"):
        return None
    return rest[1:].split("?")[0]


class DatabaseTimeout(asyncio.TimeoutError):
    """The database did not answer in time (hung, overloaded, or a lock held too long)."""


_R = TypeVar("_R")


def _bounded(fn: Callable[..., Awaitable[_R]]) -> Callable[..., Awaitable[_R]]:
    """Give up on a query after the store's ``timeout_s``: callers answer 503 instead of waiting on a
    database that does not answer (PostgreSQL behind a dead link, a stuck lock)."""

    @functools.wraps(fn)
    async def run(self: Store, *args: Any, **kwargs: Any) -> _R:
        try:
            return await asyncio.wait_for(fn(self, *args, **kwargs), self.timeout_s)
        except asyncio.TimeoutError:
            raise DatabaseTimeout(f"the database did not answer within {self.timeout_s:g} s") from None

    return run


def _private_sqlite_file(path: str) -> None:
    """The central database holds the master secret every route token derives from: create it
    readable by its owner only (SQLite gives its -wal and -shm files the same mode), and say so
    when an existing file is readable by others."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        return
    except FileExistsError:
        pass
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        log.warning(
            "central database %s is readable by other users (mode %o): it holds the master secret; "
            "chmod 600 it",
            path,
            mode,
        )


def _run_upgrade(connection: Any, revision: str) -> None:
    # Alembic narrates every plugin at INFO as it is imported; central logs what it migrates itself.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    command.upgrade(cfg, revision)


class Store:
    """Every database access central makes. One per process; methods are coroutines."""

    def __init__(self, url: str, echo: bool = False, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.url = async_url(url)
        self.dialect = dialect_of(self.url)
        self.timeout_s = timeout_s
        kw: dict[str, Any] = {"echo": echo}
        if self.dialect == "sqlite":
            kw["connect_args"] = {"timeout": timeout_s}
        else:
            kw.update(
                pool_size=10,
                max_overflow=10,
                pool_pre_ping=True,
                pool_timeout=timeout_s,
                connect_args={"timeout": timeout_s, "command_timeout": timeout_s},
            )
        self.engine: AsyncEngine = create_async_engine(self.url, **kw)
        if self.dialect == "sqlite":
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)

    async def open(self) -> None:
        await self.migrate()

    async def close(self) -> None:
        await self.engine.dispose()

    async def migrate(self, revision: str = "head") -> None:
        with self._file_lock():
            async with self.engine.begin() as conn:
                if self.dialect == "postgresql":
                    from sqlalchemy import text

                    await conn.execute(text(f"SELECT pg_advisory_xact_lock({_PG_MIGRATION_LOCK})"))
                await conn.run_sync(_run_upgrade, revision)

    @contextlib.contextmanager
    def _file_lock(self) -> Any:
        # SQLite has no advisory locks; a lock file next to the database serialises replicas' migrations.
        path = _sqlite_path(self.url) if self.dialect == "sqlite" else None
        if path is None:
            yield
            return
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        _private_sqlite_file(path)
        with open(path + ".migrate-lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # ------------------------------------------------------------------------------- secrets

    @_bounded
    async def master_secret(self) -> bytes:
        """The secret every replica derives cluster keys from; created by whichever replica comes first."""
        async with self.sessions() as s:
            row = await s.get(Secret, "master")
            if row is not None:
                return row.value
        try:
            async with self.sessions.begin() as s:
                s.add(Secret(name="master", value=os.urandom(32)))
        except IntegrityError:
            pass  # another replica created it first: use theirs
        async with self.sessions() as s:
            row = await s.get(Secret, "master")
            assert row is not None
            return row.value

    # ------------------------------------------------------------------------------ accounts

    @_bounded
    async def add_account(self, kind: str, name: str, password_hash: str) -> None:
        try:
            async with self.sessions.begin() as s:
                s.add(Account(kind=kind, name=name, password_hash=password_hash, created_at=time.time()))
        except IntegrityError:
            raise AccountExists(f"a {kind} account named {name!r} already exists") from None

    @_bounded
    async def password_hash(self, kind: str, name: str) -> str | None:
        async with self.sessions() as s:
            return await s.scalar(
                select(Account.password_hash).where(Account.kind == kind, Account.name == name)
            )

    @_bounded
    async def list_accounts(self, kind: str | None = None) -> list[AccountRow]:
        q = select(Account.kind, Account.name, Account.created_at).order_by(Account.kind, Account.name)
        if kind is not None:
            q = q.where(Account.kind == kind)
        async with self.sessions() as s:
            return [AccountRow(*r) for r in (await s.execute(q)).all()]

    @_bounded
    async def count_accounts(self, kind: str) -> int:
        async with self.sessions() as s:
            q = select(func.count()).select_from(Account).where(Account.kind == kind)
            return int(await s.scalar(q) or 0)

    @_bounded
    async def remove_account(self, kind: str, name: str) -> bool:
        async with self.sessions.begin() as s:
            r = await s.execute(delete(Account).where(Account.kind == kind, Account.name == name))
            return (r.rowcount or 0) > 0

    # ------------------------------------------------------------------------------ commands

    @_bounded
    async def add_command(self, device: str, command: str, args: dict[str, Any], by: str) -> int:
        async with self.sessions.begin() as s:
            row = Command(
                device=device, command=command, args=json.dumps(args), created_by=by, created_at=time.time()
            )
            s.add(row)
            await s.flush()
            return int(row.id)

    @_bounded
    async def pending_commands(self, device: str, limit: int = 100) -> list[dict[str, Any]]:
        """Commands for ``device`` not acknowledged yet, oldest first; marks them delivered."""
        async with self.sessions.begin() as s:
            rows = (
                await s.scalars(
                    select(Command)
                    .where(Command.device == device, Command.acked_at.is_(None))
                    .order_by(Command.id)
                    .limit(limit)
                )
            ).all()
            now = time.time()
            fresh = [r.id for r in rows if r.delivered_at is None]
            if fresh:
                await s.execute(update(Command).where(Command.id.in_(fresh)).values(delivered_at=now))
            return [
                {
                    "id": r.id,
                    "command": r.command,
                    "args": json.loads(r.args),
                    "created_at": r.created_at,
                    "created_by": r.created_by,
                }
                for r in rows
            ]

    @_bounded
    async def ack_command(self, device: str, command_id: int, result: Any) -> bool:
        async with self.sessions.begin() as s:
            r = await s.execute(
                update(Command)
                .where(Command.id == command_id, Command.device == device, Command.acked_at.is_(None))
                .values(acked_at=time.time(), result=json.dumps(result))
            )
            return (r.rowcount or 0) > 0

    @_bounded
    async def commands_since(self, last_id: int) -> list[tuple[int, str]]:
        async with self.sessions() as s:
            rows = await s.execute(
                select(Command.id, Command.device).where(Command.id > last_id).order_by(Command.id)
            )
            return [(int(i), d) for i, d in rows.all()]

    @_bounded
    async def last_command_id(self) -> int:
        async with self.sessions() as s:
            return int(await s.scalar(select(func.max(Command.id))) or 0)

    @_bounded
    async def command_counts(self) -> dict[str, int]:
        async with self.sessions() as s:
            n = select(func.count()).select_from(Command)
            pending = await s.scalar(n.where(Command.acked_at.is_(None)))
            acked = await s.scalar(n.where(Command.acked_at.is_not(None)))
        return {"pending": int(pending or 0), "acked": int(acked or 0)}

    @_bounded
    async def acked_since(self, since: float) -> list[dict[str, Any]]:
        """Commands acknowledged after ``since`` (unix seconds) with their results, for the webhook."""
        async with self.sessions() as s:
            rows = (
                await s.scalars(select(Command).where(Command.acked_at > since).order_by(Command.acked_at))
            ).all()
        return [
            {
                "id": r.id,
                "device": r.device,
                "command": r.command,
                "acked_at": r.acked_at,
                "result": json.loads(r.result) if r.result else None,
            }
            for r in rows
        ]


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # WAL lets readers (other replicas, the CLI) work while one replica writes.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()
