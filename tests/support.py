"""Helpers shared by the tests: settings pointing at a simulator, and reading the warehouse back."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import sqlalchemy as sa

from ingest.config import load_settings
from ingest.store import Warehouse

KEY = "sk-admin-test"


def settings_for(server, database_url: str, **overrides):
    """Settings for a test: the simulator's URL, fast retries, the given warehouse."""
    values = {"base_url": server.url, "database_url": database_url, "retry_base_delay": 0.01, "retry_max_delay": 0.2}
    values.update(overrides)
    return load_settings(None, **values)


def sync(server, database_url: str, *, transport=None, on_progress=None, **overrides) -> list:
    """One incremental sync of every source, in this process; the run summaries. `overrides` are settings."""
    from ingest.sync import run_sources

    settings = settings_for(server, database_url, **overrides)
    warehouse = Warehouse(settings.database_url, settings.db_schema)
    try:
        return run_sources(settings, warehouse, settings.sources, transport=transport, on_progress=on_progress)
    finally:
        warehouse.dispose()


def stored_events(database_url: str, schema: str | None = None) -> dict[str, dict]:
    """id -> raw event, read back from the warehouse."""
    warehouse = Warehouse(database_url, schema)
    try:
        with warehouse.connect() as conn:
            events = sa.table("audit_events", sa.column("id"), sa.column("raw"), schema=schema)
            rows = conn.execute(sa.select(events.c.id, events.c.raw)).all()
    finally:
        warehouse.dispose()
    return {row.id: row.raw if isinstance(row.raw, dict) else json.loads(row.raw) for row in rows}


def assert_verified(url: str, events: int, schema: str | None = None) -> str:
    """`verify` finds nothing and counts `events`; returns the chain head."""
    from ingest import verify

    warehouse = Warehouse(url, schema)
    try:
        result = verify.run(warehouse)
    finally:
        warehouse.dispose()
    assert [f.line() for f in result.findings] == [] and result.events == events
    assert result.head is not None
    return result.head


def logged_events(url: str) -> list:
    """Every stored event (`batchlog.StoredEvent`) in committed-batch log order: the order consumers get them."""
    from ingest import batchlog

    warehouse = Warehouse(url)
    try:
        with warehouse.connect() as conn:
            return [e for b in batchlog.iter_after(conn, 0) for e in b.events]
    finally:
        warehouse.dispose()


def alembic_config():
    from alembic.config import Config

    from ingest import store

    config = Config()
    config.set_main_option("script_location", str(store.MIGRATIONS))
    return config


def migrate(url: str, action: str, revision: str, schema: str | None = None) -> None:
    """Alembic's upgrade or downgrade, on the connection Warehouse gives it (as `db upgrade` does), running
    every migration (`Warehouse.upgrade` builds a new database from the model instead)."""
    from alembic import command

    config = alembic_config()
    warehouse = Warehouse(url, schema)
    try:
        with warehouse.connect() as conn, conn.begin():
            config.attributes.update(connection=conn, schema=schema)
            getattr(command, action)(config, revision)
    finally:
        warehouse.dispose()


def select(url: str, query) -> list:
    """The rows of a query, read back from the warehouse."""
    warehouse = Warehouse(url)
    try:
        with warehouse.connect() as conn:
            return conn.execute(query).all()
    finally:
        warehouse.dispose()


def kill_run_after(server, env: dict, args: list[str], requests: int, *, after: float = 0.0) -> None:
    """Starts `audit-ingest <args>` and SIGKILLs it once the simulator has served `requests` more (not after a
    time: a busy machine starts slower), `after` seconds later."""
    start = server.sim.requests
    proc = subprocess.Popen([sys.executable, "-m", "ingest", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 60
    while proc.poll() is None and server.sim.requests - start < requests and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(after)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def scalar(database_url: str, sql: str, schema: str | None = None):
    warehouse = Warehouse(database_url, schema)
    try:
        with warehouse.connect() as conn:
            return conn.execute(sa.text(sql)).scalar()
    finally:
        warehouse.dispose()


def cli(
    *args: str, env: dict | None = None, cwd: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    """Runs `audit-ingest` in a subprocess, as a user or a scheduler would."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("AUDIT_INGEST_", "OPENAI_"))}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "ingest", *args], env=full_env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def handed_batches(monkeypatch) -> list[int]:
    """The sequence numbers of the batches `batchlog.read_after` takes as a sync handed them (ingest.batchlog.keeping)
    rather than reading them back, filled as the test runs."""
    from ingest import batchlog

    handed: list[int] = []
    take = batchlog._Kept.take

    def counted(self, engine, seqs):
        found = take(self, engine, seqs)
        handed.extend(found)
        return found

    monkeypatch.setattr(batchlog._Kept, "take", counted)
    return handed
