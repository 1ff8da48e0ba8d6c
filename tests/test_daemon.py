"""The daemon as an operator runs it: a subprocess against the simulator over HTTP, stopped by SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import httpx
import pytest
import sqlalchemy as sa
from support import KEY, cli, scalar, select, stored_events, sync

from ingest import model
from ingest.sync import PREFETCH_PAGES

_started: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_daemon_outlives_its_test():
    yield
    while _started:
        proc = _started.pop()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def start_daemon(server, path: Path, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUDIT_INGEST_", "OPENAI_"))}
    env.update(OPENAI_ADMIN_KEY=KEY, OPENAI_BASE_URL=server.url, AUDIT_INGEST_DATABASE_URL=f"duckdb:///{path}")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ingest", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    _started.append(proc)
    return proc


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> tuple[int, float, str]:
    """Sends the signal; (exit code, seconds until exit, stderr)."""
    sent = time.monotonic()
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=30)
    return proc.returncode, time.monotonic() - sent, stderr.decode()


def wait_for(condition, timeout: float, proc: subprocess.Popen, every: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the daemon exited ({proc.returncode}): {proc.stderr.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out; daemon log: {proc.communicate()[1].decode()[-2000:]}")
        time.sleep(every)


def read_ids(path: Path) -> set[str] | None:
    """The stored ids, read the way a person would (the DuckDB file, read-only); None while it is locked."""
    try:
        with duckdb.connect(str(path), read_only=True) as conn:
            return {row[0] for row in conn.execute("SELECT id FROM audit_events").fetchall()}
    except (duckdb.IOException, duckdb.CatalogException):  # locked by a run, or not created yet
        return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric(port: int, name: str) -> float | None:
    lines = [line for line in httpx.get(f"http://127.0.0.1:{port}/metrics").text.splitlines() if line.startswith(name)]
    return float(lines[0].rsplit(" ", 1)[1]) if lines else None


def test_daemon_picks_up_new_events_leaves_the_file_readable_and_stops_on_sigterm(simulator, tmp_path):
    server = simulator(events=500, seed=21)
    path, port = tmp_path / "daemon.duckdb", free_port()
    proc = start_daemon(server, path, "--log-format", "json", "daemon", "--interval", "1s", "--metrics-port", str(port))
    want = {e["id"] for e in server.sim.events}
    # Each successful read happened between runs: a daemon holding the file would make every one fail.
    # (A run that finds the file held by a reader fails, logs it and backs off: so a read once a second.)
    wait_for(lambda: read_ids(path) == want, 30, proc, every=1.0)
    new = {e["id"] for e in server.sim.append(30)} | {e["id"] for e in server.sim.append(5, late_by=120)}
    wait_for(lambda: read_ids(path) == want | new, 30, proc, every=1.0)

    wait_for(lambda: metric(port, "audit_ingest_events_ingested_total") == 535, 10, proc)
    assert metric(port, "audit_ingest_runs_total") >= 2
    # The newest event is read after each run (a run whose read found the file held by this test keeps the
    # previous value); the lag is computed from it at scrape time.
    newest = max(e["effective_at"] for e in server.sim.events)

    def lag_is_right() -> bool:
        lag = metric(port, "audit_ingest_lag_seconds")
        return lag is not None and abs(lag - (time.time() - newest)) < 5

    wait_for(lag_is_right, 10, proc)
    scrape = httpx.get(f"http://127.0.0.1:{port}/metrics").text  # nothing new comes: the head stays

    code, seconds, stderr = stop(proc)
    assert code == 0 and seconds < 15, stderr
    assert "Traceback" not in stderr and '"message": "daemon stopped"' in stderr  # json log lines
    url = f"duckdb:///{path}"
    runs = scalar(url, "SELECT count(*) FROM sync_runs WHERE status = 'ok'")
    assert runs >= 2 and scalar(url, "SELECT count(*) FROM sync_runs WHERE status NOT IN ('ok', 'interrupted')") == 0
    assert set(stored_events(url)) == want | new
    # The chain head, exported for a copy outside the warehouse's reach, is the warehouse's.
    [(seq, hash_)] = select(url, sa.select(model.ingest_ledger.c.seq, model.ingest_ledger.c.hash)
                                 .order_by(model.ingest_ledger.c.seq.desc()).limit(1))  # fmt: skip
    assert f"audit_ingest_ledger_head_seq {float(seq)}" in scrape
    assert f'audit_ingest_ledger_head_info{{hash="{hash_}",seq="{seq}"}} 1.0' in scrape


def test_sigterm_during_a_run_exits_0_after_committing_the_current_batch(simulator, tmp_path, monkeypatch):
    server = simulator(events=3000, seed=22, latency=0.05)
    path = tmp_path / "stopped.duckdb"
    proc = start_daemon(server, path, "daemon", "--interval", "1h")
    wait_for(lambda: server.sim.requests >= 10, 30, proc)
    server.sim.latency = 1.0  # the run cannot end before the signal, however late the poll saw its requests
    code, seconds, stderr = stop(proc)
    assert code == 0 and seconds < 15, stderr
    assert "Traceback" not in stderr

    url = f"duckdb:///{path}"
    assert scalar(url, "SELECT status FROM sync_runs") == "interrupted"
    pages, stored = scalar(url, "SELECT pages FROM sync_runs"), len(stored_events(url))
    assert 0 < stored < 3000
    # What was fetched and not committed is at most the download queue: the last batch was committed.
    assert server.sim.requests - pages <= PREFETCH_PAGES + 1
    monkeypatch.setenv("OPENAI_ADMIN_KEY", KEY)
    server.sim.latency = 0
    [summary] = sync(server, url)
    assert summary.events_new == 3000 - stored
    assert set(stored_events(url)) == {e["id"] for e in server.sim.events}


def test_failing_api_backs_off_then_the_next_run_recovers(simulator, tmp_path):
    server = simulator(events=300, seed=23, key="sk-admin-another-key")  # the daemon's key is refused (401)
    path, port = tmp_path / "backoff.duckdb", free_port()
    proc = start_daemon(server, path, "daemon", "--interval", "0.5s", "--metrics-port", str(port))
    times: list[float] = []  # when each request arrived; a failing run makes one (401 is not retried)

    def seen(count: int) -> bool:
        while len(times) < server.sim.requests:
            times.append(time.monotonic())
        return len(times) >= count

    # The third run has failed, not only sent its request, before the API takes the key again.
    wait_for(lambda: seen(3) and metric(port, "audit_ingest_run_failures_total") == 3, 30, proc)
    server.sim.key = KEY  # the API accepts the key again
    wait_for(lambda: seen(4), 30, proc)
    # Without backoff a run starts every 0.5 s; after k failures in a row, 2^(k-1) - 1 ticks are skipped
    # (1 s, then 2 s; the bounds leave room for a run that started late on a busy machine, and the runs' own
    # lines below say the same without a clock).
    assert times[2] - times[1] >= 0.6
    assert times[3] - times[2] >= 1.2
    # Watched through the metrics, not the file: a read while a run opens it would fail that run.
    wait_for(lambda: metric(port, "audit_ingest_events_ingested_total") == 300, 30, proc)
    wait_for(lambda: metric(port, "audit_ingest_last_success_timestamp_seconds") is not None, 10, proc)
    assert metric(port, "audit_ingest_run_failures_total") == 3
    code, _, stderr = stop(proc, signal.SIGINT)  # Ctrl-C
    assert code == 0
    failures = [line for line in stderr.splitlines() if "run failed" in line]
    assert len(failures) == 3 and all("401" in line for line in failures), stderr
    assert [re.search(r"next attempt in ([\d.]+s)", line)[1] for line in failures] == ["0.5s", "1s", "2s"]
    assert [f"({k} in a row)" in line for k, line in enumerate(failures, 1)] == [True] * 3
    assert "Traceback" not in stderr and KEY not in stderr
    url = f"duckdb:///{path}"
    assert scalar(url, "SELECT count(*) FROM sync_runs WHERE status = 'failed'") == 3
    assert scalar(url, "SELECT count(*) FROM sync_runs WHERE status = 'ok'") >= 1
    assert set(stored_events(url)) == {e["id"] for e in server.sim.events}


def test_bad_schedules_are_configuration_errors(simulator, tmp_path):
    server = simulator(events=10)
    env = {"OPENAI_ADMIN_KEY": KEY, "OPENAI_BASE_URL": server.url,
           "AUDIT_INGEST_DATABASE_URL": f"duckdb:///{tmp_path / 'never.duckdb'}"}  # fmt: skip
    for args, message in [
        (["--interval", "5 minutes"], "bad --interval"),
        (["--cron", "*/5 * * *"], "bad --cron"),
    ]:
        result = cli("daemon", *args, env=env, timeout=30)
        assert result.returncode == 2 and result.stderr.startswith("error: ") and message in result.stderr
    assert server.sim.requests == 0 and not (tmp_path / "never.duckdb").exists()
