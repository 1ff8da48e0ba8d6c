"""Completeness: `sweep_windows` (the windows each stream holds whole) and `reconcile_findings`.

Coverage is seeded from what earlier revisions kept. It assumes that every stream with a checkpoint has been
synced without a hole from its oldest stored event up to its checkpoint (each incremental sweep starts
`lookback` before the last one's end, so consecutive sweeps overlap), or holds just its checkpoint's second
when it stored no event; and that every finished backfill slice covered its share of the backfill's window
(its bounds follow from its key). Older time the copy may hold whole is not claimed: `status` shows coverage
from the oldest stored event, and a backfill or a reconciliation of earlier time extends it.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05
"""

from datetime import UTC

import sqlalchemy as sa
from alembic import context, op

from ingest.state import TENANT, Key

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sweep_windows",
        sa.Column("stream", sa.Text(), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("gte", sa.BigInteger(), nullable=False),
        sa.Column("lte", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("stream", "gte"),
    )
    op.create_table(
        "reconcile_findings",
        sa.Column("run_at", sa.DateTime(), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("event_id", sa.Text(), nullable=False),
        sa.Column("finding", sa.Text(), nullable=False),
        sa.Column("details", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("run_at", "source", "event_id"),
    )
    _seed()


def _seed() -> None:
    """The windows the assumptions above give, merged per stream as `ingest.coverage.record` would."""
    from ingest import model

    conn = op.get_bind()
    schema = context.config.attributes.get("schema")
    state = sa.table("sync_state", *map(sa.column, ("key", "kind", "checkpoint")), schema=schema)
    events = sa.table("audit_events", *map(sa.column, ("source", "type", "effective_at")), schema=schema)
    oldest: dict[str, int] = {}
    query = sa.select(events.c.source, events.c.type, sa.func.min(events.c.effective_at)).group_by(
        events.c.source, events.c.type
    )
    for source, event_type, first in conn.execute(query):
        stream = source + (TENANT if model.is_tenant_scoped(event_type) else "")
        at = int(first.replace(tzinfo=UTC).timestamp())  # stored as naive UTC
        oldest[stream] = min(oldest.get(stream, at), at)
    windows: dict[tuple[str, bool], list[tuple[int, int, str]]] = {}
    done = sa.select(state.c.key, state.c.kind, state.c.checkpoint).where(state.c.checkpoint.is_not(None))
    for key_text, kind, checkpoint in conn.execute(done):
        if kind == "incremental":
            key = Key.parse(key_text)
            gte = min(oldest.get(key_text, checkpoint), checkpoint)
            windows.setdefault((key.name, key.tenant), []).append((gte, checkpoint, "incremental"))
        elif kind == "backfill":
            key = Key.parse(key_text)
            (since, until), (i, n) = key.window, key.slice
            lo, hi = since + (until - since) * i // n, since + (until - since) * (i + 1) // n - 1
            windows.setdefault((key.name, key.tenant), []).append((lo, hi, "backfill"))
    table = sa.table("sweep_windows", *map(sa.column, ("stream", "source", "gte", "lte", "kind", "updated_at")),
                     schema=schema)  # fmt: skip
    for (source, tenant), found in sorted(windows.items()):
        merged: list[list] = []
        for gte, lte, kind in sorted(found):
            if merged and gte <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], lte)
            else:
                merged.append([gte, lte, kind])
        for gte, lte, kind in merged:
            row = {"stream": source + (TENANT if tenant else ""), "source": source, "gte": gte, "lte": lte,
                   "kind": kind, "updated_at": sa.func.now()}  # fmt: skip
            conn.execute(table.insert().values(row))


def downgrade() -> None:
    op.drop_table("reconcile_findings")
    op.drop_table("sweep_windows")
