"""The warehouse: connections, migrations, and `save_batch`, the one write path for events.

Generic: what differs between engines (engine settings, locks, transactions, the bulk writers, reading
events back, error texts) is in the URL dialect's module of `ingest.backends`. Every insert is
insert-if-absent, so a replayed page changes nothing.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa

from ingest import backends, model, typed_sql
from ingest.backends.common import is_arrow, json_text
from ingest.errors import ConfigError, DatabaseError

log = logging.getLogger("ingest.store")

MIGRATIONS = next(
    p for p in (Path(__file__).parent / "migrations", Path(__file__).parent.parent / "migrations") if p.is_dir()
)


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
        # Before anything is created: an unsupported URL names the supported backends and opens nothing.
        self.backend = backends.for_dialect(self.dialect)
        self.location = url_obj.database if self.dialect == "duckdb" else url_obj.render_as_string(hide_password=True)
        # JSON read back with orjson (model.parsed): a tenth of the stdlib's time, over every event a consumer reads.
        options = {
            "json_serializer": json_text,
            "json_deserializer": model.parsed,
            **self.backend.engine_options(read_only),
        }
        try:
            self.engine = sa.create_engine(url_obj, **options)
        except (sa.exc.ArgumentError, ImportError, sa.exc.NoSuchModuleError) as exc:
            raise ConfigError(
                f"unsupported database URL {url_obj.render_as_string(hide_password=True)}: {exc}"
            ) from None

    @contextmanager
    def connect(self) -> Iterator[sa.Connection]:
        """A connection for one run (with the schema applied); database failures become DatabaseError."""
        with self._translate_errors(), self.engine.connect() as conn:
            yield conn.execution_options(schema_translate_map={None: self.schema}) if self.schema else conn

    @contextmanager
    def _translate_errors(self) -> Iterator[None]:
        """Driver errors as one line: the backend's own where it knows better (a held file), else DatabaseError."""
        try:
            yield
        except sa.exc.DBAPIError as exc:
            text = str(exc.orig) if exc.orig is not None else str(exc)
            known = self.backend.translate(text, str(self.location))
            if known is not None:
                raise known from None
            first_line = text.strip().splitlines()[0] if text.strip() else type(exc.orig).__name__
            raise DatabaseError(f"database error on {self.location}: {first_line}") from None

    def dispose(self) -> None:
        self.engine.dispose()

    def settle(self, conn: sa.Connection) -> None:
        """After a sync's writes: the engine's work of closing the warehouse, done now (DuckDB's checkpoint), in
        its own transaction on `conn`."""
        self.backend.settle(conn)

    def lock(
        self, conn: sa.Connection, name: str, *, wait: bool = False, stop: threading.Event | None = None
    ) -> contextlib.AbstractContextManager[bool]:
        """Holds `name`'s lock on `conn` for the block; yields False if another session holds it (after waiting
        for it, polling so that `stop` is heard, when `wait`)."""
        return self.backend.lock(conn, self.schema, name, wait=wait, stop=stop)

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
        revision = re.search(r'^revision = "(\w+)"', text, re.M)
        assert revision, f"{path.name} names no revision"
        revisions.add(revision[1])
        parent = re.search(r'^down_revision = "(\w+)"', text, re.M)
        if parent:
            parents.add(parent[1])
    (head,) = revisions - parents
    return head


HEAD_REVISION = _head_revision()


T = TypeVar("T")


def atomically(conn: sa.Connection, work: Callable[[], T]) -> T:
    """`work()` in one transaction (DuckDB: with its memory limit raised for a batch that outgrows it)."""
    return backends.for_dialect(conn.dialect.name).atomically(conn, work)


def stage(dialect: str, batch: model.Batch) -> model.Batch:
    """The batch in `dialect`'s bulk form for `save_batch`, built before its transaction starts."""
    return backends.for_dialect(dialect).stage(batch)


def insert_rows(
    conn: sa.Connection,
    table: sa.Table,
    rows: Any,
    *,
    update: Callable | None = None,
    returning: str | None = None,
    absent: bool = False,
) -> list:
    """Insert-if-absent (or upsert with `update(excluded) -> set_`), one statement; returns `returning` values.

    `rows`: dicts, or the backend's staged form (`stage`). `update` must be a module-level function or one
    made once per table (`newest_wins`): DuckDB caches statements by it.
    `absent`: the rows are known to be new (typed rows of events this transaction inserted), so a plain
    INSERT does: DuckDB's conflict check costs more than the insert of a typed table's rows.
    """
    if not len(rows):
        return []
    present = rows.column_names if is_arrow(rows) else rows[0]
    names = tuple(c.name for c in table.columns if c.name in present)
    return backends.for_dialect(conn.dialect.name).insert(conn, table, names, rows, update, returning, absent)


@functools.cache
def newest_wins(table: sa.Table) -> Callable:
    """Dimension merge: keep the earliest first_seen, the latest last_seen, and the newest attributes."""

    def set_(excluded):
        newer = excluded.last_seen >= table.c.last_seen
        values: dict[str, Any] = {
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
            insert_rows(conn, table, rows_of(rows, new) if replayed else rows, absent=True)
    for table in model.DIMENSIONS:
        insert_rows(conn, table, batch.dimensions.get(table.name, []), update=newest_wins(table))
    return new


def _with_seq(rows, seq: int | None):
    """The event rows with their batch's sequence number."""
    if not len(rows):
        return rows
    if not is_arrow(rows):
        return [{**row, "batch_seq": seq} for row in rows]
    import pyarrow as pa

    return rows.append_column("batch_seq", pa.repeat(pa.scalar(seq, pa.int64()), len(rows)))


def unstored(conn: sa.Connection, events: list[dict], until: int) -> list[dict]:
    """`events` (as served) without those stored already, when some of them are as old as `until` (a lookback's
    replays): looked up by id within the time range of them all, where the insert-if-absent would find them, of
    any source as it does (in a transaction of its own). It only saves work: the insert-if-absent keeps every
    event once, and what it leaves out is what that would."""
    times = [e["effective_at"] for e in events]
    if not times or min(times) > until:
        return events
    ev = model.audit_events
    window = ev.c.effective_at.between(model.to_datetime(min(times)), model.to_datetime(max(times)))
    with conn.begin():
        stored = set(conn.execute(sa.select(ev.c.id).where(window)).scalars())
    return [e for e in events if e["id"] not in stored] if stored else events


def span_of(rows) -> tuple[datetime, datetime]:
    """The earliest and latest effective_at among event rows (dicts, or the DuckDB backend's Arrow table)."""
    if not is_arrow(rows):
        times = [r["effective_at"] for r in rows]
        return min(times), max(times)
    import pyarrow.compute as pc

    bounds = pc.min_max(rows["effective_at"])
    return bounds["min"].as_py(), bounds["max"].as_py()


def rows_of(rows, ids: set[str], key: str = "event_id"):
    """The rows (dicts, or an Arrow table) whose `key` is one of `ids`: typed rows of some events, or (key `id`)
    the events themselves."""
    if not is_arrow(rows):
        return [r for r in rows if r[key] in ids]
    import pyarrow as pa
    import pyarrow.compute as pc

    return rows.filter(pc.is_in(rows[key], value_set=pa.array(list(ids), pa.string())))


def save_rejected(conn: sa.Connection, source: str, rejected: list[tuple[str, str]]) -> None:
    import hashlib

    at = now()
    rows = {}
    for text, reason in rejected:
        key = hashlib.sha256(f"{source}\0{text}".encode()).hexdigest()
        rows[key] = {"id": key, "source": source, "reason": reason, "raw_text": text, "received_at": at}
    insert_rows(conn, model.rejected_events, list(rows.values()))


def rebuild_typed(conn: sa.Connection) -> int:
    """Re-derives every typed row from `raw` (after a model change), in the engine (ingest.typed_sql); needs no API
    call. Returns the number of stored events."""
    derived = typed_sql.derivations(conn.dialect.name)
    with backends.for_dialect(conn.dialect.name).all_cores(conn):
        for table in reversed(model.TYPED_TABLES):
            conn.execute(table.delete())
        for table in model.TYPED_TABLES:
            conn.execute(table.insert().from_select([c.name for c in table.columns], derived[table.name]))
    return conn.execute(sa.select(sa.func.count()).select_from(model.audit_events)).scalar_one()
