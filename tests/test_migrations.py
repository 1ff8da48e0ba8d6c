"""Migrations: Alembic builds exactly the declared model, an upgrade from every earlier revision keeps the
data (and re-derives typed rows from `raw`), and `db rebuild-typed` restores typed rows from `raw`."""

from __future__ import annotations

from collections import Counter

import duckdb
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from support import KEY, alembic_config, cli, migrate, sync

from ingest import model, store
from ingest.store import Warehouse


def scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


EARLIER = [r.revision for r in scripts().walk_revisions() if r.revision != scripts().get_current_head()]


def test_head_revision_constant_is_alembics_head():
    assert scripts().get_current_head() == store.HEAD_REVISION
    assert EARLIER  # the upgrade test below has something to upgrade from


def duckdb_catalog(path) -> dict[str, tuple]:
    """table -> (columns, constraints, indexes) from DuckDB's own catalog: SQLAlchemy's inspector cannot
    reflect DuckDB (duckdb-engine 0.17 queries pg_catalog tables DuckDB lacks under SQLAlchemy 2.1)."""
    with duckdb.connect(str(path), read_only=True) as conn:
        catalog: dict[str, tuple] = {}
        for (table,) in conn.execute("SELECT table_name FROM duckdb_tables() ORDER BY 1").fetchall():
            columns = conn.execute(
                "SELECT column_name, data_type, is_nullable, column_default FROM duckdb_columns()"
                " WHERE table_name = ? ORDER BY column_index",
                [table],
            ).fetchall()
            constraints = conn.execute(
                "SELECT constraint_type, constraint_column_names, referenced_table, referenced_column_names"
                " FROM duckdb_constraints() WHERE table_name = ? ORDER BY 1, 2",
                [table],
            ).fetchall()
            indexes = conn.execute(
                "SELECT sql FROM duckdb_indexes() WHERE table_name = ? ORDER BY 1", [table]
            ).fetchall()
            catalog[table] = (columns, constraints, indexes)
    return catalog


def upgraded(url: str) -> None:
    warehouse = Warehouse(url)
    try:
        warehouse.upgrade()
    finally:
        warehouse.dispose()


def test_migrations_build_exactly_the_model_on_duckdb(tmp_path):
    """The migrations build the declared model, which is what `Warehouse.upgrade` gives a new database."""
    migrated, created = tmp_path / "migrated.duckdb", tmp_path / "created.duckdb"
    migrate(f"duckdb:///{migrated}", "upgrade", "head")
    upgraded(f"duckdb:///{created}")
    built = duckdb_catalog(migrated)
    assert built == duckdb_catalog(created)
    assert built.pop("alembic_version")
    assert set(built) == set(model.metadata.tables)
    for path in (migrated, created):
        with duckdb.connect(str(path), read_only=True) as conn:
            assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [(store.HEAD_REVISION,)]


def test_migrations_build_exactly_the_model_on_postgresql(pg_database):
    """As on DuckDB: in one schema by the migrations, in another by `Warehouse.upgrade` for a new database."""
    database, admin = pg_database
    catalogs = []
    for schema in ("migrated", "created"):
        admin(f'CREATE SCHEMA "{schema}"')
        url = database.update_query_dict({"options": f"-csearch_path={schema}"})
        if schema == "migrated":
            migrate(url.render_as_string(hide_password=False), "upgrade", "head")
        else:
            upgraded(url.render_as_string(hide_password=False))
        engine = sa.create_engine(url)
        try:
            with engine.connect() as conn:
                context = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
                assert compare_metadata(context, model.metadata) == []
                assert context.get_current_revision() == store.HEAD_REVISION
                catalogs.append(postgresql_catalog(conn, schema))
        finally:
            engine.dispose()
    assert catalogs[0] == catalogs[1]  # names and definitions of constraints and indexes too


def postgresql_catalog(conn: sa.Connection, schema: str) -> tuple[list, ...]:
    """Columns, constraints and indexes of `schema`, written without its name."""
    query = {
        "columns": "SELECT table_name, column_name, data_type, is_nullable, column_default"
        " FROM information_schema.columns WHERE table_schema = :schema ORDER BY 1, ordinal_position",
        "constraints": "SELECT t.relname, c.conname, pg_get_constraintdef(c.oid) FROM pg_constraint c"
        " JOIN pg_class t ON t.oid = c.conrelid JOIN pg_namespace n ON n.oid = t.relnamespace"
        " WHERE n.nspname = :schema ORDER BY 1, 2",
        "indexes": "SELECT tablename, indexname, replace(indexdef, :schema || '.', '') FROM pg_indexes"
        " WHERE schemaname = :schema ORDER BY 1, 2",
    }
    return tuple([tuple(r) for r in conn.execute(sa.text(sql), {"schema": schema})] for sql in query.values())


# ---------------------------------------------------------------------------------------- data


def snapshot(url: str, tables, schema: str | None = None, without: tuple[str, ...] = ()) -> dict[str, list[dict]]:
    """Every row of the tables (but the columns `without`), in primary-key order."""
    warehouse = Warehouse(url, schema)
    try:
        with warehouse.connect() as conn:
            return {
                t.name: [
                    dict(r)
                    for r in conn.execute(
                        sa.select(*(c for c in t.columns if c.name not in without)).order_by(*t.primary_key.columns)
                    ).mappings()
                ]
                for t in tables
            }
    finally:
        warehouse.dispose()


def copy_rows(source_url: str, target_url: str) -> None:
    """Copies the source's rows into the tables and columns the target has (an older revision has fewer)."""
    rows = snapshot(source_url, model.metadata.sorted_tables)
    warehouse = Warehouse(target_url)
    try:
        with warehouse.connect() as conn, conn.begin():
            present: dict[str, set[str]] = {}
            for table, column in conn.exec_driver_sql(
                "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = current_schema()"
            ):
                present.setdefault(table, set()).add(column)
            for table in model.metadata.sorted_tables:
                names = [c.name for c in table.columns if c.name in present.get(table.name, ())]
                if names and rows[table.name]:
                    older = sa.Table(table.name, sa.MetaData(), *(sa.Column(n, table.c[n].type) for n in names))
                    json = {n for n in names if isinstance(table.c[n].type, sa.JSON)}  # the write path takes JSON text
                    values = [{n: model.dumps(r[n]) if n in json and r[n] is not None else r[n] for n in names}
                              for r in rows[table.name]]  # fmt: skip
                    store.insert_rows(conn, older, values, absent=True)  # an empty database
    finally:
        warehouse.dispose()


@pytest.mark.parametrize("revision", EARLIER)
def test_upgrade_from_an_earlier_revision_keeps_the_data(revision, simulator, db_url, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_ADMIN_KEY", KEY)
    reference = f"duckdb:///{tmp_path / 'reference.duckdb'}"  # the same events synced at the head revision
    # No detections: an older revision has no `alerts` to copy the reference's into.
    sync(simulator(events=600, seed=11), reference, detections=False)

    old = Warehouse(db_url)
    old.upgrade(revision)
    old.dispose()
    copy_rows(reference, db_url)
    result = cli("db", "upgrade", env={"AUDIT_INGEST_DATABASE_URL": db_url})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(store.HEAD_REVISION)

    expected = without_batches(snapshot(reference, model.metadata.sorted_tables))
    assert all(expected[t.name] for t in (model.audit_events, *model.TYPED_TABLES))
    # Every row of every table, checkpoints included; the typed rows re-derived from raw.
    upgraded_rows = snapshot(db_url, model.metadata.sorted_tables)
    assert without_batches(upgraded_rows) == expected
    # The migration ledgers what was stored: the chain verifies, over every event.
    verified = cli("verify", env={"AUDIT_INGEST_DATABASE_URL": db_url})
    assert verified.returncode == 0 and verified.stdout.startswith("verified 600 events"), verified.stdout
    if int(revision) < 10:
        # Coverage seeded per stream: from its oldest stored event up to its checkpoint.
        checkpoints = {r["key"]: r["checkpoint"] for r in upgraded_rows["sync_state"] if r["kind"] == "incremental"}
        oldest: dict[str, int] = {}
        for e in upgraded_rows["audit_events"]:
            stream = e["source"] + ("#tenant" if model.is_tenant_scoped(e["type"]) else "")
            oldest[stream] = min(oldest.get(stream, checkpoints[stream]), int(e["raw"]["effective_at"]))
        windows = {(w["stream"], w["gte"], w["lte"]) for w in upgraded_rows["sweep_windows"]}
        assert windows == {(k, oldest[k], c) for k, c in checkpoints.items()}
    if int(revision) < 4:
        # Events stored before the batch log: one batch per source and stream, every event in one.
        batches = upgraded_rows["ingest_batches"]
        assert [(b["seq"], b["state_key"]) for b in batches] == [(1, "default"), (2, "default#tenant")]
        by_batch = Counter(e["batch_seq"] for e in upgraded_rows["audit_events"])
        assert by_batch == {b["seq"]: b["events"] for b in batches}
        tenant = {e["id"] for e in upgraded_rows["audit_events"] if model.is_tenant_scoped(e["type"])}
        assert tenant == {e["id"] for e in upgraded_rows["audit_events"] if e["batch_seq"] == 2}


# What the revisions after 0003 add: a downgrade to 0002 has none of it.
LATER_TABLES = (
    "ingest_batches", "ingest_batch_counter", "alerts", "alert_deliveries", "sink_status", "ingest_ledger",
    "ingest_ledger_entries", "sweep_windows", "reconcile_findings",
)  # fmt: skip
LATER_COLUMNS = ("batch_seq", "unavailable")


def without_batches(rows: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """The rows but the committed-batch log's and the ledger's, which a migration numbers anew (one batch per
    stream), and the coverage, which migration 0010 seeds from the checkpoints and stored events."""
    log = {"ingest_batches", "ingest_batch_counter", "ingest_ledger", "ingest_ledger_entries", "sweep_windows"}
    return {
        name: [{k: v for k, v in r.items() if k != "batch_seq"} for r in table]
        for name, table in rows.items()
        if name not in log
    }


def test_rebuild_typed_restores_typed_rows_from_raw(simulator, db_url, monkeypatch):
    monkeypatch.setenv("OPENAI_ADMIN_KEY", KEY)
    sync(simulator(events=600, seed=12), db_url)
    before = snapshot(db_url, model.TYPED_TABLES)
    assert all(before.values())
    warehouse = Warehouse(db_url)
    try:
        with warehouse.connect() as conn, conn.begin():
            for table in reversed(model.TYPED_TABLES):  # as a model change would leave them: stale or missing
                conn.execute(table.delete().where(table.c.event_id < "audit_log-8"))
    finally:
        warehouse.dispose()
    assert snapshot(db_url, model.TYPED_TABLES) != before

    result = cli("db", "rebuild-typed", env={"AUDIT_INGEST_DATABASE_URL": db_url})
    assert result.returncode == 0, result.stderr
    assert "600 events" in result.stdout
    assert snapshot(db_url, model.TYPED_TABLES) == before


@pytest.mark.parametrize("schema", [None, "audit"])
def test_duckdb_event_tables_lose_their_keys_at_0003_and_get_them_back_on_downgrade(
    schema, simulator, tmp_path, monkeypatch
):
    monkeypatch.setenv("OPENAI_ADMIN_KEY", KEY)
    path = tmp_path / "keys.duckdb"
    url = f"duckdb:///{path}"
    sync(simulator(events=400, seed=13), url, db_schema=schema, detections=False)
    # Compared without what revisions after 0003 add (the batch log numbers stored events anew after the downgrade).
    before_log = [t for t in model.metadata.sorted_tables if t.name not in LATER_TABLES]
    stored = snapshot(url, before_log, schema, without=LATER_COLUMNS)
    event_tables = {"audit_events", *(t.name for t in model.TYPED_TABLES)}

    def keys() -> list[tuple[str, str]]:
        with duckdb.connect(str(path), read_only=True) as conn:
            rows = conn.execute(
                "SELECT table_name, constraint_type FROM duckdb_constraints()"
                " WHERE constraint_type IN ('PRIMARY KEY', 'FOREIGN KEY') AND schema_name = ?",
                [schema or "main"],
            ).fetchall()
        return sorted(r for r in rows if r[0] in event_tables)

    assert keys() == []
    migrate(url, "downgrade", "0002", schema)
    assert keys() == sorted(
        [("audit_events", "PRIMARY KEY")]
        + [(t.name, kind) for t in model.TYPED_TABLES for kind in ("PRIMARY KEY", "FOREIGN KEY")]
    )
    assert snapshot(url, before_log, schema, without=LATER_COLUMNS) == stored
    migrate(url, "upgrade", "head", schema)
    assert keys() == []
    assert snapshot(url, before_log, schema, without=LATER_COLUMNS) == stored
