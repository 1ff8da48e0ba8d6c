"""PostgreSQL next to DuckDB: the write path alone, and a whole first run over HTTP.

    .venv/bin/python benchmarks/pg_bulk.py [--events 100000] [--server postgresql+psycopg://postgres@127.0.0.1:5432/postgres]

`write`: `store.save_batch` of pre-normalised 5,000-event batches, each committed (what a sync does after
its downloads); `run`: `audit-ingest run`'s engine against the simulator on 127.0.0.1 (no latency), from an
empty warehouse. PostgreSQL gets a fresh database, dropped afterwards; DuckDB a temporary file.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import psycopg
import sqlalchemy as sa

from ingest import model, store
from ingest.config import load_settings
from ingest.simulator import Simulator, SimulatorServer
from ingest.sync import run_sources

KEY = "sk-admin-bench"


def write(url: str, batches: list[model.Batch]) -> float:
    warehouse = store.Warehouse(url)
    warehouse.ensure_schema()
    try:
        start = time.perf_counter()
        with warehouse.connect() as conn:
            for batch in batches:
                with conn.begin():
                    store.save_batch(conn, batch)
        return time.perf_counter() - start
    finally:
        warehouse.dispose()


def run(url: str, server: SimulatorServer) -> float:
    settings = load_settings(None, base_url=server.url, database_url=url)
    warehouse = store.Warehouse(url)
    try:
        start = time.perf_counter()
        [summary] = run_sources(settings, warehouse, settings.sources)
        assert summary.status == "ok", summary.error
        return time.perf_counter() - start
    finally:
        warehouse.dispose()


def count(url: str) -> int:
    warehouse = store.Warehouse(url)
    try:
        with warehouse.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(model.audit_events)).scalar()
    finally:
        warehouse.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--server", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args()
    os.environ["OPENAI_ADMIN_KEY"] = KEY
    sim = Simulator(events=args.events, seed=1, key=KEY)
    events = sim.events
    batches = [model.normalise(events[i : i + 5000], "bench", store.now()) for i in range(0, len(events), 5000)]

    server_url = sa.make_url(args.server)
    admin_info = server_url.set(drivername="postgresql").render_as_string(hide_password=False)
    results = []
    with psycopg.connect(admin_info, autocommit=True) as admin, tempfile.TemporaryDirectory() as tmp:
        for label in ("write", "run"):
            for backend in ("duckdb", "postgresql"):
                if backend == "duckdb":
                    url = f"duckdb:///{Path(tmp) / f'{label}.duckdb'}"
                else:
                    name = f"audit_ingest_bench_{os.getpid()}_{label}"
                    admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
                    admin.execute(f'CREATE DATABASE "{name}"')
                    url = server_url.set(database=name).render_as_string(hide_password=False)
                if label == "write":
                    seconds = write(url, batches)
                else:
                    with SimulatorServer(sim) as server:
                        seconds = run(url, server)
                stored = count(url)
                assert stored == len(events), (backend, label, stored)
                results.append((label, backend, stored, seconds))
                if backend == "postgresql":
                    admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    print(f"{'what':6} {'backend':11} {'events':>8} {'seconds':>8} {'events/s':>9}")
    for label, backend, stored, seconds in results:
        print(f"{label:6} {backend:11} {stored:8,} {seconds:8.2f} {stored / seconds:9,.0f}")


if __name__ == "__main__":
    main()
