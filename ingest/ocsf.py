"""OCSF 1.5.0 events from audit events: one class per family (ingest.mapping), declared as data below.

1.5.0: the first 1.x whose IAM classes all carry `actor`, `src_endpoint` and `http_request`; `api` (which
carries the event type) and `cloud` (OpenAI, the project) come with the `cloud` profile. Every event carries the
event id (`metadata.uid`) so receivers can drop repeats, the type (`api.operation`, `metadata.event_code`),
the event as served (`raw_data`), and the payload fields its class has no place for (`unmapped`).
tests/test_ocsf.py validates every type the simulator generates against the official schema of its class.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ingest import mapping, model

VERSION = "1.5.0"
PROFILES = ["cloud"]
PRODUCT = {"name": "OpenAI Audit Logs", "vendor_name": "OpenAI"}

_CRUD = {verb: {"create": 1, "read": 2, "update": 3, "delete": 4}[kind] for verb, kind in mapping.KINDS.items()}


@dataclass(frozen=True)
class OcsfClass:
    uid: int
    name: str
    category_uid: int
    category_name: str
    activities: dict[str, int]  # verb -> activity_id; any other verb is 99 Other
    names: dict[int, str]  # activity_id -> activity_name
    subject: str | None  # the class's object for the event's subject: user | group | entity
    fixed: dict = field(default_factory=dict)  # attributes every event of the class has


_IAM, _APP = (3, "Identity & Access Management"), (6, "Application Activity")
CLASSES: dict[str, OcsfClass] = {
    "authentication": OcsfClass(3002, "Authentication", *_IAM, {"login": 1, "logout": 2},
                                {1: "Logon", 2: "Logoff"}, "user", {"service": {"name": "OpenAI"}}),
    "account": OcsfClass(3001, "Account Change", *_IAM,
                         {"added": 1, "created": 1, "sent": 1, "invited": 1, "upserted": 1, "accepted": 2,
                          "enabled": 2, "disabled": 5, "deleted": 6, "removed": 6, "revoked": 6},
                         {1: "Create", 2: "Enable", 5: "Disable", 6: "Delete"}, "user"),
    "user_access": OcsfClass(3005, "User Access Management", *_IAM,
                             {"created": 1, "bound_to_resource": 1, "deleted": 2, "unbound_from_resource": 2},
                             {1: "Assign Privileges", 2: "Revoke Privileges"}, "user"),
    "group": OcsfClass(3006, "Group Management", *_IAM, {"created": 6, "deleted": 5, "added": 3, "removed": 4},
                       {3: "Add User", 4: "Remove User", 5: "Delete", 6: "Create"}, "group"),
    "entity": OcsfClass(3004, "Entity Management", *_IAM, _CRUD,
                        {1: "Create", 2: "Read", 3: "Update", 4: "Delete"}, "entity"),
    "activity": OcsfClass(6003, "API Activity", *_APP, _CRUD,
                          {1: "Create", 2: "Read", 3: "Update", 4: "Delete"}, None),
}  # fmt: skip

_USER_TYPES = {"user": (1, "User"), "service_account": (99, "Service Account")}
_UNKNOWN = {"name": "unknown"}  # a required object the event has nothing for


def class_of(event_type: str) -> OcsfClass:
    return CLASSES[mapping.rule_of(event_type).family]


def to_ocsf(event: dict) -> dict:
    """The OCSF event of an audit event as served."""
    f = mapping.facts(event)
    cls = CLASSES[f.rule.family]
    # The verb's activity; Authentication's is its prefix (login/logout), its verb the outcome.
    head = str(event.get("type", "")).split(".", 1)[0]
    activity = cls.activities.get(head if f.rule.family == "authentication" else f.verb, 99)
    out: dict[str, Any] = {
        "class_uid": cls.uid, "class_name": cls.name, "category_uid": cls.category_uid,
        "category_name": cls.category_name, "activity_id": activity,
        "activity_name": cls.names.get(activity, f.verb), "type_uid": cls.uid * 100 + activity,
        "type_name": f"{cls.name}: {cls.names.get(activity, 'Other')}",
        "time": int(event.get("effective_at") or 0) * 1000, "severity_id": 1, "severity": "Informational",
        "status_id": 2 if f.failed else 1, "status": "Failure" if f.failed else "Success",
        "metadata": {"uid": str(event.get("id")), "version": VERSION, "product": PRODUCT,
                     "event_code": str(event.get("type")), "log_name": "audit_logs", "profiles": PROFILES},
        "cloud": _cloud(event),
        "api": {"operation": str(event.get("type")), "service": {"name": "OpenAI"}},
        "actor": _actor(f),
        "raw_data": model.dumps(event),
        **cls.fixed,
    }  # fmt: skip
    if f.failed:
        out["status_detail"] = _text(f.payload.get("error_message") or f.payload.get("error_code"))
        out["status_code"] = _text(f.payload.get("error_code"))
        f.used.update(("error_code", "error_message"))
    endpoint = _src_endpoint(f)
    if endpoint or cls.uid == 6003:  # API Activity requires it
        out["src_endpoint"] = endpoint or _UNKNOWN
    if user_agent := mapping.string(f.session.get("user_agent")):
        out["http_request"] = {"user_agent": user_agent}
    _subject(out, f, cls)
    unmapped = _unmapped(f, event)
    if unmapped:
        out["unmapped"] = unmapped
    return {k: v for k, v in out.items() if v is not None}


def _actor(f: mapping.Facts) -> dict:
    user: dict[str, Any] = {}
    if f.service_account_id:
        user = {"uid": f.service_account_id, "type_id": 99, "type": "Service Account"}
    elif f.user:
        email = f.user.get("email")
        user = {"uid": f.user.get("id"), "name": email, "email_addr": _email(email), "type_id": 1, "type": "User"}
        user = {k: v for k, v in user.items() if v} or {"name": "unknown"}
    if f.api_key_id:
        user = {**(user or {"name": "unknown"}), "credential_uid": f.api_key_id}
    return {"user": user or {"name": "unknown", "type_id": 0}}


def _cloud(event: dict) -> dict:
    project = event.get("project")
    project_id = mapping.string(project.get("id")) if isinstance(project, dict) else None
    return {"provider": "OpenAI", "project_uid": project_id} if project_id else {"provider": "OpenAI"}


def _src_endpoint(f: mapping.Facts) -> dict | None:
    ip = mapping.string(f.session.get("ip_address"))
    if not ip:
        return None
    endpoint: dict[str, Any] = {"ip": ip}
    d = f.ip_details
    location: dict[str, Any] = {"city": _text(d.get("city")), "country": _text(d.get("country")),
                "region": _text(d.get("region_code"))}  # fmt: skip
    lat, lon = mapping.number(d.get("latitude")), mapping.number(d.get("longitude"))
    if lat is not None and lon is not None:
        location["coordinates"] = [lon, lat]  # OCSF: [longitude, latitude]
    location = {k: v for k, v in location.items() if v is not None}
    if location:
        endpoint["location"] = location
    return endpoint


def _subject(out: dict, f: mapping.Facts, cls: OcsfClass) -> None:
    found = f.subject()
    if cls.subject == "user":
        privileges = found.pop("privileges", None)
        if f.rule.family == "user_access":
            out["privileges"] = [str(p) for p in (privileges if isinstance(privileges, list) else [privileges])
                                 if p is not None]  # fmt: skip
        user = {k: _text(v) for k, v in found.items()}
        if "email_addr" in user:
            user["email_addr"] = _email(user["email_addr"])
        if f.rule.family == "authentication":  # who logged in or out: the actor
            user = _actor(f)["user"]
        elif not (user.get("uid") or user.get("name")):
            user = {**_UNKNOWN, **user}
        out["user"] = user
    elif cls.subject == "group":
        out["group"] = {k: _text(v) for k, v in found.items()} or _UNKNOWN
    elif cls.subject == "entity":
        entity: dict[str, Any] = {k: _text(v) for k, v in found.items()}
        entity["type"] = f.rule.entity_type
        if items := f.listed():
            entity["data"] = items
            entity.setdefault("name", ", ".join(str(i.get("name") or i.get("id")) for i in items))
        entity.setdefault("name", f.rule.entity_type)
        out["entity"] = entity


def _unmapped(f: mapping.Facts, event: dict) -> dict:
    """What the class has no place for: the rest of the payload, the project, the TLS fingerprints, the ASN."""
    extra: dict[str, Any] = {}
    if payload := f.unplaced():
        extra["payload"] = payload
    if isinstance(event.get("project"), dict):
        extra["project"] = event["project"]
    session = {k: f.session.get(k) for k in ("ja3", "ja4") if f.session.get(k)}
    for k in ("asn", "region"):
        if f.ip_details.get(k) not in (None, ""):
            session[f"ip_{k}"] = f.ip_details[k]
    if session:
        extra["session"] = session
    return extra


_EMAIL = re.compile(r"^[a-zA-Z0-9_.+-]+@[a-zA-Z0-9-]+\.[a-zA-Z0-9-.]+$")  # OCSF's email_t


def _email(value: str | None) -> str | None:
    """The address if OCSF's email_t takes it (it refuses some valid ones, `o'brien@...`); the user's `name`
    keeps it either way."""
    return value if value and _EMAIL.match(value) else None


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else model.dumps(value)
