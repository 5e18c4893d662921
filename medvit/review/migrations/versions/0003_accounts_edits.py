"""Site mode and editable reviews: users, audit_events, review_edits; reviews gain the signed-in account, the
calibration version in force, an edit time and a source; verdicts gain their label (present/absent/NULL).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(120), nullable=False, unique=True),
        sa.Column("password_hash", sa.String(255), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("disabled", sa.Boolean(), nullable=False),
        sa.Column("failed_signins", sa.Integer(), nullable=False),
        sa.Column("locked_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("role IN ('reviewer', 'admin')", name="ck_users_role"),
    )
    op.create_table(
        "audit_events",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(120), nullable=True),
        sa.Column("event", sa.String(32), nullable=False),
        sa.Column("target", sa.String(200), nullable=True),
        sa.Column("ok", sa.Boolean(), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=True),
    )
    op.create_index("ix_audit_events_at", "audit_events", ["at"])
    op.create_index("ix_audit_events_event", "audit_events", ["event"])
    with op.batch_alter_table("reviews") as batch:
        batch.add_column(sa.Column("user_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("calibration_version", sa.String(64), nullable=True))
        batch.add_column(sa.Column("updated_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("source", sa.String(16), nullable=False, server_default="app"))
        batch.create_foreign_key("fk_reviews_user_id", "users", ["user_id"], ["id"])
        batch.create_index("ix_reviews_user_id", ["user_id"])
    with op.batch_alter_table("review_verdicts") as batch:
        batch.add_column(sa.Column("label", sa.String(8), nullable=True))
        batch.create_check_constraint("ck_review_verdicts_label", "label IS NULL OR label IN ('present', 'absent')")
    op.create_table(
        "review_edits",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("review_id", sa.Integer(), sa.ForeignKey("reviews.id", ondelete="CASCADE"), nullable=False),
        sa.Column("edited_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("editor", sa.String(120), nullable=False),
        sa.Column("verdicts", sa.JSON(), nullable=False),
        sa.Column("note", sa.String(2000), nullable=False),
    )
    op.create_index("ix_review_edits_review_id", "review_edits", ["review_id"])


def downgrade() -> None:
    op.drop_index("ix_review_edits_review_id", table_name="review_edits")
    op.drop_table("review_edits")
    with op.batch_alter_table("review_verdicts") as batch:
        batch.drop_constraint("ck_review_verdicts_label", type_="check")
        batch.drop_column("label")
    with op.batch_alter_table("reviews") as batch:
        batch.drop_index("ix_reviews_user_id")
        batch.drop_constraint("fk_reviews_user_id", type_="foreignkey")
        batch.drop_column("source")
        batch.drop_column("updated_at")
        batch.drop_column("calibration_version")
        batch.drop_column("user_id")
    op.drop_index("ix_audit_events_event", table_name="audit_events")
    op.drop_index("ix_audit_events_at", table_name="audit_events")
    op.drop_table("audit_events")
    op.drop_table("users")
