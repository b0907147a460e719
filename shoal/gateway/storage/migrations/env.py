"""Alembic environment for the results table (see ``shoal.database.run_env``)."""

from __future__ import annotations

from alembic import context

from shoal.database import run_env
from shoal.gateway.storage.schema import VERSION_TABLE, metadata

run_env(context, metadata, VERSION_TABLE)
