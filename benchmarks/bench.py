"""The performance benchmark: a whole `audit-ingest run` against its download floor, and the issue's targets.

    .venv/bin/python benchmarks/bench.py [--events 100000] [--skip-pg] [--skip-backfill] [--skip-parts]
                                         [--rss-series] [--repeat N]

Everything runs as a user would run it: the simulator (`audit-ingest simulate`) in its own process, each
measured command in a fresh process (wall time includes interpreter start; peak RSS and CPU time from wait4). Steps:

1. simulator: every page fetched as bytes, not parsed: how fast it serves, and its CPU per page.
2. floor: the same pages downloaded and parsed by the tool's own client, nothing stored.
3. `audit-ingest run` into a fresh DuckDB file, then into a fresh PostgreSQL database when one answers;
   each stored copy is counted against the simulator. Wall, events/s, peak RSS, ratio to the floor, and
   how busy the simulator was meanwhile (above half the time it, not the tool, would set the pace).
4. unless --skip-parts, a first run's two halves, each alone: the run without its bulk writes (`save_batch`
   discards each batch), and the bulk writes of the same batches, built beforehand, with nothing else running.
5. a second run with nothing new: its requests and wall time (median of three).
6. `backfill --workers 1` and `--workers 4` against a simulator answering each request after 20 ms.
7. with --rss-series: peak RSS of DuckDB runs of 10,000, 100,000 and 1,000,000 events (about 4 minutes).

Prints the figures table, then MET / NOT MET per target; exits 1 when a target is not met.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

KEY = "sk-admin-benchmark"
PG_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
PYTHON = sys.executable
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Measure:
    name: str
    events: int
    wall: float
    rss_mb: float | None = None
    floor: float | None = None  # the floor's wall for the same events, for the ratio
    note: str = ""
    cpu: float | None = None  # user + system seconds of the measured process

    def row(self) -> list[str]:
        return [
            self.name,
            f"{self.events:,}",
            f"{self.wall:.2f}",
            f"{self.cpu:.2f}" if self.cpu is not None else "-",
            f"{self.events / self.wall:,.0f}" if self.events else "-",
            f"{self.rss_mb:.0f}" if self.rss_mb is not None else "-",
            f"{self.wall / self.floor:.2f}x" if self.floor else "-",
            self.note,
        ]


# ------------------------------------------------------------------------------------------ processes
class Simulator:
    """`audit-ingest simulate` in its own process, so that it never shares a GIL with the tool."""

    def __init__(self, events: int, seed: int = 1, latency: float = 0.0, extra: tuple[str, ...] = ()):
        port = _free_port()
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "ingest", "simulate", "--port", str(port), "--events", str(events), "--seed", str(seed),
             "--latency", str(latency), *extra],
            env={**os.environ, "OPENAI_ADMIN_KEY": KEY}, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        self.url = self.proc.stdout.readline().strip()  # printed once the events are generated
        if not self.url.startswith("http"):
            raise SystemExit(f"the simulator did not start (exit {self.proc.wait()})")
        self.events = self.stats()["events"]

    def stats(self) -> dict:
        request = urllib.request.Request(self.url + "/_sim/stats", headers={"Authorization": f"Bearer {KEY}"})
        with urllib.request.urlopen(request) as response:
            return json.load(response)

    def cpu(self) -> float:
        """CPU seconds the simulator has used so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def __enter__(self) -> Simulator:
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Finished:
    wall: float
    rss_mb: float
    cpu: float  # user + system seconds: against the wall, how much ran in parallel
    stdout: str
    stderr: str


def timed(args: list[str], env: dict[str, str]) -> Finished:
    """Runs a command to its end: wall time, and peak RSS from the kernel's accounting of that child."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=err, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        result = Finished(wall, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime, out.read(), err.read())
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args[1:])} failed ({proc.returncode}):\n{result.stderr[-2000:]}")
    return result


def ingest(command: list[str], sim: Simulator, database_url: str) -> Finished:
    return timed([PYTHON, "-m", "ingest", *command], _env(sim, database_url))


def _env(sim: Simulator, database_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUDIT_INGEST_", "OPENAI_"))}
    env.update(OPENAI_ADMIN_KEY=KEY, OPENAI_BASE_URL=sim.url, AUDIT_INGEST_DATABASE_URL=database_url,
               AUDIT_INGEST_LOG_LEVEL="WARNING")  # fmt: skip
    return env


# ------------------------------------------------------------------------------------------ steps
def fetch_all(base_url: str, parse: bool) -> int:
    """Every page of both sweeps of a first run (tenant_only false, then true); returns the events parsed.

    Without `parse`, bodies stay bytes and the cursor is cut from the end of the simulator's body: what
    serving costs, without the tool's parsing."""
    from ingest.api import Client, Query, fetch_pages

    count = 0
    with Client(base_url, KEY) as client:
        for tenant in (False, True):
            query = Query(lte=int(time.time()), tenant_only=tenant)
            if parse:
                count += sum(len(page.events) for page in fetch_pages(client, query))
                continue
            after = None
            while True:
                body = client._http.get("/organization/audit_logs", params=query.params(after)).content
                tail = body[-300:]
                if not tail.endswith(b'"has_more":true}'):
                    break
                after = tail.split(b'"last_id":"')[1].split(b'"')[0].decode()
    return count


def run_without_writes() -> None:
    """(In a child process.) `audit-ingest run` whose bulk writes discard their batch: the download, parsing,
    normalising and staging of every batch, and everything else a run does but `store.save_batch`."""
    import runpy

    from ingest import store

    store.save_batch = lambda conn, batch, seq=None: set()
    sys.argv = ["audit-ingest", "run"]
    runpy.run_module("ingest", run_name="__main__")


def writes_alone(base_url: str, database_url: str) -> None:
    """(In a child process.) Every batch of a first run downloaded, normalised and staged first, then written by
    the run's own write step (`sync._save`: a transaction per batch with its cursor), then the close (DuckDB's
    checkpoint). Prints the seconds of the writing: the warehouse's share of a run, with no Python work beside it."""
    import threading

    from ingest import store, sync
    from ingest.api import Client, Query, fetch_pages

    warehouse = store.Warehouse(database_url)
    warehouse.upgrade()
    batches = []
    with Client(base_url, KEY) as client:
        for tenant in (False, True):
            pages = fetch_pages(client, Query(lte=int(time.time()), tenant_only=tenant))
            batches += sync._normalised(pages, "bench", warehouse.dialect)
    from ingest.state import Key, SweepState

    state = SweepState.for_key(Key("incremental", "bench", False))
    state.start(None, int(time.time()))
    summary, lock = sync.RunSummary("bench"), threading.Lock()
    start = time.perf_counter()
    with warehouse.connect() as conn:
        for batch in batches:
            sync._save(conn, state, batch, summary, lock)
    warehouse.dispose()
    print(time.perf_counter() - start)


def _in_process(call: str) -> list[str]:
    return [PYTHON, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); from benchmarks.bench import *; {call}"]


def simulator_check(sim: Simulator) -> tuple[Measure, float]:
    """(the bytes-only fetch, the simulator's CPU seconds per page while serving it)."""
    cpu, requests = sim.cpu(), sim.stats()["requests"]
    done = timed(_in_process(f"fetch_all({sim.url!r}, False)"), dict(os.environ))
    per_page = (sim.cpu() - cpu) / (sim.stats()["requests"] - requests)
    note = f"simulator CPU {per_page * 1000:.2f} ms/page"
    return Measure("simulator, bytes only", sim.events, done.wall, done.rss_mb, note=note, cpu=done.cpu), per_page


def floor(sim: Simulator) -> Measure:
    done = timed(_in_process(f"print(fetch_all({sim.url!r}, True))"), dict(os.environ))
    got = int(done.stdout.strip())
    if got != sim.events:
        raise SystemExit(f"the floor fetched {got} events, the simulator holds {sim.events}")
    return Measure(
        "fetch-only floor", got, done.wall, done.rss_mb, note="download + parse, nothing stored", cpu=done.cpu
    )


def first_run(name: str, sim: Simulator, database_url: str, count, floor_wall: float | None) -> tuple[Measure, float]:
    """(the measure, the share of its wall time the simulator was busy)."""
    cpu = sim.cpu()
    done = ingest(["run"], sim, database_url)
    busy = (sim.cpu() - cpu) / done.wall
    stored = count()
    if stored != sim.events:
        raise SystemExit(f"{name}: {stored} events stored, the simulator holds {sim.events}")
    note = f"{stored:,} stored = simulator's; simulator busy {busy:.0%}"
    return Measure(name, sim.events, done.wall, done.rss_mb, floor_wall, note, done.cpu), busy


def pipeline_half(sim: Simulator, path: Path, floor_wall: float) -> Measure:
    """A first run without its bulk writes, as a whole process like `run`, into a fresh DuckDB file."""
    done = timed(_in_process("run_without_writes()"), _env(sim, f"duckdb:///{path}"))
    seen, stored = f"{sim.events:,} events seen," in done.stdout, duckdb_count(path)()
    if not seen or stored:  # every event fetched, none written: else the patch of save_batch missed
        raise SystemExit(f"run without bulk writes: {stored} events stored; its summary: {done.stdout.strip()}")
    note = "download, parse, normalise, stage; save_batch discards"
    return Measure("run without bulk writes", sim.events, done.wall, done.rss_mb, floor_wall, note, done.cpu)


def writes_half(name: str, sim: Simulator, database_url: str, count, floor_wall: float) -> Measure:
    """The bulk writes of a first run's batches, built beforehand, with nothing else running (timed in process)."""
    done = timed(_in_process(f"writes_alone({sim.url!r}, {database_url!r})"), dict(os.environ))
    if count() != sim.events:
        raise SystemExit(f"{name} writes alone: {count()} events stored, the simulator holds {sim.events}")
    note = "batches prebuilt; transactions and close, timed in process"
    return Measure(f"{name} writes alone", sim.events, float(done.stdout.strip()), None, floor_wall, note)


def noop_runs(sim: Simulator, database_url: str, times: int = 3) -> tuple[Measure, int]:
    """A run with nothing new, `times` times: (median measure, most requests any of them made)."""
    walls, peaks, requests = [], [], []
    for _ in range(times):
        before = sim.stats()["requests"]
        done = ingest(["run"], sim, database_url)
        walls.append(done.wall)
        peaks.append(done.rss_mb)
        requests.append(sim.stats()["requests"] - before)
    note = f"{max(requests)} requests; walls " + " ".join(f"{w:.2f}" for w in walls)
    measure = Measure("run, nothing new (median)", 0, statistics.median(walls), statistics.median(peaks), note=note)
    return measure, max(requests)


def duckdb_count(path: Path):
    def count() -> int:
        import duckdb

        with duckdb.connect(str(path), read_only=True) as con:
            return con.execute("SELECT count(*) FROM audit_events").fetchone()[0]

    return count


def postgres_database() -> str | None:
    """A fresh database on the local server, or None when no server answers."""
    import psycopg

    name = f"audit_bench_{os.getpid()}"
    try:
        with psycopg.connect(_libpq(PG_SERVER), autocommit=True, connect_timeout=3) as con:
            con.execute(f"DROP DATABASE IF EXISTS {name}")
            con.execute(f"CREATE DATABASE {name}")
    except psycopg.OperationalError:
        return None
    return PG_SERVER.rsplit("/", 1)[0] + "/" + name


def _libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


def postgres_count(url: str):
    def count() -> int:
        import psycopg

        with psycopg.connect(_libpq(url)) as con:
            return con.execute("SELECT count(*) FROM audit_events").fetchone()[0]

    return count


def drop_postgres(url: str) -> None:
    import psycopg

    with psycopg.connect(_libpq(PG_SERVER), autocommit=True) as con:
        con.execute(f"DROP DATABASE IF EXISTS {url.rsplit('/', 1)[1]} WITH (FORCE)")


def backfills(events: int, workdir: Path) -> tuple[Measure, Measure]:
    """`backfill --workers 1` and `--workers 4` of the whole history, each into a fresh file, 20 ms a request."""
    since = (datetime.now(UTC) - timedelta(days=31)).strftime("%Y-%m-%dT%H:%M:%SZ")
    result = []
    workdir.mkdir(exist_ok=True)
    with Simulator(events, latency=0.02) as sim:
        for workers in (1, 4):
            path = workdir / f"backfill-{workers}.duckdb"
            done = ingest(["backfill", "--since", since, "--workers", str(workers)], sim, f"duckdb:///{path}")
            stored = duckdb_count(path)()
            if stored != sim.events:
                raise SystemExit(f"backfill --workers {workers}: {stored} events stored of {sim.events}")
            name = f"backfill --workers {workers}, 20 ms/request"
            result.append(Measure(name, sim.events, done.wall, done.rss_mb, note=f"{stored:,} stored", cpu=done.cpu))
    return result[0], result[1]


def rss_series(workdir: Path) -> list[Measure]:
    result = []
    for events in (10_000, 100_000, 1_000_000):
        with Simulator(events) as sim:
            path = workdir / f"series-{events}.duckdb"
            measure, _ = first_run(f"run into DuckDB, {events:,} events", sim, f"duckdb:///{path}",
                                   duckdb_count(path), None)  # fmt: skip
            result.append(measure)
    return result


# ------------------------------------------------------------------------------------------ report
def middle(runs: list[Measure]) -> Measure:
    """The run of median wall time (`--repeat`); its note lists every run's wall when there are several."""
    chosen = sorted(runs, key=lambda m: m.wall)[len(runs) // 2]
    if len(runs) > 1:
        chosen.note += "; median of " + " ".join(f"{m.wall:.2f}" for m in runs)
    return chosen


def table(measures: list[Measure]) -> str:
    rows = [["measurement", "events", "wall s", "CPU s", "events/s", "peak RSS MB", "x floor", "note"]]
    rows += [m.row() for m in measures]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            c.ljust(w) if i in (0, 7) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ).rstrip()
        for r in rows
    ]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def compile_package() -> None:
    """The package's bytecode, written once: where PYTHONDONTWRITEBYTECODE is set (the development machine),
    an editable install would compile every module at every start, which an installed wheel never does."""
    import compileall

    compileall.compile_dir(ROOT / "ingest", quiet=1)


def main() -> int:
    compile_package()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=100_000, help="events in the simulator (default 100,000)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--skip-pg", action="store_true", help="no PostgreSQL run")
    parser.add_argument("--skip-backfill", action="store_true", help="no backfill runs")
    parser.add_argument("--backfill-events", type=int, default=50_000)
    parser.add_argument("--skip-parts", action="store_true", help="no runs of a first run's halves alone")
    parser.add_argument("--rss-series", action="store_true", help="peak RSS at 10k, 100k and 1M events (slow)")
    parser.add_argument("--repeat", type=int, default=1, help="the median of this many runs of each timed step")
    args = parser.parse_args()

    measures: list[Measure] = []
    targets: list[tuple[bool | None, str]] = []  # (met, text); None: not measured

    def target(met: bool | None, text: str) -> None:
        targets.append((met, text))

    print(f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="audit-bench-") as tmp, Simulator(args.events, args.seed) as sim:
        workdir = Path(tmp)
        raw, sim_cpu_per_page = simulator_check(sim)
        measures.append(raw)
        base = middle([floor(sim) for _ in range(args.repeat)])
        measures.append(base)
        print(f"simulator: {raw.events / raw.wall:,.0f} events/s served as bytes, "
              f"{sim_cpu_per_page * 1000:.2f} ms CPU per page; floor {base.events / base.wall:,.0f} events/s",
              flush=True)  # fmt: skip

        def duckdb_run(i: int) -> tuple[Measure, float]:
            path = workdir / f"warehouse-{i}.duckdb"
            return first_run("run into DuckDB", sim, f"duckdb:///{path}", duckdb_count(path), base.wall)

        runs = [duckdb_run(i) for i in range(args.repeat)]
        duck, busy = middle([m for m, _ in runs]), max(b for _, b in runs)
        measures.append(duck)
        target(busy <= 0.5, f"simulator not the bottleneck: busy {busy:.0%} of the DuckDB run (at most 50%)")
        ratio = duck.wall / base.wall
        target(ratio <= 3, f"DuckDB first run at most 3x the floor (aim 2x): {ratio:.2f}x")
        target(duck.rss_mb <= 200, f"peak RSS at most 200 MB: {duck.rss_mb:.0f} MB (DuckDB, {args.events:,} events)")

        if not args.skip_parts:
            measures.append(pipeline_half(sim, workdir / "no-writes.duckdb", base.wall))
            path = workdir / "writes-alone.duckdb"
            measures.append(writes_half("DuckDB", sim, f"duckdb:///{path}", duckdb_count(path), base.wall))

        noop, requests = noop_runs(sim, f"duckdb:///{workdir / 'warehouse-0.duckdb'}")
        measures.append(noop)
        target(requests <= 2 and noop.wall <= 1.0,
               f"run with nothing new: at most 2 requests and 1.0 s: {requests} requests, {noop.wall:.2f} s")  # fmt: skip
        target(noop.rss_mb is not None and noop.rss_mb <= 100,
               f"run with nothing new: peak RSS at most 100 MB (issue 14): {noop.rss_mb:.0f} MB")  # fmt: skip

        def postgres_run(pg_url: str) -> Measure:
            try:
                return first_run("run into PostgreSQL", sim, pg_url, postgres_count(pg_url), base.wall)[0]
            finally:
                drop_postgres(pg_url)

        pg_url = None if args.skip_pg else postgres_database()
        if pg_url:
            pg = middle([postgres_run(pg_url if i == 0 else postgres_database()) for i in range(args.repeat)])
            measures.append(pg)
            target(pg.wall / base.wall <= 4, f"PostgreSQL first run at most 4x the floor: {pg.wall / base.wall:.2f}x")
            if not args.skip_parts:
                pg_url = postgres_database()
                try:
                    measures.append(writes_half("PostgreSQL", sim, pg_url, postgres_count(pg_url), base.wall))
                finally:
                    drop_postgres(pg_url)
        else:
            target(None, "PostgreSQL first run at most 4x the floor: " + ("skipped" if args.skip_pg else "no server"))

    if args.skip_backfill:
        target(None, "backfill --workers 4 at least 3x faster than --workers 1: skipped")
    else:
        with tempfile.TemporaryDirectory(prefix="audit-bench-") as tmp:
            pairs = [backfills(args.backfill_events, Path(tmp) / str(i)) for i in range(args.repeat)]
        one, four = middle([p[0] for p in pairs]), middle([p[1] for p in pairs])
        measures += [one, four]
        target(one.wall / four.wall >= 3, f"backfill --workers 4 at least 3x faster: {one.wall / four.wall:.2f}x")

    if args.rss_series:
        with tempfile.TemporaryDirectory(prefix="audit-bench-") as tmp:
            series = rss_series(Path(tmp))
        measures += series
        peaks = [m.rss_mb for m in series]
        flat = max(peaks) <= 200 and max(peaks) <= 1.25 * min(peaks)
        target(flat, "peak RSS at most 200 MB and flat (within 25%) from 10k to 1M events: "
               + " / ".join(f"{p:.0f}" for p in peaks) + " MB")  # fmt: skip
    else:
        target(None, "peak RSS flat from 10k to 1M events: not measured (--rss-series)")

    print()
    print(table(measures))
    print()
    for met, text in targets:
        print(f"{'MET' if met else 'NOT MEASURED' if met is None else 'NOT MET':>12}  {text}")
    return 0 if all(met is not False for met, _ in targets) else 1


if __name__ == "__main__":
    sys.exit(main())
