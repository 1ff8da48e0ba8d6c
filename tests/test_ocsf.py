"""OCSF: every event the simulator generates, stored and read back from the committed-batch log, maps to a
valid event of its class under the official OCSF 1.5.0 schema (the OCSF server's export, shipped by the
`ocsf-json-schema` package, which derives each class's JSON Schema from it), with the class, activity and
status its type calls for."""

from __future__ import annotations

import functools
import json

import orjson
import pytest
import soc_support
from jsonschema import Draft202012Validator
from ocsf_json_schema import OcsfJsonSchemaEmbedded, get_ocsf_schema

from ingest import ocsf
from ingest.simulator import event_types_in_spec


@functools.cache
def validator(class_uid: int) -> Draft202012Validator:
    schema = OcsfJsonSchemaEmbedded(get_ocsf_schema(version=ocsf.VERSION))
    name = schema.lookup_class_name_from_uid(class_uid=class_uid)
    class_schema = schema.get_class_schema(class_name=name, profiles=ocsf.PROFILES)
    return Draft202012Validator(class_schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


def problems(event: dict) -> list[str]:
    return [
        f"{'.'.join(map(str, e.path))}: {e.message[:200]}" for e in validator(event["class_uid"]).iter_errors(event)
    ]


@pytest.fixture(scope="module")
def every_type(tmp_path_factory) -> list[dict]:
    return soc_support.every_type(f"duckdb:///{tmp_path_factory.mktemp('ocsf')}/w.duckdb")


def test_every_type_the_simulator_generates_is_a_valid_event_of_its_ocsf_class(every_type):
    types = {e["type"] for e in every_type}
    assert set(event_types_in_spec()) <= types and len(types) > len(event_types_in_spec())  # invented ones too
    invalid = {}
    for event in every_type:
        mapped = ocsf.to_ocsf(event)
        if found := problems(mapped):
            invalid.setdefault(event["type"], found[0])
    assert invalid == {}
    classes = {ocsf.to_ocsf(e)["class_uid"] for e in every_type}
    assert classes == {3001, 3002, 3004, 3005, 3006, 6003}


def test_each_ocsf_event_carries_the_event_id_time_actor_source_and_the_event_as_served(every_type):
    for event in every_type:
        mapped = ocsf.to_ocsf(event)
        assert mapped["metadata"]["uid"] == event["id"] and mapped["metadata"]["version"] == "1.5.0"
        assert mapped["metadata"]["product"]["vendor_name"] == "OpenAI"
        assert mapped["time"] == event["effective_at"] * 1000
        assert mapped["type_uid"] == mapped["class_uid"] * 100 + mapped["activity_id"]
        assert orjson.loads(mapped["raw_data"]) == event
        assert mapped["api"]["operation"] == event["type"]
        session = (event.get("actor") or {}).get("session") or {}
        if session.get("ip_address"):
            assert mapped["src_endpoint"]["ip"] == session["ip_address"]
            assert mapped.get("http_request", {}).get("user_agent") == session.get("user_agent")
            if details := session.get("ip_address_details"):
                assert mapped["src_endpoint"]["location"]["city"] == details["city"]
                assert mapped["src_endpoint"]["location"]["coordinates"] == [
                    float(details["longitude"]), float(details["latitude"])]  # fmt: skip
        key = (event.get("actor") or {}).get("api_key") or {}
        if key.get("service_account"):
            assert mapped["actor"]["user"]["uid"] == key["service_account"]["id"]
            assert mapped["actor"]["user"]["credential_uid"] == key["id"]


@pytest.mark.parametrize(
    ("event_type", "class_uid", "activity_id"),
    [
        ("login.succeeded", 3002, 1), ("login.failed", 3002, 1), ("logout.succeeded", 3002, 2),
        ("user.added", 3001, 1), ("user.deleted", 3001, 6), ("invite.sent", 3001, 1), ("tenant.user.invited", 3001, 1),
        ("role.assignment.created", 3005, 1), ("role.assignment.deleted", 3005, 2),
        ("role.bound_to_resource", 3005, 1), ("role.unbound_from_resource", 3005, 2),
        ("group.created", 3006, 6), ("group.deleted", 3006, 5), ("tenant.group.member.added", 3006, 3),
        ("api_key.created", 3004, 1), ("service_account.deleted", 3004, 4), ("project.archived", 3004, 4),
        ("certificates.activated", 3004, 3), ("ip_allowlist.updated", 3004, 3), ("organization.updated", 3004, 3),
        ("rate_limit.deleted", 3004, 4), ("role.created", 6003, 1), ("tenant.sso_connection.updated", 6003, 3),
        ("never.heard.of", 6003, 99),
    ],
)  # fmt: skip
def test_a_type_maps_to_the_class_and_activity_of_its_family(event_type, class_uid, activity_id):
    event = {"id": "audit_log-1", "type": event_type, "effective_at": 1_800_000_000, event_type: {"id": "x_1"},
             "actor": {"type": "session", "session": {"user": {"id": "user-1", "email": "a@example.com"},
                                                      "ip_address": "192.0.2.1", "user_agent": "curl/8"}}}  # fmt: skip
    mapped = ocsf.to_ocsf(event)
    assert (mapped["class_uid"], mapped["activity_id"]) == (class_uid, activity_id)
    assert problems(mapped) == []


def test_a_failed_login_has_status_failure_and_its_error_and_payload_leftovers_are_kept(every_type):
    failed = next(e for e in every_type if e["type"] == "login.failed")
    mapped = ocsf.to_ocsf(failed)
    assert mapped["status_id"] == 2 and mapped["user"]["uid"] == failed["actor"]["session"]["user"]["id"]
    ok = ocsf.to_ocsf(next(e for e in every_type if e["type"] == "login.succeeded"))
    assert ok["status_id"] == 1
    created = next(
        e
        for e in every_type
        if e["type"] == "role.assignment.created" and "principal_id" in e[e["type"]] and "resource_id" in e[e["type"]]
    )
    mapped = ocsf.to_ocsf(created)
    assert mapped["user"]["uid"] == created["role.assignment.created"]["principal_id"]
    assert mapped["unmapped"]["payload"]["resource_id"] == created["role.assignment.created"]["resource_id"]


@pytest.mark.parametrize("event", soc_support.HOSTILE, ids=[e["id"] for e in soc_support.HOSTILE])
def test_odd_events_the_warehouse_keeps_still_map_to_valid_ocsf_and_encode(event):
    from ingest.formats import encoder

    mapped = ocsf.to_ocsf(event)
    assert problems(mapped) == [] and mapped["metadata"]["uid"] == event["id"]
    assert json.loads(mapped["raw_data"]) == event  # json: integers beyond 64 bits
    for fmt in ("raw", "ocsf", "ecs"):
        assert encoder(fmt)(event).startswith(b"{")
