"""Many sources: daemons (real processes) syncing the organizations of one simulator (one key each) into one
PostgreSQL warehouse, on a schedule of short ticks; everything asserted on what the warehouse and the simulator
read back."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC
from pathlib import Path

import pytest
import sqlalchemy as sa
from support import select
from test_daemon import _no_daemon_outlives_its_test, _started, free_port, metric  # noqa: F401  (the fixture)

from ingest import model
from ingest.errors import DatabaseError
from ingest.simulator import Organizations, Simulator, SimulatorServer, is_tenant_scoped, organizations


def config(path: Path, orgs: Organizations, *, tenant_events: bool = True, **settings) -> tuple[Path, dict[str, str]]:
    """A TOML file with one [[sources]] per organization (`org-<i>`, its key in ORG_<i>_KEY, i from 1), and that
    environment."""
    lines = [f"{k} = {json.dumps(v)}" for k, v in settings.items()]  # JSON's scalars are TOML's
    env = {}
    for i, key in enumerate(orgs.by_key, 1):
        lines += [
            "[[sources]]",
            f'name = "org-{i}"',
            f'key_env = "ORG_{i}_KEY"',
            f"tenant_events = {json.dumps(tenant_events)}",
        ]
        env[f"ORG_{i}_KEY"] = key
    path.write_text("\n".join(lines) + "\n")
    return path, env


def start_daemon(server: SimulatorServer, url: str, toml: Path, keys: dict[str, str], *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUDIT_INGEST_", "OPENAI_"))}
    env.update(keys, OPENAI_BASE_URL=server.url, AUDIT_INGEST_DATABASE_URL=url)
    proc = subprocess.Popen([sys.executable, "-m", "ingest", "--config", str(toml), "daemon", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    _started.append(proc)
    return proc


def runs(url: str) -> list:
    """(source, tick, status) of every sync_runs row, the tick being its start time on the grid of `period`."""
    r = model.sync_runs
    return select(url, sa.select(r.c.source, r.c.started_at, r.c.status, r.c.pages, r.c.retries))


def tick_of(row, period: float) -> int:
    return int(row.started_at.replace(tzinfo=UTC).timestamp() // period)  # the warehouse's times: naive UTC


def ok_ticks(url: str, period: float) -> dict[str, list[int]]:
    """Per source, the tick of each run that ended ok, in order."""
    found: dict[str, list[int]] = {}
    for row in runs(url):
        if row.status == "ok":
            found.setdefault(row.source, []).append(tick_of(row, period))
    return {source: sorted(ticks) for source, ticks in found.items()}


def wait_until(condition, timeout: float, procs: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + timeout
    while not _holds(condition):
        for proc in procs:
            if proc.poll() is not None:
                pytest.fail(f"a daemon exited ({proc.returncode}): {proc.communicate()[1][-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail("timed out")
        time.sleep(0.1)


def _holds(condition) -> bool:
    try:
        return condition()
    except DatabaseError:  # no daemon has created the tables yet
        return False


def test_a_slow_or_failing_source_delays_no_other_and_the_sources_share_one_request_budget(pg_url, tmp_path):
    period = 4.0  # a small source's run, on a loaded machine, well within a tick: it starts in its own
    orgs = Organizations([
        Simulator(key="sk-admin-slow", events=50, seed=61, latency=20.0),  # a run of two requests: 40 s
        Simulator(key="sk-admin-big-1", events=3000, seed=62),
        Simulator(key="sk-admin-big-2", events=3000, seed=63),
        *organizations(3, key="sk-admin-small", seed=64, events=100).by_key.values(),
    ])  # fmt: skip
    with SimulatorServer(orgs) as server:
        # A place for every source: with the slow one holding a place for 20 s, the default 4 leave 3 for six
        # jobs a tick, and a job that starts after its tick's boundary counts for the next one.
        toml, keys = config(tmp_path / "sources.toml", orgs, max_requests_per_second=20, detections=False,
                            max_concurrent_sources=8)  # fmt: skip
        toml.write_text(toml.read_text() + '[[sources]]\nname = "org-failing"\nkey_env = "ORG_FAILING_KEY"\n')
        keys["ORG_FAILING_KEY"] = "sk-admin-revoked"  # no organization's: 401 at every run
        proc = start_daemon(server, pg_url, toml, keys, "--interval", f"{period}s")
        requests = lambda: sum(sim.requests for sim in orgs.by_key.values())  # noqa: E731
        wait_until(lambda: requests() > 0, 30, [proc])
        first, samples, bigs_done = time.monotonic(), [], None
        # Until the big sources' first syncs are done (they fill the pool of 4 at first), then 3 ticks more.
        while bigs_done is None or time.time() < (bigs_done + 4) * period:
            samples.append((time.monotonic() - first, requests()))
            if bigs_done is None and {"org-2", "org-3"} <= ok_ticks(pg_url, period).keys():
                bigs_done = int(time.time() // period)
            assert bigs_done is not None or time.monotonic() - first < 30, "the big sources' first syncs take too long"
            time.sleep(0.05)
        synced = ok_ticks(pg_url, period)
        code = proc.send_signal(signal.SIGTERM) or proc.wait(timeout=30)
        stderr = proc.communicate()[1]
    assert code == 0, stderr[-3000:]
    # Every source asks for starts at once: together they stay under the one budget of 20 a second.
    assert samples[-1][1] > 60
    assert all(count <= 20 * elapsed + 3 for elapsed, count in samples), samples
    # Then the small sources are synced in each tick, while the slow one's first run still waits for its API and
    # the failing one fails.
    for source in ("org-4", "org-5", "org-6"):
        assert set(range(bigs_done + 1, bigs_done + 4)) <= set(synced[source]), (source, bigs_done, synced)
    assert "org-1" not in synced
    assert "org-failing: run failed (1 in a row)" in stderr and "401" in stderr
    for source in ("org-2", "org-3", "org-4", "org-5", "org-6"):
        sim = orgs.by_key[keys[f"ORG_{source[4:]}_KEY"]]
        assert {e["id"] for e in sim.events} <= set(stored_events_of(pg_url, source))


def stored_events_of(url: str, source: str) -> list[str]:
    events = model.audit_events
    return [row.id for row in select(url, sa.select(events.c.id).where(events.c.source == source))]


def test_three_daemons_sync_each_of_30_sources_once_a_tick_and_take_over_a_killed_ones_within_a_tick(pg_url, tmp_path):
    # Ticks long enough for 30 runs and 60 skips on a busy machine of 2 cores; one stream a source, for the same reason.
    period = 8.0
    orgs = organizations(30, key="sk-admin-org", seed=70, events=40)
    with SimulatorServer(orgs) as server:
        toml, keys = config(tmp_path / "sources.toml", orgs, tenant_events=False, detections=False)
        ports = [free_port() for _ in range(3)]
        daemons = [start_daemon(server, pg_url, toml, keys, "--interval", f"{period}s", "--metrics-port", str(port))
                   for port in ports]  # fmt: skip
        # Once every source had its first sync: a full tick, then the first daemon killed mid-tick, then two ticks.
        wait_until(lambda: len(ok_ticks(pg_url, period)) == 30, 60, daemons)
        steady = int(time.time() // period) + 1
        for sim in list(orgs.by_key.values())[::3]:
            sim.append(5)
        killed_in = steady + 1
        wait_until(lambda: time.time() >= (killed_in + 0.5) * period, 30, daemons)
        daemons[0].send_signal(signal.SIGKILL)
        killed_log = daemons[0].communicate()[1]
        for sim in list(orgs.by_key.values())[1::3]:
            sim.append(5)
        wait_until(lambda: time.time() >= (killed_in + 3) * period + 0.5, 30, daemons[1:])
        skipped = [metric(port, "audit_ingest_runs_skipped_total") for port in ports[1:]]
        for proc in daemons[1:]:
            proc.send_signal(signal.SIGTERM)
        assert [proc.wait(timeout=30) for proc in daemons[1:]] == [0, 0]
    rows = runs(pg_url)
    per_tick: dict[tuple[str, int], int] = {}
    for row in rows:
        if row.status == "ok":
            per_tick[row.source, tick_of(row, period)] = per_tick.get((row.source, tick_of(row, period)), 0) + 1
    sources = [f"org-{i}" for i in range(1, 31)]
    # Never two runs of a source in one tick; in each tick from the first full one on, one (the killed daemon's
    # sources are taken over from the tick after the kill: its locks died with its sessions).
    assert max(per_tick.values()) == 1
    ticks = [steady, killed_in + 1, killed_in + 2]
    missing = [(s, t) for s in sources for t in ticks if (s, t) not in per_tick]
    assert missing == [], (steady, killed_in, missing, sorted(per_tick))
    assert "org-" in killed_log and ": ok, " in killed_log  # the killed daemon did sync sources
    assert all(count and count > 0 for count in skipped)  # the others' ticks left to another daemon are counted
    # No request for a skipped tick: each organization served exactly the requests of its runs (but for a run cut
    # short by the kill or the stop, whose last requests may be uncounted).
    for i, (key, sim) in enumerate(orgs.by_key.items(), 1):
        mine = [r for r in rows if r.source == f"org-{i}"]
        made = sum(r.pages + r.retries for r in mine)
        cut = any(r.status in ("running", "abandoned", "interrupted") for r in mine)
        assert made == sim.requests or (cut and made < sim.requests), (key, made, sim.requests)
        # Every event of every organization stored once, under its source (the main stream's: tenant_events false).
        served = [e["id"] for e in sim.events if not is_tenant_scoped(e["type"])]
        assert sorted(stored_events_of(pg_url, f"org-{i}")) == sorted(served)
