"""Backfills: exactly the half-open window, resumable after a kill, the same rows whatever the slicing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from support import KEY, cli, scalar, settings_for, stored_events

from ingest import model, sync
from ingest.config import load_settings
from ingest.store import Warehouse

DAY = 86400


def in_window(sim, since: int, until: int) -> set[str]:
    return {e["id"] for e in sim.events if since <= e["effective_at"] < until}


def backfill(server, url, since: int, until: int | None, workers: int = 1) -> sync.RunSummary:
    settings = settings_for(server, url)
    warehouse = Warehouse(url)
    try:
        [summary] = sync.backfill(
            settings, warehouse, settings.sources, datetime.fromtimestamp(since, UTC),
            None if until is None else datetime.fromtimestamp(until, UTC), workers=workers,
        )  # fmt: skip
    finally:
        warehouse.dispose()
    return summary


def test_backfill_loads_exactly_its_half_open_window_and_leaves_the_incremental_checkpoint(
    simulator, duckdb_url, key_env
):
    server = simulator(events=3000, seed=31)
    now = int(time.time())
    settings = settings_for(server, duckdb_url, start=now - 2 * DAY)
    warehouse = Warehouse(duckdb_url)
    sync.run_sources(settings, warehouse, settings.sources)  # the incremental copy: the last two days
    warehouse.dispose()
    recent = in_window(server.sim, now - 2 * DAY, now + 1)
    checkpoints = scalar(
        duckdb_url,
        "SELECT string_agg(key || '=' || checkpoint, ',' ORDER BY key) FROM sync_state WHERE kind = 'incremental'",
    )  # not the consumers' checkpoints, which the backfill's batches move

    times = sorted({e["effective_at"] for e in server.sim.events if e["effective_at"] < now - 3 * DAY})
    since, until = times[len(times) // 4], times[len(times) // 2]  # both bounds are times of events
    # --since in another time zone and --until in UTC: the same instants.
    since_text = datetime.fromtimestamp(since, timezone(timedelta(hours=2))).isoformat()
    until_text = datetime.fromtimestamp(until, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    env = {"OPENAI_ADMIN_KEY": KEY, "OPENAI_BASE_URL": server.url, "AUDIT_INGEST_DATABASE_URL": duckdb_url}
    result = cli("backfill", "--since", since_text, "--until", until_text, "--workers", "3", env=env)
    assert result.returncode == 0, result.stderr

    window = in_window(server.sim, since, until)
    at_since = {e["id"] for e in server.sim.events if e["effective_at"] == since}
    at_until = {e["id"] for e in server.sim.events if e["effective_at"] == until}
    stored = stored_events(duckdb_url)
    assert set(stored) == recent | window
    assert at_since <= set(stored) and not at_until & set(stored)  # inclusive start, exclusive end
    assert all(stored[i] == e for e in server.sim.events if (i := e["id"]) in window)
    assert f"{len(window):,} new" in result.stdout
    assert scalar(duckdb_url, "SELECT events_new FROM sync_runs WHERE kind = 'backfill' AND status = 'ok'") == len(
        window
    )
    keys = scalar(duckdb_url, "SELECT string_agg(key, ',' ORDER BY key) FROM sync_state WHERE kind = 'backfill'")
    assert keys.split(",") == sorted(
        f"backfill:default:{since}:{until}:{i}/3{suffix}" for i in range(3) for suffix in ("", "#tenant")
    )
    assert scalar(duckdb_url, "SELECT count(*) FROM sync_state WHERE kind = 'backfill' AND checkpoint IS NULL") == 0
    assert (
        scalar(duckdb_url, "SELECT string_agg(key || '=' || checkpoint, ',' ORDER BY key) FROM sync_state "
               "WHERE kind = 'incremental'") == checkpoints
    )  # fmt: skip


def test_killed_backfill_resumes_to_an_exact_result(simulator, duckdb_url):
    server = simulator(events=5000, seed=32, latency=0.5)  # 3 slices at a time: about 7 s
    since = int(time.time()) - 20 * DAY
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("AUDIT_INGEST_", "OPENAI_"))},
           "OPENAI_ADMIN_KEY": KEY, "OPENAI_BASE_URL": server.url, "AUDIT_INGEST_DATABASE_URL": duckdb_url}  # fmt: skip
    since_text = datetime.fromtimestamp(since, UTC).isoformat()
    # No --until: the window ends now, and the rerun (also without --until) must find the same window.
    # Killed 2 s after its first request, when batches (1 s of pages) have usually committed; on a busy
    # machine they may not have: then the backfill starts over and is killed later.
    for seconds in (2.0, 3.0, 4.0):
        start = server.sim.requests
        proc = subprocess.Popen([sys.executable, "-m", "ingest", "backfill", "--since", since_text, "--workers", "3"],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        deadline = time.monotonic() + 60
        while server.sim.requests == start and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(seconds)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if partial := set(stored_events(duckdb_url)):
            break
    server.sim.latency = 0
    [until] = {int(k.split(":")[3]) for k in _keys(duckdb_url)}
    full = in_window(server.sim, since, until)
    assert 0 < len(partial) < len(full) and partial <= full
    requests_before = server.sim.requests
    server.sim.append(20)  # after `until`: not part of the window

    result = cli("backfill", "--since", since_text, "--workers", "1", env=env)
    assert result.returncode == 0, result.stderr
    assert set(stored_events(duckdb_url)) == full
    assert f"{len(full) - len(partial):,} new" in result.stdout
    assert {int(k.split(":")[3]) for k in _keys(duckdb_url)} == {until}
    assert all("/3" in k for k in _keys(duckdb_url))  # the slicing of the killed run, whatever --workers says now
    # Resumed, not restarted: each sweep went on from its last committed cursor.
    assert scalar(duckdb_url, "SELECT events_seen FROM sync_runs WHERE status = 'ok'") == len(full) - len(partial)
    assert (
        scalar(duckdb_url, "SELECT pages FROM sync_runs WHERE status = 'ok'") == server.sim.requests - requests_before
    )
    assert scalar(duckdb_url, "SELECT status FROM sync_runs WHERE status <> 'ok'") == "abandoned"  # the killed run


def _keys(url: str) -> list[str]:
    return scalar(url, "SELECT string_agg(key, ',') FROM sync_state WHERE kind = 'backfill'").split(",")


@pytest.fixture(params=["duckdb", "postgresql"])
def two_urls(request, tmp_path) -> tuple[str, str]:
    """Two fresh warehouses on one backend."""
    if request.param == "duckdb":
        return f"duckdb:///{tmp_path / 'one.duckdb'}", f"duckdb:///{tmp_path / 'four.duckdb'}"
    database, admin = request.getfixturevalue("pg_database")
    urls = []
    for _ in range(2):
        schema = f"test_{uuid.uuid4().hex[:12]}"
        admin(f'CREATE SCHEMA "{schema}"')
        urls.append(database.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(False))
    return urls[0], urls[1]


def all_rows(url: str) -> dict[str, list[tuple]]:
    """Every row of every event and actor table, in a stable order, without when and in which batch it was written."""
    result = {}
    warehouse = Warehouse(url)
    try:
        with warehouse.connect() as conn:
            for table in (model.audit_events, *model.DIMENSIONS, *model.TYPED_TABLES):
                columns = [c for c in table.columns if c.name not in ("ingested_at", "batch_seq")]
                rows = conn.execute(sa.select(*columns).order_by(*table.primary_key.columns)).all()
                result[table.name] = [
                    tuple(json.loads(v) if isinstance(v, str) and isinstance(c.type, sa.JSON) else v
                          for v, c in zip(row, columns, strict=True)) for row in rows
                ]  # fmt: skip
    finally:
        warehouse.dispose()
    return result


def test_four_concurrent_slices_give_the_same_rows_as_one(simulator, two_urls, key_env):
    # 429s on a share of requests: the slices share one client, so one rate-limit pause holds them all.
    server = simulator(events=1500, seed=33, fault_rate=0.15, faults=("429", "500"))
    since, until = int(time.time()) - 25 * DAY, int(time.time()) - 2 * DAY
    one, four = two_urls
    first = backfill(server, one, since, until, workers=1)
    second = backfill(server, four, since, until, workers=4)
    window = in_window(server.sim, since, until)
    assert first.events_new == second.events_new == len(window)
    assert set(stored_events(four)) == window
    rows = all_rows(four)
    assert rows == all_rows(one)
    assert len(rows["audit_events"]) == len(window) and sum(map(len, rows.values())) > 2 * len(window)
    done = "SELECT count(*) FROM sync_state WHERE checkpoint IS NOT NULL AND kind = 'backfill'"
    assert scalar(four, done) == 8  # 4 slices x 2 streams
    assert second.retries > 0 and sum(server.sim.faults_injected.values()) == first.retries + second.retries


def test_empty_window_is_refused_before_any_request(simulator, duckdb_url):
    server = simulator(events=10)
    env = {"OPENAI_ADMIN_KEY": KEY, "OPENAI_BASE_URL": server.url, "AUDIT_INGEST_DATABASE_URL": duckdb_url}
    result = cli("backfill", "--since", "2026-02-01", "--until", "2026-01-01", env=env)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "empty" in result.stderr
    assert server.sim.requests == 0


def test_every_slice_of_the_main_stream_is_scheduled_before_the_tenant_streams(duckdb_url, key_env):
    # The pool takes sweeps in this order: a large main-stream slice started last would leave the other
    # workers idle while it runs alone (the tenant stream is usually the smaller one).
    settings = load_settings(None, database_url=duckdb_url)
    warehouse = Warehouse(duckdb_url)
    try:
        warehouse.upgrade()
        with warehouse.connect() as conn, conn.begin():
            pending = sync._slices(conn, settings.sources[0], 1_000_000, 1_000_400, workers=4)
            stored = conn.execute(sa.select(sa.func.count()).select_from(model.sync_state)).scalar()
    finally:
        warehouse.dispose()
    keys = [state.key.rpartition(":")[2] for state, _ in pending]
    assert keys == ["0/4", "1/4", "2/4", "3/4", "0/4#tenant", "1/4#tenant", "2/4#tenant", "3/4#tenant"]
    bounds = [(1_000_000, 1_000_099), (1_000_100, 1_000_199), (1_000_200, 1_000_299), (1_000_300, 1_000_399)]
    assert [(s.sweep_gte, s.sweep_lte) for s, _ in pending] == bounds * 2
    assert [f.tenant_only for _, f in pending] == [False] * 4 + [True] * 4 and stored == 8
