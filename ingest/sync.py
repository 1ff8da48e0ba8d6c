"""The sync engine: sweeps a time window page by page, committing each batch with its cursor.

A sweep covers [gte, lte] (Unix seconds, inclusive) newest first, following `after`. Its bounds and
cursor live in `sync_state` and commit in the same transaction as the rows of the pages before the
cursor, so a killed run resumes exactly where its last commit left it. When the sweep completes, the
incremental checkpoint moves to the sweep's upper bound; the next sweep starts `lookback` before it. The
completed window joins the stream's coverage (ingest.coverage) in that same transaction (`complete`).
A backfill sweeps time slices of a past window concurrently, each with a state row of its own.
The engine names no event type: `model.normalise` turns events into rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import queue
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import UTC, datetime

import sqlalchemy as sa

from ingest import backends, batchlog, coverage, ledger, model, store
from ingest.api import PAGE_SIZE, Client, Page, Query, fetch_pages
from ingest.config import Settings, Source
from ingest.errors import (
    ApiError,
    BadResponseError,
    ConfigError,
    CursorRejected,
    Failure,
    IngestError,
    Interrupted,
    RulesError,
)
from ingest.state import Key, SweepState
from ingest.throttle import Budget

log = logging.getLogger("ingest.sync")

# Pages are committed together, up to this many events or this many seconds after the batch's first
# page: a DuckDB commit costs tens of milliseconds, a page of the real API a few hundred. A kill loses at
# most the uncommitted batches, which the rerun fetches again.
BATCH_EVENTS = 5000
BATCH_SECONDS = 1.0
# Downloading runs this many pages ahead in a thread of its own. Normalising runs one batch ahead in another
# thread while PostgreSQL's server works on the last one. On DuckDB it stays in the writing thread (the backend's NORMALISE_AHEAD), and
# concurrent sweeps (backfill slices) normalise under the writers' lock: DuckDB takes the GIL back a dozen
# times per statement, each a wait of up to 5 ms while another thread computes (benchmarks/README.md).
PREFETCH_PAGES = 50


@dataclass
class RunSummary:
    source: str
    kind: str = "incremental"
    pages: int = 0
    events_seen: int = 0
    events_new: int = 0
    rejected: int = 0
    mismatches: Counter = field(default_factory=Counter)
    requests: int = 0
    retries: int = 0
    rate_limit_wait: float = 0.0
    status: str = "running"
    error: str | None = None
    started: float = field(default_factory=time.monotonic)
    duration: float = 0.0
    # Per sweep (state key): (seconds of its window covered so far, its width), for progress and ETA.
    coverage: dict[str, tuple[int, int]] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)  # streams the API refused (state key: why)

    def progress(self) -> tuple[int, int] | None:
        """(seconds covered, seconds in all known windows); None while no window is known."""
        if not self.coverage:
            return None
        return sum(done for done, _ in self.coverage.values()), sum(width for _, width in self.coverage.values())

    def line(self) -> str:
        if self.status == "skipped":
            return f"{self.source}: skipped, another ingester is syncing it"
        if self.status == "done":
            return f"{self.source}: skipped, another ingester synced it this tick"
        text = (
            f"{self.source}: {self.status}, {self.events_seen:,} events seen, {self.events_new:,} new, "
            f"{self.pages:,} pages, {self.requests:,} requests in {self.duration:.1f}s"
        )
        if self.rejected:
            text += f", {self.rejected:,} rejected (see rejected_events)"
        if self.mismatches:
            text += f", {sum(self.mismatches.values()):,} payloads not matching their declared shape"
        if self.retries:
            text += f", {self.retries} retries ({self.rate_limit_wait:.1f}s rate-limited)"
        if self.unavailable:
            text += ", tenant stream unavailable (no tenant?)"
        return text


Progress = Callable[[RunSummary], None]


def run_sources(
    settings: Settings,
    warehouse: store.Warehouse,
    sources: tuple[Source, ...],
    *,
    stop: threading.Event | None = None,
    on_progress: Progress | None = None,
    transport=None,
    job: Callable[..., RunSummary] | None = None,
) -> list[RunSummary]:
    """One incremental sync (or `job`, e.g. a backfill) of each source; the first failure is raised after
    every source had its turn."""
    warehouse.ensure_schema()
    job = job or sync_source
    summaries, failure = [], None
    with feeding(settings, warehouse):
        for source in sources:
            try:
                with client_for(settings, source, stop, transport) as client:
                    summaries.append(job(warehouse, client, source, settings, stop=stop, on_progress=on_progress))
            except IngestError as exc:
                if isinstance(exc, Interrupted):
                    raise
                failure = failure or exc
                # `raised`: the CLI prints this one as `error: ...` anyway, so a terminal can do without the log line.
                log.error("%s: %s", source.name, exc, extra={"raised": failure is exc})
    if failure:
        raise failure
    return summaries


@contextlib.contextmanager
def feeding(settings: Settings, warehouse: store.Warehouse) -> Iterator[None]:
    """The block (a sync) with the configured consumers fed: the rules alongside it (ingest.consumers.alongside),
    then, once it has ended without raising, every consumer what committed since (`feed_consumers`)."""
    from ingest import consumers, sinks

    try:
        found = consumers.configured(settings)
    except RulesError as exc:  # a rule file edited since the start: the sync goes on, the rules wait for a fix
        log.error("%s; the rules evaluate this run's batches once they load again", exc)
        found = list(sinks.configured(settings))
    rules = [c for c in found if not isinstance(c, sinks.Sink)]
    # A connection held for the block: the sync's own closing would checkpoint DuckDB's file there and then.
    with warehouse.connect() as held, consumers.alongside(warehouse, rules) as healthy:
        yield
        warehouse.settle(held)  # while the rules finish their last round
    feed_consumers(settings, warehouse, [c for c in found if c in healthy or isinstance(c, sinks.Sink)])


def feed_consumers(settings: Settings, warehouse: store.Warehouse, found: list | None = None) -> None:
    """After a sync: the configured consumers (rules, sinks), or those `found` of them, process what committed
    since their checkpoints. Their failures are logged and never fail the sync (ingest.consumers)."""
    from ingest import consumers, sinks

    found = consumers.configured(settings) if found is None else found
    consumers.run(warehouse, [c for c in found if not isinstance(c, sinks.Sink)])
    if settings.detections and settings.webhooks():
        from ingest import delivery

        try:
            delivery.deliver_pending(warehouse, retry_delay=settings.alert_retry_delay)
        except IngestError as exc:  # the alerts wait in alert_deliveries for the next run
            log.error("alert delivery: %s", exc)
    sinks.run(warehouse, [c for c in found if isinstance(c, sinks.Sink)])  # each in a thread: none waits on another
    sinks.observe(warehouse, settings)


def client_for(
    settings: Settings,
    source: Source,
    stop: threading.Event | None = None,
    transport=None,
    budget: Budget | None = None,
) -> Client:
    """The source's client, starting requests within `budget` (the daemon's, shared by its sources), or within
    `max_requests_per_second` of its own."""
    return Client(
        settings.base_url,
        source.admin_key(),
        timeout=settings.timeout,
        max_retries=settings.max_retries,
        retry_base_delay=settings.retry_base_delay,
        retry_max_delay=settings.retry_max_delay,
        stop=stop,
        transport=transport,
        budget=budget or Budget(settings.max_requests_per_second),
    )


def streams(source: Source) -> list[tuple[Key, Query]]:
    """(incremental state key, filters) of each sweep a complete copy of the source needs: the API serves
    tenant-scoped events only to `tenant_only=true` requests, and only those there."""
    result = []
    for tenant in (False, True):
        types = tuple(t for t in source.event_types if model.is_tenant_scoped(t) == tenant)
        if (tenant and not source.tenant_events) or (source.event_types and not types):
            continue
        result.append(
            (Key("incremental", source.name, tenant),
             Query(event_types=types, project_ids=source.project_ids, tenant_only=tenant))
        )  # fmt: skip
    return result


def sync_source(
    warehouse: store.Warehouse,
    client: Client,
    source: Source,
    settings: Settings,
    *,
    stop: threading.Event | None = None,
    on_progress: Progress | None = None,
    unless_synced_since: datetime | None = None,
) -> RunSummary:
    """The incremental sync of one source: per stream, resume the unfinished sweep or start one from the checkpoint.
    With `unless_synced_since` (naive UTC, a daemon's tick), none if a run that ended ok started since (status
    `done`): another daemon synced it this tick."""
    summary = RunSummary(source.name)
    with warehouse.connect() as conn:
        lock = warehouse.lock(conn, source.name, wait=settings.lock_wait, stop=stop)
        with lock if settings.source_lock else contextlib.nullcontext(True) as held:
            if not held:  # its line() is the one line the caller logs or prints
                summary.status = "skipped"
                return summary
            if unless_synced_since is not None and _synced_since(conn, source.name, unless_synced_since):
                summary.status = "done"
                return summary
            with _recorded(conn, summary, client):
                todo = streams(source)
                while todo:  # a resumed sweep ends at its old bound: then sweep again up to now
                    todo = _sweep_streams(warehouse, conn, client, todo, settings, summary, stop, on_progress)
    return summary


def _synced_since(conn: sa.Connection, source: str, since: datetime) -> bool:
    """Whether an incremental run of `source` that ended ok started at `since` or later (read under its lock)."""
    runs = model.sync_runs
    found = sa.select(runs.c.id).where(
        runs.c.source == source, runs.c.kind == "incremental", runs.c.status == "ok", runs.c.started_at >= since
    )
    with conn.begin():
        return conn.execute(found.limit(1)).first() is not None


def _sweep_streams(
    warehouse: store.Warehouse, conn: sa.Connection, client: Client, todo: list[tuple[Key, Query]],
    settings: Settings, summary: RunSummary, stop: threading.Event | None, on_progress: Progress | None,
) -> list[tuple[Key, Query]]:  # fmt: skip
    """One sweep of each stream: resumed, or started from its checkpoint. The slices of every stream split (now
    or by a killed run) share one pool, so that the tenant stream's slices fill the workers the main stream's
    leave idle; once a stream has slices to sweep, the next streams' sweeps start in that pool too, up to where
    they split (`_Head`). The first stream's sweep goes first alone: a wrong key costs one request. Returns the
    streams whose resumed sweep ended at an old bound: they sweep again up to now."""
    again: list[tuple[Key, Query]] = []
    split: list[tuple[Key, SweepState]] = []
    pending: list[tuple[SweepState, Query]] = []
    heads: list[_Head] = []
    for key, filters in todo:
        with conn.begin():
            state = SweepState.load(conn, str(key)) or SweepState.for_key(key)
            resumed = state.unfinished
            was_split, parts = _parts(conn, key) if resumed else (False, [])
            if resumed:
                log.info("%s: resuming the unfinished sweep at cursor %s", key, state.sweep_cursor)
            else:
                gte: int | None
                if state.checkpoint is not None:
                    gte = state.checkpoint - int(settings.lookback)
                else:
                    gte = None if settings.start is None else int(settings.start.timestamp())
                state.start(gte, int(time.time()))
                state.save(conn)
        if resumed:
            again.append((key, filters))
        head = _Head(client, key, filters, state, settings, summary, stop, on_progress)
        if not was_split and pending:
            heads.append(head)
            continue
        if not was_split:
            parts = head(conn, threading.Lock())
            if head.unavailable:
                _drop_unavailable(again, head)
                continue
        if parts:
            split.append((key, state))
            pending += [(p, filters) for p in parts]
        else:
            _complete_stream(conn, key, state, settings.retention)
    if pending:
        _pool(warehouse, client, pending, summary, settings.workers, stop or threading.Event(), on_progress,
              settings.retention, heads)  # fmt: skip
    for head in heads:
        if head.unavailable:
            _drop_unavailable(again, head)
        else:
            split.append((head.key, head.state))
    for key, state in split:
        _complete_stream(conn, key, state, settings.retention)
    return again


def _drop_unavailable(again: list[tuple[Key, Query]], head: _Head) -> None:
    """A refused stream does not sweep again in this run, resumed or not."""
    if (head.key, head.filters) in again:
        again.remove((head.key, head.filters))


@dataclass
class _Head:
    """A stream's sweep up to where it splits (the whole of it when it does not): called with a connection and
    the writers' lock, it returns the slices to sweep. A tenant stream the API refuses while the main stream
    works is recorded as `unavailable` (`_unavailable`) instead of failing the run."""

    client: Client
    key: Key
    filters: Query
    state: SweepState
    settings: Settings
    summary: RunSummary
    stop: threading.Event | None
    on_progress: Progress | None
    unavailable: bool = False

    def __call__(self, conn: sa.Connection, lock: threading.Lock) -> list[SweepState]:
        state, settings = self.state, self.settings
        splitter = _Splitter(settings.workers, state.sweep_gte, int(settings.retention),
                             first=state.checkpoint is None)  # fmt: skip
        try:
            sweep(conn, self.client, state, self.filters, self.summary, stop=self.stop, on_progress=self.on_progress,
                  lock=lock, split=splitter)  # fmt: skip
        except ApiError as exc:
            if not (self.key.tenant and exc.failure in NO_TENANT and self.summary.pages):
                raise
            with lock:
                _unavailable(conn, state, exc, self.summary)
            self.unavailable = True
            return []
        if not splitter.parts:
            return []
        with lock, conn.begin():
            return _split(conn, state, self.key, splitter)


def _complete_stream(conn: sa.Connection, key: Key, state: SweepState, retention: float) -> None:
    with conn.begin():
        complete(conn, state, retention)  # its locks first (coverage.record)
        _drop_parts(conn, key)


def complete(conn: sa.Connection, state: SweepState, retention: float) -> None:
    """The sweep is complete (in the caller's transaction, first in it: see coverage.record): its window joins the
    stream's coverage, and its state moves on. A sweep without a lower bound (a first sync, the oldest slice of a split one) covered all
    the API still held when it ended: from `retention` before now, or from its top if that is older."""
    key = Key.parse(state.key)
    assert state.sweep_lte is not None, "a sweep in progress has an upper bound"
    lte = state.sweep_lte
    gte = state.sweep_gte if state.sweep_gte is not None else min(lte, int(time.time() - retention))
    kind = "first sync" if key.kind == "incremental" and state.checkpoint is None else key.kind
    coverage.record(conn, key.name, key.tenant, gte, lte, kind)
    state.finish()
    state.save(conn)


@dataclass
class _Splitter:
    """Decides, after a sweep's first page (a first sync) or its first SPLIT_AFTER pages, whether to split the
    rest of its window into slices fetched concurrently: when there are more pages, and the window left holds
    at least SPLIT_PAGES pages a slice by the density of those seen. `parts` and `oldest` are then set, and the
    sweep stops there. A first sync that goes on after a page is long (it reaches back to the retention); an
    incremental window is judged on several pages: one with a burst of new events at its top is not long. A
    wrong guess costs little: idle workers split the slices still running (`_steal`).

    Only an API slower than SPLIT_LATENCY a page is worth it: concurrent downloads hide its latency, while pages
    served faster than this machine stores them (a local simulator, say) make the run CPU-bound, and its
    threads then slow the writer down (benchmarks/README.md, "a fast API")."""

    workers: int
    gte: int | None
    retention: int  # the window's lower bound when it has none (a first sync): the API keeps no older events
    first: bool = False  # a first sync: decided on its first page
    parts: int = 0
    oldest: int = 0
    _pages: int = 0
    _events: int = 0
    _newest: int | None = None
    _started: float = field(default_factory=time.monotonic)

    def stop_after(self, page: Page) -> bool:
        """Whether the sweep stops after `page`: decided once, at page 1 of a first sync, else SPLIT_AFTER."""
        if self.workers < 2 or not page.events:
            return False
        times = [e["effective_at"] for e in page.events]
        self._pages, self._events = self._pages + 1, self._events + len(times)
        self._newest = max(times) if self._newest is None else self._newest
        if self._pages != (1 if self.first else SPLIT_AFTER) or not page.has_more:
            return False
        if (time.monotonic() - self._started) / self._pages < SPLIT_LATENCY:
            return False
        oldest = min(times)
        lower = self.gte if self.gte is not None else oldest - self.retention
        per_second = self._events / max(1, self._newest - oldest)
        pages_left = (oldest - lower + 1) * per_second / PAGE_SIZE
        parts = min(self.workers, int(pages_left // SPLIT_PAGES))
        if parts < 2:
            return False
        self.parts, self.oldest = parts, oldest
        return True


# An incremental sweep still going after SPLIT_AFTER pages is split into slices of SPLIT_PAGES pages at least
# (by the density seen so far).
SPLIT_AFTER = 5
SPLIT_PAGES = 2
SPLIT_LATENCY = 0.02  # seconds a page: the real API takes hundreds of milliseconds, a local simulator a few
# A worker out of work splits a running slice only if its unswept part is STEAL_SECONDS wide at least and holds
# STEAL_PAGES pages by the slice's density so far; it looks again every STEAL_POLL seconds while none is.
STEAL_SECONDS = 2
STEAL_PAGES = 2
STEAL_POLL = 0.02


def _split(conn: sa.Connection, state: SweepState, key: Key, splitter: _Splitter) -> list[SweepState]:
    """The rest of `state`'s window, up to and including the last page's oldest second (which may hold more
    events than that page gave), as `splitter.parts` slice rows; the oldest slice keeps the window's lower
    bound, open (None) for a first sync."""
    n, top = splitter.parts, splitter.oldest
    lower = state.sweep_gte if state.sweep_gte is not None else top - splitter.retention
    parts = []
    for i in range(n):
        lo, hi = lower + (top - lower + 1) * i // n, lower + (top - lower + 1) * (i + 1) // n - 1
        part = SweepState.for_key(Key("slice", key.name, key.tenant, top=hi))
        part.start(state.sweep_gte if i == 0 else lo, hi)
        part.save(conn)
        parts.append(part)
    log.info("%s: the sweep goes on in %d slices fetched concurrently", key, n)
    return parts[::-1]  # newest first: recent activity is usually the densest


# How the API may answer tenant_only=true for an organization without a tenant (undocumented): 400, 403, 404.
NO_TENANT = frozenset({Failure.REJECTED, Failure.FORBIDDEN})


def _unavailable(conn: sa.Connection, state: SweepState, exc: ApiError, summary: RunSummary) -> None:
    """The tenant stream refused while the main stream works: kept as unavailable, with the API's words, and
    tried again (one request) on the next run; the run goes on and succeeds."""
    if state.unavailable is None:
        log.warning("%s: the API refuses the tenant stream, skipped until it accepts it: %s", state.key, exc)
    with conn.begin():
        state.unavailable = str(exc)
        state.save(conn)
    summary.unavailable[state.key] = str(exc)


def _parts(conn: sa.Connection, key: Key) -> tuple[bool, list[SweepState]]:
    """Whether the stream's unfinished sweep was split, and its slices not done yet, newest first."""
    keys = _slice_keys(conn, key)
    parts = [p for p in map(functools.partial(SweepState.load, conn), keys) if p is not None and p.checkpoint is None]
    return bool(keys), sorted(parts, key=lambda p: -(p.sweep_lte or 0))


def _drop_parts(conn: sa.Connection, key: Key) -> None:
    """The slice rows of the stream's sweep, once the sweep is complete."""
    table = model.sync_state
    for k in _slice_keys(conn, key):
        conn.execute(table.delete().where(table.c.key == k))


def _slice_keys(conn: sa.Connection, key: Key) -> list[str]:
    table = model.sync_state
    query = sa.select(table.c.key).where(table.c.kind == "slice", table.c.source == key.name)
    return [k for k in conn.execute(query).scalars().all() if Key.parse(k).tenant == key.tenant]


def backfill(
    settings: Settings,
    warehouse: store.Warehouse,
    sources: tuple[Source, ...],
    since: datetime,
    until: datetime | None = None,
    *,
    workers: int = 1,
    stop: threading.Event | None = None,
    on_progress: Progress | None = None,
    transport=None,
) -> list[RunSummary]:
    """Loads the half-open window [since, until) (until defaults to now) of each source, in `workers` time
    slices fetched concurrently. Slices have their own state rows and never move the incremental checkpoint."""
    if (until or datetime.now(UTC)) <= since:
        raise ConfigError("the backfill window is empty: --until (default now) must be later than --since")
    # Events carry whole seconds: t >= since <=> t >= ceil(since), and t < until <=> t < ceil(until).
    job = functools.partial(
        backfill_source,
        since=math.ceil(since.timestamp()),
        until=None if until is None else math.ceil(until.timestamp()),
        workers=workers,
    )
    stop = stop or threading.Event()  # shared by the client and the slices, so that Ctrl-C reaches both
    return run_sources(settings, warehouse, sources, stop=stop, on_progress=on_progress, transport=transport, job=job)


def backfill_source(
    warehouse: store.Warehouse,
    client: Client,
    source: Source,
    settings: Settings,
    *,
    since: int,
    until: int | None,
    workers: int,
    stop: threading.Event,
    on_progress: Progress | None = None,
) -> RunSummary:
    """The backfill of one source: a pool of `workers` threads over its unfinished slices, sharing `client`
    (and so its rate-limit pause) and one write lock."""
    summary = RunSummary(source.name, kind="backfill")
    with warehouse.connect() as conn, _recorded(conn, summary, client):
        with conn.begin():
            pending = _slices(conn, source, since, until, workers)
        for state, _ in pending:  # the whole remaining window is known now: progress has a total from the start
            summary.coverage[state.key] = (0, state.width)
        _pool(warehouse, client, pending, summary, workers, stop, on_progress, settings.retention)
    return summary


def _pool(
    warehouse: store.Warehouse, client: Client, pending: list[tuple[SweepState, Query]], summary: RunSummary,
    workers: int, stop: threading.Event, on_progress: Progress | None, retention: float,
    heads: Sequence[_Head] = (),
) -> None:  # fmt: skip
    """Sweeps the slices, `workers` downloading at a time, each in a thread with its own connection, sharing
    `client` (and so its rate-limit pause and requests in flight) and one write lock; each slice's row is
    finished when done. `heads` (streams not split yet) take the first free places: the slices they return
    join the queue.

    A slice whose last page is served frees its place while it writes its last batches. A free place takes the
    next slice, or else splits the running slice with the most left to fetch (`_steal`) and sweeps the part
    split off, so that one dense slice does not finish alone while the others idle."""
    lock = threading.Lock()
    changed = threading.Condition()  # the queue and the running slices; taken before `lock`, never inside it
    queued = list(pending)
    starting = list(heads)
    running: dict[str, tuple[SweepState, Query, _Reach]] = {}
    heading = 0  # heads running: they hold a place, and no worker may split them
    failed = threading.Event()  # a slice failed: the others finish theirs, and no worker takes another

    def take(conn: sa.Connection) -> _Head | tuple[SweepState, Query, _Reach] | None:
        nonlocal heading
        with changed:
            while not (stop.is_set() or failed.is_set()):
                found: tuple[SweepState, Query, _Reach] | None = None
                if heading + sum(not reach.done for _, _, reach in running.values()) < workers:
                    if starting:
                        heading += 1
                        return starting.pop(0)
                    if queued:
                        found = (*queued.pop(0), _Reach())
                    else:
                        with lock:
                            found = _steal(conn, list(running.values()), summary, retention)
                if found:
                    running[found[0].key] = found
                    return found
                if not running and not queued and not heading:
                    return None
                changed.wait(STEAL_POLL)  # until a slice is done, or one has more to split off
        return None

    def start(conn: sa.Connection, head: _Head) -> None:
        nonlocal heading
        parts: list[SweepState] = []
        try:
            parts = head(conn, lock)
        except BaseException:
            failed.set()
            raise
        finally:
            with changed:  # its slices queued as it frees its place: no worker sees the pool empty between
                heading -= 1
                queued.extend((p, head.filters) for p in parts)
                changed.notify_all()

    def work() -> None:
        with warehouse.connect() as conn:
            while (found := take(conn)) is not None:
                if isinstance(found, _Head):
                    start(conn, found)
                    continue
                state, filters, reach = found
                try:
                    sweep(conn, client, state, filters, summary, stop=stop, on_progress=on_progress, lock=lock,
                          reach=reach)  # fmt: skip
                    with lock, conn.begin():
                        complete(conn, state, retention)
                except BaseException:
                    failed.set()
                    raise
                finally:
                    with changed:
                        del running[state.key]
                        changed.notify_all()

    threads = 2 * max(1, workers)  # half of them at most writing their slices' last batches
    with ThreadPoolExecutor(threads, thread_name_prefix="slice") as pool:
        futures = [pool.submit(work) for _ in range(threads)]
        try:
            for future in as_completed(futures):
                future.result()
        except BaseException as exc:
            failed.set()  # slices not started yet stay pending for the rerun
            if isinstance(exc, KeyboardInterrupt):
                stop.set()  # running slices end after their current batch
            raise
    if queued or starting:  # a stop came before every slice and head had a worker: they stay for the rerun
        raise Interrupted("stopped")


@dataclass
class _Reach:
    """How far a running sweep's download has got: what a worker out of work needs to split it (`_steal`)."""

    oldest: int | None = None  # the oldest effective_at served so far
    events: int = 0  # served so far
    done: bool = False  # its last page is served: nothing left to split off


def _steal(
    conn: sa.Connection, running: list[tuple[SweepState, Query, _Reach]], summary: RunSummary, retention: float
) -> tuple[SweepState, Query, _Reach] | None:
    """Splits the running slice with the most events left by its density so far (under the write lock): of its
    unswept part [lower bound, oldest second served] (newest first, everything above is served), the older half
    becomes a new slice; the running slice's lower bound moves up to the rest, saved with the new row in one
    transaction, and its sweep ends once it is served an event below that bound (`_served`). A slice open
    below (a first sync's oldest) counts its unswept part from the retention; the part split off stays open."""
    best: tuple[float, int, SweepState, Query] | None = None
    floor = int(time.time() - retention)
    for state, filters, reach in running:
        if reach.done or reach.oldest is None or state.sweep_lte is None:
            continue
        lower = state.sweep_gte if state.sweep_gte is not None else floor
        left = (reach.oldest - lower) * reach.events / max(1, state.sweep_lte - reach.oldest + 1)
        if reach.oldest - lower >= STEAL_SECONDS and left >= STEAL_PAGES * PAGE_SIZE and (not best or left > best[0]):
            best = (left, (lower + reach.oldest + 1) // 2, state, filters)
    if best is None:
        return None
    _, mid, state, filters = best
    part = SweepState.for_key(dataclasses.replace(Key.parse(state.key), slice=(0, 0), top=mid - 1))
    part.start(state.sweep_gte, mid - 1)
    with conn.begin():
        part.save(conn)
        dataclasses.replace(state, sweep_gte=mid).save(conn)
    state.sweep_gte = mid  # the running sweep's saves write this bound from now on
    if state.key in summary.coverage:  # progress: the running slice's window is narrower now
        done, _ = summary.coverage[state.key]
        summary.coverage[state.key] = (min(done, state.width), state.width)
    log.info("%s: split at %s, the part below goes on as %s", state.key, _when(mid), part.key)
    return part, filters, _Reach()


def _when(t: int) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat()


def _slices(
    conn: sa.Connection, source: Source, since: int, until: int | None, workers: int
) -> list[tuple[SweepState, Query]]:
    """The unfinished slice sweeps of the backfill [since, until), created on its first run.

    Keys are `backfill:<source>:<since>:<until>:<i>/<n>` plus the stream suffix, and `...:<until>:<top>` for a
    slice split off a running one. A rerun finds the rows of the killed run and resumes them, with their slicing
    whatever `workers` says now; without `until` it resumes the unfinished backfill that started at `since`, if
    there is one.
    """
    rows = conn.execute(
        sa.select(model.sync_state.c.key, model.sync_state.c.checkpoint).where(
            model.sync_state.c.source == source.name, model.sync_state.c.kind == "backfill"
        )
    ).all()
    keys = [Key.parse(r.key) for r in rows]
    if until is None:
        unfinished = [k for k, r in zip(keys, rows, strict=True) if r.checkpoint is None and k.window[0] == since]
        until = unfinished[0].window[1] if unfinished else math.ceil(time.time())
    existing = [k for k in keys if k.window == (since, until)]
    n = next((k.slice[1] for k in existing if k.top is None), max(1, min(workers, until - since)))
    pending = []
    # Stream by stream: the pool starts every slice of the main stream before the (usually smaller) tenant
    # stream's, so that no worker is left with a large sweep at the end while the others idle.
    for stream_key, filters in streams(source):
        found = [k for k in existing if k.tenant == stream_key.tenant]
        for key in found or [Key("backfill", source.name, stream_key.tenant, (since, until), (i, n)) for i in range(n)]:
            state = SweepState.load(conn, str(key))
            if state is None:
                i = key.slice[0]
                state = SweepState.for_key(key)
                state.start(since + (until - since) * i // n, since + (until - since) * (i + 1) // n - 1)
                state.save(conn)
            if state.checkpoint is None:
                pending.append((state, filters))
    window = " to ".join(datetime.fromtimestamp(t, UTC).isoformat() for t in (since, until))
    log.info("%s: backfill [%s) in %d slices, %d sweeps to do", source.name, window, n, len(pending))
    return pending


def sweep(
    conn: sa.Connection,
    client: Client,
    state: SweepState,
    filters: Query,
    summary: RunSummary,
    *,
    stop: threading.Event | None = None,
    on_progress: Progress | None = None,
    lock: threading.Lock | None = None,
    split: _Splitter | None = None,
    reach: _Reach | None = None,
) -> None:
    """Fetches the window in `state` from its cursor to the end, committing batches with the cursor; or, when
    `split` says so, up to its page (the caller sweeps the rest in slices). How far it has got is kept in
    `reach`; another worker may raise `state.sweep_gte` meanwhile (`_steal`), and the sweep then ends there.

    Concurrent sweeps (slices) share `lock`: it serialises their writes and `summary` updates,
    because concurrent upserts of the same actor rows would conflict (DuckDB) or deadlock (PostgreSQL).
    """
    lte = state.sweep_lte
    assert lte is not None, "a sweep in progress has an upper bound"
    if state.sweep_gte is not None:
        summary.coverage[state.key] = (0, state.width)
    stop = stop or threading.Event()
    lock = lock or threading.Lock()
    reach = reach or _Reach()
    while True:
        try:
            query = dataclasses.replace(filters, gte=state.sweep_gte, lte=lte)
            served = _served(fetch_pages(client, query, state.sweep_cursor), state, reach)
            pages = _ahead(_until_split(served, split), PREFETCH_PAGES)
            if backends.for_dialect(conn.dialect.name).NORMALISE_AHEAD:
                batches = _ahead(_normalised(pages, state.source, conn.dialect.name), 1)
            else:  # see PREFETCH_PAGES: no Python work beside the engine's statements
                # What the window's lookback sees again is stored already: left out before it costs any work.
                until = state.checkpoint
                fresh = None if until is None else functools.partial(store.unstored, conn, until=until)
                batches = _normalised(pages, state.source, conn.dialect.name, lock, fresh)
            for batch in batches:
                _save(conn, state, batch, summary, lock)
                del batch  # not kept alive while waiting for the next one
                if on_progress:
                    on_progress(summary)
                if stop.is_set():
                    raise Interrupted("stopped")
            if state.sweep_gte is not None:
                summary.coverage[state.key] = (state.width, state.width)
            return
        except CursorRejected as exc:
            if state.sweep_cursor is None:
                raise
            # Its event may have expired; the sweep restarts from the top, and insert-if-absent makes that harmless.
            log.warning("%s: %s; restarting the sweep from its top", state.key, exc)
            state.sweep_cursor = None
        except BadResponseError as exc:
            if exc.body is None:
                raise
            # No cursor lies beyond an unusable page: keep its body for a person, fail the run, move nothing.
            with lock, conn.begin():
                store.save_rejected(conn, state.source, [(exc.body, "unusable page: " + str(exc))])
            summary.rejected += 1
            raise


def _served(pages: Iterator[Page], state: SweepState, reach: _Reach) -> Iterator[Page]:
    """The pages down to the first one with an event below the sweep's lower bound, which `_steal` may raise
    meanwhile: newest first, every event at or above it was served before that one. `reach` follows them."""
    reach.done = False  # a sweep restarted from its top (CursorRejected) downloads again
    for page in pages:
        oldest = min((e["effective_at"] for e in page.events), default=None)
        if oldest is not None:
            reach.oldest, reach.events = oldest, reach.events + len(page.events)
        reach.done = not page.has_more
        yield page
        if oldest is not None and state.sweep_gte is not None and oldest < state.sweep_gte:
            reach.done = True
            return


def _until_split(pages: Iterator[Page], split: _Splitter | None) -> Iterator[Page]:
    """The pages, up to the one after which `split` decides to split the sweep."""
    for page in pages:
        yield page
        if split is not None and split.stop_after(page):
            return


@dataclass
class _Batch:
    """Pages normalised together, and what `_save` needs of them once their events are rows."""

    rows: model.Batch
    pages: int
    events: int
    rejected: list[tuple[str, str]]
    cursor: str | None
    oldest: int | None  # the smallest effective_at: newest first, everything after it is done
    served: list[dict] | None  # the events as served, for a consumer following the sync (batchlog.committed)


def _normalised(
    pages: Iterator[Page], source: str, dialect: str, lock: threading.Lock | None = None,
    fresh: Callable[[list[dict]], list[dict]] | None = None,
) -> Iterator[_Batch]:  # fmt: skip
    """Pages grouped into batches (up to BATCH_EVENTS events or BATCH_SECONDS), normalised and staged together,
    holding `lock` if given (the writers' lock of concurrent sweeps); only the events `fresh` keeps, if given
    (`store.unstored`: a quiet run's lookback then costs neither staging nor a write).

    No reference outlives its use (`del`): a batch's pages and rows are a large part of a run's memory."""
    group: list[Page] = []
    size, since = 0, 0.0
    for page in pages:
        if not group:
            since = time.monotonic()
        group.append(page)
        size += len(page.events)
        del page
        if size >= BATCH_EVENTS or time.monotonic() - since >= BATCH_SECONDS:
            batch = _normalise(group, source, dialect, lock, fresh)
            group, size = [], 0
            yield batch
            del batch
    if group:
        yield _normalise(group, source, dialect, lock, fresh)


def _normalise(
    pages: list[Page], source: str, dialect: str, lock: threading.Lock | None,
    fresh: Callable[[list[dict]], list[dict]] | None,
) -> _Batch:  # fmt: skip
    events = [e for p in pages for e in p.events]
    with lock or contextlib.nullcontext():
        rows = store.stage(dialect, model.normalise(fresh(events) if fresh else events, source, store.now()))
    return _Batch(
        rows,
        len(pages),
        len(events),
        [r for p in pages for r in p.rejected],
        pages[-1].last_id,
        min((e["effective_at"] for e in events), default=None),
        events if batchlog.kept_now() and backends.for_dialect(dialect).RAW_AS_SERVED else None,
    )


def _save(conn: sa.Connection, state: SweepState, batch: _Batch, summary: RunSummary, lock: threading.Lock) -> None:
    def write() -> tuple[int, set[str]]:
        written = write_batch(conn, state.source, state.key, batch.rows)
        if batch.rejected:
            store.save_rejected(conn, state.source, batch.rejected)
        state.sweep_cursor = batch.cursor
        state.save(conn)
        return written

    with lock:  # concurrent sweeps (backfill slices) overlap all but their writes
        seq, new = store.atomically(conn, write)
        summary.pages += batch.pages
        summary.events_seen += batch.events
        summary.events_new += len(new)
        summary.rejected += len(batch.rejected)
        # Replays: counted once.
        mismatches = Counter(t for event_id, t in batch.rows.mismatches.items() if event_id in new)
        summary.mismatches.update(mismatches)
        if batch.oldest is not None and state.key in summary.coverage:
            done, width = summary.coverage[state.key]
            summary.coverage[state.key] = (max(done, min(width, (state.sweep_lte or 0) - batch.oldest)), width)
        for kind in mismatches.keys() - _mismatch_logged:
            _mismatch_logged.add(kind)
            log.warning("payload of %s does not match its declared shape; stored what fits (raw JSON kept)", kind)
    if new and batch.served is not None:  # committed: handed over outside the lock the other writers wait on
        batchlog.committed(conn, seq, batch.served, new)


_mismatch_logged: set[str] = set()  # once per type per process


def write_batch(conn: sa.Connection, source: str, state_key: str, rows: model.Batch) -> tuple[int, set[str]]:
    """The one write path of events (in the caller's transaction): the rows, and their batch's entries in the
    committed-batch log and the ledger when they store any; the batch's sequence number (its log entry's, once
    committed) and the ids of the new events."""
    seq = batchlog.take(conn)
    new = store.save_batch(conn, rows, seq)
    if new:
        stored = store.rows_of(rows.events, new, key="id")
        batchlog.record(conn, seq, source, state_key, len(new), store.span_of(stored))
        ledger.record(conn, seq, source, ledger.batch_digests(stored))
    else:
        batchlog.give_back(conn, seq)
    return seq, new


def store_events(conn: sa.Connection, source: str, state_key: str, events: list[dict]) -> set[str]:
    """Events served outside a sweep (a reconciliation's repair), normalised and written as a sweep's batch
    (in the caller's transaction); the ids of the new ones."""
    rows = store.stage(conn.dialect.name, model.normalise(events, source, store.now()))
    return write_batch(conn, source, state_key, rows)[1]


def _ahead(items: Iterator, depth: int) -> Iterator:
    """`items`, produced in a thread up to `depth` ahead of the caller."""
    slots: queue.Queue = queue.Queue(maxsize=depth)
    cancelled = threading.Event()
    end = object()

    def put(item: object) -> None:
        while not cancelled.is_set():
            try:
                slots.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def produce() -> None:
        try:
            for item in items:
                put(item)
                del item  # not kept alive while the next one is produced
                if cancelled.is_set():
                    return
            put(end)
        except BaseException as exc:  # handed to the consumer, which raises it
            put(exc)

    threading.Thread(target=produce, name="ahead", daemon=True).start()
    try:
        while (item := slots.get()) is not end:
            if isinstance(item, BaseException):
                raise item
            yield item
            del item  # not kept alive while waiting for the next one
    finally:
        cancelled.set()


class _recorded:
    """Records the run in `sync_runs`: a row when it starts, its outcome and counters when it ends."""

    def __init__(self, conn: sa.Connection, summary: RunSummary, client: Client):
        self.conn, self.summary, self.client = conn, summary, client
        self.id = uuid.uuid4().hex

    def __enter__(self) -> None:
        runs = model.sync_runs
        with self.conn.begin():
            # A run killed before it could record its end stays 'running' forever otherwise.
            self.conn.execute(
                runs.update()
                .where(
                    runs.c.source == self.summary.source, runs.c.kind == self.summary.kind, runs.c.status == "running"
                )
                .values(status="abandoned")
            )
            self.conn.execute(
                runs.insert().values(
                    id=self.id,
                    source=self.summary.source,
                    kind=self.summary.kind,
                    started_at=store.now(),
                    status="running",
                )
            )

    def __exit__(self, exc_type, exc, tb) -> None:
        s = self.summary
        s.duration = time.monotonic() - s.started
        s.requests, s.retries, s.rate_limit_wait = (
            self.client.stats.requests,
            self.client.stats.retries,
            self.client.stats.rate_limit_wait,
        )
        s.status = (
            "ok" if exc is None else ("interrupted" if isinstance(exc, Interrupted | KeyboardInterrupt) else "failed")
        )
        s.error = None if exc is None else str(exc)[:1000]
        if self.conn.in_transaction():
            self.conn.rollback()
        try:
            with self.conn.begin():
                self.conn.execute(
                    model.sync_runs.update()
                    .where(model.sync_runs.c.id == self.id)
                    .values(
                        finished_at=store.now(), status=s.status, pages=s.pages, events_seen=s.events_seen,
                        events_new=s.events_new, rejected=s.rejected, mismatches=sum(s.mismatches.values()),
                        retries=s.retries, rate_limit_wait=s.rate_limit_wait, error=s.error,
                    )
                )  # fmt: skip
        except sa.exc.DBAPIError:
            if exc is None:
                raise
            log.debug("could not record the failed run", exc_info=True)  # the original error matters more
