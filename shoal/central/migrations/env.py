"""Alembic environment for the central database (see ``shoal.database.run_env``)."""

from __future__ import annotations

from alembic import context

from shoal.central.db import VERSION_TABLE, Base
from shoal.database import run_env

run_env(context, Base.metadata, VERSION_TABLE)
