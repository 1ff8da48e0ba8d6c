"""Reading `alerts` back: `audit-ingest alerts` and `rules list`."""

from __future__ import annotations

import csv
import json
from datetime import datetime
from typing import TextIO

import orjson
import sqlalchemy as sa

from ingest import model

COLUMNS = ("rule_id", "title", "level", "tags", "event_ids", "first_event_at", "last_event_at", "created_at",
           "historical")  # fmt: skip


def read(conn: sa.Connection, since: datetime | None = None) -> list[dict]:
    """The alerts, oldest event first; `since`: those whose last event is at or after it."""
    table = model.alerts
    query = sa.select(*(table.c[n] for n in COLUMNS)).order_by(table.c.first_event_at, table.c.rule_id)
    if since is not None:
        query = query.where(table.c.last_event_at >= since.replace(tzinfo=None))
    rows: list[dict] = []
    for mapping in conn.execute(query).mappings():
        row = dict(mapping)
        for name in ("tags", "event_ids"):
            if isinstance(row[name], str):
                row[name] = orjson.loads(row[name])
        for name in ("first_event_at", "last_event_at", "created_at"):
            row[name] = iso(row[name])
        rows.append(row)
    return rows


def counts(conn: sa.Connection) -> dict[str, int]:
    table = model.alerts
    return dict(conn.execute(sa.select(table.c.rule_id, sa.func.count()).group_by(table.c.rule_id)).all())


def iso(value: datetime) -> str:
    return value.isoformat(timespec="seconds") + "Z"


def write(rows: list[dict], fmt: str, out: TextIO) -> None:
    """json: an array of objects; csv: a header line, lists as JSON text."""
    if fmt == "json":
        out.write(json.dumps(rows, ensure_ascii=False, indent=2) + "\n")
        return
    writer = csv.writer(out)
    writer.writerow(COLUMNS)
    for row in rows:
        writer.writerow([json.dumps(row[n]) if isinstance(row[n], list) else row[n] for n in COLUMNS])


def table_rows(rows: list[dict]) -> list[dict]:
    """For a terminal: one line per alert."""
    return [
        {"first event": r["first_event_at"], "last event": r["last_event_at"], "level": r["level"],
         "rule": r["rule_id"], "events": len(r["event_ids"]), "historical": "yes" if r["historical"] else "",
         "title": r["title"]}
        for r in rows
    ]  # fmt: skip
