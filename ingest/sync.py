"""The sync engine: sweeps a time window page by page, committing each batch with its cursor.

A sweep covers [gte, lte] (Unix seconds, inclusive) newest first, following `after`. Its bounds and
cursor live in `sync_state` and commit in the same transaction as the rows of the pages before the
cursor, so a killed run resumes exactly where its last commit left it. When the sweep completes, the
incremental checkpoint moves to the sweep's upper bound; the next sweep starts `lookback` before it.
The engine names no event type: `model.normalise` turns events into rows.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import sqlalchemy as sa

from ingest import model, store
from ingest.api import Client, CursorRejected, Interrupted, Page, Query, fetch_pages
from ingest.config import Settings, Source
from ingest.errors import IngestError

log = logging.getLogger("ingest.sync")

# Pages are committed together, up to this many events or this many seconds after the batch's first
# page: a DuckDB commit costs tens of milliseconds, a page of the real API a few hundred. A kill loses at
# most the uncommitted batch, which the rerun fetches again.
BATCH_EVENTS = 5000
BATCH_SECONDS = 1.0
PREFETCH_PAGES = 8


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
    window: tuple[int | None, int | None] = (None, None)  # the sweep's bounds, for progress and ETA
    oldest_seen: int | None = None  # effective_at of the oldest event so far: sweeps go newest first

    def line(self) -> str:
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
) -> list[RunSummary]:
    """One incremental sync of each source; the first failure is raised after every source had its turn."""
    warehouse.ensure_schema()
    summaries, failure = [], None
    for source in sources:
        try:
            with client_for(settings, source, stop, transport) as client:
                summaries.append(sync_source(warehouse, client, source, settings, stop=stop, on_progress=on_progress))
        except IngestError as exc:
            if isinstance(exc, Interrupted):
                raise
            failure = failure or exc
            log.error("%s: %s", source.name, exc)
    if failure:
        raise failure
    return summaries


def client_for(settings: Settings, source: Source, stop: threading.Event | None = None, transport=None) -> Client:
    return Client(
        settings.base_url,
        source.admin_key(),
        timeout=settings.timeout,
        max_retries=settings.max_retries,
        retry_base_delay=settings.retry_base_delay,
        retry_max_delay=settings.retry_max_delay,
        stop=stop,
        transport=transport,
    )


def streams(source: Source) -> list[tuple[str, Query]]:
    """(state key, filters) of each sweep a complete copy of the source needs: the API serves
    tenant-scoped events only to `tenant_only=true` requests, and only those there."""
    result = []
    for suffix, tenant in (("", False), ("#tenant", True)):
        types = tuple(t for t in source.event_types if model.is_tenant_scoped(t) == tenant)
        if (tenant and not source.tenant_events) or (source.event_types and not types):
            continue
        result.append(
            (source.name + suffix, Query(event_types=types, project_ids=source.project_ids, tenant_only=tenant))
        )
    return result


def sync_source(
    warehouse: store.Warehouse,
    client: Client,
    source: Source,
    settings: Settings,
    *,
    stop: threading.Event | None = None,
    on_progress: Progress | None = None,
) -> RunSummary:
    """The incremental sync of one source: per stream, resume the unfinished sweep or start one from the checkpoint."""
    summary = RunSummary(source.name)
    with warehouse.connect() as conn, _recorded(conn, summary, client):
        for key, filters in streams(source):
            resumed = True
            while resumed:  # a resumed sweep ends at its old bound: then sweep again up to now
                with conn.begin():
                    state = store.load_state(conn, key) or {
                        "key": key, "source": source.name, "kind": "incremental", "checkpoint": None,
                        "sweep_gte": None, "sweep_lte": None, "sweep_cursor": None,
                    }  # fmt: skip
                    resumed = state["sweep_lte"] is not None
                    if resumed:
                        log.info("%s: resuming the unfinished sweep at cursor %s", key, state["sweep_cursor"])
                    else:
                        checkpoint = state["checkpoint"]
                        if checkpoint is not None:
                            state["sweep_gte"] = checkpoint - int(settings.lookback)
                        elif settings.start is not None:
                            state["sweep_gte"] = int(settings.start.timestamp())
                        state["sweep_lte"] = int(time.time())
                        store.save_state(conn, state)
                sweep(conn, client, state, filters, summary, stop=stop, on_progress=on_progress)
                with conn.begin():
                    state.update(checkpoint=state["sweep_lte"], sweep_gte=None, sweep_lte=None, sweep_cursor=None)
                    store.save_state(conn, state)
    return summary


def sweep(
    conn: sa.Connection,
    client: Client,
    state: dict,
    filters: Query,
    summary: RunSummary,
    *,
    stop: threading.Event | None = None,
    on_progress: Progress | None = None,
) -> None:
    """Fetches the window in `state` from its cursor to the end, committing batches with the cursor."""
    query = dataclasses.replace(filters, gte=state["sweep_gte"], lte=state["sweep_lte"])
    summary.window = (state["sweep_gte"], state["sweep_lte"])
    stop = stop or threading.Event()
    while True:
        try:
            for pages in _batches(_prefetch(fetch_pages(client, query, state["sweep_cursor"]))):
                _save(conn, state, pages, summary)
                if on_progress:
                    on_progress(summary)
                if stop.is_set():
                    raise Interrupted("stopped")
            return
        except CursorRejected as exc:
            if state["sweep_cursor"] is None:
                raise
            # Its event may have expired; the sweep restarts from the top, and insert-if-absent makes that harmless.
            log.warning("%s: %s; restarting the sweep from its top", state["key"], exc)
            state["sweep_cursor"] = None


def _save(conn: sa.Connection, state: dict, pages: list[Page], summary: RunSummary) -> None:
    events = [e for p in pages for e in p.events]
    rejected = [r for p in pages for r in p.rejected]
    batch = model.normalise(events, state["source"], store.now())
    with conn.begin():
        new = store.save_batch(conn, batch)
        if rejected:
            store.save_rejected(conn, state["source"], rejected)
        state["sweep_cursor"] = pages[-1].last_id
        store.save_state(conn, state)
    summary.pages += len(pages)
    summary.events_seen += len(events)
    summary.events_new += len(new)
    summary.rejected += len(rejected)
    summary.mismatches.update(batch.mismatches)
    if events:
        oldest = min(e["effective_at"] for e in events)
        summary.oldest_seen = oldest if summary.oldest_seen is None else min(summary.oldest_seen, oldest)
    for kind in batch.mismatches.keys() - _mismatch_logged:
        _mismatch_logged.add(kind)
        log.warning("payload of %s does not match its declared shape; stored what fits (raw JSON kept)", kind)


_mismatch_logged: set[str] = set()  # once per type per process


def _batches(pages: Iterator[Page]) -> Iterator[list[Page]]:
    group: list[Page] = []
    size, since = 0, 0.0
    for page in pages:
        if not group:
            since = time.monotonic()
        group.append(page)
        size += len(page.events)
        if size >= BATCH_EVENTS or time.monotonic() - since >= BATCH_SECONDS:
            yield group
            group, size = [], 0
    if group:
        yield group


def _prefetch(pages: Iterator[Page], depth: int = PREFETCH_PAGES) -> Iterator[Page]:
    """Downloads ahead in a thread while the caller writes."""
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
            for page in pages:
                put(page)
                if cancelled.is_set():
                    return
            put(end)
        except BaseException as exc:  # handed to the consumer, which raises it
            put(exc)

    threading.Thread(target=produce, name="prefetch", daemon=True).start()
    try:
        while (item := slots.get()) is not end:
            if isinstance(item, BaseException):
                raise item
            yield item
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
