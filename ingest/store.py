"""The warehouse: connections, migrations, and `save_batch`, the one write path for events.

Writes take each engine's bulk path, one statement per table per batch. DuckDB: INSERT ... SELECT from an
Arrow table found by its name. PostgreSQL: binary COPY, straight into the table when the rows are new,
otherwise into a temporary table, then INSERT ... SELECT. Every insert is insert-if-absent, so a replayed
page changes nothing.
"""

from __future__ import annotations

import logging
import operator
import os
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert

from ingest import model
from ingest.errors import ConfigError, DatabaseError, DatabaseInUseError

log = logging.getLogger("ingest.store")

MIGRATIONS = next(
    p for p in (Path(__file__).parent / "migrations", Path(__file__).parent.parent / "migrations") if p.is_dir()
)
# Each column type's name for PostgreSQL's binary COPY (psycopg's names: the compiled FLOAT is not one) and
# its Arrow type for DuckDB (a pyarrow factory and its arguments). Subclasses before their base: BigInteger
# is an Integer, Double a Float. JSON is serialised text (model.dumps), tagged as Arrow's JSON type, which
# DuckDB takes without parsing it again to validate it: validating took a third of `audit_events`' inserts.
_COLUMN_TYPES = {
    sa.DateTime: ("timestamp", ("timestamp", "us")),
    sa.JSON: ("jsonb", ("json_",)),
    sa.BigInteger: ("int8", ("int64",)),
    sa.Integer: ("int4", ("int32",)),
    sa.Boolean: ("bool", ("bool_",)),
    sa.Float: ("float8", ("float64",)),
    sa.Text: ("text", ("string",)),
}


# Named up front: SQLAlchemy otherwise finds duckdb-engine through the installed packages' entry points,
# a tenth of a second of every run's start.
sa.dialects.registry.register("duckdb", "duckdb_engine", "Dialect")

# A writer's DuckDB settings (a URL's query string overrides them). At the default 16 MB of WAL, DuckDB
# checkpoints every few batches, and each checkpoint re-compresses the whole last row group of every table
# it touched: most of a first run's time. One thread: a second only doubles the CPU of small inserts on a
# machine whose other core downloads. A memory limit keeps a run's memory flat whatever the size of the log
# (DuckDB's cache would otherwise grow to 80% of RAM); below 64 MB, a batch's inserts no longer fit, and a
# batch of unusually large events gets twice as much (`atomically`).
DUCKDB_CONFIG = {"checkpoint_threshold": "256MB", "threads": 1, "memory_limit": "64MB"}

# Arrow's own allocator keeps freed memory for reuse: 25 MB more at the peak of a run than malloc's.
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")

LOCK_POLL_SECONDS = 1.0  # a waiting ingester retries the lock this often


def now() -> datetime:
    """Naive UTC, as every timestamp in the warehouse."""
    return datetime.now(UTC).replace(tzinfo=None)


class Warehouse:
    def __init__(self, url: str, schema: str | None = None, *, read_only: bool = False):
        self.url = url
        self.schema = schema
        try:
            url_obj = sa.engine.make_url(url)
        except sa.exc.ArgumentError:
            raise ConfigError(f"not a database URL: {url!r} (e.g. duckdb:///audit_logs.duckdb)") from None
        self.dialect = url_obj.get_backend_name()
        self.location = url_obj.database if self.dialect == "duckdb" else url_obj.render_as_string(hide_password=True)
        kwargs: dict = {"json_serializer": _json_text}
        if self.dialect == "duckdb":
            # No pool: the file is opened for a run and released after it, so others can open it between runs.
            kwargs["poolclass"] = sa.pool.NullPool
            # Closing discards what was not committed; a rollback first would only add a traceback to the
            # one-line error when DuckDB has invalidated the database (disk full, I/O error).
            kwargs["pool_reset_on_return"] = None
        else:
            kwargs["pool_pre_ping"] = True
        # `query` and `export` read only: DuckDB lets several read-only processes share the file.
        if read_only and self.dialect == "duckdb":
            kwargs["connect_args"] = {"read_only": True}
        elif read_only:
            kwargs["execution_options"] = {"postgresql_readonly": True}
        elif self.dialect == "duckdb":
            kwargs["connect_args"] = {"config": DUCKDB_CONFIG}
        try:
            self.engine = sa.create_engine(url_obj, **kwargs)
        except (sa.exc.ArgumentError, ImportError, sa.exc.NoSuchModuleError) as exc:
            raise ConfigError(
                f"unsupported database URL {url_obj.render_as_string(hide_password=True)}: {exc}"
            ) from None

    @contextmanager
    def connect(self) -> Iterator[sa.Connection]:
        """A connection for one run (with the schema applied); database failures become DatabaseError."""
        with translate_errors(self.location), self.engine.connect() as conn:
            yield conn.execution_options(schema_translate_map={None: self.schema}) if self.schema else conn

    def dispose(self) -> None:
        self.engine.dispose()

    @contextmanager
    def lock(
        self, conn: sa.Connection, name: str, *, wait: bool = False, stop: threading.Event | None = None
    ) -> Iterator[bool]:
        """Holds `name`'s lock on `conn` for the block; yields False if another session holds it (after waiting
        for it, polling so that `stop` is heard, when `wait`).

        PostgreSQL: a session-level advisory lock keyed by schema and name, so it outlives the block's commits
        and dies with a killed ingester's connection. DuckDB: its file lock already keeps other processes out.
        """
        if self.dialect != "postgresql":
            yield True
            return
        # 64 bits of a hash of schema and name; hashtextextended is hash partitioning's, stable across versions.
        key = (
            "hashtextextended(concat('audit-ingest:', coalesce(CAST(:schema AS text), current_schema()), ':', "
            "CAST(:name AS text)), 0)"
        )
        params = {"schema": self.schema, "name": name}

        def attempt() -> bool:
            with conn.begin():
                return conn.execute(sa.text(f"SELECT pg_try_advisory_lock({key})"), params).scalar()

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

    # ------------------------------------------------------------------------------------ migrations
    def current_revision(self, conn: sa.Connection) -> str | None:
        # Read directly: cheaper than importing Alembic on every run.
        if not sa.inspect(conn).has_table("alembic_version", schema=self.schema):
            return None
        version = sa.table("alembic_version", sa.column("version_num"), schema=self.schema)
        return conn.execute(sa.select(version.c.version_num)).scalar()

    def upgrade(self, revision: str = "head") -> list[str]:
        """Applies pending migrations; re-derives typed rows when a revision asks for it."""
        from alembic import command
        from alembic.config import Config
        from alembic.script import ScriptDirectory

        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        script = ScriptDirectory.from_config(config)
        # Ingesters starting together on a new database: one migrates, the others wait and find it done.
        with self.connect() as conn, self.lock(conn, "schema migrations", wait=True):
            # Only when missing: even IF NOT EXISTS needs CREATE on the database, which a schema's owner may lack.
            schemata = sa.text("SELECT count(*) FROM information_schema.schemata WHERE schema_name = :name")
            if self.schema and not conn.execute(schemata, {"name": self.schema}).scalar():
                conn.exec_driver_sql(f'CREATE SCHEMA "{self.schema}"')
            before = self.current_revision(conn)
            target = script.get_revision(revision).revision if revision != "head" else script.get_current_head()
            if before == target:
                return []
            pending = [r for r in script.iterate_revisions(target, before)][::-1]
            rebuild = before is not None and any(getattr(r.module, "REBUILD_TYPED", False) for r in pending)
            config.attributes.update(connection=conn, schema=self.schema)
            new = before is None and target == script.get_current_head() and not self._model_tables(conn)
            conn.commit()

            def migrate() -> None:
                if new:
                    # A new database gets the model as declared, stamped at the head: the schema the migrations
                    # build (tests/test_migrations.py), in a sixth of the time.
                    model.metadata.create_all(conn, checkfirst=False)
                    command.stamp(config, "head")
                else:
                    command.upgrade(config, revision)
                if rebuild and target == script.get_current_head():
                    log.info("re-derived typed rows of %d stored events", rebuild_typed(conn))

            # One transaction: a killed upgrade must not leave the new revision with typed rows missing.
            atomically(conn, migrate)
        applied = [r.revision for r in pending]
        log.info("database upgraded: %s", " -> ".join([before or "empty", *applied]))
        return applied

    def _model_tables(self, conn: sa.Connection) -> int:
        """How many of the model's tables the schema holds."""
        tables = sa.table("tables", sa.column("table_schema"), sa.column("table_name"), schema="information_schema")
        schema = sa.literal(self.schema) if self.schema else sa.func.current_schema()
        # Compared here, not in an IN list: DuckDB's information_schema with three dozen parameters needs more
        # than a small memory limit.
        query = sa.select(tables.c.table_name).where(tables.c.table_schema == schema)
        return len(set(conn.execute(query).scalars()) & set(model.metadata.tables))

    def ensure_schema(self) -> None:
        """Cheap check on every run; migrations only when the database is behind this version."""
        with self.connect() as conn:
            current = self.current_revision(conn)
        if current != HEAD_REVISION:
            self.upgrade()


def _head_revision() -> str:
    """The migrations' head, read from their files: importing Alembic would cost every run's start."""
    revisions, parents = set(), set()
    for path in (MIGRATIONS / "versions").glob("*.py"):
        text = path.read_text()
        revisions.add(re.search(r'^revision = "(\w+)"', text, re.M)[1])
        parent = re.search(r'^down_revision = "(\w+)"', text, re.M)
        if parent:
            parents.add(parent[1])
    (head,) = revisions - parents
    return head


HEAD_REVISION = _head_revision()


@contextmanager
def translate_errors(location: str) -> Iterator[None]:
    try:
        yield
    except sa.exc.DBAPIError as exc:
        text = str(exc.orig) if exc.orig is not None else str(exc)
        if "lock" in text.lower() and ("conflicting" in text.lower() or "could not set" in text.lower()):
            holder = re.search(r"PID (\d+)", text)
            raise DatabaseInUseError(
                f"database {location} is in use by another process"
                + (f" (pid {holder[1]})" if holder else "")
                + ": wait for it to finish, or use PostgreSQL for concurrent access"
            ) from None
        first_line = text.strip().splitlines()[0] if text.strip() else type(exc.orig).__name__
        raise DatabaseError(f"database error on {location}: {first_line}") from None


def _json_text(value: object) -> str:
    # model.normalise serialises every JSON value once, with orjson; the engine passes the text on.
    return value if isinstance(value, str) else model.dumps(value)


# ---------------------------------------------------------------------------------------- writes
T = TypeVar("T")


def atomically(conn: sa.Connection, work: Callable[[], T]) -> T:
    """`work()` in one transaction.

    DuckDB: a transaction that outgrows the writer's memory limit (a batch of unusually large events) runs
    again with the limit doubled, up to MEMORY_LIMIT_MAX, rather than failing every run at the same batch.
    """
    while True:
        try:
            with conn.begin():
                return work()
        except sa.exc.DBAPIError as exc:
            if conn.dialect.name != "duckdb" or not _out_of_memory(exc.orig):
                raise
            with conn.begin():
                limit = conn.exec_driver_sql("SELECT current_setting('memory_limit')").scalar()
                size, unit = re.match(r"([\d.]+)\s*(\w+)", limit).groups()
                doubled = 2 * float(size) * _BYTES[unit[0].upper()]
                if doubled > MEMORY_LIMIT_MAX:
                    raise exc from None
                conn.exec_driver_sql(f"SET memory_limit = '{int(doubled) // 2**10}KiB'")
            log.warning("a batch needed more than DuckDB's memory limit of %s: trying again with twice as much", limit)


def _out_of_memory(error: BaseException | None) -> bool:
    import duckdb

    # At commit, the same shortage comes as a TransactionException ("Failed to commit: failed to pin block").
    return isinstance(error, duckdb.OutOfMemoryException) or (
        isinstance(error, duckdb.TransactionException) and "failed to pin block" in str(error)
    )


_BYTES = {"B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, "P": 2**50}  # 'P': no limit
MEMORY_LIMIT_MAX = 4 * 2**30


def insert_rows(
    conn: sa.Connection,
    table: sa.Table,
    rows,
    *,
    update: dict | None = None,
    returning: str | None = None,
    absent: bool = False,
) -> list:
    """Insert-if-absent (or upsert with `update(excluded) -> set_`), one statement; returns `returning` values.

    `rows`: dicts, or on DuckDB a pyarrow Table (`stage`).
    `absent`: the rows are known to be new (typed rows of events this transaction inserted), so a plain
    INSERT does: DuckDB's conflict check costs more than the insert of a typed table's rows.
    """
    if not len(rows):
        return []
    present = rows.column_names if _is_arrow(rows) else rows[0]
    names = tuple(c.name for c in table.columns if c.name in present)
    if conn.dialect.name == "duckdb":
        return _insert_duckdb(conn, table, names, rows, update, returning, absent)
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
    result = conn.execute(_insert(table, names, source, update, returning, absent))
    return [r[0] for r in result] if returning else []


def _insert(table: sa.Table, names: tuple[str, ...], source: sa.Select, update, returning, absent) -> sa.Insert:
    stmt = pg_insert(table).from_select(names, source)
    if update:
        stmt = stmt.on_conflict_do_update(
            index_elements=[c.name for c in table.primary_key], set_=update(stmt.excluded)
        )
    elif not absent:
        stmt = stmt.on_conflict_do_nothing()
    return stmt.returning(table.c[returning]) if returning else stmt


def _insert_duckdb(conn: sa.Connection, table: sa.Table, names: tuple[str, ...], rows, update, returning, absent):
    # The statement's text is compiled once per shape: duckdb-engine turns SQLAlchemy's statement cache off,
    # and compiling an upsert costs more than inserting a batch. `update` must depend on the table and the
    # columns only (true of `_newest_wins` and `save_state`'s), as its code object stands for it in the key.
    translate = conn.get_execution_options().get("schema_translate_map")
    key = (table, names, update and update.__code__, returning, absent, translate and tuple(translate.items()))
    sql = _DUCKDB_SQL.get(key)
    if sql is None:
        batch = sa.table("_batch", *map(sa.column, names))
        source = sa.select(*batch.c)
        if table is model.audit_events and not absent:
            source, absent = source.where(~_stored(batch)), True
        compiled = _insert(table, names, source, update, returning, absent).compile(
            dialect=conn.dialect, schema_translate_map=translate, render_schema_translate=bool(translate)
        )
        sql = _DUCKDB_SQL[key] = str(compiled)
    staged = _arrow(table, rows)
    if not _is_arrow(staged):
        # A few values (a sweep's state) go as parameters: a sweep that fetches nothing then never imports
        # pyarrow (a tenth of a quiet run's start-up). Only a few: binding costs about 0.25 ms a value
        # (a 20-row upsert of `projects` took 20 ms bound, 4 ms from Arrow).
        columns = ", ".join(f'"{n}"' for n in names)
        values = ", ".join(["(" + ", ".join("?" * len(names)) + ")"] * len(rows))
        params = tuple(row[n] for row in rows for n in names)
        result = conn.exec_driver_sql(f"WITH _batch ({columns}) AS (VALUES {values}) {sql}", params)
        return result.scalars().all() if returning else []
    # Found by name by DuckDB's replacement scan, which looks in the calling frame: that is why the DuckDB
    # connection is called directly. Half the cost of registering the table as a view and dropping it.
    _batch = staged  # noqa: F841
    dbapi = conn.dialect.loaded_dbapi
    try:
        result = conn.connection.driver_connection.execute(sql)
        return [r[0] for r in result.fetchall()] if returning else []
    except dbapi.Error as exc:  # a raw driver call: wrapped as SQLAlchemy would, for translate_errors
        raise sa.exc.DBAPIError.instance(sql, None, exc, dbapi.Error) from exc


_BOUND_VALUES = 10


def _stored(batch: sa.TableClause) -> sa.Exists:
    """DuckDB: whether a batch's event is stored (no key there, migration 0003). Only the batch's time range
    is searched: its events' effective_at bounds let DuckDB skip the other row groups by their zone maps."""
    events = model.audit_events.alias("stored")
    at = batch.c.effective_at
    return sa.exists().where(
        events.c.id == batch.c.id,
        events.c.effective_at.between(
            sa.select(sa.func.min(at)).scalar_subquery(), sa.select(sa.func.max(at)).scalar_subquery()
        ),
    )


_DUCKDB_SQL: dict[tuple, str] = {}


def _copied_new(conn: sa.Connection, names: tuple[str, ...], rows: list[dict]) -> bool:
    """PostgreSQL: COPY events straight into `audit_events` when no stored event lies in their time range (a
    first run's batch, a backfill's); False, with nothing written, otherwise: the caller merges them instead.

    A third less of the server's time than staging and merging every batch (benchmarks/README.md). The check
    is one probe of the effective_at index (an id probe of 5,000 ids took 17 ms); the savepoint covers a
    concurrent ingester storing one of them meanwhile. In the merge's key order (byte order: Python's for
    str, COLLATE "C" there), so that concurrent ingesters wait for each other instead of deadlocking.
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
    """PostgreSQL: COPY the rows into the session's temporary twin of `table`; selects them from it.

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
    """PostgreSQL: COPY `rows` into `table`, or into `target` (a psycopg identifier), after the statement `before`."""
    from psycopg import sql
    from psycopg.types.json import set_json_dumps

    if target is None:
        schema = (conn.get_execution_options().get("schema_translate_map") or {}).get(None)
        target = sql.Identifier(*filter(None, (schema, table.name)))
    dbapi = conn.dialect.loaded_dbapi
    try:
        with conn.connection.driver_connection.cursor() as cursor:
            if before is not None:
                cursor.execute(before)
            # Binary: the server parses no text but the JSON's (a third less of the client's COPY time too).
            copy_sql = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
                target, sql.SQL(", ").join(map(sql.Identifier, names))
            )
            set_json_dumps(_json_text, context=cursor)  # JSON values are serialised already (model.dumps)
            values = _values(names)
            with cursor.copy(copy_sql) as copy:
                copy.set_types([_copy_type(table.c[n].type) for n in names])
                for row in rows:
                    copy.write_row(values(row))
    except dbapi.Error as exc:  # raw driver calls: wrap as SQLAlchemy would, for translate_errors
        raise sa.exc.DBAPIError.instance(f"COPY into {table.name}", None, exc, dbapi.Error) from exc


def _column_type(sql_type: sa.types.TypeEngine) -> tuple[str, tuple[str, ...]]:
    for cls, types in _COLUMN_TYPES.items():
        if isinstance(sql_type, cls):
            return types
    raise TypeError(f"no bulk type for {sql_type!r}: add it to store._COLUMN_TYPES")


def _copy_type(sql_type: sa.types.TypeEngine) -> str:
    return _column_type(sql_type)[0]


def _arrow_type(sql_type: sa.types.TypeEngine):
    import pyarrow as pa

    factory, *args = _column_type(sql_type)[1]
    return getattr(pa, factory)(*args)


def _newest_wins(table: sa.Table):
    """Dimension merge: keep the earliest first_seen, the latest last_seen, and the newest attributes."""

    def set_(excluded):
        newer = excluded.last_seen >= table.c.last_seen
        values = {
            "first_seen": sa.func.least(table.c.first_seen, excluded.first_seen),
            "last_seen": sa.func.greatest(table.c.last_seen, excluded.last_seen),
        }
        for col in table.columns:
            if col.name not in ("id", "first_seen", "last_seen"):
                values[col.name] = sa.case(
                    (newer, sa.func.coalesce(excluded[col.name], col)), else_=sa.func.coalesce(col, excluded[col.name])
                )
        return values

    return set_


def stage(dialect: str, batch: model.Batch) -> model.Batch:
    """The batch in `dialect`'s bulk form for `save_batch`. DuckDB: one Arrow table per table (a few values stay
    rows: bound parameters), built before the first statement: Python work between DuckDB statements makes
    each of them wait for the GIL the download thread holds meanwhile. PostgreSQL: the rows, which COPY streams."""
    if dialect != "duckdb":
        return batch
    return model.Batch(
        _arrow(model.audit_events, batch.events),
        {name: _arrow(_TABLES[name], rows) for name, rows in batch.typed.items() if rows},
        {name: _arrow(_TABLES[name], rows) for name, rows in batch.dimensions.items() if rows},
        batch.mismatches,
    )


_TABLES = {t.name: t for t in (*model.TYPED_TABLES, *model.DIMENSIONS)}


def _arrow(table: sa.Table, rows: list[dict]):
    """An Arrow table of `rows`; unchanged if they are a few values, or an Arrow table already."""
    if _is_arrow(rows) or not rows or len(rows) * len(rows[0]) <= _BOUND_VALUES:
        return rows
    import pyarrow as pa

    names = [c.name for c in table.columns if c.name in rows[0]]
    # Column by column from a transposed list: a third faster than `from_pylist`'s lookups row by row.
    columns = zip(*map(_values(names), rows), strict=True)
    types = [_arrow_type(table.c[n].type) for n in names]
    return pa.Table.from_arrays([pa.array(v, t) for v, t in zip(columns, types, strict=True)], names=names)


def _values(names) -> Callable[[dict], tuple]:
    """A row's values of `names`, as a tuple (itemgetter's, which returns a bare value for one name).
    Every row has the same keys: model.normalise makes them so."""
    return operator.itemgetter(*names) if len(names) > 1 else lambda row: (row[names[0]],)


def _is_arrow(rows) -> bool:
    return not isinstance(rows, list)


def save_batch(conn: sa.Connection, batch: model.Batch, seq: int | None = None) -> set[str]:
    """Writes the batch, rows or `stage`d (inside the caller's transaction), its new events with
    `batch_seq = seq` (ingest.batchlog); returns the ids of new events.

    Typed rows are written only for new events: a replayed event already has them.
    """
    new = set(insert_rows(conn, model.audit_events, _with_seq(batch.events, seq), returning="id"))
    replayed = len(new) < len(batch.events)
    if new:
        for table in model.TYPED_TABLES:
            rows = batch.typed.get(table.name, [])
            insert_rows(conn, table, _of(rows, new) if replayed else rows, absent=True)
    for table in model.DIMENSIONS:
        insert_rows(conn, table, batch.dimensions.get(table.name, []), update=_newest_wins(table))
    return new


def _with_seq(rows, seq: int | None):
    """The event rows with their batch's sequence number."""
    if not len(rows):
        return rows
    if not _is_arrow(rows):
        return [{**row, "batch_seq": seq} for row in rows]
    import pyarrow as pa

    return rows.append_column("batch_seq", pa.repeat(pa.scalar(seq, pa.int64()), len(rows)))


def span_of(rows, events: set[str]) -> tuple[datetime, datetime]:
    """The earliest and latest effective_at of `events` among the batch's event rows."""
    if not _is_arrow(rows):
        times = [r["effective_at"] for r in rows if r["id"] in events]
        return min(times), max(times)
    import pyarrow.compute as pc

    bounds = pc.min_max(_of(rows.select(["id", "effective_at"]).rename_columns(["event_id", "at"]), events)["at"])
    return bounds["min"].as_py(), bounds["max"].as_py()


def _of(rows, events: set[str]):
    """The typed rows of `events`."""
    if not _is_arrow(rows):
        return [r for r in rows if r["event_id"] in events]
    import pyarrow as pa
    import pyarrow.compute as pc

    return rows.filter(pc.is_in(rows["event_id"], value_set=pa.array(list(events), pa.string())))


def save_rejected(conn: sa.Connection, source: str, rejected: list[tuple[str, str]]) -> None:
    import hashlib

    at = now()
    rows = {}
    for text, reason in rejected:
        key = hashlib.sha256(f"{source}\0{text}".encode()).hexdigest()
        rows[key] = {"id": key, "source": source, "reason": reason, "raw_text": text, "received_at": at}
    insert_rows(conn, model.rejected_events, list(rows.values()))


def rebuild_typed(conn: sa.Connection, chunk: int = 5000) -> int:
    """Re-derives every typed row from `raw` (after a model change); needs no API call."""
    import orjson

    for table in reversed(model.TYPED_TABLES):
        conn.execute(table.delete())
    events = model.audit_events
    count, last = 0, ""
    while True:
        rows = conn.execute(
            sa.select(events.c.id, events.c.source, events.c.raw, events.c.ingested_at)
            .where(events.c.id > last)
            .order_by(events.c.id)
            .limit(chunk)
        ).all()
        if not rows:
            return count
        batch = model.Batch(typed={t.name: [] for t in model.TYPED_TABLES})
        for row in rows:
            raw = row.raw if isinstance(row.raw, dict) else orjson.loads(row.raw)
            family = model.FAMILY_OF_TYPE.get(raw.get("type"))
            if family is not None:
                model.typed_rows(batch.typed, family, row.id, raw.get(raw["type"]))
        for table in model.TYPED_TABLES:
            insert_rows(conn, table, batch.typed[table.name], absent=True)
        count += len(rows)
        last = rows[-1].id
