"""Detections: `alerts` (one row per rule and set of events) and `alert_deliveries` (webhook attempts).

Revision ID: 0006
Revises: 0004
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

from ingest import model

revision = "0006"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "alerts",
        sa.Column("rule_id", sa.Text(), nullable=False),
        sa.Column("events_hash", sa.Text(), nullable=False),
        sa.Column("title", sa.Text(), nullable=False),
        sa.Column("level", sa.Text(), nullable=False),
        sa.Column("tags", model.JSON, nullable=False),
        sa.Column("event_ids", model.JSON, nullable=False),
        sa.Column("first_event_at", sa.DateTime(), nullable=False),
        sa.Column("last_event_at", sa.DateTime(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("historical", sa.Boolean(), nullable=False),
        sa.Column("batch_seq", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("rule_id", "events_hash"),
    )
    op.create_table(
        "alert_deliveries",
        sa.Column("rule_id", sa.Text(), nullable=False),
        sa.Column("events_hash", sa.Text(), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(), nullable=False),
        sa.Column("delivered_at", sa.DateTime(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("rule_id", "events_hash", "url"),
    )


def downgrade() -> None:
    op.drop_table("alert_deliveries")
    op.drop_table("alerts")
