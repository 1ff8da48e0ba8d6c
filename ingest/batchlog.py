"""The committed-batch log: every batch that stores events gets a sequence number, in commit order.

A writer takes the next number first thing in its batch's transaction (`take`), which locks the counter row
until the transaction ends: a second writer waits there, so a number is visible only once every lower number
is (or was rolled back and is given again). A consumer that has read up to N and then reads after N never
misses a batch, also with several ingesters on one PostgreSQL. The price: writers of one warehouse serialise
their batches' writes (their downloads and normalising still overlap).

`read_after` is the one way to read the log; `ingest.consumers` runs its users from their checkpoints. While a
consumer follows a sync in the same process (`keeping`), the batches this process commits are handed to it with
their events as parsed from the API (`committed`), instead of being read back and parsed again. The same values
on DuckDB, whose `raw` is those events' canonical JSON (the backend's RAW_AS_SERVED).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert

from ingest import model
from ingest.store import now


@dataclass(frozen=True)
class StoredEvent:
    id: str
    effective_at: datetime
    raw: dict  # the event's JSON as served


@dataclass(frozen=True)
class CommittedBatch:
    seq: int
    source: str
    state_key: str  # the sweep that committed it (sync_state.key): its kind says incremental or backfill
    committed_at: datetime
    events: list[StoredEvent]  # id order


def take(conn: sa.Connection) -> int:
    """The next sequence number, holding the counter's row lock until the transaction ends."""
    counter = model.ingest_batch_counter
    upsert = pg_insert(counter).values(id=1, seq=1)
    upsert = upsert.on_conflict_do_update(index_elements=["id"], set_={"seq": counter.c.seq + 1})
    return conn.execute(upsert.returning(counter.c.seq)).scalar_one()


def hold(conn: sa.Connection) -> None:
    """Holds the counter row's lock until the transaction ends, as `take` does, without taking a number. Writers
    of what several ingesters share besides events (coverage) hold it first, so that they run one at a time and,
    taking their row locks after this one in every transaction, never deadlock."""
    counter = model.ingest_batch_counter
    upsert = pg_insert(counter).values(id=1, seq=0)
    conn.execute(upsert.on_conflict_do_update(index_elements=["id"], set_={"seq": counter.c.seq}))


def give_back(conn: sa.Connection, seq: int) -> None:
    """A batch that stored nothing gets no number: the log lists only batches with events."""
    counter = model.ingest_batch_counter
    conn.execute(counter.update().where(counter.c.id == 1, counter.c.seq == seq).values(seq=seq - 1))


def record(
    conn: sa.Connection, seq: int, source: str, state_key: str, events: int, span: tuple[datetime, datetime]
) -> None:
    """The log's row of batch `seq` (in its transaction), whose `events` events carry `batch_seq = seq`."""
    conn.execute(
        model.ingest_batches.insert().values(
            seq=seq, source=source, state_key=state_key, committed_at=now(), events=events,
            min_effective_at=span[0], max_effective_at=span[1],
        )
    )  # fmt: skip


def last_seq(conn: sa.Connection) -> int:
    """The highest committed sequence number, 0 for an empty log."""
    return conn.execute(sa.select(sa.func.coalesce(sa.func.max(model.ingest_batches.c.seq), 0))).scalar_one()


class _Kept:
    """The batches committed in this process to a warehouse that `keeping` is on for (by engine), with their new
    events, id order. At most LIMIT events, the oldest batches dropped first: a consumer that falls behind reads
    them back. Concurrent writers hand theirs over after their commits, so not always in sequence order."""

    LIMIT = 20000

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.keepers: Counter[sa.Engine] = Counter()
        self.batches: dict[tuple[sa.Engine, int], list[StoredEvent]] = {}
        self.events = 0

    def add(self, engine: sa.Engine, seq: int, events: list[StoredEvent]) -> None:
        with self.lock:
            if not self.keepers[engine]:
                return
            self.events += len(events) - len(self.batches.get((engine, seq), ()))
            self.batches[engine, seq] = events
            while self.events > self.LIMIT:
                self.events -= len(self.batches.pop(min(self.batches, key=lambda k: k[1])))

    def take(self, engine: sa.Engine, seqs: list[int]) -> dict[int, list[StoredEvent]]:
        """The kept events of the batches of `seqs` (in order, the log's from its first); none of them, nor
        any older batch, is kept any longer."""
        wanted = set(seqs)
        with self.lock:
            taken = {seq: events for (e, seq), events in self.batches.items() if e is engine and seq in wanted}
            self._drop(engine, seqs[-1])
            return taken

    def _drop(self, engine: sa.Engine, through: int | None = None) -> None:
        for key in [k for k in self.batches if k[0] is engine and (through is None or k[1] <= through)]:
            self.events -= len(self.batches.pop(key))


_kept = _Kept()


@contextmanager
def keeping(engine: sa.Engine) -> Iterator[None]:
    """For the block (a consumer following a sync: ingest.consumers.alongside), the batches this process commits to
    `engine`'s warehouse are kept for `read_after`."""
    with _kept.lock:
        _kept.keepers[engine] += 1
    try:
        yield
    finally:
        with _kept.lock:
            _kept.keepers[engine] -= 1
            if not _kept.keepers[engine]:
                del _kept.keepers[engine]
                _kept._drop(engine)


def kept_now() -> bool:
    """Whether a consumer follows a sync in this process (`keeping`): its writers should keep their batches' events."""
    return bool(_kept.keepers)


def committed(conn: sa.Connection, seq: int, events: list[dict], new: set[str]) -> None:
    """Batch `seq` has committed on `conn`, storing the events of `events` (as served) whose ids are in `new`:
    kept for `read_after` while `keeping`. An id seen twice keeps its first event, as `model.normalise` does."""
    if not _kept.keepers[conn.engine]:
        return
    first: dict[str, dict] = {}
    for event in events:
        if event["id"] in new:
            first.setdefault(event["id"], event)
    stored = [StoredEvent(i, model.to_datetime(e["effective_at"]), e) for i, e in sorted(first.items())]
    _kept.add(conn.engine, seq, stored)


def read_after(conn: sa.Connection, after: int, *, max_events: int = 20000) -> list[CommittedBatch]:
    """The committed batches after `after`, in sequence order, with their events: whole batches, at least
    one, and no more than fit in `max_events` beyond the first."""
    batches = model.ingest_batches
    rows = conn.execute(sa.select(batches).where(batches.c.seq > after).order_by(batches.c.seq).limit(1000)).all()
    chosen: list = []
    total = 0
    for row in rows:
        if chosen and total + row.events > max_events:
            break
        chosen.append(row)
        total += row.events
    if not chosen:
        return []
    events = _kept.take(conn.engine, [row.seq for row in chosen])
    if missing := [row.seq for row in chosen if row.seq not in events]:
        events.update({seq: [] for seq in missing})
        ev = model.audit_events
        for seq, event_id, at, raw in conn.execute(
            sa.select(ev.c.batch_seq, ev.c.id, ev.c.effective_at, ev.c.raw)
            .where(ev.c.batch_seq.in_(missing) if len(missing) < len(chosen) else
                   ev.c.batch_seq.between(chosen[0].seq, chosen[-1].seq))
            .order_by(ev.c.batch_seq, ev.c.id)
        ).all():  # fmt: skip  # fetched at once: row by row costs more than the evaluation of a rule
            events[seq].append(StoredEvent(event_id, at, model.parsed(raw)))
    return [CommittedBatch(r.seq, r.source, r.state_key, r.committed_at, events[r.seq]) for r in chosen]


def iter_after(conn: sa.Connection, after: int, *, max_events: int = 20000) -> Iterator[CommittedBatch]:
    """Every committed batch after `after`, read in chunks of `read_after`."""
    while batches := read_after(conn, after, max_events=max_events):
        yield from batches
        after = batches[-1].seq
