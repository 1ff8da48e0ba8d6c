"""Where a first `run`'s wall goes, against the simulator at 100 ms a request (issue 15): from the process's start
to its first request, the requests, and from the last answer to the exit.

Each run is a child process (this script with `--child`) timing `Client.get_page` around `audit-ingest run`,
into a new DuckDB file; the simulator runs in a process of its own. Prints each run and the medians.

    .venv/bin/python benchmarks/first_sync_timeline.py               # 20,000 events, 5 runs: about a minute
    .venv/bin/python benchmarks/first_sync_timeline.py --no-detections
"""

from __future__ import annotations

import time

STARTED = time.time()  # before any import: the interpreter's own start is what a user waits for too

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from bench import PYTHON, Simulator, _env, compile_package  # noqa: E402

PHASES = ("start to first request", "first request to last answer", "last answer to exit", "wall")


def child() -> None:
    """`audit-ingest run` in this process, its requests timed; one JSON line of figures on stderr at exit."""
    import atexit

    from ingest import api, cli

    spans: list[tuple[float, float]] = []
    lock = threading.Lock()
    get_page = api.Client.get_page

    def timed(self, *args, **kwargs):
        began = time.time()
        try:
            return get_page(self, *args, **kwargs)
        finally:
            with lock:
                spans.append((began, time.time()))

    api.Client.get_page = timed  # type: ignore[method-assign]

    def report() -> None:
        first, last, end = min(b for b, _ in spans), max(e for _, e in spans), time.time()
        figures = [first - STARTED, last - first, end - last, end - STARTED]
        print(json.dumps({"requests": len(spans), **dict(zip(PHASES, figures, strict=True))}), file=sys.stderr)

    atexit.register(report)
    sys.argv = ["audit-ingest", "run"]
    cli.cli()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--no-detections", action="store_true", help="`detections = false`")
    args = parser.parse_args()
    compile_package()
    rows = []
    with tempfile.TemporaryDirectory() as tmp, Simulator(args.events, latency=0.1) as sim:
        env_extra = {}
        if args.no_detections:
            config = Path(tmp) / "no-detections.toml"
            config.write_text("detections = false\n")
            env_extra["AUDIT_INGEST_CONFIG"] = str(config)
        for n in range(args.runs):
            env = {**_env(sim, f"duckdb:///{Path(tmp) / f'run-{n}.duckdb'}"), **env_extra}
            done = subprocess.run([PYTHON, __file__, "--child"], env=env, capture_output=True, text=True, check=True)
            row = json.loads(done.stderr.strip().splitlines()[-1])
            rows.append(row)
            print("  ".join(f"{k} {row[k]:.2f} s" for k in PHASES) + f"  ({row['requests']} requests)")
    ideal = statistics.median(r["requests"] for r in rows) * 0.1 / 4
    print("median: " + "  ".join(f"{k} {statistics.median(r[k] for r in rows):.2f} s" for k in PHASES)
          + f"  (the requests' ideal at 4 at a time: {ideal:.2f} s)")  # fmt: skip
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--child"]:
        child()
    else:
        sys.exit(main())
