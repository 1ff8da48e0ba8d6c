"""The typed model: every event type of the spec mapped or declared opaque, every typed column equal to
the JSON it came from, and payloads that do not fit their declaration stored anyway and counted."""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml
from support import KEY, scalar, stored_events, sync

import ingest.sync
from ingest import model
from ingest.store import Warehouse
from ingest.sync import RunSummary

SPEC = Path(model.__file__).parent / "spec" / "openai-audit-logs.openapi.yaml"
SPEC_TYPES = {"string": "str", "integer": "int", "boolean": "bool", "object": "object"}


@pytest.fixture(scope="module")
def spec() -> dict:
    schemas = yaml.safe_load(SPEC.read_text())["components"]["schemas"]
    payloads = schemas["AuditLog"]["properties"]
    enum = schemas["AuditLogEventType"]["enum"]
    return {t: payloads.get(t) for t in enum}  # None: no payload schema


def spec_fields(schema: dict, path: tuple[str, ...] = ()) -> dict[str, tuple[tuple[str, ...], dict]]:
    """Leaf name -> (path in the payload, schema); objects with properties are walked into."""
    out = {}
    for name, sub in (schema.get("properties") or {}).items():
        if sub.get("type") == "object" and sub.get("properties"):
            out.update(spec_fields(sub, (*path, name)))
        else:
            assert name not in out, f"leaf {name} twice in one payload schema"
            out[name] = ((*path, name), sub)
    return out


def read(conn: sa.Connection, table: sa.Table) -> list[dict]:
    return [dict(r) for r in conn.execute(sa.select(table)).mappings()]


# ---------------------------------------------------------------------------------------- declaration


def test_every_enum_type_is_mapped_or_declared_opaque(spec):
    typed = {t for t, schema in spec.items() if schema is not None}
    unmapped = set(spec) - set(model.FAMILY_OF_TYPE) - model.OPAQUE_TYPES
    assert not unmapped, f"event types in the spec's enum neither mapped nor opaque: {sorted(unmapped)}"
    assert set(model.FAMILY_OF_TYPE) == typed  # a payload schema: typed rows; none: opaque
    assert set(spec) - typed == model.OPAQUE_TYPES
    assert sum(len(f.types) for f in model.FAMILIES) == len(model.FAMILY_OF_TYPE)  # one family per type


def test_fixed_table_names_and_keys():
    families = {f.table: f for f in model.FAMILIES}
    assert set(families["api_key_events"].types) == {t for t in model.FAMILY_OF_TYPE if t.startswith("api_key.")}
    assert [(lst.table, lst.value) for lst in families["api_key_events"].lists] == [("api_key_event_scopes", "scope")]
    assert set(families["login_events"].types) == {
        t for t in model.FAMILY_OF_TYPE if t.startswith(("login.", "logout."))
    }
    assert {c.name for c in families["login_events"].columns} == {"error_code", "error_message"}
    for family in model.FAMILIES:
        assert family.table.endswith("_events")
        prefix = family.table.removesuffix("s") + "_"
        assert all(lst.table.startswith(prefix) for lst in family.lists)
    for table in model.TYPED_TABLES:
        [fk] = table.c.event_id.foreign_keys
        assert fk.target_fullname == "audit_events.id"
        expected_key = ["event_id"] if table.name in families else ["event_id", "position"]
        assert [c.name for c in table.primary_key] == expected_key


def test_mapping_covers_every_field_of_the_spec_and_no_other(spec):
    for family in model.FAMILIES:
        columns = {c.field: c for c in family.columns}
        lists = {lst.field: lst for lst in family.lists}
        used = set()
        for event_type in family.types:
            for name, (path, schema) in spec_fields(spec[event_type]).items():
                used.add(name)
                where = f"{event_type}: {'.'.join(path)}"
                if schema.get("type") == "array":
                    assert name in lists, f"{where} has no child table"
                    items = schema["items"]
                    if items["type"] == "string":
                        assert lists[name].value, f"{where}: a list of strings needs a value column"
                    else:
                        declared = {c.field: c.type for c in lists[name].columns}
                        assert declared == {k: SPEC_TYPES[v["type"]] for k, v in items["properties"].items()}, where
                else:
                    assert name in columns, f"{where} has no column"
                    assert columns[name].type == SPEC_TYPES[schema["type"]], where
                    assert schema["type"] != "object" or path[-1] in (*model.WRAPPERS, "metadata"), where
        assert set(columns) | set(lists) == used, f"{family.table} declares fields no type of it has"


# ---------------------------------------------------------------------------------------- ingestion


def expected_value(payload: dict, path: tuple[str, ...]):
    """The value at the spec's path; a field the spec puts under one wrapper is also found under the
    other (the spec's own api_key.updated example uses `data` where the schema says `changes_requested`)."""
    if path[0] in model.WRAPPERS and path[0] not in payload and len(path) > 1:
        other = next(w for w in model.WRAPPERS if w != path[0])
        path = (other, *path[1:])
    value = payload
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def event_row(event: dict) -> dict:
    """The `audit_events` row the README and docs/schema.md promise for a served event."""
    actor = event["actor"] or {}
    session, key = actor.get("session") or {}, actor.get("api_key") or {}
    user = session.get("user") or key.get("user") or {}
    details = session.get("ip_address_details") or {}
    payload = event.get(event["type"])
    project = event.get("project") or {}
    return {
        "id": event["id"],
        "type": event["type"],
        "effective_at": datetime.fromtimestamp(event["effective_at"], UTC).replace(tzinfo=None),
        "source": "default",
        "project_id": project.get("id"),
        "project_name": project.get("name"),
        "resource_id": payload.get("id") if isinstance(payload, dict) else None,
        "actor_type": actor.get("type"),
        "actor_user_id": user.get("id"),
        "actor_email": user.get("email"),
        "actor_api_key_id": key.get("id"),
        "actor_service_account_id": (key.get("service_account") or {}).get("id"),
        **{k: session.get(k) for k in ("ip_address", "user_agent", "ja3", "ja4")},
        **{f"ip_{k}": details.get(k) for k in ("country", "region", "region_code", "city", "asn")},
        **{f"ip_{k}": float(details[k]) if k in details else None for k in ("latitude", "longitude")},
        "payload": payload,
        "raw": event,
    }


def test_an_event_row_has_every_column_and_a_whole_session_fills_them():
    session = {
        "user": {"id": "user-1", "email": "ana@example.com"}, "ip_address": "192.0.2.7", "user_agent": "curl/8",
        "ja3": "ja3-hash", "ja4": "ja4-hash",
        "ip_address_details": {"country": "FR", "region": "Ile-de-France", "region_code": "IDF", "city": "Paris",
                               "asn": "3215", "latitude": "48.85", "longitude": "2.35"},
    }  # fmt: skip
    event = {
        "id": "audit_log-1", "type": "project.created", "effective_at": 1700000000,
        "project": {"id": "proj-1", "name": "Audit"}, "actor": {"type": "session", "session": session},
        "project.created": {"id": "proj-1", "data": {"name": "Audit", "title": "Audit"}},
    }  # fmt: skip
    [row] = model.normalise([event], "default", datetime(2026, 1, 1)).events
    assert row.keys() == {c.name for c in model.audit_events.columns} - {"batch_seq"}  # batch_seq: set by the write
    assert [name for name, value in row.items() if value is None] == ["actor_api_key_id", "actor_service_account_id"]
    assert (row["ip_region_code"], row["ip_asn"], row["ip_latitude"]) == ("IDF", "3215", 48.85)


def test_every_event_type_from_the_simulator_lands_typed_as_served(synced_10k, spec):
    events = synced_10k.events
    assert set(spec) <= {e["type"] for e in events}  # every type of the enum ...
    assert {e["type"] for e in events} - set(spec)  # ... and types the spec does not know yet
    assert synced_10k.summary.mismatches == Counter()  # the simulator's payloads all fit

    warehouse = Warehouse(synced_10k.url)
    try:
        with warehouse.connect() as conn:
            stored = {r["id"]: r for r in read(conn, model.audit_events)}
            tables = {t.name: read(conn, t) for t in model.TYPED_TABLES}
    finally:
        warehouse.dispose()

    assert set(stored) == {e["id"] for e in events}
    for event in events:
        written = {k: stored[event["id"]][k] for k in ("ingested_at", "batch_seq")}  # the write's, not the event's
        assert stored[event["id"]] == {**written, **event_row(event)}

    for table, rows in tables.items():
        assert rows, f"{table} is empty after a 10,000-event run"
    for family in model.FAMILIES:
        of_family = [e for e in events if e["type"] in family.types]
        typed = {r["event_id"]: r for r in tables[family.table]}
        assert set(typed) == {e["id"] for e in of_family}, family.table  # one row per event, no other
        children = {lst.table: {} for lst in family.lists}
        for lst in family.lists:
            for r in tables[lst.table]:
                children[lst.table].setdefault(r["event_id"], []).append(r)
            assert set(children[lst.table]) <= set(typed), lst.table
        for event in of_family:
            payload, fields = event[event["type"]], spec_fields(spec[event["type"]])
            for col in family.columns:
                want = expected_value(payload, fields[col.field][0]) if col.field in fields else None
                assert typed[event["id"]][col.name] == want, (event["id"], family.table, col.name)
            for lst in family.lists:
                items = expected_value(payload, fields[lst.field][0]) if lst.field in fields else None
                got = sorted(children[lst.table].get(event["id"], []), key=lambda r: r["position"])
                if lst.value:
                    want_rows = [(i, item) for i, item in enumerate(items or [])]
                    assert [(r["position"], r[lst.value]) for r in got] == want_rows, (event["id"], lst.table)
                else:
                    want_rows = [(i, *(item.get(c.field) for c in lst.columns)) for i, item in enumerate(items or [])]
                    got_rows = [(r["position"], *(r[c.name] for c in lst.columns)) for r in got]
                    assert got_rows == want_rows, (event["id"], lst.table)


# ---------------------------------------------------------------------------------------- mismatches


def staged(n: str, event_type: str, payload, at: int) -> dict:
    actor = {"type": "session", "session": {"user": {"id": "user-stage", "email": "stage@example.com"}}}
    return {"id": f"staged-{n}", "type": event_type, "effective_at": at, "actor": actor, event_type: payload}


def sync_once(server, url: str, caplog) -> RunSummary:
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ingest.sync"):
        [summary] = sync(server, url)
    return summary


def mismatch_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "declared shape" in r.getMessage()]


def test_payloads_that_do_not_fit_land_and_are_counted_once_per_type(simulator, db_url, monkeypatch, caplog):
    monkeypatch.setenv("OPENAI_ADMIN_KEY", KEY)
    monkeypatch.setattr(ingest.sync, "_mismatch_logged", set())  # "once per type" is per process
    server = simulator(events=200, seed=5)
    at = int(time.time()) - 600
    bad = [
        # scopes not a list, and a field the spec does not declare
        staged("bad-1", "api_key.created", {"id": "key_1", "data": {"scopes": "all"}, "expires": 1}, at),
        staged("bad-2", "api_key.created", {"id": "key_2", "data": {"scopes": ["a", 7, None]}}, at),
        # a string where an integer belongs, next to a limit that fits
        staged(
            "bad-3",
            "rate_limit.updated",
            {"id": "rl-1", "changes_requested": {"max_requests_per_1_minute": "100", "max_tokens_per_1_minute": 5000}},
            at,
        ),  # fmt: skip
        staged("bad-4", "invite.sent", {"id": "invite-1", "data": "owner@evil.test"}, at),  # `data` not an object
        staged("bad-5", "role.bound_to_resource", {"id": "ws__c", "enabled": "yes", "role_id": "role_1"}, at),
        staged("bad-6", "certificates.activated", {"certificates": [{"id": "cert_1", "pem": "x"}, "cert_2"]}, at),
        staged("bad-7", "login.failed", "wrong password", at),  # the payload is not an object at all
        staged("bad-8", "external_key.registered", {"id": "ekey_1", "data": ["not", "an", "object"]}, at),
    ]
    fits = [
        staged("ok-1", "rate_limit.updated", {"id": "rl-2"}, at),  # absent fields: NULL, and not counted
        staged("ok-2", "api_key.updated", {"id": "key_3", "data": {"scopes": ["x"]}}, at),  # as in the spec's example
        staged("ok-3", "login.succeeded", {}, at),
    ]
    # Geo-IP details as numbers: an integer ASN is kept as its digits, coordinates as numbers.
    details = {"asn": 3215, "region_code": 75, "city": 7.5, "latitude": 48.85, "longitude": "2.35"}
    fits[2]["actor"]["session"]["ip_address_details"] = details
    server.sim.insert(bad + fits)

    summary = sync_once(server, db_url, caplog)
    assert summary.status == "ok" and summary.events_new == 200 + len(bad) + len(fits)
    expected = Counter(e["type"] for e in bad)
    assert summary.mismatches == expected
    assert scalar(db_url, "SELECT mismatches FROM sync_runs") == len(bad)
    warnings = mismatch_warnings(caplog)
    assert len(warnings) == len(expected) and all(sum(f" {t} " in w for w in warnings) == 1 for t in expected)

    stored = stored_events(db_url)
    for event in bad + fits:
        assert stored[event["id"]] == event  # the JSON in full, as served

    def rows(sql: str) -> list[tuple]:
        warehouse = Warehouse(db_url)
        try:
            with warehouse.connect() as conn:
                return [tuple(r) for r in conn.execute(sa.text(sql))]
        finally:
            warehouse.dispose()

    staged_ids = "event_id LIKE 'staged-%'"
    assert rows(f"SELECT event_id, api_key_id FROM api_key_events WHERE {staged_ids} ORDER BY 1") == [
        ("staged-bad-1", "key_1"), ("staged-bad-2", "key_2"), ("staged-ok-2", "key_3"),
    ]  # fmt: skip
    assert rows(f"SELECT event_id, position, scope FROM api_key_event_scopes WHERE {staged_ids} ORDER BY 1, 2") == [
        ("staged-bad-2", 0, "a"), ("staged-bad-2", 1, None), ("staged-bad-2", 2, None), ("staged-ok-2", 0, "x"),
    ]  # fmt: skip
    assert rows(
        "SELECT event_id, rate_limit_id, max_requests_per_1_minute, max_tokens_per_1_minute, max_requests_per_1_day"
        f" FROM rate_limit_events WHERE {staged_ids} ORDER BY 1"
    ) == [("staged-bad-3", "rl-1", None, 5000, None), ("staged-ok-1", "rl-2", None, None, None)]
    assert rows(f"SELECT invite_id, email, role FROM invite_events WHERE {staged_ids}") == [("invite-1", None, None)]
    assert rows(f"SELECT bound_resource_id, role_id, enabled FROM role_binding_events WHERE {staged_ids}") == [
        ("ws__c", "role_1", None)
    ]
    assert rows(f"SELECT position, certificate_id, name FROM certificate_event_certificates WHERE {staged_ids} ORDER BY 1") == [
        (0, "cert_1", None), (1, None, None),
    ]  # fmt: skip
    assert rows(f"SELECT event_id, error_code, error_message FROM login_events WHERE {staged_ids} ORDER BY 1") == [
        ("staged-bad-7", None, None), ("staged-ok-3", None, None),
    ]  # fmt: skip
    assert rows(f"SELECT external_key_id, data FROM external_key_events WHERE {staged_ids}") == [("ekey_1", None)]
    assert rows("SELECT resource_id, payload FROM audit_events WHERE id = 'staged-bad-7'") == [(None, "wrong password")]
    assert rows(
        "SELECT ip_asn, ip_region_code, ip_city, ip_latitude, ip_longitude FROM audit_events WHERE id = 'staged-ok-3'"
    ) == [("3215", "75", None, 48.85, 2.35)]

    # A later run counts its own mismatches; the warning for a type already reported is not repeated.
    server.sim.insert([staged("bad-9", "api_key.created", {"id": "key_9", "data": {"scopes": 1}}, int(time.time()))])
    summary = sync_once(server, db_url, caplog)
    assert summary.events_new == 1 and summary.mismatches == Counter({"api_key.created": 1})
    assert mismatch_warnings(caplog) == []
    assert rows("SELECT api_key_id FROM api_key_events WHERE event_id = 'staged-bad-9'") == [("key_9",)]


# ---------------------------------------------------------------------------------------- documentation

DOC = Path(__file__).parents[1] / "docs" / "schema.md"
DOC_TYPES = (
    (sa.JSON, "json"), (sa.Double, "double"), (sa.Float, "float"), (sa.BigInteger, "bigint"),
    (sa.Integer, "integer"), (sa.Boolean, "boolean"), (sa.DateTime, "timestamp"), (sa.Text, "text"),
)  # fmt: skip


def doc_type(column: sa.Column) -> str:
    return next(name for cls, name in DOC_TYPES if isinstance(column.type, cls))


def test_schema_document_describes_every_table_and_column():
    text = DOC.read_text()
    documented = {}
    for name, body in re.findall(r"^#### `(\w+)`\n(.*?)(?=^#|\Z)", text, re.S | re.M):
        documented[name] = re.findall(r"^\| `(\w+)` \| (\w+) \|", body, re.M)
    assert set(documented) == set(model.metadata.tables)
    for table in model.metadata.tables.values():
        assert documented[table.name] == [(c.name, doc_type(c)) for c in table.columns], table.name

    drawn: dict[str, list[tuple[str, str]]] = {}
    for diagram in re.findall(r"```mermaid\n(.*?)```", text, re.S):
        for name, body in re.findall(r"^    (\w+) \{\n(.*?)^    \}", diagram, re.S | re.M):
            drawn.setdefault(name, []).extend(re.findall(r"^        (\w+) (\w+)", body, re.M))
    assert set(drawn) == set(model.metadata.tables)
    for table in model.metadata.tables.values():
        assert set(drawn[table.name]) == {(doc_type(c), c.name) for c in table.columns}, table.name

    readme = (
        (DOC.parents[1] / "README.md").read_text().split("## Typed tables and ready queries", 1)[1].split("\n## ")[0]
    )
    assert set(re.findall(r"`(\w+_events)`", readme)) - {"audit_events"} == {f.table for f in model.FAMILIES}
