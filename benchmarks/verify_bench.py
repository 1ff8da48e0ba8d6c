"""The ledger's benchmark: `verify` over 1,000,000 events against reading their `raw` back, target at most 2x.

    .venv/bin/python benchmarks/verify_bench.py [--events 1000000] [--backend duckdb|postgresql|both] [--repeat 3]

A real sync of `--events` from the simulator fills the warehouse (DuckDB in a temporary file; PostgreSQL in a
database of its own at 127.0.0.1:5432, dropped afterwards), every batch ledgered by the write path. Then, each
`--repeat` times, in this process: reading every event's `raw` back (streamed in chunks, values as the driver
returns them: the baseline); `db rebuild-typed` (`store.rebuild_typed`, every typed row derived again from raw;
the `verify` runs after it check what it wrote); `verify --events-only` (the chain and every event's digest); `verify` (also every
typed row derived again from raw). Prints the medians, the ratios, and MET / NOT MET for each; exits 1 when the
full `verify` misses the target.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg
import sqlalchemy as sa

from ingest import model, store, verify
from ingest.config import load_settings
from ingest.simulator import Simulator, SimulatorServer
from ingest.store import Warehouse
from ingest.sync import run_sources

KEY = "sk-admin-benchmark"
TARGET = 2.0


def fill(url: str, events: int) -> None:
    with SimulatorServer(Simulator(events=events, seed=5, key=KEY)) as server:
        os.environ["OPENAI_ADMIN_KEY"] = KEY
        settings = load_settings(None, base_url=server.url, database_url=url, detections=False)
        warehouse = Warehouse(url)
        try:
            run_sources(settings, warehouse, settings.sources)
        finally:
            warehouse.dispose()


def read_raw(warehouse: Warehouse) -> int:
    with warehouse.connect() as conn:
        rows = conn.execution_options(yield_per=verify.CHUNK).execute(sa.select(model.audit_events.c.raw))
        return sum(1 for _ in rows)


def rebuild_typed(warehouse: Warehouse) -> int:
    with warehouse.connect() as conn, conn.begin():
        return store.rebuild_typed(conn)


def timed(work) -> tuple[float, object]:
    t0 = time.perf_counter()
    result = work()
    return time.perf_counter() - t0, result


def measure(name: str, url: str, events: int, repeat: int) -> bool:
    started = time.monotonic()
    fill(url, events)
    print(f"{name}: {events:,} events synced in {time.monotonic() - started:.1f} s")
    warehouse = Warehouse(url)
    try:
        times: dict[str, list[float]] = {
            "read raw back": [],
            "rebuild-typed": [],
            "verify --events-only": [],
            "verify": [],
        }
        for _ in range(repeat):
            seconds, count = timed(lambda: read_raw(warehouse))
            assert count == events, count
            times["read raw back"].append(seconds)
            seconds, count = timed(lambda: rebuild_typed(warehouse))
            assert count == events, count
            times["rebuild-typed"].append(seconds)
            for label, typed in (("verify --events-only", False), ("verify", True)):
                seconds, result = timed(lambda typed=typed: verify.run(warehouse, typed=typed))
                assert not result.findings and result.events == events, result.line()  # type: ignore[attr-defined]
                times[label].append(seconds)
    finally:
        warehouse.dispose()
    base = statistics.median(times["read raw back"])
    met = True
    for label, values in times.items():
        median = statistics.median(values)
        line = f"{name}: {label:<22} {median:7.2f} s (median of {repeat})"
        if label == "rebuild-typed":
            line += f"  {events / median:,.0f} events/s"
        elif label != "read raw back":
            ratio = median / base
            ok = ratio <= TARGET
            met &= ok or label != "verify"
            line += f"  {ratio:5.2f}x the read, target at most {TARGET:.0f}x: {'MET' if ok else 'NOT MET'}"
        print(line)
    return met


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--backend", choices=["duckdb", "postgresql", "both"], default="both")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    met = True
    if args.backend in ("duckdb", "both"):
        with tempfile.TemporaryDirectory() as tmp:
            met &= measure("DuckDB", f"duckdb:///{Path(tmp) / 'warehouse.duckdb'}", args.events, args.repeat)
    if args.backend in ("postgresql", "both"):
        database = f"verify_bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres", autocommit=True) as admin:
            admin.execute(f"CREATE DATABASE {database}")
            try:
                met &= measure(
                    "PostgreSQL", f"postgresql+psycopg://postgres@127.0.0.1/{database}", args.events, args.repeat
                )
            finally:
                admin.execute(f"DROP DATABASE {database} WITH (FORCE)")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
