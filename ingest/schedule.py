"""`audit-ingest daemon`: a sync of every source at start, then on an interval or a cron schedule.

APScheduler runs one job per source on a pool of `max_concurrent_sources` threads (one on DuckDB, whose file has
one writer): runs of a source never overlap (max_instances=1), runs missed while one was running coalesce into
the next tick, and a slow or failing source holds one thread, not the others' turns. The sources' clients share
one request budget (`max_requests_per_second`, handed round-robin: ingest.throttle). Ticks fall on a grid from
the Unix epoch (or the cron line's times), the same for every daemon: several daemons on one PostgreSQL sync each
source once a tick, the first to take its lock; the others find the run of this tick done and make no request.
Each run opens the warehouse and releases it when done, so between runs people can open the file with DuckDB or
`audit-ingest query`. A failing source backs off: after k failures in a row it skips 2^(k-1) - 1 ticks (at most
an hour's worth), so an API that keeps failing is not hammered. A reconciliation of the last day
(ingest.reconcile) runs every `reconcile_every` in the same pool, the first one interval after the start: a
restarted daemon does not re-read a day. SIGTERM or SIGINT set `stop`: the running syncs commit their current
batch and end, and the process exits 0.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from ingest import coverage, ledger, model
from ingest.config import Settings, Source
from ingest.errors import ConfigError, IngestError, Interrupted
from ingest.metrics import Metrics
from ingest.store import Warehouse
from ingest.sync import Progress, RunSummary, client_for, feeding, sync_source
from ingest.throttle import Budget

log = logging.getLogger("ingest.daemon")

DEFAULT_INTERVAL = 300.0
EPOCH = datetime.fromtimestamp(0, UTC)  # where the ticks of an --interval start: every daemon has the same ones
MAX_BACKOFF = 3600.0  # seconds: the longest a failing source waits between attempts (or one tick, if longer)


class _Coalesced(logging.Filter):
    """APScheduler warns at every tick that finds the source's last run still going: that skip is the
    coalescing asked for, not news."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "maximum number of running instances" not in record.getMessage()


def trigger_for(interval: float | None, cron: str | None) -> tuple[BaseTrigger, float]:
    """The schedule and its period in seconds (for a cron line, the gap between its next two runs)."""
    if interval is not None and cron is not None:
        raise ConfigError("give --interval or --cron, not both")
    if cron is None:
        interval = DEFAULT_INTERVAL if interval is None else interval
        if interval <= 0:
            raise ConfigError("--interval must be a positive duration, e.g. 30s, 5m, 1h")
        return IntervalTrigger(seconds=interval, start_date=EPOCH, timezone=UTC), interval
    try:
        trigger = CronTrigger.from_crontab(cron, timezone=UTC)
    except ValueError as exc:
        raise ConfigError(f"bad --cron {cron!r}: {exc} (five fields, UTC, e.g. '*/5 * * * *')") from None
    first = trigger.get_next_fire_time(None, datetime.now(UTC))
    return trigger, (trigger.get_next_fire_time(first, first) - first).total_seconds()


def tick_start(trigger: BaseTrigger, period: float, now: datetime) -> datetime:
    """The trigger's last fire time at or before `now`: the start of the tick `now` is in."""
    back = period
    while (first := trigger.get_next_fire_time(None, now - timedelta(seconds=back))) is None or first > now:
        back *= 2
    while (following := trigger.get_next_fire_time(first, first)) is not None and following <= now:
        first = following
    return first


class SourceJob:
    """The runs of one source, and its backoff after consecutive failures."""

    def __init__(
        self,
        settings: Settings,
        source: Source,
        *,
        trigger: BaseTrigger,
        period: float,
        budget: Budget,
        stop: threading.Event,
        metrics: Metrics,
        progress: Callable[[], AbstractContextManager[Progress]],
    ):
        self.settings, self.source, self.trigger, self.period, self.stop = settings, source, trigger, period, stop
        self.budget, self.metrics, self.progress = budget, metrics, progress
        self.failures = 0
        self.skip = 0  # ticks left to skip before the next attempt

    def __call__(self) -> None:
        if self.stop.is_set():
            return  # a tick queued behind a running job when the stop came
        if self.skip:
            self.skip -= 1
            return
        latest: list[RunSummary] = []  # the counters of committed batches, even if the run fails later
        outcome = "interrupted"
        tick = tick_start(self.trigger, self.period, datetime.now(UTC)).astimezone(UTC).replace(tzinfo=None)
        warehouse = Warehouse(self.settings.database_url, self.settings.db_schema)
        client = client_for(self.settings, self.source, self.stop, budget=self.budget)
        try:
            with client, self.progress() as show:
                warehouse.ensure_schema()

                def on_progress(summary: RunSummary) -> None:
                    latest[:] = [summary]
                    show(summary)

                with feeding(self.settings, warehouse):
                    summary = sync_source(warehouse, client, self.source, self.settings, stop=self.stop,
                                          on_progress=on_progress, unless_synced_since=tick)  # fmt: skip
                    latest[:] = [summary]
            log.info("%s", summary.line())
            outcome, self.failures, self.skip = summary.status, 0, 0  # ok; skipped or done: another process's
        except Interrupted:
            log.info("%s: run stopped; the next one resumes from its last commit", self.source.name)
        except Exception as exc:  # whatever failed: one line, and a retry after the backoff
            outcome, self.failures = "failed", self.failures + 1
            self.skip = min(2 ** min(self.failures - 1, 30) - 1, max(0, int(MAX_BACKOFF // self.period) - 1))
            reason = str(exc) if isinstance(exc, IngestError) else f"internal error: {type(exc).__name__}: {exc}"
            log.error("%s: run failed (%d in a row): %s; next attempt in %s", self.source.name, self.failures,
                      reason, _duration((self.skip + 1) * self.period))  # fmt: skip
            log.debug("traceback of the failed run", exc_info=True)
        finally:
            seen = _Observed() if outcome == "interrupted" else _observed(warehouse, self.source.name, self.settings)
            if seen.streams is not None:
                self.metrics.observe_coverage(self.source.name, seen.streams)
            events_new = latest[0].events_new if latest else 0
            self.metrics.observe(
                self.source.name, outcome, events_new=events_new, stats=client.stats, newest=seen.newest, head=seen.head,
                unavailable=len(latest[0].unavailable) if latest else 0,
            )  # fmt: skip
            warehouse.dispose()  # nothing may keep the DuckDB file open between runs


class ReconcileJob:
    """The scheduled reconciliation of the last day (`reconcile_every`): its findings logged, counted and kept in
    `reconcile_findings`. It repairs nothing: a finding is for a person (`verify --against-api --repair`)."""

    WINDOW = 86400.0

    def __init__(self, settings: Settings, sources: tuple[Source, ...], *, stop: threading.Event, metrics: Metrics):
        self.settings, self.sources, self.stop, self.metrics = settings, sources, stop, metrics

    def __call__(self) -> None:
        from ingest import reconcile

        if self.stop.is_set():
            return
        warehouse = Warehouse(self.settings.database_url, self.settings.db_schema)
        run_at = datetime.now(UTC)
        try:
            report = reconcile.run(self.settings, warehouse, datetime.fromtimestamp(time.time() - self.WINDOW, UTC),
                                   None, False, sources=self.sources, stop=self.stop)  # fmt: skip
            with warehouse.connect() as conn, conn.begin():
                reconcile.keep(conn, report, run_at)
            for finding in report.findings:
                log.warning("reconciliation: %s", finding.line())
                self.metrics.findings.labels(finding.source, finding.finding).inc()
            log.info("reconciliation: %s", report.summary())
        except Interrupted:
            log.info("reconciliation stopped")
        except IngestError as exc:  # tried again at the next tick
            log.error("reconciliation failed: %s", exc)
        finally:
            warehouse.dispose()


def run_daemon(
    settings: Settings,
    sources: tuple[Source, ...],
    *,
    interval: float | None,
    cron: str | None,
    progress: Callable[[], AbstractContextManager[Progress]],
    metrics_port: int | None = None,
    metrics_addr: str = "127.0.0.1",
) -> None:
    """Runs until SIGTERM or SIGINT; returns once the running sync has committed and stopped."""
    trigger, period = trigger_for(interval, cron)
    for source in sources:
        source.admin_key()  # a missing key is a configuration error, not a failed run to retry forever
    logging.getLogger("apscheduler.scheduler").addFilter(_Coalesced())
    probe = Warehouse(settings.database_url, settings.db_schema)  # a bad URL fails here; nothing is opened
    at_once = settings.max_concurrent_sources if probe.backend.CONCURRENT_SOURCES else 1
    probe.dispose()
    stop = threading.Event()
    metrics = Metrics()
    server = metrics.serve(metrics_port, metrics_addr) if metrics_port is not None else None
    scheduler = BackgroundScheduler(
        executors={"default": ThreadPoolExecutor(at_once)},
        job_defaults={"max_instances": 1, "coalesce": True, "misfire_grace_time": None},
        timezone=UTC,
    )
    budget = Budget(settings.max_requests_per_second)
    # The first run at once, as the current tick's (its start in the past): the next ones on the grid.
    first = tick_start(trigger, period, datetime.now(UTC))
    for source in sources:
        job = SourceJob(settings, source, trigger=trigger, period=period, budget=budget, stop=stop, metrics=metrics,
                        progress=progress)  # fmt: skip
        scheduler.add_job(job, trigger, id=source.name, name=f"sync {source.name}", next_run_time=first)
    if settings.reconcile_every:
        scheduler.add_job(ReconcileJob(settings, sources, stop=stop, metrics=metrics),
                          IntervalTrigger(seconds=settings.reconcile_every, timezone=UTC), id="reconcile",
                          name="reconcile the last day")  # fmt: skip
    # The handler only sets a flag: the main thread polls it, and never blocks on a lock the handler needs.
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    scheduler.start()
    log.info(
        "daemon started: %s, every %s, %d at once%s; SIGTERM or Ctrl-C stops it",
        ", ".join(s.name for s in sources),
        cron or _duration(period),
        min(at_once, len(sources)),
        f", metrics on http://{metrics_addr}:{metrics_port}/metrics" if server else "",
    )
    try:
        while not stop.is_set():
            time.sleep(0.1)
        log.info("stopping: letting the running syncs commit their current batch")
    finally:
        stop.set()
        scheduler.shutdown(wait=True)
        if server is not None:
            server.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("daemon stopped")


@dataclass(frozen=True)
class _Observed:
    """What the metrics read from the warehouse after a run; None where it could not be read."""

    newest: datetime | None = None  # the source's newest stored event
    head: ledger.Head | None = None  # the ledger's chain head
    streams: list[coverage.Coverage] | None = None


def _observed(warehouse: Warehouse, source: str, settings: Settings) -> _Observed:
    """The lag, ledger and coverage metrics' readings, in one connection; nothing when the warehouse cannot be read
    (that run's failure is logged already)."""
    events = model.audit_events
    try:
        with warehouse.connect() as conn:
            newest = conn.execute(sa.select(sa.func.max(events.c.effective_at)).where(events.c.source == source))
            return _Observed(
                newest.scalar(),
                ledger.head(conn),
                coverage.streams(conn, now=int(time.time()), retention=int(settings.retention)),
            )
    except IngestError:
        return _Observed()


def _duration(seconds: float) -> str:
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:g}s"
