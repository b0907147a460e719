"""The central database: accounts, the master secret, commands for devices and each cluster's decision
lease (SQLAlchemy 2, async).

SQLite by default (``aiosqlite``), PostgreSQL by URL (``asyncpg``). The schema is managed by Alembic
(``shoal/central/migrations``); ``Store.open()`` brings the database to the newest revision, holding a
lock so that several replicas starting together on one database migrate it once. The live table of
clusters is not here: every replica keeps its own, since clusters report to each of them; only the
decision lease, which replicas must agree on, is.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
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
    case,
    delete,
    func,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from shoal.database import async_url, create_engine, dialect_of, migrate, private_sqlite_file, sqlite_path
from shoal.protocol.central_messages import Account, AckedCommand, CommandCounts, a_kind
from shoal.protocol.central_messages import Command as CommandMessage

log = logging.getLogger("shoal.central")

DEFAULT_TIMEOUT_S = 5.0  # every query; a hung database makes requests 503 instead of hanging them
MIGRATIONS = Path(__file__).parent / "migrations"
VERSION_TABLE = "shoal_alembic_version"
# Any constant works; it names the PostgreSQL advisory lock replicas take while migrating.
_PG_MIGRATION_LOCK = 0x5E0A1


class Base(DeclarativeBase):
    pass


# SQLite only autoincrements INTEGER PRIMARY KEY; PostgreSQL gets a 64-bit identity.
_Id = BigInteger().with_variant(Integer(), "sqlite")


class AccountRow(Base):
    __tablename__ = "shoal_accounts"
    __table_args__ = (UniqueConstraint("kind", "name", name="uq_shoal_accounts_kind_name"),)
    id: Mapped[int] = mapped_column(_Id, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(128))
    password_hash: Mapped[str] = mapped_column(String(256))
    created_at: Mapped[float] = mapped_column(Float)


class SecretRow(Base):
    __tablename__ = "shoal_secrets"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[bytes] = mapped_column(LargeBinary)


class CommandRow(Base):
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


class LeaseRow(Base):
    """Which gateway of a cluster decides (runs the autoscaler), until when (unix seconds, central's clock)."""

    __tablename__ = "shoal_decision_leases"
    cluster: Mapped[str] = mapped_column(String(128), primary_key=True)
    holder: Mapped[str] = mapped_column(String(128))
    expires_at: Mapped[float] = mapped_column(Float)


class AccountExists(Exception):
    pass


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


class Store:
    """Every database access central makes. One per process; methods are coroutines."""

    def __init__(self, url: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.url = async_url(url)
        self.dialect = dialect_of(self.url)
        self.timeout_s = timeout_s
        self.engine: AsyncEngine = create_engine(self.url, timeout_s=timeout_s)
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)

    async def open(self) -> None:
        await self.migrate()

    async def close(self) -> None:
        await self.engine.dispose()

    async def migrate(self, revision: str = "head") -> None:
        path = sqlite_path(self.url)
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            # Every route token derives from the master secret this file holds.
            private_sqlite_file(path, "central database", "it holds the master secret")
        await migrate(self.engine, MIGRATIONS, _PG_MIGRATION_LOCK, revision)

    # ------------------------------------------------------------------------------- secrets

    @_bounded
    async def master_secret(self) -> bytes:
        """The secret every replica derives cluster keys from; created by whichever replica comes first."""
        async with self.sessions() as s:
            row = await s.get(SecretRow, "master")
            if row is not None:
                return row.value
        try:
            async with self.sessions.begin() as s:
                s.add(SecretRow(name="master", value=os.urandom(32)))
        except IntegrityError:
            pass  # another replica created it first: use theirs
        async with self.sessions() as s:
            row = await s.get(SecretRow, "master")
            assert row is not None
            return row.value

    # ------------------------------------------------------------------------------ accounts

    @_bounded
    async def add_account(self, kind: str, name: str, password_hash: str) -> None:
        try:
            async with self.sessions.begin() as s:
                s.add(AccountRow(kind=kind, name=name, password_hash=password_hash, created_at=time.time()))
        except IntegrityError:
            raise AccountExists(f"{a_kind(kind)} account named {name!r} already exists") from None

    @_bounded
    async def password_hash(self, kind: str, name: str) -> str | None:
        async with self.sessions() as s:
            return await s.scalar(
                select(AccountRow.password_hash).where(AccountRow.kind == kind, AccountRow.name == name)
            )

    @_bounded
    async def list_accounts(self, kind: str | None = None) -> list[Account]:
        q = select(AccountRow.kind, AccountRow.name, AccountRow.created_at).order_by(
            AccountRow.kind, AccountRow.name
        )
        if kind is not None:
            q = q.where(AccountRow.kind == kind)
        async with self.sessions() as s:
            return [Account(*r) for r in (await s.execute(q)).all()]

    @_bounded
    async def count_accounts(self, kind: str) -> int:
        async with self.sessions() as s:
            q = select(func.count()).select_from(AccountRow).where(AccountRow.kind == kind)
            return int(await s.scalar(q) or 0)

    @_bounded
    async def remove_account(self, kind: str, name: str) -> bool:
        async with self.sessions.begin() as s:
            r = await s.execute(delete(AccountRow).where(AccountRow.kind == kind, AccountRow.name == name))
            return (r.rowcount or 0) > 0

    # ------------------------------------------------------------------------------ commands

    @_bounded
    async def add_command(self, device: str, command: str, args: dict[str, Any], by: str) -> int:
        async with self.sessions.begin() as s:
            row = CommandRow(
                device=device, command=command, args=json.dumps(args), created_by=by, created_at=time.time()
            )
            s.add(row)
            await s.flush()
            return int(row.id)

    @_bounded
    async def pending_commands(self, device: str, limit: int = 100) -> list[CommandMessage]:
        """Commands for ``device`` not acknowledged yet, oldest first; marks them delivered."""
        async with self.sessions.begin() as s:
            rows = (
                await s.scalars(
                    select(CommandRow)
                    .where(CommandRow.device == device, CommandRow.acked_at.is_(None))
                    .order_by(CommandRow.id)
                    .limit(limit)
                )
            ).all()
            now = time.time()
            fresh = [r.id for r in rows if r.delivered_at is None]
            if fresh:
                await s.execute(update(CommandRow).where(CommandRow.id.in_(fresh)).values(delivered_at=now))
            return [
                CommandMessage(r.id, r.command, json.loads(r.args), r.created_at, r.created_by) for r in rows
            ]

    @_bounded
    async def ack_command(self, device: str, command_id: int, result: Any) -> bool:
        async with self.sessions.begin() as s:
            r = await s.execute(
                update(CommandRow)
                .where(
                    CommandRow.id == command_id, CommandRow.device == device, CommandRow.acked_at.is_(None)
                )
                .values(acked_at=time.time(), result=json.dumps(result))
            )
            return (r.rowcount or 0) > 0

    @_bounded
    async def commands_since(self, last_id: int) -> list[tuple[int, str]]:
        async with self.sessions() as s:
            rows = await s.execute(
                select(CommandRow.id, CommandRow.device)
                .where(CommandRow.id > last_id)
                .order_by(CommandRow.id)
            )
            return [(int(i), d) for i, d in rows.all()]

    @_bounded
    async def last_command_id(self) -> int:
        async with self.sessions() as s:
            return int(await s.scalar(select(func.max(CommandRow.id))) or 0)

    @_bounded
    async def command_counts(self) -> CommandCounts:
        async with self.sessions() as s:
            n = select(func.count()).select_from(CommandRow)
            pending = await s.scalar(n.where(CommandRow.acked_at.is_(None)))
            acked = await s.scalar(n.where(CommandRow.acked_at.is_not(None)))
        return CommandCounts(int(pending or 0), int(acked or 0))

    @_bounded
    async def acked_since(self, since: float) -> list[AckedCommand]:
        """Commands acknowledged after ``since`` (unix seconds) with their results, for the webhook."""
        async with self.sessions() as s:
            q = select(CommandRow).where(CommandRow.acked_at > since).order_by(CommandRow.acked_at)
            rows = (await s.scalars(q)).all()
        return [
            AckedCommand(
                r.id, r.device, r.command, r.acked_at or 0.0, json.loads(r.result) if r.result else None
            )
            for r in rows
        ]

    # ---------------------------------------------------------------------------- decision lease

    @_bounded
    async def take_lease(self, cluster: str, gateway: str, lease_s: float, now: float) -> tuple[str, float]:
        """Give ``gateway`` the cluster's decision lease until ``now + lease_s`` when it is free,
        expired or already its own; the holder and its expiry either way. One statement (an upsert
        that keeps the row unless the lease may change hands), so replicas on one database never hand
        it to two gateways: PostgreSQL re-checks the condition on the latest row after waiting for
        its lock, SQLite has one writer at a time."""
        t = LeaseRow.__table__
        c = t.c
        free = (c.holder == gateway) | (c.expires_at <= now)
        ins = (postgresql if self.dialect == "postgresql" else sqlite).insert(t)
        stmt = ins.values(cluster=cluster, holder=gateway, expires_at=now + lease_s).on_conflict_do_update(
            index_elements=[c.cluster],
            set_={
                "holder": case((free, ins.excluded.holder), else_=c.holder),
                "expires_at": case((free, ins.excluded.expires_at), else_=c.expires_at),
            },
        )
        async with self.sessions.begin() as s:
            holder, expires = (await s.execute(stmt.returning(c.holder, c.expires_at))).one()
        return str(holder), float(expires)

    @_bounded
    async def release_lease(self, cluster: str, gateway: str) -> None:
        """Drop the lease if ``gateway`` holds it (it no longer asks to decide)."""
        async with self.sessions.begin() as s:
            await s.execute(delete(LeaseRow).where(LeaseRow.cluster == cluster, LeaseRow.holder == gateway))

    @_bounded
    async def lease(self, cluster: str) -> tuple[str, float] | None:
        """The lease row as it is (tests and tools); None when nobody holds it."""
        async with self.sessions() as s:
            row = await s.get(LeaseRow, cluster)
            return None if row is None else (row.holder, row.expires_at)
