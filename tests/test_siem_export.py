"""`export --format ocsf|ecs|security-lake` as a person runs it: a subprocess whose files are read back and
checked against the warehouse, the mappings, and Security Lake's partition layout."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pyarrow.dataset as ds
import pytest
from support import cli, stored_events, sync

from ingest import ecs, ocsf


def env_for(url: str) -> dict:
    return {"AUDIT_INGEST_DATABASE_URL": url}


def comparable(mapped: dict) -> dict:
    """The event as served parsed: PostgreSQL's JSONB keeps the event's values, not its keys' order."""
    if "raw_data" in mapped:
        return {**mapped, "raw_data": json.loads(mapped["raw_data"])}
    return {**mapped, "event": {**mapped["event"], "original": json.loads(mapped["event"]["original"])}}


def present(value):
    """Without the nulls of fields an event does not have (a Parquet file has every column)."""
    if isinstance(value, dict):
        return {k: present(v) for k, v in value.items() if v is not None}
    return value


def window(server) -> tuple[list[str], list[dict]]:
    """A window of the simulator's events: its --since/--until arguments, and the events in it, oldest first."""
    times = sorted({e["effective_at"] for e in server.sim.events})
    since, until = times[200], times[900]
    events = sorted((e for e in server.sim.events if since <= e["effective_at"] < until),
                    key=lambda e: (e["effective_at"], e["id"]))  # fmt: skip
    return ["--since", datetime.fromtimestamp(since, UTC).isoformat(), "--until", str(until)], events


def test_export_writes_the_window_as_ocsf_and_ecs_json_lines(simulator, db_url, tmp_path, key_env):
    server = simulator(events=1200, seed=191)
    sync(server, db_url)
    args, events = window(server)
    for fmt, mapper in (("ocsf", ocsf.to_ocsf), ("ecs", ecs.to_ecs)):
        output = tmp_path / f"events.{fmt}.jsonl"
        result = cli("export", *args, "--format", fmt, "--output", str(output), env=env_for(db_url))
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == f"wrote {len(events):,} events to {output}"
        lines = [json.loads(line) for line in output.read_bytes().split(b"\n")[:-1]]
        assert [comparable(line) for line in lines] == [comparable(mapper(e)) for e in events]
    assert not list(tmp_path.glob(".*.partial"))


def test_export_security_lake_writes_ocsf_parquet_one_class_per_folder_partitioned_by_region_account_and_day(
    simulator, duckdb_url, tmp_path, key_env
):
    server = simulator(events=1500, seed=192)
    sync(server, duckdb_url)
    args, events = window(server)
    out = tmp_path / "lake"
    result = cli("export", *args, "--format", "security-lake", "--region", "eu-west-1", "--account-id",
                 "123456789012", "--output", str(out), env=env_for(duckdb_url))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"wrote {len(events):,} events to {out}"
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files and all(f.suffix == ".parquet" and len(f.parts) == 5 for f in files)
    by_id = {e["id"]: e for e in events}
    seen = []
    for cls in {f.parts[0] for f in files}:
        rows = ds.dataset(out / cls, format="parquet", partitioning="hive").to_table().to_pylist()
        assert {r["class_name"] for r in rows} == {cls.replace("_", " ").title().replace("Api", "API")}
        for row in rows:
            event = by_id[row["metadata"]["uid"]]
            day = datetime.fromtimestamp(event["effective_at"], UTC).strftime("%Y%m%d")
            assert (row["region"], row["accountId"], str(row["eventDay"])) == ("eu-west-1", "123456789012", day)
            want = ocsf.to_ocsf(event)
            row = present(row)
            row["unmapped"] = {k: json.loads(v) for k, v in row.get("unmapped", [])}
            if "data" in row.get("entity", {}):
                row["entity"]["data"] = json.loads(row["entity"]["data"])
            assert {**row, "raw_data": json.loads(row["raw_data"])} == {  # every mapped field, read back
                **want, "raw_data": json.loads(want["raw_data"]), "unmapped": want.get("unmapped", {}),
                "region": "eu-west-1", "accountId": "123456789012", "eventDay": int(day)}  # fmt: skip
            seen.append(row["metadata"]["uid"])
    assert sorted(seen) == sorted(by_id) and len(stored_events(duckdb_url)) == 1500


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--region", "eu-west-1"], "--format security-lake needs --region and --account-id"),
        (["--region", "Europe", "--account-id", "1"], "bad --region 'Europe'"),
    ],
)
def test_export_security_lake_refuses_missing_or_bad_partition_values_in_one_line(tmp_path, duckdb_url, args, message):
    from ingest.store import Warehouse

    Warehouse(duckdb_url).dispose()
    result = cli("export", "--since", "2026-01-01", "--format", "security-lake", *args, "--output",
                 str(tmp_path / "lake"), env=env_for(duckdb_url))  # fmt: skip
    assert result.returncode == 2 and result.stderr.startswith(f"error: {message}")
    assert len(result.stderr.strip().splitlines()) == 1
