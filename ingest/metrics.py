"""Prometheus metrics of the daemon (`--metrics-port`), updated after each run.

A registry of its own (not prometheus_client's global one) so that nothing else leaks into the scrape.
The lag is computed at scrape time from the newest stored event, so it keeps growing between runs and
an alert on it fires even when the daemon has stopped syncing.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Info, start_http_server

from ingest.api import Stats
from ingest.coverage import Coverage
from ingest.errors import ConfigError
from ingest.ledger import Head
from ingest.sinks.metrics import SinkCollector


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()

        def metric(kind: type, name: str, text: str):
            return kind(name, text, ["source"], registry=self.registry)

        self.events = metric(Counter, "audit_ingest_events_ingested", "Events stored (new ones only).")
        self.runs = metric(Counter, "audit_ingest_runs", "Sync runs that ended ok or failed.")
        self.failures = metric(Counter, "audit_ingest_run_failures", "Sync runs that failed.")
        self.skipped = metric(
            Counter, "audit_ingest_runs_skipped",
            "Ticks of a source left to another ingester: it held the source's lock, or had synced it this tick.",
        )  # fmt: skip
        self.retries = metric(Counter, "audit_ingest_retries", "API requests retried.")
        self.rate_limited = metric(Counter, "audit_ingest_rate_limit_wait_seconds", "Time spent waiting on 429s.")
        self.last_success = metric(Gauge, "audit_ingest_last_success_timestamp_seconds", "End of the last ok run.")
        self.lag = metric(Gauge, "audit_ingest_lag_seconds", "Now minus the newest stored event.")
        self.unavailable = metric(
            Counter, "audit_ingest_stream_unavailable", "Runs in which the API refused the tenant stream (no tenant)."
        )
        # The chain head, for a copy of it outside the warehouse's reach (README, "What it proves").
        self.ledger_seq = Gauge("audit_ingest_ledger_head_seq", "The ledger's last batch.", registry=self.registry)
        self.ledger_hash = Info("audit_ingest_ledger_head", "The ledger's chain head.", registry=self.registry)
        self.gaps = metric(
            Gauge,
            "audit_ingest_coverage_gap_seconds",
            "Seconds between covered windows that the API still holds (a backfill fetches them).",
        )
        self.lost = metric(
            Gauge,
            "audit_ingest_coverage_lost_upstream_seconds",
            "Seconds between covered windows older than the API's retention: lost upstream.",
        )
        self.findings = Counter("audit_ingest_reconcile_findings", "Findings of the scheduled reconciliations.",
                                ["source", "finding"], registry=self.registry)  # fmt: skip
        self._newest: dict[str, float] = {}  # Unix time of the newest stored event, per source
        self.registry.register(SinkCollector())  # per forwarding sink

    def serve(self, port: int, addr: str) -> Any:
        """Starts the /metrics HTTP server in a thread; returns the server (its `shutdown()` stops it)."""
        try:
            server, _thread = start_http_server(port, addr, registry=self.registry)
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {addr}:{port}: {exc.strerror or exc}") from None
        return server

    def observe(
        self, source: str, outcome: str, *, events_new: int, stats: Stats, newest: datetime | None,
        head: Head | None = None, unavailable: int = 0,
    ) -> None:  # fmt: skip
        """One run that ended `ok`, `failed`, `interrupted`, `skipped` or `done` (the last two: another ingester's
        tick, see ingest.sync.sync_source): its new events (those of its committed
        batches), its client's stats, the newest stored event (None when the warehouse was not read), and how
        many of its streams the API refused; the ledger's chain head."""
        if head is not None:
            self.ledger_seq.set(head.seq)
            self.ledger_hash.info({"seq": str(head.seq), "hash": head.hash})
        self.events.labels(source).inc(events_new)
        self.unavailable.labels(source).inc(unavailable)
        self.retries.labels(source).inc(stats.retries)
        self.rate_limited.labels(source).inc(stats.rate_limit_wait)
        if outcome in ("ok", "failed"):
            self.runs.labels(source).inc()
        if outcome == "ok":
            self.last_success.labels(source).set(time.time())
        elif outcome == "failed":
            self.failures.labels(source).inc()
        elif outcome in ("skipped", "done"):
            self.skipped.labels(source).inc()
        if newest is not None:
            if source not in self._newest:
                self.lag.labels(source).set_function(lambda: time.time() - self._newest[source])
            self._newest[source] = newest.replace(tzinfo=UTC).timestamp()

    def observe_coverage(self, source: str, streams: list[Coverage]) -> None:
        """The source's coverage after a run: the seconds of its gaps, lost upstream or not."""
        gaps = [g for c in streams if c.source == source for g in c.gaps]
        self.gaps.labels(source).set(sum(g.seconds for g in gaps if not g.lost))
        self.lost.labels(source).set(sum(g.seconds for g in gaps if g.lost))
