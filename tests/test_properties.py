"""Property: any event the spec's schema allows (strings of any NUL-free unicode, quotes, backslashes, SQL
fragments; integers beyond 64 bits; unknown types and fields) goes through the real path (the page
parser, `normalise`, `save_batch`) and comes back exactly: `raw` equal to what was served, typed columns
equal to the values in it."""

from __future__ import annotations

import itertools
import json
import string
from collections.abc import Iterator
from decimal import Decimal

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest import api, model, store
from ingest.simulator import load_spec
from ingest.store import Warehouse

SCHEMAS = load_spec()["components"]["schemas"]
HOSTILE = [
    "'; DROP TABLE audit_events; --", "Robert'); DELETE FROM users WHERE ('1'='1", "' OR 1=1 --", '" OR ""="',
    "back\\slash \\\\ \\n \\u0000 literally", "\\", "\"'`", "$1 $$ dollar $$", "%s %(x)s {0} ?", ":name",
    "𝕳𝖊𝖑𝖑𝖔 🚀👩‍💻🇫🇷", "שלום \u202eevil\u202c", "Z\u0351a\u0310l\u0346g\u0350o", "line\u2028sep\u2029",
    "tab\tnl\ncr\r", "\x01\x07\x1b[31m\x7f", "\ufeffBOM", "null", "", " ", "ß" * 300,
]  # fmt: skip
TEXT = st.one_of(
    st.sampled_from(HOSTILE),
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40),
)
SCALAR = st.one_of(
    TEXT, st.booleans(), st.none(), st.integers(-(2**63), 2**63 - 1), st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
)  # fmt: skip
FREE_FORM = st.recursive(
    SCALAR, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3), max_leaves=8
)


def from_schema(schema: dict) -> st.SearchStrategy:
    """Values the OpenAPI schema allows, and now and then a value of another type (which must still land)."""
    if "$ref" in schema:
        return from_schema(SCHEMAS[schema["$ref"].rsplit("/", 1)[1]])
    if "anyOf" in schema:
        return st.one_of([from_schema(s) for s in schema["anyOf"]])
    kind = schema.get("type")
    if kind == "object":
        properties = schema.get("properties")
        if not properties:
            return st.dictionaries(TEXT, FREE_FORM, max_size=3)
        return st.fixed_dictionaries({}, optional={k: from_schema(v) for k, v in properties.items()})
    if kind == "array":
        return st.lists(from_schema(schema.get("items", {})), max_size=4) | SCALAR
    leaf = {
        "string": st.sampled_from(schema["enum"]) if "enum" in schema else TEXT,
        "integer": st.integers(-(2**63), 2**63 - 1) | st.integers(),
        "boolean": st.booleans(),
        "null": st.none(),
    }.get(kind, FREE_FORM)
    return leaf | SCALAR


EVENT_TYPES = [*SCHEMAS["AuditLogEventType"]["enum"], "external_storage.registered", "never.seen.before"]
PROPERTIES = SCHEMAS["AuditLog"]["properties"]


@st.composite
def events(draw) -> dict:
    event_type = draw(st.sampled_from(EVENT_TYPES))
    event = {
        "id": draw(st.sampled_from(["audit_log-", "'; --", "ü\\"]) | TEXT) + f"#{next(_ids)}",  # unique per example
        "type": event_type,
        "effective_at": draw(st.integers(-62_135_596_800, 253_402_300_799)),
    }
    for name in ("project", "actor"):
        if draw(st.booleans()):
            event[name] = draw(from_schema(PROPERTIES[name]))
    payload = PROPERTIES.get(event_type)
    if draw(st.integers(0, 9)) > 0:  # the payload is optional too
        event[event_type] = draw(from_schema(payload) if payload else st.dictionaries(TEXT, FREE_FORM, max_size=3))
    event.update(draw(st.dictionaries(st.sampled_from(["extra", "ünknown", "x'y"]), FREE_FORM, max_size=2)))
    return event


_ids = itertools.count()


@pytest.fixture(scope="module", params=["duckdb", "postgresql"])
def warehouse(request, tmp_path_factory) -> Iterator[Warehouse]:
    if request.param == "duckdb":
        url = f"duckdb:///{tmp_path_factory.mktemp('properties') / 'w.duckdb'}"
    else:
        database, admin = request.getfixturevalue("pg_database")
        admin("DROP SCHEMA IF EXISTS properties CASCADE; CREATE SCHEMA properties")
        url = database.update_query_dict({"options": "-csearch_path=properties"}).render_as_string(False)
    warehouse = Warehouse(url)
    warehouse.ensure_schema()
    yield warehouse
    warehouse.dispose()


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(batch=st.lists(events(), min_size=1, max_size=4), ascii_only=st.booleans())
def test_generated_events_round_trip_exactly(warehouse, batch, ascii_only):
    body = json.dumps({"object": "list", "data": batch, "has_more": False}, ensure_ascii=ascii_only).encode()
    page = api.parse_page(body)
    assert page.rejected == [] and page.events == batch
    staged = store.stage(warehouse.dialect, model.normalise(page.events, "default", store.now()))
    with warehouse.connect() as conn:
        with conn.begin():
            new = store.save_batch(conn, staged)
        assert new == {e["id"] for e in batch}
        with conn.begin():
            assert store.save_batch(conn, staged) == set()  # a replay adds nothing (check_stored: one row each)
        for event in batch:
            check_stored(conn, event)


def check_stored(conn: sa.Connection, event: dict) -> None:
    events = model.audit_events
    row = conn.execute(sa.select(events).where(events.c.id == event["id"])).mappings().one()
    assert as_json(row["raw"]) == decimals(event)
    assert row["type"] == event["type"] and row["effective_at"] == model.to_datetime(event["effective_at"])
    project = event.get("project") if isinstance(event.get("project"), dict) else {}
    assert row["project_id"] == text_or_none(project.get("id"))
    assert row["project_name"] == text_or_none(project.get("name"))
    actor = event.get("actor") if isinstance(event.get("actor"), dict) else {}
    assert row["actor_type"] == text_or_none(actor.get("type"))
    payload = event.get(event["type"])
    assert (None if row["payload"] is None else as_json(row["payload"])) == decimals(payload)
    family = model.FAMILY_OF_TYPE.get(event["type"])
    if family is not None:
        check_typed(conn, family, event["id"], payload)


def check_typed(conn: sa.Connection, family: model.Family, event_id: str, payload: object) -> None:
    """The oracle: each declared field, looked up by the documented rule, typed as declared or NULL."""
    tables = {t.name: t for t in model.TYPED_TABLES}
    table = tables[family.table]
    row = conn.execute(sa.select(table).where(table.c.event_id == event_id)).mappings().one()
    payload = payload if isinstance(payload, dict) else {}
    scopes = [payload] + [
        payload[k]
        for k in model.WRAPPERS
        if isinstance(payload.get(k), dict) and not any(c.field == k and c.type == "object" for c in family.columns)
    ]

    def lookup(name: str) -> object:
        return next((scope[name] for scope in scopes if name in scope), None)

    for col in family.columns:
        stored, expected = row[col.name], typed(lookup(col.field), col.type)
        if col.type == "object":
            stored, expected = None if stored is None else as_json(stored), decimals(expected)
        assert stored == expected, col.name
    for lst in family.lists:
        child = tables[lst.table]
        rows = conn.execute(sa.select(child).where(child.c.event_id == event_id).order_by(child.c.position)).mappings()
        items = lookup(lst.field)
        items = items if isinstance(items, list) else []
        if lst.value:
            assert [r[lst.value] for r in rows] == [typed(i, "str") for i in items]
        else:
            expected = [{c.name: typed(i.get(c.field), c.type) if isinstance(i, dict) else None for c in lst.columns}
                        for i in items]  # fmt: skip
            assert [{c.name: r[c.name] for c in lst.columns} for r in rows] == expected


def typed(value: object, kind: str) -> object:
    fits = {
        "str": isinstance(value, str),
        "int": isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63,
        "bool": isinstance(value, bool),
        "object": isinstance(value, dict),
    }[kind]
    return value if fits else None


def text_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


def as_json(value: object) -> object:
    """Stored JSON as a value, numbers by their decimal value: PostgreSQL's jsonb keeps a number exactly but
    spells it its own way (1e308 comes back as 1000...0), which Python would read as an int, not a float."""
    return decimals(json.loads(value) if isinstance(value, str) else value)


def decimals(value: object) -> object:
    if isinstance(value, dict):
        return {k: decimals(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decimals(v) for v in value]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    return value


def test_hostile_strings_are_stored_verbatim_in_text_columns(warehouse):
    """The same strings, straight into typed text columns and the dimension tables, read back unchanged."""
    batch = [
        {"id": f"hostile-{i}-{text}", "type": "project.created", "effective_at": 1_700_000_000 + i,
         "project": {"id": f"proj_{i}", "name": text},
         "actor": {"type": "session", "session": {"user": {"id": f"user_{i}", "email": text}, "user_agent": text}},
         "project.created": {"id": f"proj_{i}", "name": text, "title": text}}
        for i, text in enumerate(HOSTILE + list(string.punctuation))
    ]  # fmt: skip
    page = api.parse_page(json.dumps({"object": "list", "data": batch, "has_more": False}).encode())
    with warehouse.connect() as conn:
        with conn.begin():
            store.save_batch(conn, model.normalise(page.events, "default", store.now()))
        for event in batch:
            text = event["project"]["name"]
            e = model.audit_events
            row = conn.execute(
                sa.select(e.c.project_name, e.c.actor_email, e.c.user_agent).where(e.c.id == event["id"])
            )
            assert tuple(row.one()) == (text, text, text)
            users = model.users
            assert (
                conn.execute(
                    sa.select(users.c.email).where(users.c.id == event["actor"]["session"]["user"]["id"])
                ).scalar()
                == text
            )
            check_stored(conn, event)
