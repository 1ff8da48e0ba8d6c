"""The ledger: each committed batch's events hashed and chained to the previous batch, in the batch's transaction.

An event's digest is the SHA-256 of `id`, `effective_at` (Unix seconds) and `raw` as canonical JSON (sorted keys,
no whitespace), joined by the unit separator (0x1f). A batch's entries (`ingest_ledger_entries`, one row an event)
are its events' ids and digests; its `events_hash` is the SHA-256 of the lines `<id> <digest>\n` in id order, and
its `hash` the SHA-256 of the previous row's hash, the batch's sequence number, source, event count and
`events_hash`, joined by newlines. Changing any stored event, or any ledger
row, changes a hash that `ingest.verify` recomputes. Rewriting the whole chain is caught only against a chain
head kept elsewhere (a signed evidence manifest, the `audit_ingest_ledger_head` metric).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa

from ingest import model
from ingest.backends.common import is_arrow
from ingest.store import insert_rows

GENESIS = "0" * 64  # the previous hash of the first batch
_SEP = "\x1f"


def digest(event_id: str, unix: int, raw: str) -> str:
    """An event's digest; `raw` is the canonical JSON text (model.canonical)."""
    return hashlib.sha256(f"{event_id}{_SEP}{unix}{_SEP}{raw}".encode()).hexdigest()


def canonical_raw(raw: object) -> str:
    """The canonical text of a stored `raw` as the driver returns it (text, or parsed on PostgreSQL)."""
    return model.canonical(model.parsed(raw))


def entries_text(digests: Iterable[tuple[str, str]]) -> str:
    """The text `events_hash` hashes, of (id, digest) pairs."""
    return "".join(f"{event_id} {d}\n" for event_id, d in sorted(digests))


def row_hash(prev: str, seq: int, source: str, events: int, events_hash: str) -> str:
    return hashlib.sha256(f"{prev}\n{seq}\n{source}\n{events}\n{events_hash}".encode()).hexdigest()


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def batch_digests(rows) -> list[tuple[str, str]]:
    """(id, digest) of event rows (dicts, or the DuckDB backend's Arrow table), whose `raw` is already canonical
    text (model.normalise writes it so)."""
    if is_arrow(rows):
        import pyarrow as pa
        import pyarrow.compute as pc

        seconds = pc.divide(rows["effective_at"].cast(pa.int64()), 1_000_000)  # timestamp[us]
        raw = rows["raw"]
        raw = raw.cast(pa.string()) if raw.type == pa.string() else pa.chunked_array([c.storage for c in raw.chunks])
        triples: Iterator = zip(rows["id"].to_pylist(), seconds.to_pylist(), raw.to_pylist(), strict=True)
    else:
        triples = ((r["id"], unix(r["effective_at"]), r["raw"]) for r in rows)
    return [(event_id, digest(event_id, t, raw)) for event_id, t, raw in triples]


def unix(at: datetime) -> int:
    return int((at - _EPOCH).total_seconds())


_EPOCH = datetime(1970, 1, 1)


def record(conn: sa.Connection, seq: int, source: str, digests: list[tuple[str, str]]) -> str:
    """The ledger row and entries of batch `seq` (in its transaction, which holds the batch log's counter: every
    lower batch has committed its row); returns its hash."""
    table = model.ingest_ledger
    prev = conn.execute(sa.select(table.c.hash).where(table.c.seq < seq).order_by(table.c.seq.desc()).limit(1))
    previous = prev.scalar() or GENESIS
    events_hash = sha256(entries_text(digests))
    hash_ = row_hash(previous, seq, source, len(digests), events_hash)
    conn.execute(
        table.insert().values(
            seq=seq, source=source, events=len(digests), events_hash=events_hash, prev_hash=previous, hash=hash_
        )
    )
    entries = [{"seq": seq, "event_id": event_id, "digest": d} for event_id, d in digests]
    insert_rows(conn, model.ingest_ledger_entries, entries, absent=True)
    return hash_


@dataclass(frozen=True)
class Head:
    seq: int
    hash: str


def head(conn: sa.Connection) -> Head | None:
    """The chain head: the last batch's sequence number and hash."""
    table = model.ingest_ledger
    row = conn.execute(sa.select(table.c.seq, table.c.hash).order_by(table.c.seq.desc()).limit(1)).first()
    return None if row is None else Head(row.seq, row.hash)
