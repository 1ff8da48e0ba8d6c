"""The ready queries of docs/schema.md, run as written on DuckDB against a 10,000-event simulator sync;
each result is checked against the same answer computed by brute force over the simulator's events."""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from ingest.store import Warehouse

DOC = Path(__file__).parents[1] / "docs" / "schema.md"


def doc_queries() -> dict[str, str]:
    """Title -> SQL: each `### title` of the "Ready queries" section and the ```sql block under it."""
    text = DOC.read_text()
    section = text.split("\n## Ready queries\n", 1)[1].split("\n## ", 1)[0]
    queries = {}
    for block in section.split("\n### ")[1:]:
        title, _, body = block.partition("\n")
        [sql] = re.findall(r"```sql\n(.*?)```", body, re.S)
        queries[title.strip()] = sql
    return queries


QUERIES = doc_queries()
CHECKS: dict[str, Callable[[list[dict], list[dict]], None]] = {}


def check(title: str):
    def register(fn):
        CHECKS[title] = fn
        return fn

    return register


def test_the_document_has_ten_queries_or_more_each_checked_here():
    assert len(QUERIES) >= 10
    assert set(QUERIES) == set(CHECKS)
    assert DOC.read_text().count("```sql") == len(QUERIES)  # no SQL in the document escapes the tests


@pytest.mark.parametrize("title", list(QUERIES))
def test_ready_query_answers_what_the_events_say(title, synced_10k):
    warehouse = Warehouse(synced_10k.url)
    try:
        with warehouse.connect() as conn:
            rows = [dict(r) for r in conn.exec_driver_sql(QUERIES[title]).mappings()]
    finally:
        warehouse.dispose()
    assert rows, f"{title!r} returned nothing on simulator data"
    CHECKS[title](rows, synced_10k.events)


# ------------------------------------------------------------------------- brute force over the events


def at(event: dict) -> datetime:
    return datetime.fromtimestamp(event["effective_at"], UTC).replace(tzinfo=None)


def session(event: dict) -> dict:
    return (event["actor"] or {}).get("session") or {}


def actor_user(event: dict) -> dict:
    actor = event["actor"] or {}
    return session(event).get("user") or (actor.get("api_key") or {}).get("user") or {}


def by(event: dict) -> str | None:
    """The user's email, or the service account that owns the key."""
    key = (event["actor"] or {}).get("api_key") or {}
    return actor_user(event).get("email") or (key.get("service_account") or {}).get("id")


def field(event: dict, name: str):
    """A payload field where the spec puts it: at the top, or in `data` / `changes_requested`."""
    payload = event[event["type"]]
    if name in payload:
        return payload[name]
    for wrapper in ("data", "changes_requested"):
        if name in (payload.get(wrapper) or {}):
            return payload[wrapper][name]
    return None


def of_type(events: list[dict], *types: str) -> list[dict]:
    return [e for e in events if e["type"] in types]


def keyed(rows: list[dict], *columns: str) -> dict[str, tuple]:
    return {r["event_id"]: tuple(r[c] for c in columns) for r in rows}


@check("Failed-login bursts by IP address")
def _(rows, events):
    by_ip = defaultdict(list)
    for e in of_type(events, "login.failed"):
        if session(e).get("ip_address"):
            by_ip[session(e)["ip_address"]].append(e)
    expected = set()
    for ip, failed in by_ip.items():
        failed.sort(key=lambda e: e["effective_at"])
        bursts = [[failed[0]]]
        for prev, e in zip(failed, failed[1:], strict=False):
            if e["effective_at"] - prev["effective_at"] > 600:
                bursts.append([])
            bursts[-1].append(e)
        for b in bursts:
            if len(b) >= 5:
                codes = sorted({field(e, "error_code") for e in b} - {None})
                users = {actor_user(e).get("email") for e in b} - {None}
                expected.add((ip, at(b[0]), at(b[-1]), len(b), len(users), ", ".join(codes) or None))
    got = {tuple(r.values()) for r in rows}
    assert got == expected
    assert max(r["failures"] for r in rows) >= 8  # the simulator's bursts are there


@check("API keys created with broad scopes")
def _(rows, events):
    expected = {}
    for e in of_type(events, "api_key.created"):
        scopes = field(e, "scopes")
        if scopes and (len(scopes) >= 3 or any(s.endswith(".write") for s in scopes)):
            expected[e["id"]] = (field(e, "id"), by(e), len(scopes), ", ".join(scopes))
    assert keyed(rows, "api_key_id", "created_by", "scope_count", "scopes") == expected


@check("Owner grants")
def _(rows, events):
    expected = {}
    for e in of_type(
        events, *(t for t in {x["type"] for x in events} if t.split(".")[0] in ("invite", "user", "service_account"))
    ):
        if field(e, "role") == "owner":
            grantee = field(e, "email") if e["type"].startswith("invite.") else field(e, "id")
            expected[e["id"]] = (e["type"], grantee, by(e))
    assert keyed(rows, "type", "grantee", "granted_by") == expected
    assert {r["type"] for r in rows} >= {"invite.sent", "user.added", "service_account.created"}


@check("Projects archived or deleted")
def _(rows, events):
    expected = {
        e["id"]: (e["type"], field(e, "id"), e["project"]["name"], by(e), at(e))
        for e in of_type(events, "project.archived", "project.deleted")
    }
    assert keyed(rows, "type", "project_id", "project_name", "by_whom", "effective_at") == expected


@check("Rate-limit changes")
def _(rows, events):
    limits = (
        "max_requests_per_1_minute", "max_tokens_per_1_minute", "max_images_per_1_minute",
        "max_audio_megabytes_per_1_minute", "max_requests_per_1_day", "batch_1_day_max_input_tokens",
    )  # fmt: skip
    expected = {
        e["id"]: (field(e, "id"), *(field(e, n) for n in limits))
        for e in of_type(events, "rate_limit.updated", "rate_limit.deleted")
    }
    assert keyed(rows, "rate_limit_id", *limits) == expected
    assert any(r["max_requests_per_1_minute"] is not None for r in rows)


@check("Service accounts created, and by whom")
def _(rows, events):
    expected = {
        e["id"]: (field(e, "id"), field(e, "role"), by(e), ((e["actor"] or {}).get("api_key") or {}).get("id"))
        for e in of_type(events, "service_account.created")
    }
    assert keyed(rows, "service_account_id", "role", "created_by", "actor_api_key_id") == expected


@check("Invites sent outside the company domain")
def _(rows, events):
    expected = {
        e["id"]: (field(e, "email"), field(e, "role"), by(e))
        for e in of_type(events, "invite.sent")
        if field(e, "email") is not None and not field(e, "email").lower().endswith("@example.com")
    }
    assert keyed(rows, "email", "role", "invited_by") == expected


@check("IP allowlist changes")
def _(rows, events):
    def joined(items):
        return ", ".join(items) if items else None

    expected = {
        e["id"]: (
            e["type"],
            field(e, "id"),
            joined(field(e, "allowed_ips")),
            joined([c.get("name") or c.get("id") for c in field(e, "configs") or []]),
        )
        for e in events
        if e["type"].startswith("ip_allowlist.")
    }
    assert keyed(rows, "type", "ip_allowlist_id", "allowed_ips", "configs") == expected


@check("Activity of one user across sources")
def _(rows, events):
    email = "ada.lovelace@example.com"
    ids = {actor_user(e)["id"] for e in events if actor_user(e).get("email") == email}
    expected = {}
    for e in events:
        payload = e[e["type"]] if isinstance(e[e["type"]], dict) else {}
        if actor_user(e).get("id") in ids:
            expected[e["id"]] = "actor"
        elif (
            payload.get("id") in ids
            or (e["type"].startswith("role.assignment.") and payload.get("principal_id") in ids)
            or (e["type"].startswith("invite.") and (field(e, "email") or "").lower() == email)
        ):
            expected[e["id"]] = "target"
    assert {k: v for k, (v,) in keyed(rows, "involvement").items()} == expected
    assert Counter(expected.values())["target"] > 0 and {r["source"] for r in rows} == {"default"}


@check("Event volume by type and day")
def _(rows, events):
    expected = Counter((at(e).date(), e["type"]) for e in events)
    assert {(r["day"], r["type"]): r["events"] for r in rows} == expected


@check("Users signing in from several countries")
def _(rows, events):
    seen = defaultdict(list)
    for e in of_type(events, "login.succeeded"):
        country = (session(e).get("ip_address_details") or {}).get("country")
        if country:
            seen[actor_user(e).get("email")].append((country, at(e)))
    expected = {
        user: (
            len({c for c, _ in logins}),
            ", ".join(sorted({c for c, _ in logins})),
            len(logins),
            max(t for _, t in logins),
        )
        for user, logins in seen.items()
        if len({c for c, _ in logins}) > 1
    }
    assert {r["actor_email"]: (r["countries"], r["seen_from"], r["logins"], r["last_login"]) for r in rows} == expected
