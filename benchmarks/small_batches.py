"""What a small batch costs on DuckDB written as bound parameters and as Arrow tables (`backends.duckdb.arrow`
chooses), and what importing pyarrow costs a process that writes only such batches (a quiet run's lookback).

Each batch is `sync.write_batch` in its transaction into one DuckDB file, of simulator events not stored yet;
medians of `--repeat` batches per size and way, after one warm-up batch of each way. The import is timed in a
fresh interpreter that has imported the tool's write path already.

    .venv/bin/python benchmarks/small_batches.py
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ingest import model, store, sync
from ingest.backends import duckdb as duckdb_backend
from ingest.simulator import Simulator

IMPORT = (
    "import time, ingest.sync, ingest.backends.duckdb, duckdb; t = time.perf_counter(); "
    "import pyarrow, pyarrow.compute, pyarrow.dataset; print(time.perf_counter() - t)"
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 5, 11])
    parser.add_argument("--repeat", type=int, default=9)
    args = parser.parse_args()
    events = iter(Simulator(events=(2 + 2 * len(args.sizes) * args.repeat) * max(args.sizes)).events)
    default, values = duckdb_backend._BOUND_BEFORE_ARROW, duckdb_backend._BOUND_VALUES
    with tempfile.TemporaryDirectory() as tmp:
        warehouse = store.Warehouse(f"duckdb:///{Path(tmp) / 'w.duckdb'}")
        warehouse.ensure_schema()
        with warehouse.connect() as conn:

            def write(n: int, bound: bool) -> float:
                duckdb_backend._BOUND_VALUES = 10**9 if bound else 10  # Arrow: pyarrow is imported by then
                rows = store.stage("duckdb", model.normalise([next(events) for _ in range(n)], "bench", store.now()))
                started = time.perf_counter()
                store.atomically(conn, lambda: sync.write_batch(conn, "bench", "bench", rows))
                return time.perf_counter() - started

            write(max(args.sizes), True), write(max(args.sizes), False)
            for n in args.sizes:
                bound = statistics.median(write(n, True) for _ in range(args.repeat))
                arrow = statistics.median(write(n, False) for _ in range(args.repeat))
                print(f"{n:3} events: bound {bound * 1000:5.1f} ms, Arrow {arrow * 1000:5.1f} ms")
        warehouse.dispose()
    duckdb_backend._BOUND_VALUES = values
    imports = [float(subprocess.run([sys.executable, "-c", IMPORT], capture_output=True, text=True,
                                    check=True).stdout) for _ in range(args.repeat)]  # fmt: skip
    print(f"importing pyarrow (compute, dataset) in a fresh process: {statistics.median(imports) * 1000:.0f} ms")
    width = len(model.normalise([next(events)], "bench", store.now()).events[0])
    print(f"_BOUND_BEFORE_ARROW = {default}: before pyarrow is imported, up to {default // width} events "
          f"({width} values each) bind")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
