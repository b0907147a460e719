"""The results table and its indexes.

A database where an earlier shoal made the table itself (before migrations managed it) keeps it: the
table is created only when missing, then this revision is recorded.

Revision ID: 0001
Revises:
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_INDEXES = {
    "ix_shoal_results_cluster_time": ["cluster", "time"],
    "ix_shoal_results_cluster_model_id": ["cluster", "model", "id"],
    "ix_shoal_results_cluster_request": ["cluster", "request_id"],
    "ix_shoal_results_cluster_path": ["cluster", "path"],
}


def upgrade() -> None:
    if sa.inspect(op.get_bind()).has_table("shoal_results"):
        return
    op.create_table(
        "shoal_results",
        sa.Column("id", _Id, primary_key=True, autoincrement=True),
        sa.Column("cluster", sa.String(128), nullable=False),
        sa.Column("request_id", sa.String(256), nullable=False),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("time", sa.Float(), nullable=False),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("client", sa.String(256), nullable=True),
        sa.Column("path", sa.String(128), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("inputs", sa.Text(), nullable=False),
        sa.Column("outputs", sa.Text(), nullable=False),
    )
    for name, columns in _INDEXES.items():
        op.create_index(name, "shoal_results", columns)


def downgrade() -> None:
    op.drop_table("shoal_results")
