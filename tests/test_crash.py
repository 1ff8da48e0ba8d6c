"""Crash safety: `audit-ingest run` (and `backfill`) SIGKILLed at random moments and rerun, again and again,
ends with exactly the simulator's events in the warehouse: the same ids, each once, `raw` as served.

CI kills each run 6 times; `pytest tests/test_crash.py --crash-kills=25` (or AUDIT_INGEST_CRASH_KILLS=25)
is the full test (README, "Guarantees").
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from support import KEY, assert_verified, cli, scalar, stored_events

from ingest.store import Warehouse

# The simulator answers each request this much later: a run lasts seconds even on a fast machine.
LATENCY = 0.005
# A backfill's workers fetch in parallel: it needs more time per page to outlast its kills (at 30 ms, a
# balanced 2-worker backfill on a fast machine sometimes finished before its sixth kill).
BACKFILL_LATENCY = 0.05
# A first sync's four workers, twice the backfill's: twice its latency for the same events a second.
PARALLEL_LATENCY = 0.1


@pytest.fixture
def kills(request) -> int:
    return request.config.getoption("--crash-kills")


def kill_repeatedly(server, url: str, env: dict, args: list[str], kills: int, log: Path, between=None) -> list[int]:
    """Starts `audit-ingest *args` and SIGKILLs it at a random moment, until `kills` kills hit a running
    process; `between(killed)` runs after each run. Most kills land in the first seconds of fetching
    (before, between and during the commits, one per second or so), some during start-up. After kills
    that found nothing committed, the window widens: a slow machine needs longer to reach a commit.

    Returns the number of stored events after each kill, which must never shrink: a commit is forever.
    """
    rng = random.Random()
    stored: list[int] = []
    fruitless = 0  # kills in a row after which the warehouse held no more than before
    while len(stored) < kills:
        start = server.sim.requests
        with log.open("w") as stderr:
            proc = subprocess.Popen(
                [sys.executable, "-m", "ingest", *args], env=env, stdout=subprocess.DEVNULL, stderr=stderr
            )
        if rng.random() < 0.15:  # imports, opening the warehouse, migrations
            kill_at = time.monotonic() + rng.uniform(0, 1.0)
        else:
            while proc.poll() is None and server.sim.requests == start:
                time.sleep(0.002)
            kill_at = time.monotonic() + rng.uniform(0, 2.5 * (1 + fruitless))
        while proc.poll() is None and time.monotonic() < kill_at:
            time.sleep(0.002)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            stored.append(stored_count(url))
            assert stored == sorted(stored), f"stored events shrank after a kill: {stored}"
            fruitless = fruitless + 1 if len(stored) > 1 and stored[-1] == stored[-2] else 0
        else:
            assert proc.returncode == 0, log.read_text()
            if between is None:
                pytest.fail(f"the run finished after only {len(stored)} kills: give it more events")
        if between:
            between(killed=proc.returncode == -signal.SIGKILL)
    return stored


def stored_count(url: str, query: str = "SELECT count(*) FROM audit_events") -> int:
    """Events in the warehouse (or `query`'s count); 0 before the first run created its tables."""
    warehouse = Warehouse(url)
    try:
        with warehouse.connect() as conn:
            if not sa.inspect(conn).has_table("audit_events"):
                return 0
            return conn.execute(sa.text(query)).scalar()
    finally:
        warehouse.dispose()


def assert_exact(server, url: str) -> None:
    stored = stored_events(url)
    served = {e["id"]: e for e in server.sim.events}
    assert stored.keys() == served.keys()
    assert stored == served
    assert scalar(url, "SELECT count(DISTINCT id) FROM audit_events") == len(served)
    assert_verified(url, len(served))  # every batch that committed before a kill is in the ledger, and only those


def test_run_killed_at_random_moments_ends_exact(simulator, tmp_path, kills):
    server = simulator(events=max(30_000, 2_000 * kills), seed=21, latency=LATENCY)
    url = f"duckdb:///{tmp_path / 'crash.duckdb'}"
    env = {"OPENAI_ADMIN_KEY": KEY, "OPENAI_BASE_URL": server.url, "AUDIT_INGEST_DATABASE_URL": url}
    rng = random.Random(21)

    def between(killed: bool) -> None:
        server.sim.append(rng.randint(0, 150) if killed else 2_000)  # a finished run: give the next one work
        server.sim.append(rng.randint(0, 30), late_by=rng.randint(1, 600))  # late, within the lookback

    stored = kill_repeatedly(server, url, env, ["run"], kills, tmp_path / "stderr.log", between)
    print(f"\nrun: {kills} kills survived; events stored at each kill: {stored}; {len(server.sim.events)} served")
    assert stored[-1] < len(server.sim.events)
    result = cli("run", env=env)
    assert result.returncode == 0, result.stderr
    assert_exact(server, url)
    assert scalar(url, "SELECT count(*) FROM sync_state WHERE sweep_lte IS NOT NULL") == 0


def test_backfill_killed_at_random_moments_ends_exact(simulator, tmp_path, kills):
    server = simulator(events=max(40_000, 8_000 * kills), seed=22, latency=BACKFILL_LATENCY)
    url = f"duckdb:///{tmp_path / 'crash.duckdb'}"
    env = {"OPENAI_ADMIN_KEY": KEY, "OPENAI_BASE_URL": server.url, "AUDIT_INGEST_DATABASE_URL": url}
    since = str(min(e["effective_at"] for e in server.sim.events))
    args = ["backfill", "--since", since, "--workers", "2"]
    stored = kill_repeatedly(server, url, env, args, kills, tmp_path / "stderr.log")
    print(f"\nbackfill: {kills} kills survived; events stored at each kill: {stored}")
    result = cli(*args, env=env)
    assert result.returncode == 0, result.stderr
    assert_exact(server, url)


def test_parallel_first_sync_killed_at_random_moments_ends_exact(simulator, tmp_path, kills):
    server = simulator(events=2_000, seed=23, latency=PARALLEL_LATENCY)
    # Then a dense stretch of the last hours, oldest first: each stream's newest slice holds it, and the workers
    # done with the sparse slices split it again and again while kills land.
    appends = max(40_000, 8_000 * kills) // 200
    for i in range(appends):
        server.sim.append(200, late_by=61 + 10 * (appends - i))
    url = f"duckdb:///{tmp_path / 'crash.duckdb'}"
    env = {"OPENAI_ADMIN_KEY": KEY, "OPENAI_BASE_URL": server.url, "AUDIT_INGEST_DATABASE_URL": url}
    args = ["run", "--workers", "4"]
    slices: list[int] = []  # the slice rows of the split first sync after each kill

    def between(killed: bool) -> None:
        if not killed:
            pytest.fail(f"the first sync finished after only {len(slices)} kills: give it more events")
        slices.append(stored_count(url, "SELECT count(*) FROM sync_state WHERE kind = 'slice'"))

    stored = kill_repeatedly(server, url, env, args, kills, tmp_path / "stderr.log", between)
    print(f"\nparallel first sync: {kills} kills survived; events stored at each kill: {stored}; slice rows: {slices}")
    assert max(slices) >= 8  # each stream split into 4 slices, their rows kept across kills
    result = cli(*args, env=env)
    assert result.returncode == 0, result.stderr
    assert_exact(server, url)
    # Slices split off running ones committed batches of their own.
    assert scalar(url, "SELECT count(DISTINCT state_key) FROM ingest_batches WHERE state_key LIKE 'slice:%'") > 8
    assert scalar(url, "SELECT count(*) FROM sync_state WHERE sweep_lte IS NOT NULL OR kind = 'slice'") == 0
    assert scalar(url, "SELECT count(*) FROM sync_state WHERE kind = 'incremental' AND checkpoint IS NULL") == 0
    # Every slice, finished in whichever run, recorded its window: one window a stream, no gap.
    assert scalar(url, "SELECT count(*) FROM sweep_windows") == 2
