"""Prometheus metrics per sink, from the status of its last pass (ingest.sinks.LATEST)."""

from __future__ import annotations

from prometheus_client.core import GaugeMetricFamily

from ingest import sinks

_GAUGES = (
    ("audit_ingest_sink_lag_batches", "Committed batches the sink has not delivered yet.", "lag_batches"),
    ("audit_ingest_sink_lag_seconds", "Age of the oldest committed batch the sink has not delivered.", "lag_seconds"),
    ("audit_ingest_sink_events_delivered", "Events the sink delivered, repeats after a crash included.", "delivered"),
    ("audit_ingest_sink_failing", "1 if the sink's last pass failed.", "failing"),
)


class SinkCollector:
    def collect(self):
        for name, text, key in _GAUGES:
            family = GaugeMetricFamily(name, text, labels=["sink"])
            for sink, row in sorted(sinks.LATEST.items()):
                family.add_metric([sink], float(row[key]))
            yield family
