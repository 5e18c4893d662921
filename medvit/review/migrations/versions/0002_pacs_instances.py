"""PACS scoring queue: pacs_instances (one row per CR/DX instance seen by `medvit watch`, with its status).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "pacs_instances",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False, unique=True),
        sa.Column("study_instance_uid", sa.String(64), nullable=False),
        sa.Column("series_instance_uid", sa.String(64), nullable=False),
        sa.Column("modality", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(500), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("sr_sop_instance_uid", sa.String(64), nullable=True),
        sa.Column("worker", sa.String(120), nullable=True),
        sa.Column("discovered_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("status IN ('pending', 'scored', 'refused', 'failed')", name="ck_pacs_instances_status"),
    )
    op.create_index("ix_pacs_instances_status", "pacs_instances", ["status"])


def downgrade() -> None:
    op.drop_index("ix_pacs_instances_status", table_name="pacs_instances")
    op.drop_table("pacs_instances")
