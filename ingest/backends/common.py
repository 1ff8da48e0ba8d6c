"""What the backends share: the model's tables by name, Arrow tables of rows, the generic insert statement."""

from __future__ import annotations

import operator
import os
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert

from ingest import model

CHUNK = 10_000  # rows per record batch read back

TABLES = {t.name: t for t in (model.audit_events, *model.TYPED_TABLES, *model.DIMENSIONS)}

# Each column type's Arrow type (a pyarrow factory and its arguments). Subclasses before their base:
# BigInteger is an Integer, Double a Float. JSON is serialised text (model.dumps), tagged as Arrow's JSON
# type, which DuckDB takes without parsing it again to validate it.
_ARROW_TYPES: dict[type, tuple[str, ...]] = {
    sa.DateTime: ("timestamp", "us"),
    sa.JSON: ("json_",),
    sa.BigInteger: ("int64",),
    sa.Integer: ("int32",),
    sa.Boolean: ("bool_",),
    sa.Float: ("float64",),
    sa.Text: ("string",),
}

# Arrow's own allocator keeps freed memory for reuse: more memory at a run's peak than malloc's.
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")


def type_for(types: dict[type, Any], sql_type: sa.types.TypeEngine) -> Any:
    """`sql_type`'s entry in a table of column types keyed by SQLAlchemy type class."""
    for cls, value in types.items():
        if isinstance(sql_type, cls):
            return value
    raise TypeError(f"no bulk type for {sql_type!r}: add its class to the backend's table of types")


def arrow_type(sql_type: sa.types.TypeEngine):
    import pyarrow as pa

    factory, *args = type_for(_ARROW_TYPES, sql_type)
    return getattr(pa, factory)(*args)


def arrow_table(table: sa.Table, rows: list[dict]):
    """An Arrow table of `rows` (dicts with the same keys) with the column types of `table`."""
    import pyarrow as pa

    names = [c.name for c in table.columns if c.name in rows[0]]
    # Column by column from a transposed list: faster than `from_pylist`'s lookups row by row.
    columns = zip(*map(values_of(names), rows), strict=True)
    types = [arrow_type(table.c[n].type) for n in names]
    return pa.Table.from_arrays([pa.array(v, t) for v, t in zip(columns, types, strict=True)], names=names)


def values_of(names) -> Callable[[dict], tuple]:
    """A row's values of `names`, as a tuple (itemgetter's, which returns a bare value for one name).
    Every row has the same keys: model.normalise makes them so."""
    return operator.itemgetter(*names) if len(names) > 1 else lambda row: (row[names[0]],)


def is_arrow(rows) -> bool:
    return not isinstance(rows, list)


def json_text(value: object) -> str:
    # model.normalise serialises every JSON value once, with orjson; the engine passes the text on.
    return value if isinstance(value, str) else model.dumps(value)


def insert_statement(
    table: sa.Table, names: tuple[str, ...], source: sa.Select, update: Callable | None, returning: str | None,
    absent: bool,
) -> sa.Insert:  # fmt: skip
    """INSERT INTO table (names) SELECT source: ON CONFLICT DO NOTHING, or DO UPDATE SET `update(excluded)`, or,
    when the rows are known to be `absent`, neither. DuckDB speaks PostgreSQL's ON CONFLICT."""
    stmt = pg_insert(table).from_select(names, source)
    if update:
        stmt = stmt.on_conflict_do_update(
            index_elements=[c.name for c in table.primary_key], set_=update(stmt.excluded)
        )
    elif not absent:
        stmt = stmt.on_conflict_do_nothing()
    return stmt.returning(table.c[returning]) if returning else stmt


def entries_text(
    event_id: sa.ColumnElement, digest: sa.ColumnElement, by_bytes: Callable[[sa.ColumnElement], sa.ColumnElement]
) -> sa.ColumnElement:
    """The aggregate of ledger.entries_text over rows of (event id, digest): `<id> <digest>\\n` lines in id order,
    the ids compared by bytes (`Backend.by_bytes`)."""
    from sqlalchemy.dialects.postgresql import aggregate_order_by

    line = event_id + sa.literal(" ") + digest + sa.literal("\n")
    return sa.func.string_agg(line, aggregate_order_by(sa.literal(""), by_bytes(event_id)))
