"""`query` and `export`: read-only access to the warehouse while syncs come and go.

A DuckDB file has one writer, and nobody else may open it while the writer has it. A sync holds it for
seconds, so readers retry opening it for `wait` seconds, then fail with DatabaseInUseError (exit 9).
Export streams Arrow record batches into the file: DuckDB hands them over natively (several times
faster than rows through SQLAlchemy), PostgreSQL rows are converted in chunks; the writers are shared.
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, TypeVar

import orjson
import sqlalchemy as sa

from ingest import backends, model
from ingest.backends.common import arrow_type
from ingest.config import Settings
from ingest.errors import ConfigError, DatabaseError, DatabaseInUseError
from ingest.store import Warehouse

if TYPE_CHECKING:
    import pyarrow as pa

T = TypeVar("T")


@contextmanager
def reader(settings: Settings, wait: float) -> Iterator[sa.Connection]:
    """A read-only connection, retrying for `wait` seconds while a sync holds the DuckDB file."""
    warehouse = read_only_warehouse(settings)
    try:
        with ExitStack() as stack:
            yield waiting(wait, lambda: stack.enter_context(warehouse.connect()))
    finally:
        warehouse.dispose()


def read_only_warehouse(settings: Settings) -> Warehouse:
    """The warehouse opened read-only; one line when a DuckDB file does not exist yet."""
    warehouse = Warehouse(settings.database_url, settings.db_schema, read_only=True)
    if warehouse.dialect == "duckdb" and not Path(str(warehouse.location)).exists():
        raise DatabaseError(f"no warehouse at {warehouse.location} yet: run `audit-ingest run` first")
    return warehouse


def waiting(wait: float, read: Callable[[], T]) -> T:
    """`read()`, retried for `wait` seconds while a sync holds the DuckDB file (as `reader` does)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return read()
        except DatabaseInUseError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.2)


# ------------------------------------------------------------------------------------------- query
def run_query(conn: sa.Connection, sql: str, schema: str | None) -> tuple[list[str], list[tuple]]:
    """Runs the SQL as written (through the driver's cursor: no bind-parameter parsing of `%` or `:x`).

    JSON values come back as objects on both backends (DuckDB hands them over as text)."""
    cursor = conn.connection.cursor()
    try:
        if schema:  # the name is validated by the settings
            cursor.execute(f"SET search_path = '{schema}'")
        cursor.execute(sql)
        if cursor.description is None:
            return [], []
        columns = [d[0] for d in cursor.description]
        parse = [str(d[1]).upper() == "JSON" for d in cursor.description]
        rows = [
            tuple(orjson.loads(v) if p and isinstance(v, str) else v for v, p in zip(row, parse, strict=True))
            for row in cursor.fetchall()
        ]
        return columns, rows
    except conn.dialect.loaded_dbapi.Error as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DatabaseError(f"query failed: {first}") from None
    finally:
        cursor.close()


def text(value: object) -> str:
    """A value as one table or CSV cell: JSON as compact JSON text, timestamps in ISO form."""
    if value is None:
        return ""
    if isinstance(value, dict | list):
        return model.dumps(value)
    if isinstance(value, datetime):
        return value.isoformat(sep=" ")
    return str(value)


def write_result(columns: list[str], rows: list[tuple], fmt: str, out: IO[str]) -> None:
    """`csv` (a header line, then RFC 4180 rows) or `json` (an array of objects, one per line)."""
    if fmt == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([text(v) for v in row] for row in rows)
        return
    out.write("[")
    for i, row in enumerate(rows):
        out.write(("\n" if i == 0 else ",\n") + _json(dict(zip(columns, row, strict=True))))
    out.write("\n]\n" if rows else "]\n")


def _json(value: object) -> str:
    try:
        return orjson.dumps(value, default=str).decode()
    except TypeError:  # integers beyond 64 bits
        return json.dumps(value, default=str, ensure_ascii=False)


# ------------------------------------------------------------------------------------------ export
def export_events(
    conn: sa.Connection, schema: str | None, since: datetime, until: datetime, fmt: str, output: Path
) -> int:
    """Writes the events of [since, until), oldest first, to `output`; returns how many.

    parquet and csv hold the `audit_events` columns; jsonl holds each event's JSON as served, one a line;
    ocsf and ecs each event mapped (ingest.ocsf, ingest.ecs), one a line.
    The file appears complete or not at all: it is written aside and renamed.
    """
    import pyarrow as pa  # here, not at the top: `query` starts faster without it

    if until <= since:
        raise ConfigError("the export window is empty: --until must be later than --since")
    since, until = (t.astimezone(UTC).replace(tzinfo=None) for t in (since, until))  # the warehouse is naive UTC
    columns = model.audit_events.columns
    # JSON as plain text: CSV has no JSON type, and readers of the Parquet file then need no extension.
    types = [arrow_type(c.type) for c in columns]
    arrow_schema = pa.schema([(c.name, getattr(t, "storage_type", t)) for c, t in zip(columns, types, strict=True)])
    partial = output.with_name(f".{output.name}.partial")
    count = 0
    try:
        write, close = _writer(fmt, partial, arrow_schema)
        try:
            for batch in backends.for_dialect(conn.dialect.name).read_events(conn, schema, since, until, arrow_schema):
                write(batch)
                count += batch.num_rows
        finally:
            close()
        os.replace(partial, output)
    except OSError as exc:
        raise ConfigError(f"cannot write {output}: {exc.strerror or exc}") from None
    finally:
        partial.unlink(missing_ok=True)
    return count


def _writer(fmt: str, path: Path, arrow_schema: pa.Schema) -> tuple[Callable, Callable[[], None]]:
    """(write a record batch, close) for `parquet`, `csv`, `jsonl`, `ocsf` or `ecs`."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        writer = pq.ParquetWriter(path, arrow_schema, compression="zstd")
        return writer.write_batch, writer.close
    if fmt == "csv":
        import pyarrow.csv as pacsv

        writer = pacsv.CSVWriter(path, arrow_schema)
        return writer.write_batch, writer.close
    out = path.open("wb")
    if fmt in ("ocsf", "ecs"):  # JSON lines, each event mapped
        from ingest.formats import encoder

        encode = encoder(fmt)
        return lambda batch: out.writelines(
            encode(orjson.loads(r)) + b"\n" for r in batch.column("raw").to_pylist()
        ), out.close
    return lambda batch: out.writelines(r.encode() + b"\n" for r in batch.column("raw").to_pylist()), out.close
