"""Several ingesters on one warehouse, the optional schema, and what is PostgreSQL's own: jsonb, COPY, errors.

PostgreSQL: a session advisory lock per source lets one ingester sync it at a time; the others skip it
(or wait, `lock_wait`). Without the lock the insert-if-absent writes alone keep the copy exact. DuckDB:
its file lock turns a second process away with a one-line "in use" error.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from support import KEY, assert_verified, cli, scalar, stored_events, sync

from ingest import model, store
from ingest.backends import postgresql as postgresql_backend
from ingest.simulator import Simulator
from ingest.store import Warehouse

postgresql_only = pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
SKIPPED = "default: skipped, another ingester is syncing it"


def assert_exact(sim, url, schema=None):
    assert stored_events(url, schema) == {e["id"]: e for e in sim.events}


def run_in_background(server, url) -> subprocess.Popen:
    """`audit-ingest run` in its own process, as a second machine or a cron job would start it."""
    env = {"OPENAI_ADMIN_KEY": KEY, "OPENAI_BASE_URL": server.url, "AUDIT_INGEST_DATABASE_URL": url}
    return subprocess.Popen(
        [sys.executable, "-m", "ingest", "run"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_for_requests(server, count: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while server.sim.requests < count:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.01)


# ------------------------------------------------------------------------------------------ locking
@postgresql_only
def test_two_runs_on_one_postgresql_one_syncs_the_other_skips(simulator, db_url):
    server = simulator(events=3000, seed=21, latency=0.5)  # slow pages keep the first run busy
    first = run_in_background(server, db_url)
    wait_for_requests(server, 2, first)
    server.sim.latency = 5.0  # the first run outlasts the second's start, however slow the machine
    second = cli(
        "run", env={"OPENAI_ADMIN_KEY": KEY, "OPENAI_BASE_URL": server.url, "AUDIT_INGEST_DATABASE_URL": db_url}
    )
    assert first.poll() is None  # the first run was syncing the whole time
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == SKIPPED
    server.sim.latency = 0.0
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert "3,000 new" in out
    requests = int(re.search(r"(\d+) requests", out)[1])
    assert server.sim.requests == requests  # the skipped run made none
    assert_exact(server.sim, db_url)
    assert scalar(db_url, "SELECT count(*) FROM sync_runs") == 1
    assert scalar(db_url, "SELECT status FROM sync_runs") == "ok"


@postgresql_only
def test_a_locked_source_is_skipped_before_any_request_then_synced_once_free(simulator, db_url, key_env):
    server = simulator(events=400, seed=22)
    other = Warehouse(db_url)  # another ingester, holding the source's lock
    other.ensure_schema()
    try:
        with other.connect() as conn, other.lock(conn, "default") as held:
            assert held
            [summary] = sync(server, db_url)
            assert summary.status == "skipped" and summary.line() == SKIPPED
            assert server.sim.requests == 0
            assert scalar(db_url, "SELECT count(*) FROM sync_runs") == 0
            assert scalar(db_url, "SELECT count(*) FROM audit_events") == 0
            [other_source] = sync(server, db_url, sources=[{"name": "other"}])  # the lock is per source
            assert other_source.events_new == 400
    finally:
        other.dispose()
    [summary] = sync(server, db_url)
    assert summary.status == "ok" and summary.events_seen == 400 and summary.events_new == 0  # `other` has them
    assert scalar(db_url, "SELECT count(*) FROM sync_runs WHERE status = 'ok'") == 2


@postgresql_only
def test_with_lock_wait_the_second_ingester_waits_then_syncs(simulator, db_url, key_env, caplog, monkeypatch):
    monkeypatch.setattr(postgresql_backend, "LOCK_POLL_SECONDS", 0.05)
    caplog.set_level(logging.INFO, logger="ingest")
    server = simulator(events=500, seed=23)
    other = Warehouse(db_url)
    other.ensure_schema()
    results = []
    try:
        with other.connect() as conn, other.lock(conn, "default"):
            waiter = threading.Thread(target=lambda: results.extend(sync(server, db_url, lock_wait=True)))
            waiter.start()
            deadline = time.monotonic() + 30
            while "waiting" not in caplog.text:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            time.sleep(0.3)  # several polls while the lock is held
            assert server.sim.requests == 0 and waiter.is_alive()
    finally:
        other.dispose()
    waiter.join(60)
    [summary] = results
    assert summary.status == "ok" and summary.events_new == 500
    assert_exact(server.sim, db_url)
    waiting = [r.getMessage() for r in caplog.records if "waiting" in r.getMessage()]
    assert waiting == ["default: another ingester holds its lock; waiting for it"]


@postgresql_only
def test_without_the_lock_two_concurrent_runs_still_store_every_event_once(simulator, db_url, key_env):
    server = simulator(events=4000, seed=24, latency=0.01)
    # Migrated beforehand: otherwise one run waits out the migration lock's poll and may start after the other ended.
    warehouse = Warehouse(db_url)
    warehouse.ensure_schema()
    warehouse.dispose()
    results: list = []
    threads = [
        threading.Thread(target=lambda: results.extend(sync(server, db_url, source_lock=False))) for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert [s.status for s in results] == ["ok", "ok"]
    assert sum(s.events_new for s in results) == 4000  # each event inserted by exactly one of them
    assert_exact(server.sim, db_url)
    assert_verified(db_url, 4000)  # their batches interleaved on one chain
    assert scalar(db_url, "SELECT count(*) FROM sync_runs WHERE status = 'ok'") == 2
    # They did overlap: each started before the other finished.
    assert scalar(db_url, "SELECT max(started_at) < min(finished_at) FROM sync_runs")
    # The actor upserts merged: every user's first and last sighting is its oldest and newest event.
    assert scalar(db_url, "SELECT count(*) FROM users") > 0
    assert scalar(db_url, SIGHTINGS_THAT_DIFFER) == 0


SIGHTINGS_THAT_DIFFER = """
SELECT count(*) FROM users u FULL JOIN (
    SELECT actor_user_id AS id, min(effective_at) AS first, max(effective_at) AS last
    FROM audit_events WHERE actor_user_id IS NOT NULL GROUP BY 1
) e ON u.id = e.id
WHERE u.first_seen IS DISTINCT FROM e.first OR u.last_seen IS DISTINCT FROM e.last
"""


def test_a_second_process_on_a_duckdb_file_gets_one_line_and_exit_9(simulator, duckdb_url):
    server = simulator(events=3000, seed=25, latency=0.5)
    first = run_in_background(server, duckdb_url)
    wait_for_requests(server, 2, first)
    server.sim.latency = 5.0  # the first run outlasts the second's start, however slow the machine
    env = {"OPENAI_ADMIN_KEY": KEY, "OPENAI_BASE_URL": server.url, "AUDIT_INGEST_DATABASE_URL": duckdb_url}
    second = cli("run", env=env)
    assert first.poll() is None
    assert second.returncode == 9
    assert second.stderr.splitlines() == [
        f"error: database {duckdb_url.removeprefix('duckdb:///')} is in use by another process (pid {first.pid}): "
        "wait for it to finish, or use PostgreSQL for concurrent access"
    ]
    server.sim.latency = 0.0
    _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert_exact(server.sim, duckdb_url)


# ------------------------------------------------------------------------------------------ schema
def test_db_schema_holds_every_table_on_both_backends(simulator, db_url):
    server = simulator(events=700, seed=26)
    env = {
        "OPENAI_ADMIN_KEY": KEY,
        "OPENAI_BASE_URL": server.url,
        "AUDIT_INGEST_DATABASE_URL": db_url,
        "AUDIT_INGEST_DB_SCHEMA": "openai_audit",
    }
    outputs = []
    for command in (["db", "upgrade"], ["run"], ["status"]):
        result = cli(*command, env=env)
        assert result.returncode == 0, result.stderr
        outputs.append(result.stdout)
    upgrade, run, status = outputs
    assert upgrade.startswith("upgraded: ") and "700 new" in run
    assert re.search(r"^default\t.*\t700\t", status, re.M)
    assert_exact(server.sim, db_url, "openai_audit")
    tables = (
        "SELECT string_agg(table_name, ',' ORDER BY table_name) FROM information_schema.tables WHERE table_schema = "
    )
    in_schema = scalar(db_url, tables + "'openai_audit'")
    assert set(in_schema.split(",")) == set(model.metadata.tables) | {"alembic_version"}
    assert scalar(db_url, tables + "current_schema()") is None  # nothing in the default schema


# ------------------------------------------------------------------------------------------ roles
def readme_sql() -> str:
    """The role and GRANT statements of the README's PostgreSQL section."""
    text = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## PostgreSQL\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```sql\n(.*?)```", section, re.S)[1]


def test_the_readme_roles_migrate_ingest_and_read_with_exactly_their_grants(simulator, pg_database):
    database, admin = pg_database
    roles = ("audit_owner", "audit_ingest", "audit_reader", "alice")
    names = {n: f"{n}_{os.getpid()}" for n in (*roles, "openai_audit")}
    admin(re.sub(r"\b(audit_owner|audit_ingest|audit_reader|openai_audit)\b", lambda m: names[m[1]], readme_sql()))
    admin(f"CREATE ROLE {names['alice']} LOGIN IN ROLE {names['audit_reader']}")  # an analyst
    server = simulator(events=600, seed=27)
    schema = names["openai_audit"]

    def as_role(role: str, *args: str):
        url = database.set(username=names[role]).render_as_string(hide_password=False)
        env = {"OPENAI_ADMIN_KEY": KEY, "OPENAI_BASE_URL": server.url, "AUDIT_INGEST_DATABASE_URL": url}
        return cli(*args, env={**env, "AUDIT_INGEST_DB_SCHEMA": schema})

    try:
        denied = as_role("audit_ingest", "run")  # the ingester cannot create tables
        assert denied.returncode == 8 and f"permission denied for schema {schema}" in denied.stderr
        assert server.sim.requests == 0
        upgraded = as_role("audit_owner", "db", "upgrade")
        assert upgraded.returncode == 0, upgraded.stderr
        ran = as_role("audit_ingest", "run")
        assert ran.returncode == 0, ran.stderr
        assert "600 new" in ran.stdout
        status = as_role("alice", "status")
        assert status.returncode == 0, status.stderr
        assert re.search(r"^default\t.*\t600\t", status.stdout, re.M)
        read_only = as_role("alice", "run")  # the reader cannot write
        assert read_only.returncode == 8 and "permission denied for table" in read_only.stderr
        url = database.render_as_string(hide_password=False)
        assert_exact(server.sim, url, schema)
        assert scalar(url, f"SELECT count(*) FROM {schema}.sync_runs WHERE status = 'ok'") == 1
    finally:
        admin(f"DROP SCHEMA {schema} CASCADE")
        for role in roles:
            admin(f"DROP OWNED BY {names[role]}")
            admin(f"DROP ROLE {names[role]}")


# ------------------------------------------------------------------------------------------ PostgreSQL's own
@postgresql_only
def test_json_columns_are_jsonb_and_a_batch_is_one_copy_or_one_insert_per_table(db_url):
    sim = Simulator(events=2500, seed=28)
    warehouse = Warehouse(db_url)
    warehouse.ensure_schema()
    statements: list[str] = []
    sa.event.listen(warehouse.engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
    columns = sa.table(
        "columns", *map(sa.column, ("table_schema", "table_name", "column_name", "data_type")),
        schema="information_schema",
    )  # fmt: skip
    try:
        with warehouse.connect() as conn:
            batch = model.normalise(sim.events, "default", store.now())
            with conn.begin():
                new = store.save_batch(conn, batch)
            with conn.begin():  # the same events again: found stored, so merged instead of COPied
                again = store.save_batch(conn, batch)
            query = sa.select(columns).where(columns.c.table_schema == sa.func.current_schema())
            types = {(r.table_name, r.column_name): r.data_type for r in conn.execute(query)}
    finally:
        warehouse.dispose()
    assert len(new) == 2500 and again == set()
    # New events went in by COPY straight into audit_events, with no INSERT; the replay by one INSERT ... SELECT
    # from its staged copy, not one per row or page.
    inserts = [s for s in statements if s.startswith("INSERT INTO audit_events")]
    assert len(inserts) == 1 and "SELECT" in inserts[0]
    assert not any(s.startswith("ROLLBACK TO SAVEPOINT") for s in statements)
    assert scalar(db_url, "SELECT count(*) FROM audit_events") == 2500
    json_columns = [
        (t.name, c.name) for t in model.metadata.tables.values() for c in t.columns if isinstance(c.type, sa.JSON)
    ]
    assert ("audit_events", "raw") in json_columns
    assert {types[c] for c in json_columns} == {"jsonb"}
    assert scalar(db_url, "SELECT count(*) FROM audit_events WHERE raw->>'id' = id AND raw->>'type' = type") == 2500
    assert stored_events(db_url) == {e["id"]: e for e in sim.events}


@postgresql_only
def test_a_batch_a_concurrent_ingester_stores_meanwhile_is_merged_not_duplicated(db_url):
    """The batch is not stored when B checks, so B COPies it; A's commit makes B's COPY fail, and B merges."""
    sim = Simulator(events=1200, seed=29)
    batch = model.normalise(sim.events, "default", store.now())
    warehouse = Warehouse(db_url)
    warehouse.ensure_schema()
    statements: list[str] = []
    try:
        with warehouse.connect() as a, warehouse.connect() as b:
            sa.event.listen(b, "before_cursor_execute", lambda *args: statements.append(args[2]))
            a.begin()
            first = store.save_batch(a, batch)
            commit = threading.Timer(1.0, a.commit)
            commit.start()
            with b.begin():
                second = store.save_batch(b, batch)  # its COPY waits for A's transaction, then fails
            commit.join()
    finally:
        warehouse.dispose()
    assert len(first) == 1200 and second == set()
    assert sum(s.startswith("ROLLBACK TO SAVEPOINT") for s in statements) == 1
    assert scalar(db_url, "SELECT count(*) FROM audit_events") == 1200
    assert scalar(db_url, "SELECT count(*) FROM login_events") == sum(e["type"].startswith("log") for e in sim.events)
    assert_exact(sim, db_url)


def test_an_unreachable_server_is_one_line_exit_8_with_the_password_masked(tmp_path):
    url = "postgresql+psycopg://audit:s3cret-pw@127.0.0.1:1/audit"
    for command in (["status"], ["db", "upgrade"]):
        result = cli(*command, env={"AUDIT_INGEST_DATABASE_URL": url})
        assert result.returncode == 8
        [line] = result.stderr.splitlines()
        assert line.startswith("error: database error on postgresql+psycopg://audit:***@127.0.0.1:1/audit: ")
        assert "s3cret-pw" not in result.stderr + result.stdout
