"""Forwarding sinks (`[[sinks]]`): each is a consumer of the committed-batch log with its own checkpoint.

`configured(settings)` builds them for ingest.consumers; `run` gives each its pass in a thread of its own,
so that a receiver that is down or slow delays only its own sink; `recorder(warehouse)` is the consumers'
`on_error` that keeps a sink's last error in `sink_status`; `lag_rows` is what `status` and the metrics show.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime

import sqlalchemy as sa

from ingest import batchlog, model
from ingest.config import Settings
from ingest.config import Sink as SinkConfig
from ingest.errors import IngestError
from ingest.sinks.base import Sink, consumer_name, record_error
from ingest.state import ConsumerState
from ingest.store import Warehouse, now

__all__ = ["Sink", "build", "configured", "lag_rows", "observe", "recorder", "run"]


def build(config: SinkConfig) -> Sink:
    from ingest.sinks.file import FileSink
    from ingest.sinks.http import HttpSink
    from ingest.sinks.splunk_hec import SplunkHecSink
    from ingest.sinks.syslog import SyslogSink

    kinds = {"http": HttpSink, "splunk_hec": SplunkHecSink, "syslog": SyslogSink, "file": FileSink}
    return kinds[config.kind](config)


def configured(settings: Settings, only: str | None = None) -> list[Sink]:
    return [build(s) for s in settings.sinks if only is None or s.name == only]


def run(warehouse: Warehouse, chosen: list[Sink],
        on_error: Callable[[object, IngestError], None] | None = None) -> dict[str, int]:  # fmt: skip
    """Each sink's pass (ingest.consumers.run) at once, each in its own thread and transactions; returns the
    batches each delivered. Failures are recorded (and passed to `on_error`); an unexpected one is raised
    once every pass has ended."""
    from ingest import consumers

    record = recorder(warehouse)
    done: dict[str, int] = {}
    crashed: list[BaseException] = []

    def fail(consumer: object, error: IngestError) -> None:
        record(consumer, error)
        if on_error:
            on_error(consumer, error)

    def one(sink: Sink) -> None:
        try:
            done.update(consumers.run(warehouse, [sink], on_error=fail))
        except BaseException as exc:  # a bug: raised in the caller's thread, after the other passes
            crashed.append(exc)
        finally:
            sink.close()

    threads = [threading.Thread(target=one, args=(s,), name=f"sink {s.config.name}") for s in chosen]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if crashed:
        raise crashed[0]
    return done


def recorder(warehouse: Warehouse) -> Callable[[object, IngestError], None]:
    """`on_error` for ingest.consumers.run: a failed sink's error, kept for `status` (other consumers pass)."""

    def on_error(consumer: object, error: IngestError) -> None:
        if not isinstance(consumer, Sink):
            return
        consumer.close()
        with warehouse.connect() as conn, conn.begin():
            record_error(conn, consumer.config.name, str(error))

    return on_error


def lag_rows(conn: sa.Connection, settings: Settings) -> list[dict]:
    """Per sink: its checkpoint, how many committed batches (and how many seconds of commits) it is behind,
    events delivered, and its last delivery and error."""
    last = batchlog.last_seq(conn)
    status = {r.name: r for r in conn.execute(sa.select(model.sink_status))}
    rows = []
    for sink in settings.sinks:
        state = ConsumerState.load(conn, consumer_name(sink.name))
        seq = state.seq if state else 0
        oldest = conn.execute(
            sa.select(sa.func.min(model.ingest_batches.c.committed_at)).where(model.ingest_batches.c.seq > seq)
        ).scalar()
        row = status.get(sink.name)
        failing = bool(
            row and row.last_error_at and (not row.last_delivered_at or row.last_error_at > row.last_delivered_at)
        )
        rows.append({
            "sink": sink.name, "kind": sink.kind, "format": sink.format, "checkpoint": seq,
            "lag_batches": last - seq, "lag_seconds": _seconds_since(oldest), "delivered": row.delivered if row else 0,
            "failing": int(failing), "last_delivered_at": row.last_delivered_at if row else None,
            "last_error": row.last_error if row else None, "last_error_at": row.last_error_at if row else None,
        })  # fmt: skip
    return rows


def _seconds_since(at: datetime | None) -> int:
    return 0 if at is None else max(0, int((now() - at).total_seconds()))


# The sinks' last status, per sink, as the metrics serve it: set after each pass (`observe`), read at scrape
# time, so a scrape never opens the warehouse (a DuckDB file has one user at a time).
LATEST: dict[str, dict] = {}


def observe(warehouse: Warehouse, settings: Settings) -> None:
    if not settings.sinks:
        return
    with warehouse.connect() as conn:
        LATEST.update({row["sink"]: row for row in lag_rows(conn, settings)})
