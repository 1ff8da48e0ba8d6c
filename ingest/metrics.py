"""Prometheus metrics of the daemon (`--metrics-port`), updated after each run.

A registry of its own (not prometheus_client's global one) so that nothing else leaks into the scrape.
The lag is computed at scrape time from the newest stored event, so it keeps growing between runs and
an alert on it fires even when the daemon has stopped syncing.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from ingest.api import Stats
from ingest.errors import ConfigError


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ["source"]
        self.events = Counter("audit_ingest_events_ingested", "Events stored (new ones only).", labels,
                              registry=self.registry)  # fmt: skip
        self.runs = Counter(
            "audit_ingest_runs",
            "Sync runs that ended (ok or failed; not those stopped).",
            labels,
            registry=self.registry,
        )
        self.failures = Counter("audit_ingest_run_failures", "Sync runs that failed.", labels, registry=self.registry)
        self.retries = Counter("audit_ingest_retries", "API requests retried.", labels, registry=self.registry)
        self.rate_limited = Counter("audit_ingest_rate_limit_wait_seconds", "Time spent waiting on rate limits.",
                                    labels, registry=self.registry)  # fmt: skip
        self.last_success = Gauge("audit_ingest_last_success_timestamp_seconds", "End of the last successful run.",
                                  labels, registry=self.registry)  # fmt: skip
        self.lag = Gauge("audit_ingest_lag_seconds", "Now minus the newest stored event.", labels,
                         registry=self.registry)  # fmt: skip
        self._newest: dict[str, float] = {}

    def serve(self, port: int, addr: str) -> object:
        """Starts the /metrics HTTP server in a thread; returns the server (its `shutdown()` stops it)."""
        try:
            server, _thread = start_http_server(port, addr, registry=self.registry)
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {addr}:{port}: {exc.strerror or exc}") from None
        return server

    def observe(self, source: str, outcome: str, *, events_new: int, stats: Stats, newest: datetime | None) -> None:
        """One run that ended `ok`, `failed` or `interrupted`: its new events (those of its committed batches),
        its client's stats, and the newest stored event (None when the warehouse was not read)."""
        self.events.labels(source).inc(events_new)
        self.retries.labels(source).inc(stats.retries)
        self.rate_limited.labels(source).inc(stats.rate_limit_wait)
        if outcome != "interrupted":
            self.runs.labels(source).inc()
        if outcome == "ok":
            self.last_success.labels(source).set(time.time())
        elif outcome == "failed":
            self.failures.labels(source).inc()
        if newest is not None:
            if source not in self._newest:
                self.lag.labels(source).set_function(lambda: time.time() - self._newest[source])
            self._newest[source] = newest.replace(tzinfo=UTC).timestamp()
