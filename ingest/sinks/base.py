"""A sink: a consumer of the committed-batch log that delivers each event, in a format, to a receiver.

`process` (the consumer's step, ingest.consumers) encodes the batches' events and hands them to `send` in
chunks of `batch_size`, in log order. A chunk that fails is retried with exponential backoff, `retries`
times; then the pass fails with SinkError and the checkpoint stays before these batches, so the next pass
(after the next sync, or `audit-ingest forward`) sends them again: delivery is at least once, and every
format carries the event id for receivers to drop repeats. The retry budget is bounded so that a receiver
that is down delays the other sinks by seconds, never blocks them, nor ingestion (which has committed).
"""

from __future__ import annotations

import logging
import time

import sqlalchemy as sa

from ingest import batchlog, formats, model
from ingest.config import Sink as SinkConfig
from ingest.errors import SinkError
from ingest.store import insert_rows, now

log = logging.getLogger("ingest.sinks")


class Sink:
    """Subclasses implement `send(lines)`: deliver these encoded events (JSON, no line ends) or raise
    SinkError; and may hold a connection between calls (`close` drops it)."""

    def __init__(self, config: SinkConfig) -> None:
        self.config = config
        self.name = consumer_name(config.name)
        self._encode = formats.encoder(config.format)

    def send(self, events: list[dict], lines: list[bytes]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Drops any connection (after a failure, so the next attempt starts afresh)."""

    def process(self, conn: sa.Connection, batches: list[batchlog.CommittedBatch]) -> None:
        events = [e.raw for b in batches for e in b.events]
        size = self.config.batch_size
        for start in range(0, len(events), size):
            chunk = events[start : start + size]
            self._send_retrying(chunk, [self._encode(e) for e in chunk])
        record_delivery(conn, self.config.name, len(events))

    def _send_retrying(self, events: list[dict], lines: list[bytes]) -> None:
        delay = self.config.retry_base_delay
        for attempt in range(self.config.retries + 1):
            try:
                self.send(events, lines)
                return
            except SinkError as exc:
                self.close()
                if attempt == self.config.retries:
                    raise SinkError(f"sink {self.config.name}: {exc}") from None
                log.warning("sink %s: %s; retrying in %.1fs", self.config.name, exc, delay)
                time.sleep(delay)
                delay = min(self.config.retry_max_delay, max(delay * 2, 0.05))


def consumer_name(sink: str) -> str:
    """The sink's consumer name, hence its checkpoint key `consumer:sink:<name>`."""
    return f"sink:{sink}"


def record_delivery(conn: sa.Connection, name: str, events: int) -> None:
    """In the pass's transaction, with the checkpoint: delivered counts only what the checkpoint covers."""
    status = model.sink_status
    row = conn.execute(sa.select(status.c.delivered).where(status.c.name == name)).first()
    delivered = (row.delivered if row else 0) + events
    insert_rows(conn, status, [{"name": name, "delivered": delivered, "last_delivered_at": now()}],
                update=lambda excluded: {"delivered": excluded.delivered,
                                         "last_delivered_at": excluded.last_delivered_at})  # fmt: skip


def record_error(conn: sa.Connection, name: str, error: str) -> None:
    status = model.sink_status
    insert_rows(conn, status, [{"name": name, "last_error": error, "last_error_at": now()}],
                update=lambda excluded: {"last_error": excluded.last_error,
                                         "last_error_at": excluded.last_error_at})  # fmt: skip
