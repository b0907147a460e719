"""Alembic migrations of the central database (run by ``shoal central`` on start, or ``shoal central migrate``)."""
