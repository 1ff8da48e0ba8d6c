"""Consumers of the committed-batch log: rules, forwarding sinks, anything that must see every stored event.

A consumer has a name and a `process(conn, batches)` method. `run` reads the batches committed after the
consumer's checkpoint (a `sync_state` row of kind `consumer`, key `consumer:<name>`) and calls `process` in a
transaction that also moves the checkpoint past them. So a consumer's writes to the warehouse (alerts, say)
happen exactly once; its effects outside it (a POST, a syslog line) at least once: a crash after delivery and
before the commit delivers those batches again, and a `process` that raises moves nothing.

One consumer's failure never stops ingestion or the other consumers: it is logged, and the next run retries.
One ingester feeds a consumer at a time (a lock per consumer, PostgreSQL's advisory lock): another skips it.
`alongside` feeds consumers while a sync runs, so that they keep up with its commits.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Protocol

import sqlalchemy as sa

from ingest import batchlog, store
from ingest.errors import DatabaseError, IngestError
from ingest.state import ConsumerState

log = logging.getLogger("ingest.consumers")

ROUND_SECONDS = 0.2  # how long `alongside` waits, once its consumers are level with the log, before looking again


class Consumer(Protocol):
    name: str

    def process(self, conn: sa.Connection, batches: list[batchlog.CommittedBatch]) -> None: ...


def checkpoint(conn: sa.Connection, name: str) -> int:
    """The last batch `name` has processed; 0 before its first."""
    state = ConsumerState.load(conn, name)
    return state.seq if state else 0


def run(
    warehouse: store.Warehouse, consumers: Sequence[Consumer], *, max_events: int = 20000,
    on_error: Callable[[Consumer, IngestError], None] | None = None, stop: threading.Event | None = None,
) -> dict[str, int]:  # fmt: skip
    """Feeds each consumer every batch committed after its checkpoint (or, once `stop` is set, no further than
    its current chunk); returns the batches each processed. A consumer that fails is logged (and passed to
    `on_error`) and keeps its checkpoint."""
    done: dict[str, int] = {}
    if not consumers:
        return done
    with warehouse.connect() as conn:
        for consumer in consumers:
            done[consumer.name] = 0
            try:
                # One feeder at a time (several source jobs, daemons on one PostgreSQL): another skips it.
                with warehouse.lock(conn, f"consumer {consumer.name}") as held:
                    while held and not (stop and stop.is_set()) and (fed := _feed(conn, consumer, max_events)):
                        done[consumer.name] += fed
            except (IngestError, sa.exc.DBAPIError) as exc:
                # A statement that failed (the warehouse out of memory, say) is this consumer's failure too.
                error = exc if isinstance(exc, IngestError) else DatabaseError(f"{consumer.name}: {exc.orig or exc}")
                log.error("%s: %s", consumer.name, error)
                if on_error:
                    on_error(consumer, error)
    return done


def _feed(conn: sa.Connection, consumer: Consumer, max_events: int) -> int:
    """One transaction: the consumer processes the batches after its checkpoint, which moves past them."""
    with conn.begin():
        state = ConsumerState.load(conn, consumer.name) or ConsumerState(consumer.name)
        batches = batchlog.read_after(conn, state.seq, max_events=max_events)
        if batches:
            consumer.process(conn, batches)
            state.seq = batches[-1].seq
            state.save(conn)
    return len(batches)


@contextmanager
def alongside(warehouse: store.Warehouse, consumers: Sequence[Consumer]) -> Iterator[list[Consumer]]:
    """Feeds `consumers` in a thread while the block runs (a sync), round after round, each processing what
    committed since the last (ROUND_SECONDS apart once they are level with the log), so that a first sync's
    rules run while its workers wait on the API, not after it. Yields the consumers that have not failed: one
    that fails is logged and fed no more, and the caller should not feed it either: the next run retries it
    from its checkpoint. The block's end waits for the chunk in progress (a stop does not wait for the rules
    to catch up); what is left is the caller's to feed."""
    healthy = list(consumers)
    if not healthy:
        yield healthy
        return
    done = threading.Event()
    crashed: list[BaseException] = []
    # The sync's writers hand the consumers their batches (ingest.batchlog.keeping) while the thread follows it.
    handed = ExitStack()
    handed.enter_context(batchlog.keeping(warehouse.engine))

    def follow() -> None:
        try:
            while not done.is_set() and healthy:
                fed = run(warehouse, list(healthy), on_error=lambda consumer, _: healthy.remove(consumer), stop=done)
                if not any(fed.values()):
                    done.wait(ROUND_SECONDS)
        except (IngestError, sa.exc.DBAPIError) as exc:  # the warehouse out of reach: the caller's feed tries again
            log.warning("consumers alongside the sync stopped (they run after it): %s", exc)
        except BaseException as exc:  # a bug: raised in the caller's thread once the block has ended
            crashed.append(exc)
        finally:
            handed.close()

    thread = threading.Thread(target=follow, name="consumers", daemon=True)
    thread.start()
    try:
        yield healthy
    finally:
        done.set()
        thread.join()
        handed.close()
    if crashed:
        raise crashed[0]


def configured(settings) -> list[Consumer]:
    """The consumers the settings ask for, in the order they run after each sync."""
    from ingest import sinks

    found: list[Consumer] = []
    if settings.detections:
        from ingest import detect

        found += detect.consumers_for(settings)
    found += sinks.configured(settings)
    return found
