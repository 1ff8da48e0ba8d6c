"""PostgreSQL: a server shared by several ingesters, bulk writes through binary COPY.

A batch of new events is COPied straight into its table; rows that may exist already (a lookback's events,
dimension upserts) are COPied into a temporary twin, then merged with one INSERT ... SELECT ... ON CONFLICT.
"""

from __future__ import annotations

import logging
import operator
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB

from ingest import model
from ingest.backends.common import CHUNK, insert_statement, json_text, type_for, values_of
from ingest.errors import IngestError

log = logging.getLogger("ingest.store")

T = TypeVar("T")

LOCK_POLL_SECONDS = 1.0  # a waiting ingester retries the lock this often
# A read of several statements that sees one snapshot (verify).
SNAPSHOT: dict[str, str] = {"isolation_level": "REPEATABLE READ"}
NORMALISE_AHEAD = True
CONCURRENT_SOURCES = True
RAW_AS_SERVED = False

# Each column type's name for binary COPY (psycopg's names: the compiled FLOAT is not one). Subclasses before
# their base: BigInteger is an Integer, Double a Float.
_COPY_TYPES: dict[type, str] = {
    sa.DateTime: "timestamp",
    sa.JSON: "jsonb",
    sa.BigInteger: "int8",
    sa.Integer: "int4",
    sa.Boolean: "bool",
    sa.Float: "float8",
    sa.Text: "text",
}


def engine_options(read_only: bool) -> dict[str, Any]:
    # No cap on overflow connections: a run's slice pool holds one a thread, 2 x workers (ingest.sync._pool), past
    # the default cap of 15 from 8 workers on; `workers` (at most 64) bounds them.
    options: dict[str, Any] = {"pool_pre_ping": True, "max_overflow": -1}
    if read_only:
        options["execution_options"] = {"postgresql_readonly": True}
    return options


@contextmanager
def lock(
    conn: sa.Connection, schema: str | None, name: str, *, wait: bool, stop: threading.Event | None
) -> Iterator[bool]:
    """A session-level advisory lock keyed by schema and name: it outlives the block's commits and dies with a
    killed ingester's connection. Waiting polls, so that `stop` is heard."""
    # 64 bits of a hash of schema and name; hashtextextended is hash partitioning's, stable across versions.
    key = (
        "hashtextextended(concat('audit-ingest:', coalesce(CAST(:schema AS text), current_schema()), ':', "
        "CAST(:name AS text)), 0)"
    )
    params = {"schema": schema, "name": name}

    def attempt() -> bool:
        with conn.begin():
            return bool(conn.execute(sa.text(f"SELECT pg_try_advisory_lock({key})"), params).scalar())

    held = attempt()
    if not held and wait:
        log.info("%s: another ingester holds its lock; waiting for it", name)
        stop = stop or threading.Event()
        while not held and not stop.wait(LOCK_POLL_SECONDS):
            held = attempt()
    try:
        yield held
    finally:
        if held:
            try:
                if conn.in_transaction():
                    conn.rollback()
                with conn.begin():
                    conn.execute(sa.text(f"SELECT pg_advisory_unlock({key})"), params)
            except sa.exc.DBAPIError:  # a broken connection: its session, and the lock, are gone already
                log.debug("could not release the lock of %s", name, exc_info=True)


def translate(text: str, location: str) -> IngestError | None:
    return None


def settle(conn: sa.Connection) -> None:
    pass  # the server checkpoints on its own schedule


def atomically(conn: sa.Connection, work: Callable[[], T]) -> T:
    with conn.begin():
        return work()


def stage(batch: model.Batch) -> model.Batch:
    return batch  # the rows, which COPY streams


def insert(
    conn: sa.Connection, table: sa.Table, names: tuple[str, ...], rows: list[dict],
    update: Callable | None, returning: str | None, absent: bool,
) -> list:  # fmt: skip
    if absent and not returning:  # nothing to merge: COPY straight into the table
        _copy(conn, table, names, rows)
        return []
    if table is model.audit_events and not update and _copied_new(conn, names, rows):
        return [row[returning] for row in rows] if returning else []
    # Primary-key order: concurrent ingesters (source_lock = false) then lock rows in one order, never deadlock.
    # Byte order for text: the order `_copied_new` inserts in, whatever the database's collation.
    key = [
        sa.column(c.name).collate("C") if isinstance(c.type, sa.Text) else sa.column(c.name) for c in table.primary_key
    ]
    source = _stage(conn, table, names, rows).order_by(*key)
    result = conn.execute(insert_statement(table, names, source, update, returning, absent))
    return [r[0] for r in result] if returning else []


def _copied_new(conn: sa.Connection, names: tuple[str, ...], rows: list[dict]) -> bool:
    """COPY events straight into `audit_events` when no stored event lies in their time range (a first run's
    batch, a backfill's); False, with nothing written, otherwise: the caller merges them instead.

    A third less of the server's time than staging and merging every batch (benchmarks/README.md). The check
    is one probe of the effective_at index; the savepoint covers a concurrent ingester storing one of them
    meanwhile. In the merge's key order (byte order: Python's for str, COLLATE "C" there), so that concurrent
    ingesters wait for each other instead of deadlocking.
    """
    events, at = model.audit_events, [row["effective_at"] for row in rows]
    stored = sa.select(sa.literal(1)).where(events.c.effective_at.between(min(at), max(at))).limit(1)
    if conn.execute(stored).first() is not None:
        return False
    try:
        with conn.begin_nested():
            _copy(conn, events, names, sorted(rows, key=operator.itemgetter("id")))
    except sa.exc.IntegrityError as exc:
        if getattr(exc.orig, "sqlstate", None) != "23505":  # anything but a unique violation is a real error
            raise
        return False
    return True


def _stage(conn: sa.Connection, table: sa.Table, names: tuple[str, ...], rows: list[dict]) -> sa.Select:
    """COPY the rows into the session's temporary twin of `table`; selects them from it.

    COPY is PostgreSQL's bulk path: a multi-row INSERT of a 5,000-event batch spends seconds in psycopg's
    client-side parsing of its 150,000 placeholders. The twin lives as long as the connection.
    """
    from psycopg import sql

    stage = sql.Identifier("pg_temp", f"_stage_{table.name}")
    columns = sql.SQL(", ").join(
        sql.SQL("{} {}").format(sql.Identifier(c.name), sql.SQL(c.type.compile(dialect=conn.dialect)))
        for c in table.columns
    )
    create = sql.SQL("CREATE TEMP TABLE IF NOT EXISTS {stage} ({columns}); TRUNCATE {stage}")
    _copy(conn, table, names, rows, stage, create.format(stage=stage, columns=columns))
    return sa.select(*[sa.column(n) for n in names]).select_from(sa.table(f"_stage_{table.name}", schema="pg_temp"))


def _copy(conn: sa.Connection, table: sa.Table, names: tuple[str, ...], rows: list[dict], target=None, before=None):
    """COPY `rows` into `table`, or into `target` (a psycopg identifier), after the statement `before`."""
    from psycopg import sql
    from psycopg.types.json import set_json_dumps

    if target is None:
        schema = (conn.get_execution_options().get("schema_translate_map") or {}).get(None)
        target = sql.Identifier(*filter(None, (schema, table.name)))
    dbapi = conn.dialect.loaded_dbapi
    try:
        with _driver(conn).cursor() as cursor:
            if before is not None:
                cursor.execute(before)
            # Binary: the server parses no text but the JSON's (a third less of the client's COPY time too).
            copy_sql = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
                target, sql.SQL(", ").join(map(sql.Identifier, names))
            )
            set_json_dumps(json_text, context=cursor)  # JSON values are serialised already (model.dumps)
            values = values_of(names)
            with cursor.copy(copy_sql) as copy:
                copy.set_types([type_for(_COPY_TYPES, table.c[n].type) for n in names])
                for row in rows:
                    copy.write_row(values(row))
    except dbapi.Error as exc:  # raw driver calls: wrapped as SQLAlchemy would, for the error translation
        raise sa.exc.DBAPIError.instance(f"COPY into {table.name}", None, exc, dbapi.Error) from exc


def _driver(conn: sa.Connection) -> Any:
    """psycopg's own connection under `conn`: COPY is not in the DB-API."""
    driver = conn.connection.driver_connection
    assert driver is not None, "a checked-out connection has its driver's"
    return driver


def read_events(conn: sa.Connection, schema: str | None, since, until, arrow_schema) -> Iterator:
    import pyarrow as pa

    events = model.audit_events
    # JSON as text: the raw JSON as stored, and no parsing of every value into Python objects.
    columns = [
        sa.cast(events.c[n], sa.Text).label(n) if isinstance(events.c[n].type, sa.JSON) else events.c[n]
        for n in arrow_schema.names
    ]
    query = (
        sa.select(*columns)
        .where(events.c.effective_at >= since, events.c.effective_at < until)
        .order_by(events.c.effective_at, events.c.id)
    )
    for rows in conn.execution_options(yield_per=CHUNK).execute(query).partitions():
        yield pa.RecordBatch.from_arrays(
            [pa.array(values, f.type) for values, f in zip(zip(*rows, strict=True), arrow_schema, strict=True)],
            schema=arrow_schema,
        )


@contextmanager
def all_cores(conn: sa.Connection) -> Iterator[None]:
    yield  # the server plans its own parallel workers


def batch_hashes(conn: sa.Connection) -> None:
    """None: `raw` is JSONB, whose text is not the canonical text the ledger hashed; ingest.verify computes it."""
    return None


def by_bytes(text: sa.ColumnElement) -> sa.ColumnElement:
    return text.collate("C")  # whatever the database's collation


def sha256_hex(text: sa.ColumnElement) -> sa.ColumnElement:
    return sa.func.encode(sa.func.sha256(sa.func.convert_to(text, "UTF8")), "hex")


# ------------------------------------------------------------------------ JSON in SQL (ingest.typed_sql)
class _JsonSQL:
    """jsonb and its operators: `->` is NULL for a missing key (or a non-object), JSON null otherwise."""

    json: Any = JSONB

    def found(
        self, family: model.Family, fields: list[str], where: sa.ColumnElement, events: sa.FromClause
    ) -> sa.Subquery:
        ev = events
        payload = ev.c.raw.op("->", return_type=JSONB)(ev.c.type).label("p")
        step = sa.select(ev.c.id.label("event_id"), payload).where(ev.c.type.in_(family.types), where).subquery("raw")
        scopes = [step.c.p, *(self.member(step.c.p, w) for w in model.wrappers_of(family))]
        return sa.select(
            step.c.event_id,
            *(
                sa.func.coalesce(*(self.member(s, f) for s in scopes), type_=JSONB).label(f"f{i}")
                for i, f in enumerate(fields)
            ),
        ).subquery("found")

    def convert(self, x: sa.ColumnElement, kind: str) -> sa.ColumnElement:
        kind_of = sa.func.jsonb_typeof(x)
        if kind == "str":
            return sa.case((kind_of == "string", x.op("#>>", return_type=sa.Text)(sa.literal_column("'{}'"))))
        if kind == "int":  # jsonb keeps a number's scale: 1.0 is text with a '.'
            text = sa.cast(x, sa.Text)
            integral = sa.and_(
                kind_of == "number", sa.func.strpos(text, ".") == 0, sa.func.strpos(sa.func.lower(text), "e") == 0
            )
            fits = sa.and_(integral, sa.cast(text, sa.Numeric).between(-(2**63), 2**63 - 1))
            return sa.case((fits, sa.cast(text, sa.BigInteger)))
        if kind == "bool":
            return sa.case((kind_of == "boolean", sa.cast(x, sa.Boolean)))
        return sa.case((kind_of == "object", x), else_=sa.null()).cast(JSONB)

    def elements(self, x: sa.ColumnElement) -> sa.TableValuedAlias:
        items = sa.case((sa.func.jsonb_typeof(x) == "array", x), else_=sa.cast(sa.literal("[]"), JSONB))
        return sa.func.jsonb_array_elements(items).table_valued("item", with_ordinality="ord").render_derived("items")

    def member(self, item: sa.ColumnElement, name: str) -> sa.ColumnElement:
        return item.op("->", return_type=JSONB)(sa.literal(name, sa.Text))

    def normal(self, x: sa.ColumnElement) -> sa.ColumnElement:
        return x  # jsonb compares by value


JSON_SQL = _JsonSQL()
