"""The warehouse: connections, migrations, and `save_batch`, the one write path for events.

Writes take each engine's bulk path, one statement per table per batch: on DuckDB the rows go in as an
Arrow table registered on the connection (`INSERT ... SELECT`); on PostgreSQL SQLAlchemy's
insertmanyvalues turns the executemany into multi-row INSERTs. Every insert is insert-if-absent, so a
replayed page changes nothing.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert

from ingest import model
from ingest.errors import DatabaseError, DatabaseInUseError

log = logging.getLogger("ingest.store")

MIGRATIONS = next(
    p for p in (Path(__file__).parent / "migrations", Path(__file__).parent.parent / "migrations") if p.is_dir()
)
_ARROW_TYPES = {
    sa.Text: "string",
    sa.BigInteger: "int64",
    sa.Integer: "int32",
    sa.Boolean: "bool_",
    sa.Float: "float64",
}


def now() -> datetime:
    """Naive UTC, as every timestamp in the warehouse."""
    return datetime.now(UTC).replace(tzinfo=None)


class Warehouse:
    def __init__(self, url: str, schema: str | None = None):
        self.url = url
        self.schema = schema
        try:
            url_obj = sa.engine.make_url(url)
        except sa.exc.ArgumentError:
            raise DatabaseError(f"not a database URL: {url!r} (e.g. duckdb:///audit_logs.duckdb)") from None
        self.dialect = url_obj.get_backend_name()
        self.location = url_obj.database if self.dialect == "duckdb" else url_obj.render_as_string(hide_password=True)
        kwargs: dict = {"json_serializer": _json_text}
        if self.dialect == "duckdb":
            # No pool: the file is opened for a run and released after it, so others can open it between runs.
            kwargs["poolclass"] = sa.pool.NullPool
        else:
            kwargs["pool_pre_ping"] = True
        try:
            self.engine = sa.create_engine(url_obj, **kwargs)
        except (sa.exc.ArgumentError, ImportError, sa.exc.NoSuchModuleError) as exc:
            raise DatabaseError(
                f"unsupported database URL {url_obj.render_as_string(hide_password=True)}: {exc}"
            ) from None

    @contextmanager
    def connect(self) -> Iterator[sa.Connection]:
        """A connection for one run (with the schema applied); database failures become DatabaseError."""
        with translate_errors(self.location), self.engine.connect() as conn:
            yield conn.execution_options(schema_translate_map={None: self.schema}) if self.schema else conn

    def dispose(self) -> None:
        self.engine.dispose()

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
        with self.connect() as conn:
            if self.schema:
                with conn.begin():
                    conn.exec_driver_sql(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
            before = self.current_revision(conn)
            conn.commit()
            target = script.get_revision(revision).revision if revision != "head" else script.get_current_head()
            if before == target:
                return []
            pending = [r for r in script.iterate_revisions(target, before)][::-1]
            with conn.begin():
                config.attributes.update(connection=conn, schema=self.schema)
                command.upgrade(config, revision)
            rebuild = before is not None and any(getattr(r.module, "REBUILD_TYPED", False) for r in pending)
            if rebuild and target == script.get_current_head():
                with conn.begin():
                    rebuilt = rebuild_typed(conn)
                log.info("re-derived typed rows of %d stored events", rebuilt)
        applied = [r.revision for r in pending]
        log.info("database upgraded: %s", " -> ".join([before or "empty", *applied]))
        return applied

    def ensure_schema(self) -> None:
        """Cheap check on every run; migrations only when the database is behind this version."""
        with self.connect() as conn:
            current = self.current_revision(conn)
        if current != HEAD_REVISION:
            self.upgrade()


HEAD_REVISION = "0002"  # a test checks this equals Alembic's head


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
def insert_rows(
    conn: sa.Connection, table: sa.Table, rows: list[dict], *, update: dict | None = None, returning: str | None = None
) -> list:
    """Insert-if-absent (or upsert with `update(excluded) -> set_`), one statement; returns `returning` values."""
    if not rows:
        return []
    names = [c.name for c in table.columns if c.name in rows[0]]
    if conn.dialect.name == "duckdb":
        import pyarrow as pa

        schema = pa.schema([(n, _arrow_type(table.c[n].type)) for n in names])
        conn.connection.driver_connection.register("_batch", pa.Table.from_pylist(rows, schema=schema))
        source = sa.select(*[sa.column(n) for n in names]).select_from(sa.table("_batch"))
        stmt = pg_insert(table).from_select(names, source)
        params = None
    else:
        stmt, params = pg_insert(table), rows
    stmt = (
        stmt.on_conflict_do_update(index_elements=[c.name for c in table.primary_key], set_=update(stmt.excluded))
        if update
        else stmt.on_conflict_do_nothing()
    )
    if returning:
        stmt = stmt.returning(table.c[returning])
    try:
        result = conn.execute(stmt, params)
        return [r[0] for r in result] if returning else []
    finally:
        if conn.dialect.name == "duckdb":
            conn.connection.driver_connection.unregister("_batch")


def _arrow_type(sql_type: sa.types.TypeEngine):
    import pyarrow as pa

    if isinstance(sql_type, sa.DateTime):
        return pa.timestamp("us")
    for cls, name in _ARROW_TYPES.items():
        if isinstance(sql_type, cls):
            return getattr(pa, name)()
    return pa.string()  # JSON: serialised text


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


def save_batch(conn: sa.Connection, batch: model.Batch) -> set[str]:
    """Writes the batch (inside the caller's transaction); returns the ids of events that were new.

    Typed rows are written only for new events: a replayed event already has them.
    """
    new = set(insert_rows(conn, model.audit_events, batch.events, returning="id"))
    if new:
        for table in model.TYPED_TABLES:
            rows = [r for r in batch.typed.get(table.name, ()) if r["event_id"] in new]
            insert_rows(conn, table, rows)
    for table in model.DIMENSIONS:
        rows = list(batch.dimensions.get(table.name, {}).values())
        if rows:
            insert_rows(conn, table, _uniform(rows), update=_newest_wins(table))
    return new


def _uniform(rows: list[dict]) -> list[dict]:
    keys = {k for r in rows for k in r}
    return [{k: r.get(k) for k in keys} for r in rows]


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
            insert_rows(conn, table, batch.typed[table.name])
        count += len(rows)
        last = rows[-1].id


# ---------------------------------------------------------------------------------------- state
def load_state(conn: sa.Connection, key: str) -> dict | None:
    row = conn.execute(sa.select(model.sync_state).where(model.sync_state.c.key == key)).mappings().first()
    return dict(row) if row else None


def save_state(conn: sa.Connection, state: dict) -> None:
    state = {**state, "updated_at": now()}
    insert_rows(conn, model.sync_state, [state], update=lambda excluded: {k: excluded[k] for k in state if k != "key"})
