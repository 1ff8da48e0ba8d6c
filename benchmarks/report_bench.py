"""The report's benchmark: `audit-ingest report` over 1,000,000 events on DuckDB, against the 10 s target.

    .venv/bin/python benchmarks/report_bench.py [--events 1000000] [--seed-events 50000] [--repeat 3]

A real sync of `--seed-events` from the simulator (over 6 days, so the report's default window of 7 holds them all)
fills a DuckDB file; SQL then copies every event and its typed rows with new ids until the file holds
`--events` (each copy's events a few seconds later, so the days and families keep their shape). The report is
then written `--repeat` times, each by `audit-ingest report` in a fresh process as a user would run it (wall
time includes interpreter start). Prints each wall time, the median, and MET / NOT MET; exits 1 when not met.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb

from ingest import model
from ingest.config import load_settings
from ingest.simulator import Simulator, SimulatorServer
from ingest.store import Warehouse
from ingest.sync import run_sources

KEY = "sk-admin-benchmark"
TARGET = 10.0


def seed(path: Path, events: int) -> None:
    with SimulatorServer(Simulator(events=events, seed=3, key=KEY, span_seconds=6 * 86400)) as server:
        os.environ["OPENAI_ADMIN_KEY"] = KEY
        settings = load_settings(None, base_url=server.url, database_url=f"duckdb:///{path}")
        warehouse = Warehouse(settings.database_url)
        try:
            run_sources(settings, warehouse, settings.sources)
        finally:
            warehouse.dispose()


def multiply(path: Path, total: int) -> int:
    """Copies of the stored events (and their typed rows) under new ids until `total`; the count stored."""
    with duckdb.connect(str(path)) as conn:
        (base,) = conn.execute("SELECT count(*) FROM audit_events").fetchone()
        copies = -(-total // base) - 1
        columns = [c.name for c in model.audit_events.columns]
        select = ", ".join(
            "id || '-' || k" if c == "id" else "effective_at + k * INTERVAL 3 SECOND" if c == "effective_at" else c
            for c in columns
        )
        conn.execute(f"INSERT INTO audit_events SELECT {select} FROM audit_events, range(1, {copies + 1}) r(k)")
        for table in model.TYPED_TABLES:
            names = ", ".join("event_id || '-' || k" if c.name == "event_id" else c.name for c in table.columns)
            conn.execute(
                f"INSERT INTO {table.name} SELECT {names} FROM {table.name}, range(1, {copies + 1}) r(k)"
            )  # fmt: skip
        conn.execute("CHECKPOINT")
        return conn.execute("SELECT count(*) FROM audit_events").fetchone()[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--seed-events", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "warehouse.duckdb"
        started = time.monotonic()
        seed(path, args.seed_events)
        stored = multiply(path, args.events)
        print(f"warehouse: {stored:,} events ({time.monotonic() - started:.1f} s to build)")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AUDIT_INGEST_", "OPENAI_"))}
        env["AUDIT_INGEST_DATABASE_URL"] = f"duckdb:///{path}"
        walls = []
        for i in range(args.repeat):
            output = Path(tmp) / f"report-{i}.html"
            t0 = time.monotonic()
            result = subprocess.run([sys.executable, "-m", "ingest", "report", "--output", str(output)], env=env,
                                    capture_output=True, text=True)  # fmt: skip
            walls.append(time.monotonic() - t0)
            if result.returncode != 0:
                print(result.stderr, file=sys.stderr)
                return 2
            print(f"run {i + 1}: {walls[-1]:.2f} s  {result.stdout.strip()}  ({output.stat().st_size:,} bytes)")
    median = statistics.median(walls)
    met = median <= TARGET
    print(f"report over {stored:,} events on DuckDB: {median:.2f} s (median of {len(walls)}); "
          f"target at most {TARGET:.0f} s: {'MET' if met else 'NOT MET'}")  # fmt: skip
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
