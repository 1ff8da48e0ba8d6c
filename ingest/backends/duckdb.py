"""DuckDB: one file, one writing process, bulk writes as INSERT ... SELECT from Arrow tables.

Event tables carry no key (migration 0003): inserts of `audit_events` skip the ids stored already, searched
only in the batch's time range, which zone maps prune.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import sqlalchemy as sa

from ingest import model
from ingest.backends.common import CHUNK, TABLES, arrow_table, entries_text, insert_statement, is_arrow
from ingest.errors import DatabaseInUseError, IngestError

log = logging.getLogger("ingest.store")

T = TypeVar("T")

# Named up front: SQLAlchemy otherwise finds duckdb-engine through the installed packages' entry points,
# a tenth of a second of every run's start.
sa.dialects.registry.register("duckdb", "duckdb_engine", "Dialect")

# A writer's settings (a URL's query string overrides them). At the default 16 MB of WAL, DuckDB checkpoints
# every few batches, and each checkpoint re-compresses the whole last row group of every table it touched:
# most of a first run's time. One thread: a second only doubles the CPU of small inserts on a machine whose
# other core downloads. A memory limit keeps a run's memory flat whatever the size of the log (DuckDB's cache
# would otherwise grow to 80% of RAM); below 64 MB, a batch's inserts no longer fit, and a batch of unusually
# large events gets twice as much (`atomically`).
CONFIG = {"checkpoint_threshold": "256MB", "threads": 1, "memory_limit": "64MB"}
MEMORY_LIMIT_MAX = 4 * 2**30
_BYTES = {"B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, "P": 2**50}  # 'P': no limit

# A few values (a sweep's state) go as bound parameters: binding costs more than Arrow a row, and a long VALUES
# list outgrows the memory limit. So do a few rows more while the process has not imported pyarrow yet: a run
# that writes no more (the few events a quiet run's lookback sees again) never pays for that import, which costs
# more time and memory than binding them (benchmarks/README.md, "small batches").
_BOUND_VALUES = 10
_BOUND_BEFORE_ARROW = 400

# Every DuckDB transaction reads one snapshot.
SNAPSHOT: dict[str, str] = {}
NORMALISE_AHEAD = False
CONCURRENT_SOURCES = False
RAW_AS_SERVED = True


def engine_options(read_only: bool) -> dict[str, Any]:
    # No pool: the file is opened for a run and released after it, so others can open it between runs.
    # Closing discards what was not committed; a rollback first would only add a traceback to the one-line
    # error when DuckDB has invalidated the database (disk full, I/O error). Readers share the file.
    return {
        "poolclass": sa.pool.NullPool,
        "pool_reset_on_return": None,
        "connect_args": {"read_only": True} if read_only else {"config": CONFIG},
    }


@contextmanager
def lock(
    conn: sa.Connection, schema: str | None, name: str, *, wait: bool, stop: threading.Event | None
) -> Iterator[bool]:
    yield True  # the file lock already keeps every other process out


def translate(text: str, location: str) -> IngestError | None:
    lowered = text.lower()
    if "lock" in lowered and ("conflicting" in lowered or "could not set" in lowered):
        holder = re.search(r"PID (\d+)", text)
        return DatabaseInUseError(
            f"database {location} is in use by another process"
            + (f" (pid {holder[1]})" if holder else "")
            + ": wait for it to finish, or use PostgreSQL for concurrent access"
        )
    return None


def atomically(conn: sa.Connection, work: Callable[[], T]) -> T:
    """`work()` in one transaction. One that outgrows the memory limit (a batch of unusually large events) runs
    again with the limit doubled, up to MEMORY_LIMIT_MAX, rather than failing every run at the same batch."""
    while True:
        try:
            with conn.begin():
                return work()
        except sa.exc.DBAPIError as exc:
            if not _out_of_memory(exc.orig):
                raise
            with conn.begin():
                limit = str(conn.exec_driver_sql("SELECT current_setting('memory_limit')").scalar())
                size, unit = re.fullmatch(r"([\d.]+)\s*(\w+)", limit).groups()  # type: ignore[union-attr]
                doubled = 2 * float(size) * _BYTES[unit[0].upper()]
                if doubled > MEMORY_LIMIT_MAX:
                    raise exc from None
                conn.exec_driver_sql(f"SET memory_limit = '{int(doubled) // 2**10}KiB'")
            log.warning("a batch needed more than DuckDB's memory limit of %s: trying again with twice as much", limit)


def settle(conn: sa.Connection) -> None:
    # The checkpoint that closing the file would make, made now: it runs in the engine while the rules finish
    # their last round in Python (ingest.sync.feeding), rather than after them. While they are writing, DuckDB
    # refuses it: closing the file makes it then, as it would have.
    import duckdb

    try:
        conn.exec_driver_sql("CHECKPOINT")
        conn.commit()
    except sa.exc.DBAPIError as exc:
        conn.rollback()
        if not (isinstance(exc.orig, duckdb.TransactionException) and "Cannot CHECKPOINT" in str(exc.orig)):
            raise


def _out_of_memory(error: BaseException | None) -> bool:
    import duckdb

    # At commit, the same shortage comes as a TransactionException ("Failed to commit: failed to pin block").
    return isinstance(error, duckdb.OutOfMemoryException) or (
        isinstance(error, duckdb.TransactionException) and "failed to pin block" in str(error)
    )


def stage(batch: model.Batch) -> model.Batch:
    """One Arrow table per table (a few values stay rows: bound parameters), built before the first statement:
    Python work between DuckDB statements makes each of them wait for the GIL the download thread holds."""
    return model.Batch(
        arrow(model.audit_events, batch.events),
        {name: arrow(TABLES[name], rows) for name, rows in batch.typed.items() if rows},
        {name: arrow(TABLES[name], rows) for name, rows in batch.dimensions.items() if rows},
        batch.mismatches,
    )


def arrow(table: sa.Table, rows: list[dict]):
    """An Arrow table of `rows`; unchanged if they are a few values (a few more while pyarrow is not imported), or
    an Arrow table already."""
    if is_arrow(rows) or not rows:
        return rows
    values = len(rows) * len(rows[0])
    if values <= _BOUND_VALUES or (values <= _BOUND_BEFORE_ARROW and "pyarrow" not in sys.modules):
        return rows
    return arrow_table(table, rows)


def insert(
    conn: sa.Connection, table: sa.Table, names: tuple[str, ...], rows: Any,
    update: Callable | None, returning: str | None, absent: bool,
) -> list:  # fmt: skip
    # The statement's text is compiled once per shape: duckdb-engine turns SQLAlchemy's statement cache off,
    # and compiling an upsert costs more than inserting a batch. `update` is in the key as itself: callers pass
    # module-level functions, or one per table (store.newest_wins).
    translate_map = conn.get_execution_options().get("schema_translate_map")
    key = (table, names, update, returning, absent, translate_map and tuple(translate_map.items()))
    sql = _SQL.get(key)
    if sql is None:
        batch = sa.table("_batch", *map(sa.column, names))
        source = sa.select(*batch.c)
        if table is model.audit_events and not absent:
            source, absent = source.where(~_stored(batch)), True
        compiled = insert_statement(table, names, source, update, returning, absent).compile(
            dialect=conn.dialect, schema_translate_map=translate_map, render_schema_translate=bool(translate_map)
        )
        sql = _SQL[key] = str(compiled)
    staged = arrow(table, rows)
    if not is_arrow(staged):
        columns = ", ".join(f'"{n}"' for n in names)
        values = ", ".join(["(" + ", ".join("?" * len(names)) + ")"] * len(rows))
        params = tuple(row[n] for row in rows for n in names)
        result = conn.exec_driver_sql(f"WITH _batch ({columns}) AS (VALUES {values}) {sql}", params)
        return list(result.scalars()) if returning else []
    # Found by name by DuckDB's replacement scan, which looks in the calling frame: that is why the DuckDB
    # connection is called directly. Half the cost of registering the table as a view and dropping it.
    _batch = staged  # noqa: F841
    dbapi = conn.dialect.loaded_dbapi
    try:
        result = _driver(conn).execute(sql)
        return [r[0] for r in result.fetchall()] if returning else []
    except dbapi.Error as exc:  # a raw driver call: wrapped as SQLAlchemy would, for the error translation
        raise sa.exc.DBAPIError.instance(sql, None, exc, dbapi.Error) from exc


_SQL: dict[tuple, str] = {}


def _stored(batch: sa.TableClause) -> sa.Exists:
    """Whether a batch's event is stored. Only the batch's time range is searched: its events' effective_at
    bounds let DuckDB skip the other row groups by their zone maps."""
    events = model.audit_events.alias("stored")
    at = batch.c.effective_at
    return sa.exists().where(
        events.c.id == batch.c.id,
        events.c.effective_at.between(
            sa.select(sa.func.min(at)).scalar_subquery(), sa.select(sa.func.max(at)).scalar_subquery()
        ),
    )


def _driver(conn: sa.Connection) -> Any:
    """DuckDB's own connection under `conn`: its replacement scans and relations are not in the DB-API."""
    driver = conn.connection.driver_connection
    assert driver is not None, "a checked-out connection has its driver's"
    return driver


def read_events(conn: sa.Connection, schema: str | None, since, until, arrow_schema) -> Iterator:
    table = f'"{schema}".audit_events' if schema else "audit_events"
    names = ", ".join(f'"{n}"' for n in arrow_schema.names)
    # A relation's reader streams (an executed cursor's would copy every row first).
    relation = _driver(conn).sql(
        f"SELECT {names} FROM {table} WHERE effective_at >= ? AND effective_at < ? ORDER BY effective_at, id",
        params=[since, until],
    )
    with relation.to_arrow_reader(CHUNK) as reader:
        for batch in reader:
            yield batch.cast(arrow_schema)  # DuckDB's FLOAT is 32-bit


def batch_hashes(conn: sa.Connection) -> dict[int | None, tuple[int, str]]:
    """Each batch's event count and the SHA-256 of its ledger entries (ingest.ledger), computed by the engine from
    the stored text, which is canonical JSON (model.normalise writes it so)."""
    ev = model.audit_events
    sep = sa.literal("\x1f")
    unix = sa.cast(sa.cast(sa.func.epoch(ev.c.effective_at), sa.BigInteger), sa.Text)
    digest = sa.func.sha256(ev.c.id + sep + unix + sep + sa.cast(ev.c.raw, sa.Text))
    query = sa.select(ev.c.batch_seq, sa.func.count(), sha256_hex(entries_text(ev.c.id, digest, by_bytes))).group_by(
        ev.c.batch_seq
    )
    return {seq: (n, h) for seq, n, h in conn.execute(query)}


def by_bytes(text: sa.ColumnElement) -> sa.ColumnElement:
    return text  # DuckDB compares text by bytes


def sha256_hex(text: sa.ColumnElement) -> sa.ColumnElement:
    return sa.func.sha256(text)


@contextmanager
def all_cores(conn: sa.Connection) -> Iterator[None]:
    """A read of the whole warehouse (verify) in every core, with room for its hash tables: the writer's settings
    (CONFIG) suit small inserts, not that; they are set back after it."""
    driver = _driver(conn)
    driver.execute(f"SET threads TO {os.cpu_count() or 1}; SET memory_limit = '{MEMORY_LIMIT_MAX // 2**20}MB'")
    try:
        yield
    finally:
        driver.execute(f"SET threads TO {CONFIG['threads']}; SET memory_limit = '{CONFIG['memory_limit']}'")


# ------------------------------------------------------------------------ JSON in SQL (ingest.typed_sql)
class _JsonSQL:
    """JSON text and DuckDB's json functions. A path list parses raw once per event for all fields."""

    json: Any = model.JSON

    def found(
        self, family: model.Family, fields: list[str], where: sa.ColumnElement, events: sa.FromClause
    ) -> sa.Subquery:
        ev = events
        scopes = ["", *model.wrappers_of(family)]

        def paths(event_type: str) -> sa.ColumnElement:
            listed = ", ".join(_quote(_path(event_type, *filter(None, [s]), f)) for s in scopes for f in fields)
            return sa.func.json_extract(ev.c.raw, sa.literal_column(f"[{listed}]"), type_=sa.ARRAY(self.json))

        values = sa.case(*((ev.c.type == t, paths(t)) for t in family.types)).label("v")
        step = sa.select(ev.c.id.label("event_id"), values).where(ev.c.type.in_(family.types), where).subquery("raw")
        width = len(fields)

        def lookup(i: int) -> sa.ColumnElement:
            at = [sa.func.list_extract(step.c.v, s * width + i + 1, type_=self.json) for s in range(len(scopes))]
            return sa.func.coalesce(*at, type_=self.json) if len(at) > 1 else at[0]

        return sa.select(step.c.event_id, *(lookup(i).label(f"f{i}") for i in range(width))).subquery("found")

    def convert(self, x: sa.ColumnElement, kind: str) -> sa.ColumnElement:
        kind_of = sa.func.json_type(x)
        if kind == "str":
            return sa.case((kind_of == "VARCHAR", sa.func.json_extract_string(x, "$", type_=sa.Text)))
        if kind == "int":  # positive integers are UBIGINT to DuckDB, up to 2**64 - 1; larger ones and 1.0 DOUBLE
            fits = sa.or_(
                kind_of == "BIGINT", sa.and_(kind_of == "UBIGINT", sa.cast(x, sa.Numeric(20, 0)) <= 2**63 - 1)
            )
            return sa.case((fits, sa.cast(x, sa.BigInteger)))
        if kind == "bool":
            return sa.case((kind_of == "BOOLEAN", sa.cast(x, sa.Boolean)))
        return sa.case((kind_of == "OBJECT", x), else_=sa.null()).cast(self.json)

    def elements(self, x: sa.ColumnElement) -> sa.TableValuedAlias:
        items = sa.case((sa.func.json_type(x) == "ARRAY", sa.func.json_extract(x, "$[*]", type_=sa.ARRAY(self.json))))
        return sa.func.unnest(items).table_valued("item", with_ordinality="ord").render_derived("items")

    def member(self, item: sa.ColumnElement, name: str) -> sa.ColumnElement:
        return sa.func.json_extract(item, _path(name), type_=self.json)

    def normal(self, x: sa.ColumnElement) -> sa.ColumnElement:
        # DuckDB's own serialisation of the value: stored canonical text and derived text then compare equal.
        return sa.func.json_extract(x, "$", type_=self.json)


JSON_SQL = _JsonSQL()


def _path(*keys: str) -> str:
    """A JSON path of quoted keys: event types have dots."""
    return "$" + "".join('."' + k.replace('"', '\\"') + '"' for k in keys)


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
