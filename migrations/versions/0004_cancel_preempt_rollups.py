"""jobs.force_cancel_at (a forced cancel kept in SQL, done by the reaper after the grace),
jobs.preempt_requested (an urgent job asks a running one for its worker), and the metrics
rollup: jobs.rolled_up and the rollups table, seeded with its fold lock; quotas per owner

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("force_cancel_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("preempt_requested", sa.Boolean(), nullable=False,
                                      server_default=sa.false()))
        batch_op.add_column(sa.Column("rolled_up", sa.Boolean(), nullable=False,
                                      server_default=sa.false()))
        batch_op.create_index("ix_jobs_rolled_up_status", ["rolled_up", "status"])
    rollups = op.create_table(
        "rollups",
        sa.Column("name", sa.String(32), primary_key=True),
        sa.Column("labels", sa.String(128), primary_key=True),
        sa.Column("value", sa.Float(), nullable=False),
    )
    op.bulk_insert(rollups, [{"name": "lock", "labels": "", "value": 0.0}])
    op.create_table(
        "quotas",
        sa.Column("owner", sa.String(64), primary_key=True),
        sa.Column("max_running", sa.JSON(), nullable=False),
        sa.Column("gpu_seconds_per_day", sa.Float(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("quotas")
    op.drop_table("rollups")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_rolled_up_status")
        batch_op.drop_column("rolled_up")
        batch_op.drop_column("preempt_requested")
        batch_op.drop_column("force_cancel_at")
