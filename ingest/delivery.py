"""Alert delivery: each new alert is POSTed as JSON to each webhook (`alert_webhooks`,
$AUDIT_INGEST_ALERT_WEBHOOK), at least once.

The detector writes one `alert_deliveries` row per alert and URL in the alert's own transaction; after the
consumers, `deliver_pending` POSTs the rows due and records each outcome in a transaction of its own. So a
crash after the alert's commit loses nothing (the row waits), and a crash between a POST and its record
sends that alert again: receivers dedupe by `alert_id`. A receiver that fails is retried with doubling
delays (`alert_retry_delay`, at most an hour); after its first failure in a round its other alerts wait
for the next round, so a receiver that is down costs a sync one failed request per URL, never a block.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import timedelta

import httpx
import orjson
import sqlalchemy as sa

from ingest import model, store

log = logging.getLogger("ingest.delivery")

TIMEOUT = 5.0
MAX_DELAY = 3600.0


def enqueue(conn: sa.Connection, alerts: list[dict], urls: tuple[str, ...]) -> None:
    """Pending deliveries of `alerts` (rows of `alerts`) to every URL, in the caller's transaction."""
    at = store.now()
    rows = [
        {"rule_id": a["rule_id"], "events_hash": a["events_hash"], "url": url, "attempts": 0,
         "next_attempt_at": at, "delivered_at": None, "last_error": None}
        for a in alerts
        for url in urls
    ]  # fmt: skip
    store.insert_rows(conn, model.alert_deliveries, rows)


def payload(alert: Mapping) -> dict:
    """A Slack-compatible `text` line and the alert's fields."""
    ids = alert["event_ids"]
    ids = orjson.loads(ids) if isinstance(ids, str) else ids
    tags = alert["tags"]
    tags = orjson.loads(tags) if isinstance(tags, str) else tags
    first, last = (alert[k].isoformat(timespec="seconds") + "Z" for k in ("first_event_at", "last_event_at"))
    historical = " (historical: from a backfill)" if alert["historical"] else ""
    return {
        "text": f"[{alert['level']}] {alert['title']}: {len(ids)} events, {first} to {last}{historical}",
        "alert_id": f"{alert['rule_id']}:{alert['events_hash']}",
        "rule_id": alert["rule_id"], "title": alert["title"], "level": alert["level"], "tags": tags,
        "event_ids": ids, "first_event_at": first, "last_event_at": last, "historical": bool(alert["historical"]),
    }  # fmt: skip


def deliver_pending(warehouse: store.Warehouse, *, retry_delay: float = 30.0, transport=None) -> int:
    """POSTs every delivery that is due; returns how many were delivered."""
    al, dl = model.alerts, model.alert_deliveries
    query = (
        sa.select(dl.c.url, dl.c.attempts, *al.c)
        .join(al, sa.and_(al.c.rule_id == dl.c.rule_id, al.c.events_hash == dl.c.events_hash))
        .where(dl.c.delivered_at.is_(None), dl.c.next_attempt_at <= store.now())
        .order_by(dl.c.url, al.c.created_at, al.c.rule_id, al.c.events_hash)
    )
    delivered, failed = 0, set()
    with warehouse.connect() as conn, httpx.Client(timeout=TIMEOUT, transport=transport) as client:
        pending = conn.execute(query).mappings().all()
        conn.rollback()  # no read transaction held while POSTing
        for row in pending:
            if row["url"] in failed:
                continue
            key = sa.and_(dl.c.rule_id == row["rule_id"], dl.c.events_hash == row["events_hash"])
            key = sa.and_(key, dl.c.url == row["url"])
            with conn.begin():
                if not _claim(conn, key):
                    continue
                error = _post(client, row["url"], payload(row))
                attempts = row["attempts"] + 1
                now = store.now()
                values = {"attempts": attempts, "last_error": error}
                if error is None:
                    values["delivered_at"] = now
                    delivered += 1
                else:
                    failed.add(row["url"])
                    delay = min(MAX_DELAY, retry_delay * 2 ** (attempts - 1))
                    values["next_attempt_at"] = now + timedelta(seconds=delay)
                    log.warning("alert webhook %s: %s (attempt %d; retried later)", _host(row["url"]), error, attempts)
                conn.execute(dl.update().where(key).values(**values))
    return delivered


def _claim(conn: sa.Connection, key) -> bool:
    """Whether the delivery is still due; on PostgreSQL it stays locked until the transaction ends, so
    that another ingester of the same warehouse skips it rather than POSTing it too (a killed process's
    lock ends with its connection)."""
    dl = model.alert_deliveries
    query = sa.select(dl.c.url).where(key, dl.c.delivered_at.is_(None), dl.c.next_attempt_at <= store.now())
    if conn.dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    return conn.execute(query).first() is not None


def _post(client: httpx.Client, url: str, body: dict) -> str | None:
    """None when the receiver took it (2xx), else the failure in one line."""
    try:
        response = client.post(url, content=orjson.dumps(body), headers={"content-type": "application/json"})
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no answer'}"
    return None if response.is_success else f"HTTP {response.status_code}"


def _host(url: str) -> str:
    """The URL without its path: webhook paths often hold a secret token (Slack's do)."""
    parts = httpx.URL(url)
    return f"{parts.scheme}://{parts.host}" + (f":{parts.port}" if parts.port else "")
