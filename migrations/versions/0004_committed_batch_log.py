"""The committed-batch log: `ingest_batches`, its counter, and `audit_events.batch_seq`.

Events stored before this revision get one batch per source and stream (the main stream, and the tenant
stream of tenant-scoped types), numbered in that order: consumers (forwarding, rules, the ledger) then see
every stored event once, as if each stream had been committed in one batch.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import context, op

from ingest import model

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Alembic's ALTER and CREATE INDEX are not schema-translated as its CREATE TABLE is: named here.
    schema = context.config.attributes.get("schema")
    op.add_column("audit_events", sa.Column("batch_seq", sa.BigInteger(), nullable=True), schema=schema)
    if op.get_bind().dialect.name == "postgresql":
        op.create_index("audit_events_batch_seq", "audit_events", ["batch_seq"], schema=schema)
    op.create_table(
        "ingest_batches",
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("state_key", sa.Text(), nullable=False),
        sa.Column("committed_at", sa.DateTime(), nullable=False),
        sa.Column("events", sa.BigInteger(), nullable=False),
        sa.Column("min_effective_at", sa.DateTime(), nullable=True),
        sa.Column("max_effective_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("seq"),
    )
    op.create_table(
        "ingest_batch_counter",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    _number_stored_events()


def _number_stored_events() -> None:
    conn = op.get_bind()
    schema = context.config.attributes.get("schema")
    events = sa.table("audit_events", *map(sa.column, ("source", "type", "batch_seq", "effective_at")), schema=schema)
    batches = sa.table("ingest_batches", *map(sa.column, _BATCH_COLUMNS), schema=schema)
    types: dict[tuple[str, str], list[str]] = {}
    for source, event_type in conn.execute(sa.select(events.c.source, events.c.type).distinct()):
        stream = source + ("#tenant" if model.is_tenant_scoped(event_type) else "")
        types.setdefault((source, stream), []).append(event_type)
    seq = 0
    for (source, stream), names in sorted(types.items()):
        seq += 1
        mine = sa.and_(events.c.source == source, events.c.type.in_(names))
        conn.execute(events.update().where(mine).values(batch_seq=seq))
        at = events.c.effective_at
        count, first, last = conn.execute(
            sa.select(sa.func.count(), sa.func.min(at), sa.func.max(at)).where(mine)
        ).one()
        row = (seq, source, stream, sa.func.now(), count, first, last)
        conn.execute(batches.insert().values(dict(zip(_BATCH_COLUMNS, row, strict=True))))
    if seq:
        counter = sa.table("ingest_batch_counter", sa.column("id"), sa.column("seq"), schema=schema)
        conn.execute(counter.insert().values(id=1, seq=seq))


_BATCH_COLUMNS = ("seq", "source", "state_key", "committed_at", "events", "min_effective_at", "max_effective_at")


def downgrade() -> None:
    op.drop_table("ingest_batch_counter")
    op.drop_table("ingest_batches")
    schema = context.config.attributes.get("schema")
    if op.get_bind().dialect.name == "postgresql":
        op.drop_index("audit_events_batch_seq", table_name="audit_events", schema=schema)
    op.drop_column("audit_events", "batch_seq", schema=schema)
