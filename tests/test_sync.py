"""The core promise: every event once, `raw` as served, whatever happens between and during runs."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time

from support import KEY, assert_verified, cli, kill_run_after, scalar, settings_for, stored_events, sync

from ingest.model import is_tenant_scoped
from ingest.store import Warehouse
from ingest.sync import run_sources


def assert_exact(sim, url):
    stored = stored_events(url)
    served = {e["id"]: e for e in sim.events}
    assert set(stored) == set(served)
    assert stored == served
    assert scalar(url, "SELECT count(*) FROM audit_events") == len(served)


def test_first_run_stores_every_event_once_with_raw_as_served(simulator, db_url, key_env):
    server = simulator(events=3000, seed=1)
    [summary] = sync(server, db_url, workers=1)  # one sweep a stream (tests/test_parallel.py: split sweeps)
    assert summary.events_new == 3000
    tenant = sum(is_tenant_scoped(e["type"]) for e in server.sim.events)
    assert summary.pages == math.ceil(tenant / 100) + math.ceil((3000 - tenant) / 100)  # two streams
    assert_exact(server.sim, db_url)
    assert scalar(db_url, "SELECT count(*) FROM sync_runs WHERE status = 'ok'") == 1


def test_new_and_late_events_between_runs_land_once(simulator, db_url, key_env):
    server = simulator(events=1500, seed=2)
    sync(server, db_url)
    server.sim.append(120)  # new
    server.sim.append(30, late_by=300)  # late, but within the 15-minute lookback
    [summary] = sync(server, db_url)
    assert summary.events_new == 150
    assert_exact(server.sim, db_url)
    server.sim.append(7)
    [summary] = sync(server, db_url)
    assert summary.events_new == 7
    assert_exact(server.sim, db_url)


def test_late_events_in_a_dense_lookback_land_once_and_an_event_moved_later_upstream_is_not_stored_twice(
    simulator, db_url, key_env
):
    """The lookback sees hundreds of stored events again (left out unstaged on DuckDB: `store.unstored`): the late
    ones among them land, and one the API serves again with a later effective_at stays one row, as first served."""
    server = simulator(events=1500, seed=9, span_seconds=1800)
    sync(server, db_url)
    server.sim.append(30, late_by=300)  # before the checkpoint, inside the lookback
    [moved] = server.sim.append(1, types=["project.created"])  # the newest, alone in its second
    [summary] = sync(server, db_url)
    assert summary.events_new == 31 and summary.events_seen > 300
    assert_exact(server.sim, db_url)
    time.sleep(1.1)  # a second after the checkpoint
    server.sim.replace({**moved, "effective_at": int(time.time())})
    [summary] = sync(server, db_url)
    assert summary.events_new == 0
    assert scalar(db_url, f"SELECT count(*) FROM audit_events WHERE id = '{moved['id']}'") == 1
    assert stored_events(db_url)[moved["id"]] == moved


def test_run_with_nothing_new_makes_at_most_two_requests(simulator, db_url, key_env):
    server = simulator(events=10000, seed=3)
    sync(server, db_url)
    before = server.sim.requests
    [summary] = sync(server, db_url)
    assert summary.events_new == 0
    assert server.sim.requests - before <= 2
    assert summary.requests <= 2


def test_faults_are_retried_to_an_exact_result(simulator, db_url, key_env):
    server = simulator(
        events=4000, seed=4, fault_rate=0.2, faults=("429ms", "500", "502", "503", "504", "reset", "truncated")
    )
    [summary] = sync(server, db_url)
    assert summary.retries > 0
    assert sum(server.sim.faults_injected.values()) == summary.retries
    assert_exact(server.sim, db_url)


def test_run_killed_mid_sweep_then_rerun_is_exact(simulator, db_url, key_env):
    server = simulator(events=6000, seed=5, latency=0.05)
    env = {"OPENAI_ADMIN_KEY": KEY, "OPENAI_BASE_URL": server.url, "AUDIT_INGEST_DATABASE_URL": db_url}
    # Killed after 35 of about 120 requests, when a batch (1 s of pages) has usually committed; on a busy
    # machine it may not have: then the run starts over and is killed later.
    for requests in (35, 55, 75):
        kill_run_after(server, env, ["run", "--workers", "1"], requests)  # one sweep a stream (test_parallel: split)
        if partial := len(stored_events(db_url)):
            break
    assert 0 < partial < 6000
    assert scalar(db_url, "SELECT count(*) FROM sync_state WHERE sweep_lte IS NOT NULL") == 1  # unfinished sweep kept
    server.sim.append(40)
    # lock_wait: on PostgreSQL the killed run's session may outlive it a moment.
    [summary] = sync(server, db_url, lock_wait=True, workers=1)
    assert summary.events_new == 6040 - partial
    assert_exact(server.sim, db_url)


def test_wrong_key_fails_after_one_request_with_one_clear_line(simulator, db_url):
    server = simulator(events=100)
    env = {
        "OPENAI_ADMIN_KEY": "sk-admin-wrong-key-123456",
        "OPENAI_BASE_URL": server.url,
        "AUDIT_INGEST_DATABASE_URL": db_url,
    }
    result = cli("run", env=env)
    assert result.returncode == 3
    assert server.sim.requests == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert lines == [lines[0]] and "401" in lines[0] and "OPENAI_ADMIN_KEY" in lines[0]
    assert "Traceback" not in result.stderr
    assert "sk-admin-wrong-key-123456" not in result.stderr + result.stdout


def test_not_enabled_is_its_own_error(simulator, db_url):
    server = simulator(events=10, audit_logging_enabled=False)
    env = {
        "OPENAI_ADMIN_KEY": KEY,
        "OPENAI_BASE_URL": server.url,
        "AUDIT_INGEST_DATABASE_URL": db_url,
    }
    result = cli("run", env=env)
    assert result.returncode == 4
    assert "audit logging" in result.stderr and "api.audit_logs.read" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_key_is_a_config_error_before_any_request(simulator, tmp_path):
    server = simulator(events=10)
    result = cli(
        "run", env={"OPENAI_BASE_URL": server.url, "AUDIT_INGEST_DATABASE_URL": f"duckdb:///{tmp_path / 'm.duckdb'}"}
    )
    assert result.returncode == 2
    assert "OPENAI_ADMIN_KEY is not set" in result.stderr
    assert server.sim.requests == 0


def test_cli_run_then_status(simulator, db_url):
    server = simulator(events=500, seed=6)
    env = {
        "OPENAI_ADMIN_KEY": KEY,
        "OPENAI_BASE_URL": server.url,
        "AUDIT_INGEST_DATABASE_URL": db_url,
    }
    result = cli("run", env=env)
    assert result.returncode == 0, result.stderr
    assert "500 new" in result.stdout
    result = cli("status", env=env)
    assert result.returncode == 0, result.stderr
    assert "default" in result.stdout and "500" in result.stdout


def test_expired_cursor_restarts_the_sweep_from_its_top(simulator, db_url, key_env):
    server = simulator(events=800, seed=8)
    settings = settings_for(server, db_url)
    warehouse = Warehouse(db_url)
    warehouse.ensure_schema()
    with warehouse.connect() as conn, conn.begin():
        from ingest.state import SweepState

        SweepState("default", "default", "incremental", sweep_lte=int(time.time()), sweep_cursor="audit_log-gone").save(
            conn
        )
    [summary] = run_sources(settings, warehouse, settings.sources)
    warehouse.dispose()
    assert summary.events_new == 800
    assert_exact(server.sim, db_url)


def test_duckdbs_checkpoint_after_a_sync_waits_for_a_connection_still_writing_and_loses_nothing(
    simulator, duckdb_url, key_env
):
    """`Warehouse.settle` checkpoints the file while the rules finish their last round; DuckDB refuses while
    another connection has an update pending: then the close checkpoints, as it would have."""
    server = simulator(events=300, seed=27)
    sync(server, duckdb_url, detections=False)
    warehouse = Warehouse(duckdb_url)
    try:
        with warehouse.connect() as writer, warehouse.connect() as other:
            writer.exec_driver_sql("UPDATE sync_state SET updated_at = updated_at")  # pending, uncommitted
            warehouse.settle(other)  # refused: no error, nothing lost
            writer.commit()
            warehouse.settle(other)
            assert not other.in_transaction()
    finally:
        warehouse.dispose()
    assert set(stored_events(duckdb_url)) == {e["id"] for e in server.sim.events}


def test_a_run_with_a_few_new_events_on_duckdb_stores_them_exactly_without_importing_pyarrow(simulator, duckdb_url):
    """The hundreds of events its lookback sees again are left out unstaged (`store.unstored`); the few new ones
    are bound, too few to pay for importing pyarrow."""
    server = simulator(events=2000, seed=8, span_seconds=1800)  # the 15-minute lookback sees half of them again
    env = {"OPENAI_ADMIN_KEY": KEY, "OPENAI_BASE_URL": server.url, "AUDIT_INGEST_DATABASE_URL": duckdb_url}
    assert cli("run", env=env).returncode == 0
    server.sim.append(3)
    report = "import atexit, sys; atexit.register(lambda: print('pyarrow' in sys.modules))"
    quiet = subprocess.run(
        [sys.executable, "-c", f"{report}; from ingest.cli import main; sys.argv[1:] = ['run']; main()"],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert quiet.returncode == 0, quiet.stderr
    seen = int(quiet.stdout.split(" events seen")[0].rsplit(" ", 1)[-1].replace(",", ""))
    assert seen > 300 and "3 new" in quiet.stdout and quiet.stdout.splitlines()[-1] == "False"
    assert_exact(server.sim, duckdb_url)
    assert_verified(duckdb_url, 2003)  # typed rows as derived from raw, the ledger whole
