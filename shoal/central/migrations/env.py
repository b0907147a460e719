"""Alembic environment for the central database.

``shoal.central.db.Store.migrate`` hands in an open connection (``config.attributes["connection"]``);
run from the ``alembic`` command instead, the URL comes from ``sqlalchemy.url`` and the async driver
is used the same way.
"""

from __future__ import annotations

import asyncio
from typing import Any

from alembic import context

from shoal.central.db import VERSION_TABLE, Base, async_url

config = context.config
target_metadata = Base.metadata


def _migrate(connection: Any) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        version_table=VERSION_TABLE,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


async def _migrate_url(url: str) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(async_url(url))
    async with engine.begin() as conn:
        await conn.run_sync(_migrate)
    await engine.dispose()


if context.is_offline_mode():
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        version_table=VERSION_TABLE,
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()
elif config.attributes.get("connection") is not None:
    _migrate(config.attributes["connection"])
else:
    asyncio.run(_migrate_url(config.get_main_option("sqlalchemy.url") or ""))
