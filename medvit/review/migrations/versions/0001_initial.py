"""Initial review schema: reviews (one per submission) and review_verdicts (one per finding judged).

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "reviews",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("reviewer", sa.String(120), nullable=False),
        sa.Column("note", sa.String(2000), nullable=False),
        sa.Column("image_uid", sa.String(64), nullable=False),
        sa.Column("image_uid_kind", sa.String(16), nullable=False),
        sa.Column("model_name", sa.String(200), nullable=False),
        sa.Column("weights_sha256", sa.String(64), nullable=False),
        sa.Column("shown", sa.JSON(), nullable=False),
        sa.CheckConstraint("image_uid_kind IN ('sop_instance_uid', 'sha256')", name="ck_reviews_uid_kind"),
    )
    op.create_index("ix_reviews_created_at", "reviews", ["created_at"])
    op.create_index("ix_reviews_image_uid", "reviews", ["image_uid"])
    op.create_table(
        "review_verdicts",
        sa.Column("review_id", sa.Integer(), sa.ForeignKey("reviews.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("finding", sa.String(64), primary_key=True),
        sa.Column("verdict", sa.String(16), nullable=False),
        sa.CheckConstraint("verdict IN ('agree', 'disagree', 'uncertain')", name="ck_review_verdicts_verdict"),
    )


def downgrade() -> None:
    op.drop_table("review_verdicts")
    op.drop_index("ix_reviews_image_uid", table_name="reviews")
    op.drop_index("ix_reviews_created_at", table_name="reviews")
    op.drop_table("reviews")
