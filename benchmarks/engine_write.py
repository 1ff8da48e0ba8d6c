"""Issue 14's question, measured: does deriving a batch's rows in the engine (DuckDB's JSON functions over the raw
text) beat the Python normaliser? Both write the same batches into a fresh DuckDB file, in this process, one after
the other, `--repeat` times (medians). bench.py measures the floor a run is held to (downloading and parsing the
pages); this compares only what comes after it:

- python: the product's write path, `model.normalise` + `store.stage` + `sync.write_batch` (events, typed rows,
  dimensions, the batch log and the ledger);
- engine: the raw text staged as Arrow, then the `audit_events` columns derived in SQL (json_extract of every
  documented path, the type checks of the Python normaliser) and the typed rows by `ingest.typed_sql` (the compiler
  `verify` and `db rebuild-typed` use) over the batch's new events. A lower bound of the engine-side design: it
  derives no dimensions, no ledger entries and no mismatch counts, and it needs DuckDB's memory limit raised from
  the writer's 64 MB to ENGINE_MEMORY (the event columns' statement runs out of memory over a 5,000-event batch).

    .venv/bin/python benchmarks/engine_write.py --events 100000 --repeat 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import sqlalchemy as sa

from ingest import model, store, sync, typed_sql
from ingest.simulator import Simulator

BATCH = sync.BATCH_EVENTS
ENGINE_MEMORY = "256MB"


def python_path(events: list[dict], path: Path) -> float:
    warehouse = store.Warehouse(f"duckdb:///{path}")
    warehouse.ensure_schema()
    started = time.perf_counter()
    with warehouse.connect() as conn:
        for i in range(0, len(events), BATCH):
            staged = store.stage("duckdb", model.normalise(events[i : i + BATCH], "bench", store.now()))
            store.atomically(conn, lambda: sync.write_batch(conn, "bench", "bench", staged))  # noqa: B023
    warehouse.dispose()
    return time.perf_counter() - started


def _event_columns() -> tuple[str, str]:
    """The `audit_events` columns from `_batch.raw`, each documented path looked up and type-checked as
    `model.normalise` does (strings; the ip_* texts also take integers; coordinates numbers or numeric strings);
    and the list of the paths, parsed once per event (`v`; the payload `p`)."""
    constant: list[str] = []
    columns = []
    for column in model.audit_events.columns:
        origin = column.info.get("from", "")
        if column.name in ("id", "type", "effective_at", "raw") or not origin.startswith("`"):
            continue
        values = []
        for p in (p.strip("` ") for p in origin.split(",")):
            keys = p.split(".")
            if keys[0] == "<type>":
                value = "p" if len(keys) == 1 else f"json_extract(p, '$.\"{keys[1]}\"')"
            else:
                constant.append("$." + ".".join(f'"{k}"' for k in keys))
                value = f"v[{len(constant)}]"
            kind = f"json_type({value})"
            if isinstance(column.type, sa.JSON):
                values.append(f"CASE WHEN {kind} <> 'NULL' THEN {value} END")
            elif isinstance(column.type, sa.Float):
                values.append(
                    f"CASE WHEN {kind} IN ('BIGINT', 'UBIGINT', 'DOUBLE') THEN TRY_CAST({value}::VARCHAR AS "
                    f"DOUBLE) WHEN {kind} = 'VARCHAR' THEN TRY_CAST({value} ->> '$' AS DOUBLE) END"
                )
            elif column.info.get("digits"):
                values.append(
                    f"CASE WHEN {kind} = 'VARCHAR' THEN {value} ->> '$' WHEN {kind} IN ('BIGINT', 'UBIGINT') "
                    f"THEN {value}::VARCHAR END"
                )
            else:
                values.append(f"CASE WHEN {kind} = 'VARCHAR' THEN {value} ->> '$' END")
        columns.append((f"coalesce({', '.join(values)})" if len(values) > 1 else values[0]) + f' AS "{column.name}"')
    listed = ", ".join(f"'{p}'" for p in constant)
    return ", ".join(columns), f"""json_extract(raw, [{listed}]) AS v, json_extract(raw, '$."' || type || '"') AS p"""


def engine_path(events: list[dict], path: Path) -> tuple[float, dict[str, float]]:
    warehouse = store.Warehouse(f"duckdb:///{path}")
    warehouse.ensure_schema()
    names = ", ".join(f'"{c.name}"' for c in model.audit_events.columns)
    columns, paths = _event_columns()
    derive = (f"CREATE OR REPLACE TEMP TABLE _new AS SELECT {names} FROM (SELECT id, type, effective_at, raw, "
              f"'bench' AS source, {columns}, now()::TIMESTAMP AS ingested_at, NULL::BIGINT AS batch_seq "
              f"FROM (SELECT *, {paths} FROM _batch b WHERE NOT EXISTS (SELECT 1 FROM audit_events s WHERE s.id = b.id "
              "AND s.effective_at BETWEEN (SELECT min(effective_at) FROM _batch) AND (SELECT max(effective_at) FROM "
              "_batch))))")  # fmt: skip
    new = sa.table("_new", *(sa.column(c.name, c.type) for c in model.audit_events.columns))
    derived = typed_sql.derivations("duckdb", events=new)
    parts = dict.fromkeys(["stage", "events", "typed"], 0.0)
    started = time.perf_counter()
    with warehouse.connect() as conn:
        driver = conn.connection.driver_connection
        # The writer's 64 MB (backends/duckdb.py CONFIG) is too little for these statements over a batch.
        driver.execute(f"SET memory_limit = '{ENGINE_MEMORY}'")
        typed = [
            str(t.insert().from_select([c.name for c in t.columns], derived[t.name]).compile(
                dialect=conn.dialect, compile_kwargs={"literal_binds": True}))
            for t in model.TYPED_TABLES
        ]  # fmt: skip
        for i in range(0, len(events), BATCH):
            t0 = time.perf_counter()
            chunk = events[i : i + BATCH]
            _batch = pa.table({  # noqa: F841  (found by DuckDB's replacement scan)
                "id": pa.array([e["id"] for e in chunk], pa.string()),
                "type": pa.array([e["type"] for e in chunk], pa.string()),
                "effective_at": pc.multiply(pa.array([e["effective_at"] for e in chunk], pa.int64()), 1_000_000).cast(
                    pa.timestamp("us")),
                "raw": pa.array([model.canonical(e) for e in chunk], pa.string()),
            })  # fmt: skip
            t1 = time.perf_counter()
            with conn.begin():
                driver.execute(derive)
                driver.execute(f"INSERT INTO audit_events SELECT {names} FROM _new")
                t2 = time.perf_counter()
                for sql in typed:
                    driver.execute(sql)
            t3 = time.perf_counter()
            parts["stage"] += t1 - t0
            parts["events"] += t2 - t1
            parts["typed"] += t3 - t2
    elapsed = time.perf_counter() - started
    warehouse.dispose()
    return elapsed, parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    events = Simulator(events=args.events, seed=1).events
    runs: dict[str, list[float]] = {"python": [], "engine": []}
    engine_parts: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeat):
            runs["python"].append(python_path(events, Path(tmp) / f"python{r}.duckdb"))
            elapsed, parts = engine_path(events, Path(tmp) / f"engine{r}.duckdb")
            runs["engine"].append(elapsed)
            engine_parts.append(parts)
            for f in Path(tmp).iterdir():
                os.remove(f)
    med = {k: statistics.median(v) for k, v in runs.items()}
    part = {k: statistics.median(p[k] for p in engine_parts) for k in engine_parts[0]}
    print(f"{args.events:,} events, batches of {BATCH:,}, medians of {args.repeat} (seconds)")
    print(f"  python: normalise + write_batch      {med['python']:7.2f}")
    print(f"  engine: events + typed rows in SQL   {med['engine']:7.2f}   (stage {part['stage']:.2f}, events "
          f"{part['events']:.2f}, typed rows {part['typed']:.2f})")  # fmt: skip
    faster = med["python"] / med["engine"]
    print(
        f"  the engine's lower bound is {faster:.2f}x the Python path's speed "
        f"({'faster' if faster > 1 else 'slower'}), before dimensions, ledger and mismatch counts"
    )


if __name__ == "__main__":
    main()
