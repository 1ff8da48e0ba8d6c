"""`query`, `export` and `status` as a person uses them: subprocesses whose output is checked against the warehouse."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime

import duckdb
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa
from support import cli, select, settings_for, sync

from ingest import model
from ingest.errors import IngestError
from ingest.store import Warehouse
from ingest.sync import backfill


def env_for(url: str, **extra: str) -> dict:
    return {"AUDIT_INGEST_DATABASE_URL": url, **extra}


def test_query_prints_what_the_warehouse_holds(simulator, db_url, key_env):
    server = simulator(events=1200, seed=41)
    sync(server, db_url)
    ev = model.audit_events
    counts = select(db_url, sa.select(ev.c.type, sa.func.count()).group_by(ev.c.type).order_by(ev.c.type))

    result = cli("query", "select type, count(*) as n from audit_events group by type order by type",
                 "--format", "csv", env=env_for(db_url))  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = list(csv.reader(io.StringIO(result.stdout)))
    assert rows[0] == ["type", "n"] and rows[1:] == [[t, str(n)] for t, n in counts]

    # JSON values come out as JSON, timestamps in ISO form; `%` and `:x` are no bind parameters.
    sql = "select id, effective_at, raw, '100%' as pct, ':x' as colon from audit_events order by id limit 25"
    result = cli("query", sql, "--format", "json", env=env_for(db_url))
    assert result.returncode == 0, result.stderr
    served = {e["id"]: e for e in server.sim.events}
    stored = select(db_url, sa.select(ev.c.id, ev.c.effective_at).order_by(ev.c.id).limit(25))
    got = json.loads(result.stdout)
    assert [r["id"] for r in got] == [r.id for r in stored]
    assert all(r["raw"] == served[r["id"]] and r["pct"] == "100%" and r["colon"] == ":x" for r in got)
    assert [datetime.fromisoformat(r["effective_at"]) for r in got] == [r.effective_at for r in stored]

    result = cli("query", "delete from audit_events", env=env_for(db_url))
    assert result.returncode == 8 and result.stderr.startswith("error: query failed") and "read-only" in result.stderr
    assert select(db_url, sa.select(sa.func.count()).select_from(ev))[0][0] == 1200


def test_query_errors_are_one_line(synced_10k, tmp_path):
    path = tmp_path / "copy.duckdb"
    shutil.copy(synced_10k.url.removeprefix("duckdb:///"), path)
    env = env_for(f"duckdb:///{path}")
    result = cli("query", "selec 1", env=env)
    assert (
        result.returncode == 8 and result.stderr.startswith("error: query failed") and "syntax error" in result.stderr
    )
    assert result.stderr.count("\n") == 1
    result = cli("query", "select count(*) as events from audit_events", env=env)  # the table, in a pipe: TSV
    assert result.stdout.splitlines() == ["events", "10000"]
    result = cli("query", "select 1", env=env_for(f"duckdb:///{tmp_path / 'absent.duckdb'}"))
    assert result.returncode == 8 and "no warehouse" in result.stderr
    assert not (tmp_path / "absent.duckdb").exists()


def test_query_waits_while_a_sync_holds_the_duckdb_file(synced_10k, tmp_path):
    path = tmp_path / "held.duckdb"
    shutil.copy(synced_10k.url.removeprefix("duckdb:///"), path)
    env = env_for(f"duckdb:///{path}")
    holder = duckdb.connect(str(path))  # a writer, as a sync is
    result = cli("query", "select count(*) from audit_events", "--wait", "0.5s", env=env)
    assert result.returncode == 9 and result.stderr.startswith("error: ") and "in use" in result.stderr

    command = [sys.executable, "-m", "ingest", "query", "select count(*) from audit_events", "--format", "csv"]
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("AUDIT_INGEST_", "OPENAI_"))}
    waiting = subprocess.Popen(command, env={**clean, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(1.5)
    assert waiting.poll() is None  # still waiting for the file
    holder.close()
    out, err = waiting.communicate(timeout=30)
    assert waiting.returncode == 0, err
    assert out.decode().splitlines() == ["count_star()", "10000"]


def test_status_matches_the_warehouse(simulator, db_url, tmp_path, key_env):
    server = simulator(events=800, seed=42)
    sync(server, db_url)
    server.sim.append(10)
    sync(server, db_url)
    server.sim.audit_logging_enabled = False  # the next run fails (403)
    with pytest.raises(IngestError):
        sync(server, db_url)
    server.sim.audit_logging_enabled = True
    server.sim.fault_rate, server.sim.faults = 1.0, ("500",)  # a backfill that fails at once stays unfinished
    settings = settings_for(server, db_url, max_retries=0)
    warehouse = Warehouse(db_url)
    with pytest.raises(IngestError):
        backfill(settings, warehouse, settings.sources, datetime(2026, 1, 1, tzinfo=UTC), workers=2)
    warehouse.dispose()

    config = tmp_path / "audit-ingest.toml"
    config.write_text('retention = "1s"\n')  # the newest event is over a second old: near this "retention"
    time.sleep(max(0.0, max(e["effective_at"] for e in server.sim.events) + 1 - time.time()))
    result = cli("--config", str(config), "status", env=env_for(db_url))
    assert result.returncode == 0, result.stderr
    header, *lines = result.stdout.splitlines()
    rows = [dict(zip(header.split("\t"), line.split("\t"), strict=True)) for line in lines]
    [row] = [r for r in rows if not r["source"].startswith("consumer ")]  # the rules' consumer has its own row
    assert [r["source"] for r in rows if r is not row] == ["consumer rules"]

    ev, runs, state = model.audit_events, model.sync_runs, model.sync_state
    [(count, newest)] = select(db_url, sa.select(sa.func.count(), sa.func.max(ev.c.effective_at)))
    checkpoint = select(db_url, sa.select(sa.func.min(state.c.checkpoint)).where(state.c.kind == "incremental"))[0][0]
    ok = select(
        db_url, sa.select(sa.func.max(runs.c.finished_at)).where(runs.c.status == "ok", runs.c.kind == "incremental")
    )[0][0]
    [(failed, error)] = select(
        db_url,
        sa.select(runs.c.finished_at, runs.c.error).where(runs.c.status == "failed", runs.c.kind == "incremental"),
    )
    assert row["source"] == "default" and row["events"] == f"{count:,}" == "810"
    assert row["newest event"] == newest.isoformat(sep=" ")
    assert row["checkpoint"] == datetime.fromtimestamp(checkpoint, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    assert row["last success"] == ok.strftime("%Y-%m-%d %H:%M:%S")
    assert row["last failure"].startswith(failed.strftime("%Y-%m-%d %H:%M:%S")) and "403" in error
    assert row["backfill"].endswith(": 4/4 sweeps left")  # 2 slices x 2 streams
    assert "retention" in row["warning"]


def test_export_writes_exactly_the_window_in_each_format(simulator, db_url, tmp_path, key_env):
    server = simulator(events=1500, seed=43)
    sync(server, db_url)
    times = sorted({e["effective_at"] for e in server.sim.events})
    since, until = times[300], times[1100]
    ev = model.audit_events
    columns = [c for c in ev.columns if c.name not in ("payload", "raw")]
    stored = select(
        db_url,
        sa.select(*columns, ev.c.raw)
        .where(ev.c.effective_at >= model.to_datetime(since), ev.c.effective_at < model.to_datetime(until))
        .order_by(ev.c.effective_at, ev.c.id),
    )
    served = {e["id"]: e for e in server.sim.events}
    assert [r.id for r in stored] == sorted(
        (i for i, e in served.items() if since <= e["effective_at"] < until),
        key=lambda i: (served[i]["effective_at"], i),
    )
    window = ["--since", datetime.fromtimestamp(since, UTC).isoformat(), "--until", str(until)]  # ISO or Unix seconds

    outputs = {}
    for fmt in ("parquet", "csv", "jsonl"):
        outputs[fmt] = tmp_path / f"events.{fmt}"
        result = cli("export", *window, "--format", fmt, "--output", str(outputs[fmt]), env=env_for(db_url))
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == f"wrote {len(stored):,} events to {outputs[fmt]}"

    table = pq.read_table(outputs["parquet"]).to_pylist()
    assert [r["id"] for r in table] == [r.id for r in stored]
    assert all(
        all(got[c.name] == want[i] for i, c in enumerate(columns)) and json.loads(got["raw"]) == served[got["id"]]
        for got, want in zip(table, stored, strict=True)
    )
    rows = list(csv.DictReader(outputs["csv"].open()))
    assert [(r["id"], r["type"], r["effective_at"][:19]) for r in rows] == [
        (r.id, r.type, r.effective_at.isoformat(sep=" ")) for r in stored
    ]
    lines = outputs["jsonl"].read_bytes().split(b"\n")[:-1]  # not splitlines(): payloads hold U+2028 and the like
    assert [json.loads(line) for line in lines] == [served[r.id] for r in stored]  # each event as served
    assert not list(tmp_path.glob(".*.partial"))
