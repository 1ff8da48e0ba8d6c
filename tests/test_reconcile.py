"""Reconciliation: `verify --against-api` re-reads a window from the API and names each event the copy holds
differently (`missing here`, `changed upstream`, `not upstream`), exit 10; `--repair` stores the missing ones once;
bad windows are one line and exit 2; the daemon's scheduled run keeps its findings in `reconcile_findings`."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from support import KEY, cli, select, settings_for, stored_events, sync

from ingest import model
from ingest.config import load_settings
from ingest.errors import ConfigError
from ingest.metrics import Metrics
from ingest.schedule import ReconcileJob

DAY = 86400


def env(server, url: str) -> dict:
    return {"OPENAI_ADMIN_KEY": KEY, "OPENAI_BASE_URL": server.url, "AUDIT_INGEST_DATABASE_URL": url}


def iso(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).isoformat()


def findings(stdout: str) -> set[str]:
    """`<finding>: <event id>` of each finding line (the summary line has no event id)."""
    kinds = ("missing here", "changed upstream", "not upstream")
    return {line.split(" (")[0] for line in stdout.splitlines() if line.split(":")[0] in kinds}


def stream_of(event: dict) -> str:
    return "default" + ("#tenant" if model.is_tenant_scoped(event["type"]) else "")


def test_an_event_published_later_than_the_lookback_is_missing_here_and_the_repair_stores_it_once(
    simulator, db_url, key_env
):
    server = simulator(events=1500, seed=91)
    sync(server, db_url)
    [late] = server.sim.append(1, late_by=2 * 3600)  # published now, two hours old: before the lookback of 15 min
    sync(server, db_url)
    assert late["id"] not in stored_events(db_url)

    since = iso(time.time() - DAY)
    found = cli("verify", "--against-api", "--since", since, env=env(server, db_url))
    assert found.returncode == 10, found.stderr
    assert findings(found.stdout) == {f"missing here: {late['id']}"}
    assert found.stderr.strip() == "error: 1 findings: the warehouse differs from what the API serves"

    repaired = cli("verify", "--against-api", "--since", since, "--repair", env=env(server, db_url))
    assert repaired.returncode == 10, repaired.stderr
    assert f"missing here: {late['id']} ({late['type']} at " in repaired.stdout
    assert "stored by the repair" in repaired.stdout and "stored 1 missing events" in repaired.stdout
    assert stored_events(db_url)[late["id"]] == late
    # Through the sweeps' write path: a batch of the committed-batch log holds it.
    batches = model.ingest_batches
    [(state_key, events)] = select(
        db_url, sa.select(batches.c.state_key, batches.c.events).where(batches.c.state_key.like("reconcile:%"))
    )
    assert (state_key, events) == (f"reconcile:{stream_of(late)}", 1)
    [seq] = select(db_url, sa.select(model.audit_events.c.batch_seq).where(model.audit_events.c.id == late["id"]))
    assert seq[0] == select(db_url, sa.select(sa.func.max(batches.c.seq)))[0][0]
    # The window counts as covered: it merged into the incremental coverage of each stream.
    windows = select(db_url, sa.select(model.sweep_windows.c.stream, model.sweep_windows.c.kind))
    assert sorted(windows) == [("default", "reconciliation"), ("default#tenant", "reconciliation")]

    again = cli("verify", "--against-api", "--since", since, "--repair", env=env(server, db_url))
    assert again.returncode == 0, again.stderr
    assert findings(again.stdout) == set() and "no findings" in again.stdout
    ids = model.audit_events.c.id
    assert select(db_url, sa.select(sa.func.count()).where(ids == late["id"]))[0][0] == 1


def test_an_event_changed_upstream_and_one_gone_upstream_are_named_and_not_repaired(simulator, db_url, key_env):
    server = simulator(events=1500, seed=92)
    sync(server, db_url)
    before = stored_events(db_url)
    recent = [e for e in server.sim.events if e["effective_at"] >= time.time() - DAY / 2]
    changed, gone = recent[0], recent[1]
    server.sim.replace({**changed, "project": {"id": "proj_changed", "name": "changed upstream"}})
    server.sim.remove([gone["id"]])

    result = cli("verify", "--against-api", "--since", iso(time.time() - DAY), "--repair", env=env(server, db_url))
    assert result.returncode == 10, result.stderr
    assert findings(result.stdout) == {f"changed upstream: {changed['id']}", f"not upstream: {gone['id']}"}
    assert result.stdout.splitlines()[-1].endswith("1 changed upstream, 1 not upstream")
    assert stored_events(db_url) == before  # the copy keeps what it was served


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--since", "2026-01-02", "--until", "2026-01-01"], "error: the window is empty"),
        (["--since", iso(time.time() + DAY)], "error: the window is empty"),
        (["--since", "2020-01-01", "--until", "2020-02-01"], "error: the window is older than the API's retention"),
        (["--since", "yesterday"], "error: bad --since"),
        (["--until", "2026-01-01"], "error: --against-api needs --since DATE"),
        ([], "error: --since, --until, --repair and --source go with --against-api"),
    ],
)
def test_a_bad_window_is_one_line_exit_2_and_writes_nothing(args, message, simulator, db_url, key_env):
    server = simulator(events=300, seed=93)
    sync(server, db_url)
    before = select(db_url, sa.select(model.sweep_windows)), stored_events(db_url)
    options = ["--against-api", *args, "--repair"] if args else ["--repair"]  # [] : --repair alone
    result = cli("verify", *options, env=env(server, db_url))
    assert result.returncode == 2
    assert result.stdout == "" and len(result.stderr.splitlines()) == 1 and result.stderr.startswith(message)
    assert (select(db_url, sa.select(model.sweep_windows)), stored_events(db_url)) == before


def test_the_daemons_reconciliation_keeps_its_findings_logs_and_counts_them(simulator, db_url, key_env, caplog):
    server = simulator(events=1500, seed=94)
    sync(server, db_url)
    [late] = server.sim.append(1, late_by=3 * 3600)
    gone = next(e for e in server.sim.events if e["id"] != late["id"] and e["effective_at"] > time.time() - DAY)
    server.sim.remove([gone["id"]])
    metrics = Metrics()
    settings = settings_for(server, db_url)

    ReconcileJob(settings, settings.sources, stop=threading.Event(), metrics=metrics)()

    table = model.reconcile_findings
    rows = select(db_url, sa.select(table.c.source, table.c.event_id, table.c.finding, table.c.details))
    assert {(r.source, r.event_id, r.finding) for r in rows} == {
        ("default", late["id"], "missing here"), ("default", gone["id"], "not upstream")
    }  # fmt: skip
    when = datetime.fromtimestamp(late["effective_at"], UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    assert {r.details for r in rows if r.event_id == late["id"]} == {f"{late['type']} at {when} in default"}
    assert late["id"] not in stored_events(db_url)  # the scheduled run repairs nothing
    sample = metrics.registry.get_sample_value
    assert sample("audit_ingest_reconcile_findings_total", {"source": "default", "finding": "missing here"}) == 1
    assert sample("audit_ingest_reconcile_findings_total", {"source": "default", "finding": "not upstream"}) == 1
    assert f"reconciliation: missing here: {late['id']}" in caplog.text


def test_reconcile_every_is_a_duration_and_0_turns_it_off():
    assert load_settings(None, reconcile_every="12h").reconcile_every == 12 * 3600
    assert load_settings(None, reconcile_every=0).reconcile_every == 0
    assert load_settings(None).reconcile_every == DAY
    with pytest.raises(ConfigError, match="reconcile_every"):
        load_settings(None, reconcile_every="-1h")
