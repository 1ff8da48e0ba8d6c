"""Warehouse backends: one module per engine, each with the functions of `Backend`.

`ingest.store` is generic and asks `for_dialect(url's dialect)` for the engine's module. To add a backend:
write a module with these functions, name it in SUPPORTED, and make the migrations and `model` work on it
(tests/test_migrations.py builds the model both ways on every backend).
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

import sqlalchemy as sa

from ingest.errors import ConfigError, IngestError

if TYPE_CHECKING:
    import pyarrow as pa

    from ingest import model

# dialect name -> module. A URL of any other dialect is refused before anything is created.
SUPPORTED = {"duckdb": "ingest.backends.duckdb", "postgresql": "ingest.backends.postgresql"}

T = TypeVar("T")


class Backend(Protocol):
    # Normalising a batch while the engine writes the previous one: PostgreSQL's server works apart from the
    # GIL; DuckDB's statements take it back often, so its batches are normalised between statements.
    NORMALISE_AHEAD: bool
    SNAPSHOT: dict[str, str]  # execution options of a read that sees one snapshot over several statements
    # The daemon syncs several sources at once (each in its own session): PostgreSQL. A DuckDB file has one writer.
    CONCURRENT_SOURCES: bool
    JSON_SQL: Any  # the engine's JSON functions for ingest.typed_sql (a typed_sql.JsonSQL)
    # `raw` reads back as the value served (DuckDB keeps its canonical text; PostgreSQL's jsonb respells some
    # numbers): a sync's batches may then be handed to the consumers following it unread (ingest.batchlog).
    RAW_AS_SERVED: bool

    def engine_options(self, read_only: bool) -> dict[str, Any]:
        """create_engine keywords: pooling, the engine's settings, read-only opens."""

    def lock(
        self, conn: sa.Connection, schema: str | None, name: str, *, wait: bool, stop: threading.Event | None
    ) -> AbstractContextManager[bool]:
        """Holds `name`'s lock on `conn` for the block; yields False if another session holds it."""

    def translate(self, text: str, location: str) -> IngestError | None:
        """The error to raise for a driver error's text, if this backend knows better than DatabaseError."""

    def atomically(self, conn: sa.Connection, work: Callable[[], T]) -> T:
        """`work()` in one transaction."""

    def settle(self, conn: sa.Connection) -> None:
        """After a sync's writes: what the engine would otherwise do when the last connection closes."""

    def stage(self, batch: model.Batch) -> model.Batch:
        """The batch in the backend's bulk form, built before its transaction starts."""

    def insert(
        self, conn: sa.Connection, table: sa.Table, names: tuple[str, ...], rows: Any,
        update: Callable | None, returning: str | None, absent: bool,
    ) -> list:  # fmt: skip
        """Insert-if-absent (or upsert) of `rows` in one bulk statement (see store.insert_rows)."""

    def read_events(
        self, conn: sa.Connection, schema: str | None, since: Any, until: Any, arrow_schema: pa.Schema
    ) -> Iterator[pa.RecordBatch]:
        """`audit_events` of [since, until), oldest first, as Arrow record batches of `arrow_schema`."""

    def all_cores(self, conn: sa.Connection) -> AbstractContextManager[None]:
        """A long read (verify, rebuild-typed) with every core the engine may use, for the block."""

    def batch_hashes(self, conn: sa.Connection) -> dict[int | None, tuple[int, str]] | None:
        """Per `batch_seq`: (events, SHA-256 of their ledger entries), computed in the engine; None where the
        engine does not keep the canonical text (ingest.verify computes it then)."""

    def by_bytes(self, text: sa.ColumnElement) -> sa.ColumnElement:
        """`text` compared and ordered by its bytes (the order the ledger's entries are hashed in)."""

    def sha256_hex(self, text: sa.ColumnElement) -> sa.ColumnElement:
        """The SHA-256 of a text, as 64 hex digits."""


def for_dialect(dialect: str) -> Backend:
    if dialect not in SUPPORTED:
        raise ConfigError(
            f"unsupported database {dialect!r}: the supported backends are {' and '.join(SUPPORTED)}"
            " (e.g. duckdb:///audit_logs.duckdb or postgresql+psycopg://user@host/db)"
        )
    return cast(Backend, importlib.import_module(SUPPORTED[dialect]))
