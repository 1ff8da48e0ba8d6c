"""The API-bound targets of issue 15: a first sync at 100 ms a request, and a run against a rate-limited API.

Each step runs `audit-ingest` in its own process against `audit-ingest simulate` in another, as bench.py does,
and prints its figures and a verdict per target; exit status 1 when a target is not met.

    .venv/bin/python benchmarks/throughput.py                # 20,000 events, medians of 3: about 3 minutes
    .venv/bin/python benchmarks/throughput.py --events 5000 --repeat 1  # a quick look
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench import PYTHON, Simulator, _env, compile_package, duckdb_count, ingest, timed  # noqa: E402

SINCE = (datetime.now(UTC) - timedelta(days=31)).strftime("%Y-%m-%dT%H:%M:%SZ")


def exact(path: Path, sim: Simulator, what: str) -> None:
    stored = duckdb_count(path)()
    if stored != sim.events:
        raise SystemExit(f"{what}: {stored} events stored of {sim.events}")


def first_sync(events: int, workdir: Path, repeat: int) -> list[tuple[str, bool]]:
    """`run` (the first sync) and `backfill --workers 1/4` of the same history, 100 ms a request; and `run` with
    the detections off, to tell the sweeps' share of its wall from the rules'. Each step `repeat` times, each
    into a new warehouse; its median wall (and that run's requests) counts."""
    verdicts, walls, syncs = [], {}, {}
    quiet = workdir / "no-detections.toml"
    quiet.write_text("detections = false\n")
    with Simulator(events, latency=0.1) as sim:
        for name, command, config in (
            ("run (first sync)", ["run"], None),
            ("run, detections off", ["run"], quiet),
            ("backfill --workers 1", ["backfill", "--since", SINCE, "--workers", "1"], None),
            ("backfill --workers 4", ["backfill", "--since", SINCE, "--workers", "4"], None),
        ):
            tries = []
            for attempt in range(repeat):
                path = workdir / f"{name.split()[0]}-{len(walls)}-{attempt}.duckdb"
                before = sim.stats()["requests"]
                if config is None:
                    done = ingest(command, sim, f"duckdb:///{path}")
                else:
                    done = timed([PYTHON, "-m", "ingest", *command],
                                 {**_env(sim, f"duckdb:///{path}"), "AUDIT_INGEST_CONFIG": str(config)})  # fmt: skip
                tries.append((done.wall, sim.stats()["requests"] - before, done.stdout))
                exact(path, sim, name)
            wall, requests, stdout = sorted(tries)[len(tries) // 2]
            walls[name] = (wall, requests)
            # The run's own summary line: the sync alone, without start-up, the rules after it and the close.
            swept = re.search(r"requests in ([\d.]+)s", stdout)
            if swept:
                syncs[name] = float(swept.group(1))
            sweeps = f", sync {swept.group(1)} s" if swept else ""
            spread = f" (of {', '.join(f'{t[0]:.2f}' for t in sorted(tries))})" if repeat > 1 else ""
            print(f"{name:28} {sim.events:>9,} events {wall:7.2f} s{spread} {requests:>6,} requests{sweeps}")
    run_wall, run_requests = walls["run (first sync)"]
    ideal = run_requests * 0.1 / 4
    verdicts.append((f"first sync at most 1.3x requests x 100 ms / 4 workers ({ideal:.2f} s): {run_wall:.2f} s",
                     run_wall <= 1.3 * ideal))  # fmt: skip
    speedup = walls["backfill --workers 1"][0] / run_wall
    verdicts.append((f"first sync at least 3x faster than one worker: {speedup:.2f}x", speedup >= 3))
    if {"run (first sync)", "backfill --workers 1"} <= syncs.keys():
        alone = syncs["run (first sync)"]
        print(f"(the first sync's own time, from its summary line: {alone:.1f} s, {alone / ideal:.2f}x the ideal, "
              f"{syncs['backfill --workers 1'] / alone:.2f}x faster than --workers 1's)")  # fmt: skip
    four = walls["backfill --workers 1"][0] / walls["backfill --workers 4"][0]
    print(
        f"(backfill --workers 4 is {four:.2f}x faster than --workers 1: the slices this issue's first sync would use)"
    )
    return verdicts


def rate_limited(events: int, workdir: Path) -> list[tuple[str, bool]]:
    """`backfill --workers 8` against an API limited to 20 requests a second, 200 ms a request."""
    with Simulator(events, latency=0.2, extra=("--rate-limit", "20")) as sim:
        path = workdir / "rate-limited.duckdb"
        done = ingest(["backfill", "--since", SINCE, "--workers", "8"], sim, f"duckdb:///{path}")
        stats = sim.stats()
        exact(path, sim, "rate-limited backfill")
    rate = stats["requests"] / done.wall
    share = stats["rate_limited"] / stats["requests"]
    print(f"rate-limited backfill --workers 8: {done.wall:.2f} s, {stats['requests']:,} requests "
          f"({rate:.1f}/s), {stats['rate_limited']:,} answered 429 ({share:.1%}), exact")  # fmt: skip
    return [
        (f"at least 85% of the API's 20 requests/s: {rate / 20:.0%}", rate >= 0.85 * 20),
        (f"at most 10% of requests answered 429: {share:.1%}", share <= 0.10),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each first-sync step; the median counts")
    args = parser.parse_args()
    compile_package()
    with tempfile.TemporaryDirectory() as tmp:
        verdicts = first_sync(args.events, Path(tmp), args.repeat) + rate_limited(args.events, Path(tmp))
    print()
    for text, met in verdicts:
        print(f"{'MET' if met else 'NOT MET':>8}  {text}")
    return 0 if all(met for _, met in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
