"""Completeness coverage: every completed sweep's window is kept per stream, merged; `status` shows where the copy
is complete from and each gap, a gap older than the API's retention as lost upstream, and the daemon exports it."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import sqlalchemy as sa
from support import select, settings_for, sync

from ingest import coverage, model
from ingest import sync as engine
from ingest.api import Stats
from ingest.config import load_settings
from ingest.coverage import Gap, Window
from ingest.metrics import Metrics
from ingest.report import status_rows
from ingest.store import Warehouse

DAY = 86400


def windows(url: str) -> list[tuple[str, int, int, str]]:
    table = model.sweep_windows
    rows = select(url, sa.select(table.c.stream, table.c.gte, table.c.lte, table.c.kind).order_by("stream", "gte"))
    return [tuple(r) for r in rows]


def checkpoints(url: str) -> dict[str, int]:
    table = model.sync_state
    return dict(select(url, sa.select(table.c.key, table.c.checkpoint).where(table.c.kind == "incremental")))


def backfill(server, url: str, since: int, until: int, **overrides) -> None:
    settings = settings_for(server, url, **overrides)
    warehouse = Warehouse(url)
    try:
        engine.backfill(settings, warehouse, settings.sources, datetime.fromtimestamp(since, UTC),
                        datetime.fromtimestamp(until, UTC), workers=2)  # fmt: skip
    finally:
        warehouse.dispose()


def status(url: str, **overrides) -> dict:
    warehouse = Warehouse(url)
    try:
        rows = status_rows(warehouse, load_settings(None, database_url=url, **overrides))
        [row] = [r for r in rows if r["source"] == "default"]
    finally:
        warehouse.dispose()
    return row


def test_a_first_sync_covers_the_apis_retention_to_its_top_and_incrementals_extend_that_one_window(
    simulator, db_url, key_env
):
    server = simulator(events=3000, seed=81)  # more than a sweep's first pages: the first sync is split in slices
    [first] = sync(server, db_url, workers=4)
    ended = int(time.time())
    assert first.events_new == 3000
    top = checkpoints(db_url)
    # From what the API still held when the sweep ended, retention before then, to the sweep's top.
    found = windows(db_url)
    assert [(s, lte, kind) for s, _, lte, kind in found] == [(s, top[s], "first sync") for s in sorted(top)]
    assert all(gte <= ended - 30 * DAY for s, gte, _, _ in found)
    start = {s: gte for s, gte, _, _ in found}

    time.sleep(1.1)  # the next sweep's top is a later second
    server.sim.append(20)
    [second] = sync(server, db_url)
    assert second.events_new == 20
    later = checkpoints(db_url)
    assert all(later[s] > top[s] for s in top)
    # Still one row per stream: the incremental window overlapped the first one (lookback) and merged into it.
    assert windows(db_url) == [(s, start[s], later[s], "incremental") for s in sorted(top)]
    assert status(db_url)["coverage"] == (
        f"complete from {_when(start['default'])}; tenant complete from {_when(start['default#tenant'])}"
    )
    assert status(db_url)["gaps"] == ""


def test_a_backfill_adds_its_window_and_status_shows_the_gap_between_the_part_lost_upstream_marked(
    simulator, db_url, key_env
):
    server = simulator(events=2000, seed=82)
    now = int(time.time())
    sync(server, db_url, start=now - 3 * DAY)
    backfill(server, db_url, now - 10 * DAY, now - 8 * DAY)
    top = checkpoints(db_url)["default"]
    main = [w for w in windows(db_url) if w[0] == "default"]
    assert main == [
        ("default", now - 10 * DAY, now - 8 * DAY - 1, "backfill"),
        ("default", now - 3 * DAY, top, "first sync"),
    ]

    # With a retention of a week, the older part of the gap is beyond what the API holds.
    # status reads its own clock: the cutoff is a second in the span around the call.
    asked = int(time.time())
    row = status(db_url, retention="7d")
    answered = int(time.time())
    assert row["coverage"].startswith(f"complete from {_when(now - 3 * DAY)}")
    assert any(
        row["gaps"].startswith(
            f"gap [{_when(now - 8 * DAY)}, {_when(cutoff - 1)}] lost upstream; gap [{_when(cutoff)}, {_when(now - 3 * DAY - 1)}]"
        )
        for cutoff in range(asked - 7 * DAY, answered - 7 * DAY + 1)
    ), row["gaps"]

    backfill(server, db_url, now - 8 * DAY, now - 3 * DAY)  # the gap filled: one window again
    assert [w[1:3] for w in windows(db_url) if w[0] == "default"] == [(now - 10 * DAY, top)]
    assert status(db_url, retention="7d")["gaps"] == ""


def test_the_daemon_exports_the_seconds_lost_upstream_and_the_gaps_it_can_still_fetch(db_url):
    warehouse = Warehouse(db_url)
    warehouse.ensure_schema()
    now = int(time.time())
    try:
        with warehouse.connect() as conn, conn.begin():
            for gte, lte in ((now - 40 * DAY, now - 35 * DAY), (now - 20 * DAY, now - 10 * DAY), (now - DAY, now)):
                coverage.record(conn, "default", False, gte, lte, "backfill")
            coverage.record(conn, "default", False, now - 10 * DAY, now - 5 * DAY, "backfill")  # merges into one
            streams = coverage.streams(conn, now=now, retention=30 * DAY)
        assert [c.windows for c in streams] == [
            [Window(now - 40 * DAY, now - 35 * DAY), Window(now - 20 * DAY, now - 5 * DAY), Window(now - DAY, now)]
        ]
        assert streams[0].gaps == [
            Gap(now - 35 * DAY + 1, now - 30 * DAY - 1, True),
            Gap(now - 30 * DAY, now - 20 * DAY - 1, False),
            Gap(now - 5 * DAY + 1, now - DAY - 1, False),
        ]
        metrics = Metrics()
        metrics.observe("default", "ok", events_new=0, stats=Stats(), newest=None)
        metrics.observe_coverage("default", streams)
        sample = metrics.registry.get_sample_value
        assert sample("audit_ingest_coverage_lost_upstream_seconds", {"source": "default"}) == 5 * DAY - 1
        assert sample("audit_ingest_coverage_gap_seconds", {"source": "default"}) == 10 * DAY + 4 * DAY - 1
    finally:
        warehouse.dispose()


def _when(unix: int) -> str:
    return datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
