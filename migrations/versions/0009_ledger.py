"""The tamper-evident ledger: `ingest_ledger`, a hash chain over the committed batches.

Events stored before this revision are ledgered as they are now, in their batches of migration 0004 (one per
source and stream) and the batches committed since: the ledger proves that nothing changes from here on, not
what happened to a row before.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import context, op

from ingest import ledger

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ingest_ledger",
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("events", sa.BigInteger(), nullable=False),
        sa.Column("entries", sa.Text(), nullable=False),
        sa.Column("events_hash", sa.Text(), nullable=False),
        sa.Column("prev_hash", sa.Text(), nullable=False),
        sa.Column("hash", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("seq"),
    )
    _ledger_stored_batches()


def _ledger_stored_batches() -> None:
    conn = op.get_bind()
    schema = context.config.attributes.get("schema")
    batches = sa.table("ingest_batches", sa.column("seq"), sa.column("source"), schema=schema)
    events = sa.table("audit_events", *map(sa.column, ("id", "effective_at", "raw", "batch_seq")), schema=schema)
    for seq, source in conn.execute(sa.select(batches.c.seq, batches.c.source).order_by(batches.c.seq)).all():
        rows = conn.execute(
            sa.select(events.c.id, events.c.effective_at, events.c.raw).where(events.c.batch_seq == seq)
        ).all()
        digests = [(r.id, ledger.digest(r.id, ledger.unix(r.effective_at), ledger.canonical_raw(r.raw))) for r in rows]
        ledger.record(conn, seq, source, digests)


def downgrade() -> None:
    op.drop_table("ingest_ledger")
