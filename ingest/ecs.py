"""Elastic Common Schema (9.4) documents from audit events: category and type by family (ingest.mapping),
declared as data below.

Unlike Elastic's own pipeline for this API (every event `iam`/`change`, no outcome), logins are
`authentication` with `event.outcome`, and users, groups and role assignments say which user or group
changed (`user.target`, `group`). The acting user is `user.*`, an acting service account `service.id` (as
Elastic's pipeline has it). `event.id` is the event id, so receivers can drop repeats; `event.original` is
the event as served; fields ECS has no place for sit under `openai.audit`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ingest import mapping, model

VERSION = "9.4.0"


@dataclass(frozen=True)
class EcsFamily:
    category: str
    types: tuple[str, ...]  # event.type values every event of the family has
    kinds: dict[str, str]  # mapping.KINDS kind -> one more event.type value


_CHANGES = {"create": "creation", "delete": "deletion", "update": "change", "read": "info", "other": "change"}
FAMILIES: dict[str, EcsFamily] = {
    "authentication": EcsFamily("authentication", (), {}),  # start/end: below, from the prefix
    "account": EcsFamily("iam", ("user",), _CHANGES),
    "user_access": EcsFamily("iam", ("user", "change"), {}),
    "group": EcsFamily("iam", ("group",), _CHANGES),
    "entity": EcsFamily("configuration", (), _CHANGES),
    "activity": EcsFamily("configuration", (), _CHANGES),
}
# Entities that are credentials or identities: IAM rather than configuration.
IAM_ENTITIES = frozenset({"API Key", "Service Account"})
_SESSION_EDGES = {"login": "start", "logout": "end"}


def to_ecs(event: dict) -> dict:
    """The ECS document of an audit event as served."""
    f = mapping.facts(event)
    family = FAMILIES[f.rule.family]
    category = "iam" if f.rule.entity_type in IAM_ENTITIES else family.category
    types = list(family.types)
    if f.rule.family == "authentication":
        types.append(_SESSION_EDGES.get(str(event.get("type", "")).split(".", 1)[0], "info"))
    elif kind := family.kinds.get(f.kind):
        types.append(kind)
    doc: dict[str, Any] = {
        "@timestamp": datetime.fromtimestamp(int(event.get("effective_at") or 0), UTC).isoformat().replace("+00:00", "Z"),
        "ecs": {"version": VERSION},
        "event": {"id": str(event.get("id")), "action": str(event.get("type")), "kind": "event",
                  "category": [category], "type": types, "provider": "openai", "module": "openai",
                  "dataset": "openai.audit_logs", "original": model.dumps(event)},
        "cloud": {"provider": "openai"},
    }  # fmt: skip
    if f.rule.family == "authentication":
        doc["event"]["outcome"] = "failure" if f.failed else "success"
        if f.failed and (reason := f.payload.get("error_message") or f.payload.get("error_code")):
            doc["event"]["reason"] = str(reason)
    project = event.get("project")
    if isinstance(project, dict) and project.get("id"):
        doc["cloud"]["project"] = {k: str(project[k]) for k in ("id", "name") if project.get(k)}
    related_users: list[str] = []
    if f.user:
        doc["user"] = {"id": f.user.get("id"), "email": f.user.get("email"), "name": f.user.get("email")}
        related_users += f.user.values()
    if f.service_account_id:
        doc["service"] = {"id": f.service_account_id}
        related_users.append(f.service_account_id)
    _subject(doc, f, related_users)
    _session(doc, f)
    if related_users:
        doc.setdefault("related", {})["user"] = sorted(set(related_users))
    doc = _prune(doc)
    audit = {
        "actor_type": f.actor_type,
        "api_key_id": f.api_key_id,
        "ja4": mapping.string(f.session.get("ja4")),
        "payload": event.get(str(event.get("type"))),
    }  # fmt: skip; the payload as served
    doc["openai"] = {"audit": {k: v for k, v in audit.items() if v is not None}}
    return doc


def _subject(doc: dict, f: mapping.Facts, related_users: list[str]) -> None:
    found = {k: v for k, v in f.subject().items() if isinstance(v, str)}
    if f.rule.family in ("account", "user_access"):
        target = {"id": found.get("uid"), "email": found.get("email_addr"), "name": found.get("name")}
        if any(target.values()):
            doc.setdefault("user", {})["target"] = target
            related_users += [v for v in target.values() if v]
    elif f.rule.family == "group":
        doc["group"] = {"id": found.get("uid"), "name": found.get("name")}


def _session(doc: dict, f: mapping.Facts) -> None:
    ip = mapping.string(f.session.get("ip_address"))
    if ip:
        d = f.ip_details
        geo = {"city_name": d.get("city"), "country_iso_code": d.get("country"), "region_name": d.get("region"),
               "region_iso_code": f"{d['country']}-{d['region_code']}" if d.get("country") and d.get("region_code")
               else None}  # fmt: skip
        lat, lon = mapping.number(d.get("latitude")), mapping.number(d.get("longitude"))
        if lat is not None and lon is not None:
            geo["location"] = {"lat": lat, "lon": lon}
        doc["source"] = {"ip": ip, "geo": {k: (str(v) if k != "location" else v) for k, v in geo.items() if v}}
        if (asn := mapping.number(d.get("asn"))) is not None:
            doc["source"]["as"] = {"number": int(asn)}
        doc["related"] = {"ip": [ip]}
    if agent := mapping.string(f.session.get("user_agent")):
        doc["user_agent"] = {"original": agent}
    if ja3 := mapping.string(f.session.get("ja3")):
        doc["tls"] = {"client": {"ja3": ja3}}


def _prune(value: Any) -> Any:
    """Without empty values: ECS documents leave absent fields out."""
    if isinstance(value, dict):
        pruned = {k: _prune(v) for k, v in value.items()}
        return {k: v for k, v in pruned.items() if v not in (None, "", {}, [])}
    return value
