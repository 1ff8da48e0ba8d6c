"""`audit-ingest verify`: the ledger's chain and every stored event recomputed, and typed rows derived again.

Findings, one per changed thing, each naming an event id:
- `modified`: the event's raw or effective_at differs from what its batch ledgered;
- `missing`: a ledgered event is gone;
- `unledgered`: a stored event that no ledgered batch accounts for;
- `broken chain`: a ledger row changed, or one is gone (named by its batch's first event);
- `typed rows disagree with raw`: a typed table's rows of the event are not what its raw derives.

The fast path recomputes each batch's hash in the engine (`Backend.batch_hashes`); only a batch whose hash
differs is read back event by event, to name what changed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import sqlalchemy as sa

from ingest import backends, batchlog, ledger, model, store
from ingest.backends.common import TABLES

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
    text = backend.entries_text(entries.c.event_id, entries.c.digest)
    first = sa.func.min(entries.c.event_id.collate("C") if conn.dialect.name == "postgresql" else entries.c.event_id)
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
    """Typed rows compared with what each event's raw derives: per table and batch, as an order-free fingerprint
    of the rows (a sum of their hashes); a batch that differs is compared event by event. Python's hash is
    enough: both sides are hashed in this process, with a seed an attacker does not know."""
    derived: Counter = Counter()
    for row in _stored(conn, sa.true()):
        for name, rows in _derive(row.id, row.raw).items():
            values = _VALUES[name]
            derived[name, row.batch_seq] += sum(hash(values(r)) for r in rows)
    stored: Counter = Counter()
    for table in model.TYPED_TABLES:
        values = _VALUES[table.name]
        for seq, rows in _typed_rows_by(conn, table, sa.true(), "batch_seq").items():
            stored[table.name, seq] += sum(hash(values(r)) for r in rows)
    differing = {k for k in derived.keys() | stored.keys() if derived[k] % _MOD != stored[k] % _MOD}
    findings = []
    for name, seq in sorted(differing, key=lambda k: (k[0], -1 if k[1] is None else k[1])):
        findings += _typed_events(conn, TABLES[name], seq)
    return findings


_MOD = 2**64


def _derive(event_id: str, raw: object) -> dict[str, list[dict]]:
    event = ledger.parsed(raw)
    family = model.FAMILY_OF_TYPE.get(str(event.get("type")))
    if family is None:
        return {}
    typed: dict[str, list[dict]] = {name: [] for name in _TABLES_OF[family.table]}
    model.typed_rows(typed, family, event_id, event.get(event["type"]))
    return typed


_TABLES_OF = {f.table: (f.table, *(lst.table for lst in f.lists)) for f in model.FAMILIES}


def _typed_rows_by(conn: sa.Connection, table: sa.Table, where: sa.ColumnElement, key: str) -> dict:
    """The stored rows of `table` whose event is `where`, grouped by `key` (the event's batch_seq, or event_id)."""
    ev = model.audit_events
    columns = [sa.cast(c, sa.Text).label(c.name) if isinstance(c.type, sa.JSON) else c for c in table.columns]
    query = sa.select(ev.c.batch_seq, *columns).join(ev, ev.c.id == table.c.event_id).where(where)
    out: dict = {}
    for row in conn.execution_options(yield_per=CHUNK).execute(query):
        out.setdefault(row._mapping[key], []).append(row._mapping)
    return out


def _values_of(table: sa.Table):
    """A function of a row (a dict, or a stored row's mapping) to its values in a form both sides share: JSON
    columns as canonical text."""
    names = [c.name for c in table.columns]
    json_columns = {c.name for c in table.columns if isinstance(c.type, sa.JSON)}
    if not json_columns:
        return lambda row: tuple(row.get(n) for n in names)

    def values(row) -> tuple:
        return tuple(
            model.canonical(ledger.parsed(row.get(n))) if n in json_columns and row.get(n) is not None else row.get(n)
            for n in names
        )

    return values


_VALUES = {t.name: _values_of(t) for t in model.TYPED_TABLES}


def _typed_events(conn: sa.Connection, table: sa.Table, seq: int | None) -> list[Finding]:
    ev = model.audit_events
    in_batch = ev.c.batch_seq.is_(None) if seq is None else ev.c.batch_seq == seq
    values = _VALUES[table.name]
    derived = {
        row.id: Counter(map(values, _derive(row.id, row.raw).get(table.name, []))) for row in _stored(conn, in_batch)
    }
    rows = _typed_rows_by(conn, table, in_batch, "event_id")
    stored = {event_id: Counter(map(values, found)) for event_id, found in rows.items()}
    return [
        Finding(i, "typed rows disagree with raw", table.name)
        for i in sorted(derived.keys() | stored.keys())
        if derived.get(i, Counter()) != stored.get(i, Counter())
    ]
