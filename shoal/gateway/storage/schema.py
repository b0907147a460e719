"""The results table: one row per stored request, its tensors in a segment file (``segments.py``).

The table is created and changed by migrations (``migrations/``, Alembic, with its own version
table so that it can share a database with central's); several clusters may share one database,
each row names its cluster.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Float, Index, Integer, MetaData, String, Table, Text

VERSION_TABLE = "shoal_results_alembic_version"
# Any constant works; it names the PostgreSQL advisory lock gateways take while migrating.
MIGRATION_LOCK = 0x5E0A2

metadata = MetaData()
# SQLite only autoincrements INTEGER PRIMARY KEY; PostgreSQL gets a 64-bit identity.
Id = BigInteger().with_variant(Integer(), "sqlite")

results_table = Table(
    "shoal_results",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("cluster", String(128), nullable=False),  # several clusters may share one database
    Column("request_id", String(256), nullable=False),
    Column("model", String(128), nullable=False),
    Column("version", String(64), nullable=False),
    Column("time", Float, nullable=False),  # unix seconds when the answer was ready
    Column("status", Integer, nullable=False),  # the HTTP status the device got
    Column("latency_ms", Float, nullable=False),
    Column("error", Text, nullable=True),
    Column("client", String(256), nullable=True),
    Column("path", String(128), nullable=False),  # the segment file holding its tensors, under the folder
    Column("bytes", BigInteger, nullable=False),  # its bytes in that file
    Column("inputs", Text, nullable=False),  # JSON: [{name, datatype, shape, files, at: [[offset, size]]}]
    Column("outputs", Text, nullable=False),
    Index("ix_shoal_results_cluster_time", "cluster", "time"),
    Index("ix_shoal_results_cluster_model_id", "cluster", "model", "id"),
    Index("ix_shoal_results_cluster_request", "cluster", "request_id"),
    Index("ix_shoal_results_cluster_path", "cluster", "path"),  # retention deletes by file
)
COLUMNS = [c.name for c in results_table.columns if c.name != "id"]
