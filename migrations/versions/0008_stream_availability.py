"""`sync_state.unavailable`: why the API refuses a stream (an organization without a tenant), NULL when it works.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import context, op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    schema = context.config.attributes.get("schema")
    op.add_column("sync_state", sa.Column("unavailable", sa.Text(), nullable=True), schema=schema)


def downgrade() -> None:
    schema = context.config.attributes.get("schema")
    op.drop_column("sync_state", "unavailable", schema=schema)
