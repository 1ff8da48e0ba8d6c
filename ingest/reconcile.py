"""Reconciliation: re-read a window from the API, both streams of each source, and compare it with the warehouse.

Events are matched by id. Served and not stored is `missing here` (an event the API published later than the
lookback, which no incremental sweep sees); served unlike the stored `raw` (compared as parsed JSON) is
`changed upstream`; stored and not served is `not upstream`. A repair stores the missing events through the
sweeps' write path (`sync.store_events`: the committed-batch log, and whatever hooks into it) and records the
window as covered, in one transaction per stream. The daemon runs one over the last day on a schedule and keeps
its findings in `reconcile_findings`.

The API keeps events for `retention` only: older stored events would all be `not upstream`, so the window is
cut at the retention cutoff.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime

import sqlalchemy as sa

from ingest import coverage, model, store, sync
from ingest.api import Client, Query, fetch_pages
from ingest.config import Settings, Source
from ingest.errors import ApiError, ConfigError
from ingest.state import Key

log = logging.getLogger("ingest.reconcile")

MISSING, CHANGED, NOT_UPSTREAM = "missing here", "changed upstream", "not upstream"


@dataclass(frozen=True)
class Finding:
    source: str
    event_id: str
    finding: str  # MISSING, CHANGED or NOT_UPSTREAM
    event_type: str
    effective_at: int
    repaired: bool = False  # a missing event the repair stored

    @property
    def details(self) -> str:
        at = datetime.fromtimestamp(self.effective_at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        return f"{self.event_type} at {at} in {self.source}" + (", stored by the repair" if self.repaired else "")

    def line(self) -> str:
        return f"{self.finding}: {self.event_id} ({self.details})"


@dataclass
class Report:
    since: int  # the window compared, [since, until) in Unix seconds: cut at the retention cutoff
    until: int
    findings: list[Finding] = field(default_factory=list)
    served: int = 0  # events the API served in the window
    stored: int = 0  # events the warehouse held in it before any repair
    unavailable: list[str] = field(default_factory=list)  # streams the API refused (no tenant)

    @property
    def repaired(self) -> int:
        return sum(f.repaired for f in self.findings)

    def summary(self) -> str:
        window = " to ".join(
            datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S") for t in (self.since, self.until)
        )
        counts = Counter(f.finding for f in self.findings)
        found = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items())) or "no findings"
        text = f"[{window}) UTC: {self.served:,} events served, {self.stored:,} stored: {found}"
        if self.repaired:
            text += f"; stored {self.repaired:,} missing events"
        if self.unavailable:
            text += f"; not compared (the API refuses them): {', '.join(self.unavailable)}"
        return text


def run(
    settings: Settings, warehouse: store.Warehouse, since: datetime, until: datetime | None, repair: bool, *,
    sources: tuple[Source, ...] | None = None, stop: threading.Event | None = None, transport=None,
) -> Report:  # fmt: skip
    """Compares [since, until) (until: default now) of each source (default: all) with the API; with `repair`,
    stores the missing events and records the window as covered."""
    end = math.ceil((until or datetime.now(UTC)).timestamp())
    start = math.ceil(since.timestamp())  # events carry whole seconds, as in a backfill
    if end <= start:
        raise ConfigError("the window is empty: --until (default now) must be later than --since")
    cutoff = math.ceil(time.time() - settings.retention)
    if end <= cutoff:
        raise ConfigError(
            f"the window is older than the API's retention ({settings.retention / 86400:g} days): it serves none of it"
        )
    report = Report(max(start, cutoff), end)
    warehouse.ensure_schema()
    for source in sources or settings.sources:
        with sync.client_for(settings, source, stop, transport) as client, warehouse.connect() as conn:
            for key, filters in sync.streams(source):
                _stream(conn, client, source, key, filters, report, repair)
    return report


def _stream(
    conn: sa.Connection, client: Client, source: Source, key: Key, filters: Query, report: Report, repair: bool
) -> None:
    gte, lte = report.since, report.until - 1
    try:
        served = {e["id"]: e for page in fetch_pages(client, dataclasses.replace(filters, gte=gte, lte=lte))
                  for e in page.events}  # fmt: skip
    except ApiError as exc:
        if not (key.tenant and exc.failure in sync.NO_TENANT):
            raise
        report.unavailable.append(str(key))
        return
    with conn.begin():
        stored = _stored(conn, source, key.tenant, filters, gte, lte)
    report.served, report.stored = report.served + len(served), report.stored + len(stored)
    missing = [e for i, e in served.items() if i not in stored]
    new: set[str] = set()
    if repair:

        def write() -> set[str]:
            coverage.record(conn, source.name, key.tenant, gte, lte, "reconciliation")
            return sync.store_events(conn, source.name, f"reconcile:{key}", missing) if missing else set()

        new = store.atomically(conn, write)
    for e in missing:
        report.findings.append(Finding(source.name, e["id"], MISSING, e["type"], e["effective_at"], e["id"] in new))
    for i, raw in stored.items():
        if i not in served:
            report.findings.append(Finding(source.name, i, NOT_UPSTREAM, raw["type"], raw["effective_at"]))
        elif served[i] != raw:
            report.findings.append(Finding(source.name, i, CHANGED, raw["type"], raw["effective_at"]))


def _stored(conn: sa.Connection, source: Source, tenant: bool, filters: Query, gte: int, lte: int) -> dict[str, dict]:
    """id -> raw event of the stored events the stream's query would serve in [gte, lte]."""
    ev = model.audit_events
    first, last = (datetime.fromtimestamp(t, UTC).replace(tzinfo=None) for t in (gte, lte))
    query = sa.select(ev.c.id, ev.c.type, ev.c.raw).where(
        ev.c.source == source.name, ev.c.effective_at >= first, ev.c.effective_at <= last
    )
    if filters.event_types:
        query = query.where(ev.c.type.in_(filters.event_types))
    if filters.project_ids:
        query = query.where(ev.c.project_id.in_(filters.project_ids))
    return {r.id: model.parsed(r.raw) for r in conn.execute(query) if model.is_tenant_scoped(r.type) == tenant}


def keep(conn: sa.Connection, report: Report, run_at: datetime) -> None:
    """The report's findings as rows of `reconcile_findings` (in the caller's transaction)."""
    rows = [
        {"run_at": run_at.replace(tzinfo=None), "source": f.source, "event_id": f.event_id, "finding": f.finding,
         "details": f.details}
        for f in report.findings
    ]  # fmt: skip
    store.insert_rows(conn, model.reconcile_findings, rows)
