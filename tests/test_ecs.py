"""ECS: every event the simulator generates, read back from the committed-batch log, maps to a document whose
every field (outside the custom `openai.*` set) is an ECS 9.4 field of the right type, with allowed values
for the categorisation fields. The field list is ECS's own (tests/data/ecs_fields_9.4.0.json, derived from
elastic/ecs v9.4.0 generated/ecs/ecs_flat.yml: names, types, array normalisation, allowed values)."""

from __future__ import annotations

import ipaddress
import json
from datetime import datetime
from pathlib import Path

import orjson
import pytest
import soc_support

from ingest import ecs

SCHEMA = json.loads((Path(__file__).parent / "data" / "ecs_fields_9.4.0.json").read_text())
FIELDS = SCHEMA["fields"]
CHECKS = {
    "keyword": lambda v: isinstance(v, str),
    "long": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "ip": lambda v: bool(ipaddress.ip_address(v)),
    "date": lambda v: bool(datetime.fromisoformat(v)),
    "geo_point": lambda v: set(v) == {"lat", "lon"} and all(isinstance(x, float) for x in v.values()),
    "match_only_text": lambda v: isinstance(v, str),
    "wildcard": lambda v: isinstance(v, str),
}


def leaves(doc: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in doc.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and FIELDS.get(name, {}).get("type") != "geo_point":
            out.update(leaves(value, name + "."))
        else:
            out[name] = value
    return out


def problems(doc: dict) -> list[str]:
    found = []
    for name, value in leaves({k: v for k, v in doc.items() if k != "openai"}).items():
        field = FIELDS.get(name)
        if field is None:
            found.append(f"{name}: not an ECS field")
            continue
        values = value if isinstance(value, list) else [value]
        if isinstance(value, list) and not field.get("array"):
            found.append(f"{name}: a list")
        if not all(CHECKS[field["type"]](v) for v in values):
            found.append(f"{name}: not a {field['type']}: {value!r}")
        if "allowed" in field and not set(values) <= set(field["allowed"]):
            found.append(f"{name}: {value!r} not allowed")
    expected = {t for c in doc["event"]["category"] for t in FIELDS["event.category"]["allowed"][c] or ()}
    if not set(doc["event"]["type"]) <= expected:
        found.append(f"event.type {doc['event']['type']} not expected for {doc['event']['category']}")
    return found


@pytest.fixture(scope="module")
def every_type(tmp_path_factory) -> list[dict]:
    return soc_support.every_type(f"duckdb:///{tmp_path_factory.mktemp('ecs')}/w.duckdb")


def test_every_type_the_simulator_generates_maps_to_valid_ecs_fields(every_type):
    invalid = {}
    for event in every_type:
        if found := problems(ecs.to_ecs(event)):
            invalid.setdefault(event["type"], found)
    assert invalid == {}
    assert {c for e in every_type for c in ecs.to_ecs(e)["event"]["category"]} == {
        "authentication", "iam", "configuration"}  # fmt: skip


def test_each_ecs_document_carries_the_event_id_action_source_user_and_the_event_as_served(every_type):
    for event in every_type:
        doc = ecs.to_ecs(event)
        assert doc["event"]["id"] == event["id"] and doc["event"]["action"] == event["type"]
        assert orjson.loads(doc["event"]["original"]) == event
        assert datetime.fromisoformat(doc["@timestamp"]).timestamp() == event["effective_at"]
        actor = event.get("actor") or {}
        session = actor.get("session") or {}
        user = session.get("user") or (actor.get("api_key") or {}).get("user") or {}
        assert doc.get("user", {}).get("id") == user.get("id")
        assert doc.get("source", {}).get("ip") == session.get("ip_address")
        assert doc.get("user_agent", {}).get("original") == session.get("user_agent")
        assert doc.get("tls", {}).get("client", {}).get("ja3") == session.get("ja3")
        if details := session.get("ip_address_details"):
            geo = doc["source"]["geo"]
            assert (geo["city_name"], geo["country_iso_code"]) == (details["city"], details["country"])
            assert geo["location"] == {"lat": float(details["latitude"]), "lon": float(details["longitude"])}
        account = ((actor.get("api_key") or {}).get("service_account") or {}).get("id")
        assert doc.get("service", {}).get("id") == account


def test_logins_have_an_outcome_and_changes_say_what_changed(every_type):
    def first(event_type: str) -> dict:
        return ecs.to_ecs(next(e for e in every_type if e["type"] == event_type))

    failed, ok, out = first("login.failed"), first("login.succeeded"), first("logout.succeeded")
    assert (failed["event"]["category"], failed["event"]["type"], failed["event"]["outcome"]) == (
        ["authentication"], ["start"], "failure")  # fmt: skip
    assert ok["event"]["outcome"] == "success" and out["event"]["type"] == ["end"]
    added = next(e for e in every_type if e["type"] == "user.added" and e["user.added"].get("id"))
    doc = ecs.to_ecs(added)
    assert doc["event"]["category"] == ["iam"] and doc["event"]["type"] == ["user", "creation"]
    assert (
        doc["user"]["target"]["id"] == added["user.added"]["id"] and added["user.added"]["id"] in doc["related"]["user"]
    )
    assert "outcome" not in doc["event"]
    group = first("group.deleted")
    assert group["event"]["type"] == ["group", "deletion"] and group["group"]["id"].startswith("group")
    assert first("api_key.created")["event"]["category"] == ["iam"]
    assert first("project.created")["event"]["category"] == ["configuration"]


@pytest.mark.parametrize("event", soc_support.HOSTILE, ids=[e["id"] for e in soc_support.HOSTILE])
def test_odd_events_the_warehouse_keeps_still_map_to_valid_ecs_fields(event):
    doc = ecs.to_ecs(event)
    assert problems(doc) == [] and doc["event"]["id"] == event["id"]
