"""OCSF Parquet in the layout Amazon Security Lake takes from a custom source.

Security Lake wants one custom source per OCSF class, each object under its source's prefix in
`region=<region>/accountId=<account>/eventDay=<YYYYMMDD>/`, and every Parquet file of one class. So the
export writes `<output>/<class>/region=.../accountId=.../eventDay=.../<file>.parquet`: copy each class's
folder to the prefix of the custom source made for it. `unmapped` is a string-to-string map (as in the
tables Security Lake makes of AWS sources) whose values are JSON text, `entity.data` JSON text: their shapes
vary from event to event, and a Parquet column's may not.
"""

from __future__ import annotations

import os
import re
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa

from ingest import model, ocsf
from ingest.errors import ConfigError

ROWS_PER_FILE = 100_000


def _arrow_schema():
    """Every column ingest.ocsf can fill, typed once: files of one class then share a schema whichever
    fields their events happen to have (tests/test_siem_export.py reads every mapped field back)."""
    import pyarrow as pa

    s, i32, i64 = pa.string(), pa.int32(), pa.int64()

    def struct(**fields) -> pa.StructType:
        return pa.struct([(k, v) for k, v in fields.items()])

    user = struct(uid=s, name=s, email_addr=s, type_id=i32, type=s, credential_uid=s)
    return pa.schema([
        ("class_uid", i32), ("class_name", s), ("category_uid", i32), ("category_name", s), ("activity_id", i32),
        ("activity_name", s), ("type_uid", i64), ("type_name", s), ("time", i64), ("severity_id", i32),
        ("severity", s), ("status_id", i32), ("status", s), ("status_code", s), ("status_detail", s),
        ("metadata", struct(uid=s, version=s, product=struct(name=s, vendor_name=s), event_code=s, log_name=s,
                            profiles=pa.list_(s))),
        ("cloud", struct(provider=s, project_uid=s)),
        ("api", struct(operation=s, service=struct(name=s))),
        ("actor", struct(user=user)),
        ("service", struct(name=s)),
        ("src_endpoint", struct(ip=s, name=s, location=struct(city=s, country=s, region=s,
                                                              coordinates=pa.list_(pa.float64())))),
        ("http_request", struct(user_agent=s)),
        ("user", user),
        ("privileges", pa.list_(s)),
        ("group", struct(uid=s, name=s)),
        ("entity", struct(uid=s, name=s, type=s, data=s)),
        ("raw_data", s),
        ("unmapped", pa.map_(s, s)),
    ])  # fmt: skip


_REGION = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d{1,2}$")
_ACCOUNT = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def check(region: str, account_id: str) -> None:
    """The partition values are path parts: they must be what Security Lake expects, and nothing else."""
    if not _REGION.match(region):
        raise ConfigError(f"bad --region {region!r}: an AWS region such as us-east-1")
    if not _ACCOUNT.match(account_id):
        raise ConfigError(f"bad --account-id {account_id!r}: the AWS account id (or external id) of the source")


def export(conn: sa.Connection, since: datetime, until: datetime, output: Path, *,
           region: str, account_id: str) -> int:  # fmt: skip
    """Writes the OCSF events of [since, until) under `output`; returns how many. Files appear whole (written
    aside, renamed); their names carry the window, so exporting a window again replaces its files."""
    check(region, account_id)
    if until <= since:
        raise ConfigError("the export window is empty: --until must be later than --since")
    naive = [t.astimezone(UTC).replace(tzinfo=None) for t in (since, until)]  # the warehouse is naive UTC
    pending: dict[tuple[str, str], list[dict]] = {}
    written: list[tuple[Path, Path]] = []
    stem = f"openai-audit-{int(since.timestamp())}-{int(until.timestamp())}"
    count = 0
    try:
        for raw in _raw(conn, *naive):
            event = ocsf.to_ocsf(model.parsed(raw))
            day = datetime.fromtimestamp(event["time"] / 1000, UTC).strftime("%Y%m%d")
            key = (_snake(event["class_name"]), day)
            rows = pending.setdefault(key, [])
            rows.append(event)
            count += 1
            if len(rows) >= ROWS_PER_FILE:
                written.append(_write(output, key, region, account_id, f"{stem}-{len(written)}", rows))
                rows.clear()
        for key, rows in pending.items():
            if rows:
                written.append(_write(output, key, region, account_id, f"{stem}-{len(written)}", rows))
        for partial, final in written:
            os.replace(partial, final)
    except OSError as exc:
        raise ConfigError(f"cannot write under {output}: {exc.strerror or exc}") from None
    finally:
        for partial, _final in written:
            partial.unlink(missing_ok=True)
    return count


def _raw(conn: sa.Connection, since: datetime, until: datetime):
    """The window's events as served, oldest first, read in chunks."""
    events = model.audit_events
    query = (
        sa.select(events.c.raw)
        .where(events.c.effective_at >= since, events.c.effective_at < until)
        .order_by(events.c.effective_at, events.c.id)
    )
    for rows in conn.execution_options(yield_per=10_000).execute(query).partitions():
        for row in rows:
            yield row[0]


def _write(output: Path, key: tuple[str, str], region: str, account: str, name: str, rows: list[dict]):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = output / key[0] / f"region={region}" / f"accountId={account}" / f"eventDay={key[1]}"
    folder.mkdir(parents=True, exist_ok=True)
    for row in rows:
        row["unmapped"] = [(k, model.dumps(v)) for k, v in row.get("unmapped", {}).items()]
        if "data" in row.get("entity", {}):
            row["entity"] = {**row["entity"], "data": model.dumps(row["entity"]["data"])}
    table = pa.Table.from_pylist(rows, schema=_arrow_schema())
    partial, final = folder / f".{name}.parquet.partial", folder / f"{name}.parquet"
    pq.write_table(table, partial, compression="zstd")
    return partial, final


def _snake(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
