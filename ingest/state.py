"""Rows of `sync_state`: a sweep's progress, or a consumer's checkpoint, as types with one key format.

Keys (source names hold no `:` or `#`, config.Source checks):

| kind | key | checkpoint |
|---|---|---|
| incremental | `<source>` or `<source>#tenant` | swept up to here (Unix s) |
| backfill | `backfill:<source>:<since>:<until>:<i>/<n>` (+ `#tenant`); one split off a running slice: `...:<until>:<top>` | set when the slice is done |
| slice | `slice:<source>:<top>` (+ `#tenant`): a part of the stream's split sweep | set when the part is done |
| consumer | `consumer:<name>` | the last committed batch it processed (ingest_batches.seq) |

A sweep covers [sweep_gte, sweep_lte] (Unix seconds, inclusive) newest first; `sweep_cursor` is the last id
of the pages committed so far. All three are NULL when no sweep is unfinished.

`<top>` is the slice's upper bound (sweep_lte). It names the slice uniquely among its sweep's slices: the slices
of a sweep are disjoint, each holds its own top, and a slice's top never moves (splitting one raises the lower
bound of the running part and gives the part below it a new slice).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import sqlalchemy as sa

from ingest import model
from ingest.store import insert_rows, now

TENANT = "#tenant"


@dataclass(frozen=True)
class Key:
    """A parsed state key."""

    kind: str  # incremental | backfill | slice | consumer
    name: str  # the source, or the consumer
    tenant: bool = False
    window: tuple[int, int] = (0, 0)  # backfill: [since, until); (0, 0) for the other kinds
    slice: tuple[int, int] = (0, 0)  # backfill: (i, n), its place in the backfill's first slicing
    top: int | None = None  # slice, and a backfill slice split off a running one: its upper bound

    @classmethod
    def parse(cls, text: str) -> Key:
        if text.startswith("consumer:"):
            return cls("consumer", text.removeprefix("consumer:"))
        body, tenant = (text.removesuffix(TENANT), True) if text.endswith(TENANT) else (text, False)
        if body.startswith("slice:"):
            _, source, top = body.split(":")
            return cls("slice", source, tenant, top=int(top))
        if not body.startswith("backfill:"):
            return cls("incremental", body, tenant)
        _, source, since, until, part = body.split(":")
        if "/" not in part:
            return cls("backfill", source, tenant, (int(since), int(until)), top=int(part))
        i, n = part.split("/")
        return cls("backfill", source, tenant, (int(since), int(until)), (int(i), int(n)))

    def __str__(self) -> str:
        if self.kind == "consumer":
            return f"consumer:{self.name}"
        suffix = TENANT if self.tenant else ""
        if self.kind == "incremental":
            return self.name + suffix
        if self.kind == "slice":
            return f"slice:{self.name}:{self.top}{suffix}"
        (since, until), (i, n) = self.window, self.slice
        part = f"{i}/{n}" if self.top is None else str(self.top)
        return f"backfill:{self.name}:{since}:{until}:{part}{suffix}"

    @staticmethod
    def backfill_prefix(source: str, since: int, until: int | None = None) -> str:
        """The start every slice key of the backfill from `since` (to `until`) has."""
        return f"backfill:{source}:{since}:" + ("" if until is None else f"{until}:")


@dataclass
class SweepState:
    """An incremental stream's or a backfill slice's row: its checkpoint and its unfinished sweep."""

    key: str
    source: str
    kind: str
    checkpoint: int | None = None
    sweep_gte: int | None = None
    sweep_lte: int | None = None
    sweep_cursor: str | None = None
    unavailable: str | None = None  # why the API refuses the stream, until a sweep of it completes

    @classmethod
    def load(cls, conn: sa.Connection, key: str) -> SweepState | None:
        row = _load(conn, key)
        return None if row is None else cls(**{k: row[k] for k in _SWEEP_FIELDS})

    @classmethod
    def for_key(cls, key: Key) -> SweepState:
        return cls(str(key), key.name, key.kind)

    @property
    def width(self) -> int:
        """Seconds in the sweep's window, both bounds included (a backfill slice's: both are set)."""
        assert self.sweep_gte is not None and self.sweep_lte is not None, "a bounded sweep"
        return self.sweep_lte - self.sweep_gte + 1

    @property
    def unfinished(self) -> bool:
        return self.sweep_lte is not None

    def start(self, gte: int | None, lte: int) -> None:
        """A new sweep of [gte, lte] (gte None: everything the API holds up to lte), from its top."""
        self.sweep_gte, self.sweep_lte, self.sweep_cursor = gte, lte, None

    def finish(self) -> None:
        """The sweep is complete: the checkpoint moves to its upper bound."""
        self.checkpoint, self.sweep_gte, self.sweep_lte, self.sweep_cursor = self.sweep_lte, None, None, None
        self.unavailable = None

    def save(self, conn: sa.Connection) -> None:
        _save(conn, asdict(self))


_SWEEP_FIELDS = ("key", "source", "kind", "checkpoint", "sweep_gte", "sweep_lte", "sweep_cursor", "unavailable")


@dataclass
class ConsumerState:
    """A consumer's checkpoint on the committed-batch log."""

    name: str
    seq: int = 0

    @classmethod
    def load(cls, conn: sa.Connection, name: str) -> ConsumerState | None:
        row = _load(conn, str(Key("consumer", name)))
        return None if row is None else cls(name, row["checkpoint"] or 0)

    def save(self, conn: sa.Connection) -> None:
        _save(conn, {"key": str(Key("consumer", self.name)), "source": self.name, "kind": "consumer",
                     "checkpoint": self.seq})  # fmt: skip


def _load(conn: sa.Connection, key: str) -> dict | None:
    row = conn.execute(sa.select(model.sync_state).where(model.sync_state.c.key == key)).mappings().first()
    return dict(row) if row else None


def _save(conn: sa.Connection, row: dict) -> None:
    row = {**row, "updated_at": now()}
    insert_rows(conn, model.sync_state, [row], update=_update_all_but_key)


def _update_all_but_key(excluded) -> dict:
    return {c.name: excluded[c.name] for c in model.sync_state.columns if c.name != "key"}
