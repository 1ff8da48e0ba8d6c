"""The tamper-evident ledger: `ingest_ledger`, a hash chain over the committed batches, and its entries.

Events stored before this revision are ledgered as they are now, in their batches of migration 0004 (one per
source and stream) and the batches committed since: the ledger proves that nothing changes from here on, not
what happened to a row before. On DuckDB, which keeps `raw`'s text, each `raw` is rewritten as canonical JSON
(the same value, sorted keys): the text the ledger hashes, which `verify` then recomputes in the engine. Typed
rows are derived again (REBUILD_TYPED): their JSON objects are canonical text now too.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03
"""

import logging

import sqlalchemy as sa
from alembic import context, op

from ingest import ledger

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None
REBUILD_TYPED = True
log = logging.getLogger("ingest.store")


def upgrade() -> None:
    op.create_table(
        "ingest_ledger",
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("events", sa.BigInteger(), nullable=False),
        sa.Column("events_hash", sa.Text(), nullable=False),
        sa.Column("prev_hash", sa.Text(), nullable=False),
        sa.Column("hash", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("seq"),
    )
    op.create_table(
        "ingest_ledger_entries",
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("event_id", sa.Text(), nullable=False),
        sa.Column("digest", sa.Text(), nullable=False),
        *([sa.PrimaryKeyConstraint("seq", "event_id")] if op.get_bind().dialect.name == "postgresql" else []),
    )
    _ledger_stored_batches()


def _ledger_stored_batches() -> None:
    conn = op.get_bind()
    schema = context.config.attributes.get("schema")
    batches = sa.table("ingest_batches", sa.column("seq"), sa.column("source"), schema=schema)
    events = sa.table("audit_events", *map(sa.column, ("id", "effective_at", "raw", "batch_seq")), schema=schema)
    ledgered = conn.execute(sa.select(batches.c.seq, batches.c.source).order_by(batches.c.seq)).all()
    for seq, source in ledgered:
        rows = conn.execute(
            sa.select(events.c.id, events.c.effective_at, events.c.raw).where(events.c.batch_seq == seq)
        ).all()
        texts = {r.id: ledger.canonical_raw(r.raw) for r in rows}
        digests = [(r.id, ledger.digest(r.id, ledger.unix(r.effective_at), texts[r.id])) for r in rows]
        ledger.record(conn, seq, source, digests)
        if conn.dialect.name == "duckdb":
            changed = {r.id: texts[r.id] for r in rows if r.raw != texts[r.id]}
            if changed:
                _rewrite_raw(conn, schema, changed)
    if ledgered:
        log.info(
            "ledgered the %d stored batches as they are now (events stored before migration 0004 in one batch per "
            "source and stream): the ledger proves what changes from here on",
            len(ledgered),
        )


def _rewrite_raw(conn, schema: str | None, texts: dict[str, str]) -> None:
    """DuckDB: `raw` of these events set to their canonical text, in one statement over an Arrow table."""
    import pyarrow as pa

    table = f'"{schema}".audit_events' if schema else "audit_events"
    driver = conn.connection.driver_connection
    driver.register("canonical_raw", pa.table({"id": list(texts), "raw": list(texts.values())}))
    try:
        driver.execute(f"UPDATE {table} SET raw = c.raw FROM canonical_raw c WHERE {table}.id = c.id")
    finally:
        driver.unregister("canonical_raw")


def downgrade() -> None:
    op.drop_table("ingest_ledger_entries")
    op.drop_table("ingest_ledger")
