"""Faults: an API that misbehaves often still yields the exact result; an API or a database that goes
away fails the run with one clear error, leaves every commit whole, and the next run resumes."""

from __future__ import annotations

import contextlib
import functools
import os
import resource
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from support import KEY, cli, scalar, stored_events, sync

import ingest.sync
from ingest.errors import ApiUnavailableError, DatabaseError, RateLimitedError
from ingest.model import is_tenant_scoped
from ingest.simulator import ALL_FAULTS, SimulatorServer
from ingest.store import Warehouse


@pytest.fixture(autouse=True)
def key_env(monkeypatch):
    monkeypatch.setenv("OPENAI_ADMIN_KEY", KEY)


@pytest.fixture
def small_batches(monkeypatch):
    """Several commits per run and a short download queue, so that a failure can land between two commits
    before the whole log is downloaded."""
    monkeypatch.setattr(ingest.sync, "BATCH_EVENTS", 300)
    monkeypatch.setattr(ingest.sync, "PREFETCH_PAGES", 3)


def assert_exact(sim, url: str) -> None:
    stored = stored_events(url)
    served = {e["id"]: e for e in sim.events}
    assert stored.keys() == served.keys()
    assert stored == served


def state(url: str) -> set[tuple]:
    warehouse = Warehouse(url)
    try:
        with warehouse.connect() as conn:
            rows = conn.execute(sa.text("SELECT key, checkpoint, sweep_gte, sweep_lte, sweep_cursor FROM sync_state"))
            return {tuple(r) for r in rows}
    finally:
        warehouse.dispose()


def checkpoints(url: str) -> dict[str, int]:
    return {key: checkpoint for key, checkpoint, *_ in state(url)}


def assert_whole_commits(sim, url: str) -> None:
    """What a failed run left is whole: each sweep holds exactly the events from the top of its window
    down to its committed cursor, and every stored event has its actor rows."""
    stored = set(stored_events(url))
    expected = set()
    served = sim.events  # newest first, as the API pages them
    for key, checkpoint, gte, lte, cursor in state(url):
        tenant = key.endswith("#tenant")
        if cursor is None:  # done, never started, or a slice of a split sweep not started yet
            assert checkpoint is not None or gte is None or key.startswith("slice:")
            continue
        # A slice split while it ran (its lower bound raised) may have committed a page reaching below its bound.
        stream = [e for e in served if is_tenant_scoped(e["type"]) == tenant and e["effective_at"] <= lte]
        ids = [e["id"] for e in stream]
        expected |= {e["id"] for e in stream[: ids.index(cursor) + 1] if e["effective_at"] >= (gte or 0)}
    assert expected <= stored
    assert stored <= {e["id"] for e in served}
    missing_users = scalar(
        url, "SELECT count(*) FROM audit_events e LEFT JOIN users u ON u.id = e.actor_user_id "
        "WHERE e.actor_user_id IS NOT NULL AND u.id IS NULL"
    )  # fmt: skip
    assert missing_users == 0


def test_every_kind_of_fault_at_15_percent_ends_exact(simulator, db_url):
    # 30 ms a page: an API slow enough for a first sync to be split (sync.SPLIT_LATENCY).
    server = simulator(events=12_000, seed=31, fault_rate=0.15, faults=ALL_FAULTS, latency=0.03)
    [summary] = sync(server, db_url)
    injected = dict(server.sim.faults_injected)
    assert all(injected[kind] > 0 for kind in ALL_FAULTS), injected
    assert summary.retries == sum(injected.values()) - injected["slow"]  # slow answers are not failures
    assert_exact(server.sim, db_url)
    # A parallel first sync: its slices (four, and any split off them) committed batches of their own.
    assert scalar(db_url, "SELECT count(DISTINCT state_key) FROM ingest_batches WHERE state_key LIKE 'slice:%'") >= 4
    # New and late events, still with faults: the next run takes them, once.
    server.sim.append(250)
    server.sim.append(40, late_by=400)
    [summary] = sync(server, db_url)
    assert summary.events_new == 290
    assert_exact(server.sim, db_url)
    print(f"\nfaults injected over {server.sim.requests} requests: {server.sim.faults_injected}")


def fail_api(server, how: str) -> None:
    if how == "stopped":
        server.stop()
    else:
        server.sim.fault_rate, server.sim.faults = 1.0, (how,)


@pytest.mark.parametrize(
    ("how", "error"),
    [("stopped", ApiUnavailableError), ("429ms", RateLimitedError)],  # 503: the CLI test below
)  # fmt: skip
def test_api_down_mid_run_past_the_retry_budget_fails_clearly_then_resumes(
    simulator, db_url, small_batches, how, error
):
    server = simulator(events=3000, seed=32)
    url = db_url
    commits = []

    def on_progress(summary):
        commits.append(summary.events_new)
        if len(commits) == 2:
            fail_api(server, how)

    with pytest.raises(error) as caught:
        # One sweep: a first sync split on a loaded machine downloads both streams before its second commit.
        sync(server, url, on_progress=on_progress, max_retries=2, workers=1)
    message = str(caught.value)
    assert "\n" not in message and "after 2 retries" in message
    partial = len(stored_events(url))
    assert 0 < partial < 3000 and partial >= commits[1]
    assert_whole_commits(server.sim, url)
    assert scalar(url, "SELECT status FROM sync_runs") == "failed"
    assert scalar(url, "SELECT count(*) FROM sync_state WHERE checkpoint IS NOT NULL AND key = 'default'") == 0

    if how == "stopped":
        server = SimulatorServer(server.sim).start()  # the same data, back on a new port
    server.sim.fault_rate = 0.0
    server.sim.append(60)
    try:
        [summary] = sync(server, url)
    finally:
        server.stop()
    assert summary.events_new == 3060 - partial
    assert_exact(server.sim, url)


def test_api_failing_with_503_from_the_cli_is_one_line_exit_6_and_the_checkpoint_stays(simulator, tmp_path, db_url):
    server = simulator(events=500, seed=33)
    config = tmp_path / "fast-retries.toml"
    config.write_text("max_retries = 1\nretry_base_delay = 0.01\n")
    env = {"OPENAI_ADMIN_KEY": KEY, "OPENAI_BASE_URL": server.url, "AUDIT_INGEST_DATABASE_URL": db_url}
    assert cli("run", env=env).returncode == 0
    before = checkpoints(db_url)
    server.sim.append(30)
    fail_api(server, "503")
    result = cli("--config", str(config), "run", env=env)
    assert result.returncode == 6
    [line] = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert "(HTTP 503) after 1 retries" in line and "Traceback" not in result.stderr
    assert checkpoints(db_url) == before
    server.sim.fault_rate = 0.0
    result = cli("run", env=env)
    assert result.returncode == 0, result.stderr
    assert "30 new" in result.stdout
    assert_exact(server.sim, db_url)


def test_disk_full_mid_run_fails_clearly_then_resumes(simulator, tmp_path):
    """DuckDB cannot grow its file (a file-size limit stands in for a full disk, and binds root too)."""
    server = simulator(events=1500, seed=34)
    path = tmp_path / "w.duckdb"
    env = {"OPENAI_ADMIN_KEY": KEY, "OPENAI_BASE_URL": server.url, "AUDIT_INGEST_DATABASE_URL": f"duckdb:///{path}"}
    assert cli("run", env=env).returncode == 0
    server.sim.append(1500)
    limit = 2**18  # no file may grow beyond 256 KB: room for a run's bookkeeping, not for 1,500 events

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes fail with EFBIG instead of killing

    result = subprocess.run(
        [sys.executable, "-m", "ingest", "run"], env={**env, "PATH": os.environ["PATH"]}, capture_output=True,
        text=True, timeout=120, preexec_fn=limit_file_size,
    )  # fmt: skip
    assert result.returncode == 8, result.stderr
    lines = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "database error" in lines[0] and "Traceback" not in result.stderr
    partial = len(stored_events(env["AUDIT_INGEST_DATABASE_URL"]))
    assert 1500 <= partial < 3000
    assert_whole_commits(server.sim, env["AUDIT_INGEST_DATABASE_URL"])
    server.sim.append(25)
    result = cli("run", env=env)
    assert result.returncode == 0, result.stderr
    assert_exact(server.sim, env["AUDIT_INGEST_DATABASE_URL"])


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[None]:
    """The file cannot be written: permissions for a user, the immutable attribute for root."""
    if os.geteuid() != 0:
        path.chmod(0o444)
        undo = functools.partial(path.chmod, 0o644)
    else:
        if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
            pytest.skip("running as root without the right to set the immutable attribute (chattr +i)")
        undo = functools.partial(subprocess.run, ["chattr", "-i", str(path)], check=True)
    try:
        yield
    finally:
        undo()


def test_database_file_read_only_fails_clearly_and_nothing_changes(simulator, tmp_path):
    server = simulator(events=800, seed=35)
    path = tmp_path / "w.duckdb"
    env = {"OPENAI_ADMIN_KEY": KEY, "OPENAI_BASE_URL": server.url, "AUDIT_INGEST_DATABASE_URL": f"duckdb:///{path}"}
    assert cli("run", env=env).returncode == 0
    server.sim.append(40)
    before = path.read_bytes()
    with read_only(path):
        result = cli("run", env=env)
    assert result.returncode == 8, result.stderr
    [line] = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert str(path) in line and "Traceback" not in result.stderr
    assert path.read_bytes() == before
    result = cli("run", env=env)
    assert result.returncode == 0, result.stderr
    assert "40 new" in result.stdout
    assert_exact(server.sim, f"duckdb:///{path}")


def test_postgresql_connection_killed_mid_run_fails_clearly_then_resumes(simulator, pg_database, small_batches):
    database, admin = pg_database
    admin("DROP SCHEMA IF EXISTS faults CASCADE; CREATE SCHEMA faults")
    url = database.update_query_dict({"options": "-csearch_path=faults"}).render_as_string(hide_password=False)
    server = simulator(events=3000, seed=36)
    commits = []

    def on_progress(summary):
        commits.append(summary.events_new)
        if len(commits) == 2:
            admin(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                f"WHERE datname = '{database.database}' AND pid <> pg_backend_pid()"
            )

    with pytest.raises(DatabaseError) as caught:
        sync(server, url, on_progress=on_progress)
    assert "\n" not in str(caught.value) and "database error" in str(caught.value)
    partial = len(stored_events(url))
    assert 0 < partial < 3000
    assert_whole_commits(server.sim, url)

    # Read-only between runs: refused with a clear error, nothing written.
    admin(f'ALTER DATABASE "{database.database}" SET default_transaction_read_only = on')
    try:
        with pytest.raises(DatabaseError, match="read-only"):
            sync(server, url)
    finally:
        admin(f'ALTER DATABASE "{database.database}" RESET default_transaction_read_only')
    assert len(stored_events(url)) == partial

    server.sim.append(20)
    [summary] = sync(server, url)
    assert summary.events_new == 3020 - partial
    assert_exact(server.sim, url)
