"""Completeness coverage: the union of the completed sweeps' windows per stream (`sweep_windows`), and its gaps.

A window [gte, lte] (Unix seconds, both included) is recorded when a sweep of it completes, in the transaction
of the sweep's final state save: every event the API served in it is then stored. Incremental sweeps, the
slices of a split sweep, backfill slices and reconciliations all record theirs. A first sync without `start`
has no lower bound; it covers what the API still held when it ended, from `retention` before then (or from its
top, when that is older: the oldest slice of a split first sync).

Windows that overlap or touch merge on insert, so a stream synced every few minutes keeps one row. The time
between two windows is a gap; a gap older than the API's retention is lost upstream: nothing can fetch it again.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa

from ingest import batchlog, model
from ingest.state import TENANT
from ingest.store import insert_rows, now


@dataclass(frozen=True)
class Window:
    gte: int
    lte: int  # included

    @property
    def seconds(self) -> int:
        return self.lte - self.gte + 1


@dataclass(frozen=True)
class Gap(Window):
    lost: bool  # older than the API's retention: lost upstream


def stream_key(source: str, tenant: bool) -> str:
    """The stream's name, the key of its incremental `sync_state` row: `<source>` or `<source>#tenant`."""
    return source + (TENANT if tenant else "")


def record(conn: sa.Connection, source: str, tenant: bool, gte: int, lte: int, kind: str) -> None:
    """Adds [gte, lte] to the stream's coverage, in the caller's transaction: the rows it overlaps or touches are
    replaced by one row of their union."""
    assert gte <= lte, f"an empty window [{gte}, {lte}]"
    batchlog.hold(conn)  # first: concurrent ingesters merging windows of one stream would deadlock
    table, stream = model.sweep_windows, stream_key(source, tenant)
    touching = sa.and_(table.c.stream == stream, table.c.gte <= lte + 1, table.c.lte >= gte - 1)
    for found in conn.execute(sa.select(table.c.gte, table.c.lte).where(touching)):
        gte, lte = min(gte, found.gte), max(lte, found.lte)
    # The row already starting at the union's start is updated, not deleted and inserted again: DuckDB refuses a
    # key deleted and inserted in one transaction.
    conn.execute(table.delete().where(touching, table.c.gte != gte))
    row = {"stream": stream, "source": source, "gte": gte, "lte": lte, "kind": kind, "updated_at": now()}
    # An upsert: another ingester (PostgreSQL, source_lock = false) may have written the same lower bound.
    insert_rows(conn, table, [row], update=_widest)


def _widest(excluded) -> dict:
    table = model.sweep_windows
    return {
        "lte": sa.func.greatest(table.c.lte, excluded.lte),
        "kind": excluded.kind,
        "updated_at": excluded.updated_at,
    }


def union(conn: sa.Connection, source: str, tenant: bool) -> list[Window]:
    """The stream's covered windows, oldest first, merged (rows written concurrently may overlap)."""
    table = model.sweep_windows
    rows = conn.execute(
        sa.select(table.c.gte, table.c.lte).where(table.c.stream == stream_key(source, tenant)).order_by(table.c.gte)
    )
    merged: list[Window] = []
    for row in rows:
        if merged and row.gte <= merged[-1].lte + 1:
            merged[-1] = Window(merged[-1].gte, max(merged[-1].lte, row.lte))
        else:
            merged.append(Window(row.gte, row.lte))
    return merged


def gaps(windows: list[Window], since: int, until: int, *, now: int, retention: int) -> list[Gap]:
    """The seconds of [since, until] (both included) no window covers, oldest first; a gap that straddles the
    retention cutoff (`now - retention`) is split into its lost and its recoverable part."""
    holes, at = [], since
    for w in windows:
        if w.gte > at:
            holes.append(Window(at, min(w.gte - 1, until)))
        at = max(at, w.lte + 1)
        if at > until:
            break
    if at <= until:
        holes.append(Window(at, until))
    cutoff, result = now - retention, []
    for h in (h for h in holes if h.gte <= h.lte):
        if h.gte < cutoff <= h.lte:
            result += [Gap(h.gte, cutoff - 1, True), Gap(cutoff, h.lte, False)]
        else:
            result.append(Gap(h.gte, h.lte, h.lte < cutoff))
    return result


@dataclass(frozen=True)
class Coverage:
    """One stream's coverage, as `status` shows it."""

    source: str
    tenant: bool
    windows: list[Window]
    gaps: list[Gap]  # between its first window and its last

    @property
    def complete_from(self) -> int | None:
        """The start of the newest window: from there to its end, nothing is missing."""
        return self.windows[-1].gte if self.windows else None

    @property
    def lost_seconds(self) -> int:
        return sum(g.seconds for g in self.gaps if g.lost)


def streams(conn: sa.Connection, *, now: int, retention: int) -> list[Coverage]:
    """The coverage of every stream with a recorded window, by source, the main stream first."""
    table = model.sweep_windows
    found = conn.execute(sa.select(table.c.source, table.c.stream).distinct()).all()
    result = []
    for source, stream in sorted(found, key=lambda r: (r.source, r.stream)):
        tenant = stream.endswith(TENANT)
        windows = union(conn, source, tenant)
        holes = gaps(windows, windows[0].gte, windows[-1].lte, now=now, retention=retention)
        result.append(Coverage(source, tenant, windows, holes))
    return result
