"""A long sweep (a first sync) is split after its first page into time slices fetched concurrently, each with
its own state row; the incremental checkpoint moves only when every slice is done, and a killed run resumes
the slices where they stopped."""

from __future__ import annotations

import logging

import sqlalchemy as sa
from support import KEY, kill_run_after, scalar, select, stored_events, sync

from ingest import coverage
from ingest.model import is_tenant_scoped
from ingest.store import Warehouse


def assert_exact(sim, url) -> None:
    assert stored_events(url) == {e["id"]: e for e in sim.events}


def test_a_first_sync_is_split_into_slices_and_is_exact(simulator, db_url, key_env, caplog):
    server = simulator(events=6000, seed=61, latency=0.03)  # slower than sync.SPLIT_LATENCY a page
    with caplog.at_level(logging.INFO, logger="ingest.sync"):
        [summary] = sync(server, db_url, workers=4)
    assert summary.status == "ok" and summary.events_new == 6000
    assert any("in 4 slices" in r.getMessage() for r in caplog.records)
    assert_exact(server.sim, db_url)
    assert scalar(db_url, "SELECT count(*) FROM sync_state WHERE kind = 'slice'") == 0  # dropped once done
    assert scalar(db_url, "SELECT count(*) FROM sync_state WHERE kind = 'incremental' AND checkpoint IS NULL") == 0

    server.sim.append(50)
    before = server.sim.requests
    [summary] = sync(server, db_url, workers=4)
    assert summary.events_new == 50 and server.sim.requests - before == 2  # one page a stream: no split
    assert_exact(server.sim, db_url)


def test_a_first_sync_from_an_api_faster_than_this_machine_stores_its_pages_stays_one_sweep(
    simulator, duckdb_url, key_env, caplog, monkeypatch
):
    monkeypatch.setattr("ingest.sync.SPLIT_LATENCY", 10.0)  # any page is served faster than that
    server = simulator(events=6000, seed=61, latency=0.03)
    with caplog.at_level(logging.INFO, logger="ingest.sync"):
        [summary] = sync(server, duckdb_url, workers=4)
    assert summary.events_new == 6000 and not any("slices" in r.getMessage() for r in caplog.records)
    assert scalar(duckdb_url, "SELECT count(*) FROM ingest_batches WHERE state_key LIKE 'slice:%'") == 0
    tenant = sum(is_tenant_scoped(e["type"]) for e in server.sim.events)
    assert server.sim.requests == (6000 - tenant) // 100 + 1 + tenant // 100 + 1  # each stream's pages, in order
    assert_exact(server.sim, duckdb_url)


def test_a_small_first_sync_makes_one_request_a_stream(simulator, duckdb_url, key_env):
    server = simulator(events=60, seed=62)
    sync(server, duckdb_url, workers=4)
    assert server.sim.requests == 2
    assert_exact(server.sim, duckdb_url)


def test_a_split_first_sync_killed_mid_way_resumes_its_slices_and_ends_exact(simulator, db_url, key_env):
    server = simulator(events=8000, seed=63, latency=0.05)
    env = {"OPENAI_ADMIN_KEY": KEY, "OPENAI_BASE_URL": server.url, "AUDIT_INGEST_DATABASE_URL": db_url}
    # Killed once some slices have committed (about 90 requests in all); a busy machine may need a later kill.
    for requests in (30, 50, 70):
        kill_run_after(server, env, ["run", "--workers", "4"], requests)
        slices = scalar(db_url, "SELECT count(*) FROM sync_state WHERE kind = 'slice' AND checkpoint IS NULL")
        if slices and len(stored_events(db_url)) > 100:
            break
    assert slices > 0  # the killed run left slices to do
    # A stream with slices to do has not moved its checkpoint.
    assert scalar(db_url, "SELECT count(*) FROM sync_state WHERE kind = 'incremental' AND checkpoint IS NULL") >= 1
    [summary] = sync(server, db_url, lock_wait=True, workers=4)
    assert summary.status == "ok"
    assert_exact(server.sim, db_url)
    assert scalar(db_url, "SELECT count(*) FROM sync_state WHERE kind = 'slice'") == 0


def test_a_stop_before_the_slices_get_a_worker_fails_the_run_and_the_rerun_sweeps_them(
    simulator, duckdb_url, key_env, monkeypatch
):
    import threading

    import pytest
    from support import settings_for

    from ingest import sync as engine
    from ingest.errors import Interrupted

    server = simulator(events=3000, seed=66, latency=0.03)
    stop = threading.Event()
    split = engine._split

    def split_then_stop(*args):
        parts = split(*args)
        stop.set()  # the main stream's slices are saved; no worker has taken one yet
        return parts

    monkeypatch.setattr(engine, "_split", split_then_stop)
    settings = settings_for(server, duckdb_url, workers=4)
    warehouse = Warehouse(duckdb_url)
    try:
        with pytest.raises(Interrupted):
            engine.run_sources(settings, warehouse, settings.sources, stop=stop)
    finally:
        warehouse.dispose()
    # Neither stream's checkpoint moved: the window is not lost.
    assert (
        scalar(duckdb_url, "SELECT count(*) FROM sync_state WHERE kind = 'incremental' AND checkpoint IS NOT NULL") == 0
    )
    monkeypatch.setattr(engine, "_split", split)
    [summary] = sync(server, duckdb_url, workers=4)
    assert summary.status == "ok"
    assert_exact(server.sim, duckdb_url)


def test_idle_workers_split_the_dense_slice_still_running_and_the_whole_window_is_covered(
    simulator, db_url, key_env, caplog
):
    # Sparse history, then one dense hour at the top (of the main stream): the first sync's four equal slices of
    # time leave that hour to one slice, which the others, done after a page each, split while it runs.
    server = simulator(events=300, seed=64, latency=0.03)
    for minute in range(60):
        server.sim.append(60, late_by=61 + 60 * minute, types=["login.succeeded", "api_key.created"])
    with caplog.at_level(logging.INFO, logger="ingest.sync"):
        [summary] = sync(server, db_url, workers=4)
    assert summary.status == "ok" and summary.events_new == len(server.sim.events)
    assert any("in 4 slices" in r.getMessage() for r in caplog.records)
    assert_exact(server.sim, db_url)
    # Slices split off running ones committed batches of their own: the main stream's batches came from more
    # slices than the four the split made.
    query = (
        "SELECT DISTINCT state_key FROM ingest_batches WHERE state_key LIKE 'slice:%' AND state_key NOT LIKE '%#tenant'"
    )
    split_off = sum("the part below goes on as" in r.getMessage() for r in caplog.records)
    assert split_off >= 1 and len(select(db_url, sa.text(query))) > 4
    # Every slice's window was recorded: one window a stream, from the oldest event (or before) to the run's end.
    warehouse = Warehouse(db_url)
    try:
        with warehouse.connect() as conn:
            found = {tenant: coverage.union(conn, "default", tenant) for tenant in (False, True)}
    finally:
        warehouse.dispose()
    for tenant, windows in found.items():
        served = [e["effective_at"] for e in server.sim.events if is_tenant_scoped(e["type"]) == tenant]
        assert len(windows) == 1 and windows[0].gte <= min(served) and windows[0].lte >= max(served)
    assert scalar(db_url, "SELECT count(*) FROM sync_state WHERE kind = 'slice'") == 0
