"""`audit-ingest verify`: the ledger's chain and every stored event recomputed, and typed rows derived again.

Findings, one per changed thing, each naming an event id:
- `modified`: the event's raw or effective_at differs from what its batch ledgered;
- `missing`: a ledgered event is gone;
- `unledgered`: a stored event that no ledgered batch accounts for;
- `broken chain`: a ledger row changed, or one is gone (named by its batch's first event);
- `typed rows disagree with raw`: a typed table's rows of the event are not what its raw derives (derived and
  compared in the engine: ingest.typed_sql).

The fast path recomputes each batch's hash in the engine (`Backend.batch_hashes`); only a batch whose hash
differs is read back event by event, to name what changed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import sqlalchemy as sa

from ingest import backends, batchlog, ledger, model, store, typed_sql
from ingest.backends.common import entries_text

CHUNK = 10_000  # events read back per fetch


@dataclass(frozen=True)
class Finding:
    event_id: str
    kind: str
    detail: str = ""

    def line(self) -> str:
        return f"{self.event_id}: {self.kind}" + (f" ({self.detail})" if self.detail else "")


@dataclass
class Result:
    events: int = 0
    batches: int = 0
    head: str | None = None
    findings: list[Finding] = field(default_factory=list)

    def line(self) -> str:
        return f"verified {self.events:,} events in {self.batches:,} batches, chain head {self.head or ledger.GENESIS}"


def run(warehouse: store.Warehouse, *, typed: bool = True) -> Result:
    """`verify` on one snapshot of the warehouse: batches committing meanwhile are not half seen."""
    with warehouse.connect() as conn:
        conn = conn.execution_options(**warehouse.backend.SNAPSHOT)
        with conn.begin():
            return verify(conn, typed=typed)


def verify(conn: sa.Connection, *, typed: bool = True) -> Result:
    """Checks everything stored; findings in `Result.findings`, batch by batch."""
    backend = backends.for_dialect(conn.dialect.name)
    result = Result()
    with backend.all_cores(conn):
        rows = _ledger_rows(conn)
        result.findings += _chain(rows, _entries_hashes(conn), batchlog.last_seq(conn))
        ledgered = {r.seq: r for r in rows}
        computed = backend.batch_hashes(conn)
        if computed is None:
            computed = _batch_hashes(conn)
        for seq in sorted(ledgered.keys() | computed.keys(), key=lambda s: -1 if s is None else s):
            count, hash_ = computed.get(seq, (0, None))
            result.events += count
            row = ledgered.get(seq)
            if row is None or hash_ != row.events_hash:
                result.findings += _events_of(conn, seq, row)
        if typed:
            result.findings += _typed(conn)
    result.batches = len(rows)
    result.head = rows[-1].hash if rows else None
    return result


def _ledger_rows(conn: sa.Connection) -> list:
    table = model.ingest_ledger
    return list(conn.execute(sa.select(table).order_by(table.c.seq)))


def _entries_hashes(conn: sa.Connection) -> dict[int, tuple[str, str]]:
    """Per batch: (its first event id, the SHA-256 of its entries), computed in the engine."""
    backend = backends.for_dialect(conn.dialect.name)
    entries = model.ingest_ledger_entries
    text = entries_text(entries.c.event_id, entries.c.digest, backend.by_bytes)
    first = sa.func.min(backend.by_bytes(entries.c.event_id))
    query = sa.select(entries.c.seq, first, backend.sha256_hex(text)).group_by(entries.c.seq)
    return {seq: (first_id, h) for seq, first_id, h in conn.execute(query)}


def _chain(rows: list, entries: dict[int, tuple[str, str]], logged: int) -> Iterator[Finding]:
    """Each ledger row's hash recomputed from its entries and linked to the previous one; the batch log's batches
    all ledgered."""
    prev, expected_seq = ledger.GENESIS, 1
    for row in rows:
        first, entries_hash = entries.get(row.seq, (f"batch {row.seq}", ledger.sha256("")))
        if row.seq != expected_seq:
            yield Finding(first, "broken chain", f"batches {expected_seq} to {row.seq - 1} are not in the ledger")
        elif (
            row.prev_hash != prev
            or entries_hash != row.events_hash
            or ledger.row_hash(row.prev_hash, row.seq, row.source, row.events, row.events_hash) != row.hash
        ):
            yield Finding(first, "broken chain", f"the ledger row of batch {row.seq} or its entries changed")
        prev, expected_seq = row.hash, row.seq + 1
    if logged >= expected_seq:
        yield Finding(
            f"batch {expected_seq}", "broken chain", f"batches {expected_seq} to {logged} are not in the ledger"
        )


def _stored(conn: sa.Connection, where: sa.ColumnElement, order: bool = False) -> Iterator:
    ev = model.audit_events
    # As text: orjson parses it several times faster than the JSON type's result processor.
    query = sa.select(ev.c.batch_seq, ev.c.id, ev.c.effective_at, sa.cast(ev.c.raw, sa.Text).label("raw")).where(where)
    if order:
        query = query.order_by(ev.c.batch_seq)
    yield from conn.execution_options(yield_per=CHUNK).execute(query)


def _digest(row) -> str:
    return ledger.digest(row.id, ledger.unix(row.effective_at), ledger.canonical_raw(row.raw))


def _batch_hashes(conn: sa.Connection) -> dict[int | None, tuple[int, str]]:
    """What `Backend.batch_hashes` computes, in Python: batch by batch, from the stored events."""
    out: dict[int | None, tuple[int, str]] = {}
    current: int | None = None
    digests: list[tuple[str, str]] = []

    def close() -> None:
        if digests:
            out[current] = (len(digests), ledger.sha256(ledger.entries_text(digests)))

    for row in _stored(conn, sa.true(), order=True):
        if row.batch_seq != current:
            close()
            current, digests = row.batch_seq, []
        digests.append((row.id, _digest(row)))
    close()
    return out


def _events_of(conn: sa.Connection, seq: int | None, row) -> list[Finding]:
    """A batch whose hash differs, event by event: what changed, what is gone, what was added."""
    ev = model.audit_events
    stored = {
        r.id: _digest(r) for r in _stored(conn, ev.c.batch_seq.is_(None) if seq is None else ev.c.batch_seq == seq)
    }
    if row is None:
        why = "stored without a batch" if seq is None else f"batch {seq} is not in the ledger"
        return [Finding(i, "unledgered", why) for i in sorted(stored)]
    table = model.ingest_ledger_entries
    entries = dict(conn.execute(sa.select(table.c.event_id, table.c.digest).where(table.c.seq == seq)).all())
    findings = [Finding(i, "missing", f"ledgered in batch {seq}") for i in sorted(entries.keys() - stored.keys())]
    findings += [Finding(i, "unledgered", f"stored in batch {seq}") for i in sorted(stored.keys() - entries.keys())]
    findings += [
        Finding(i, "modified", f"batch {seq}")
        for i in sorted(entries.keys() & stored.keys())
        if entries[i] != stored[i]
    ]
    return findings


# ------------------------------------------------------------------------------------------------ typed rows


def _typed(conn: sa.Connection) -> list[Finding]:
    """Typed rows compared with what each event's raw derives, in the engine (ingest.typed_sql): per table, both
    sides' rows counted +1 (stored) and -1 (derived) in one aggregate; a row whose count is not 0 is in one side
    more often than in the other (EXCEPT ALL both ways, with each side computed once), and its event is named."""
    dialect = conn.dialect.name
    engine, derived = typed_sql.json_sql(dialect), typed_sql.derivations(dialect)
    ev = model.audit_events

    def side(columns, sign: int) -> sa.Select:
        values = [engine.normal(c).label(c.name) if isinstance(c.type, sa.JSON) else c for c in columns]
        return sa.select(*values, sa.literal(sign).label("side"))

    findings = []
    for table in sorted(model.TYPED_TABLES, key=lambda t: t.name):
        ours = derived[table.name].subquery()
        both = sa.union_all(
            side(table.columns, 1).join(ev, ev.c.id == table.c.event_id),
            side([ours.c[c.name] for c in table.columns], -1),
        ).subquery()
        counted = sa.select(both.c.event_id).group_by(*(both.c[c.name] for c in table.columns))
        differ = counted.having(sa.func.sum(both.c.side) != 0).subquery()
        ids = conn.execute(sa.select(differ.c.event_id).distinct().order_by(differ.c.event_id)).scalars()
        findings += [Finding(i, "typed rows disagree with raw", table.name) for i in ids]
    return findings
