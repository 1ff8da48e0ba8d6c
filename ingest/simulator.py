"""A faithful local simulator of OpenAI's `GET /v1/organization/audit_logs`.

Used by the tests and benchmarks instead of the real API. The data is generated from the spec extract
(ingest/spec/openai-audit-logs.openapi.yaml): every event type of the enum, payloads built from the
AuditLog schema, plus the wire quirks listed in the shared api-facts notes. The HTTP layer is the
standard library only, so the simulator runs anywhere the package does.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import gc
import heapq
import itertools
import pathlib
import random
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Generic, NamedTuple, Protocol, TypeVar
from urllib.parse import parse_qsl

import orjson
import yaml

SPEC_PATH = pathlib.Path(__file__).parent / "spec" / "openai-audit-logs.openapi.yaml"

ALL_FAULTS = ("429", "429ms", "500", "502", "503", "504", "reset", "truncated", "slow")

# Types newer than the spec extract (OpenAI's SDK 3.57 already lists them): clients must cope.
UNKNOWN_EVENT_TYPES = (
    "external_storage.registered",
    "external_storage.removed",
    "tenant.trusted_access.granted",
)

# Tenant-scoped types are only returned with tenant_only=true (and only they are).
_TENANT_TYPES_OUTSIDE_PREFIX = frozenset({"role.bound_to_resource", "role.unbound_from_resource"})

API_PATH = "/v1/organization/audit_logs"
_SLOW_SECONDS = 0.3


@functools.cache
def load_spec() -> dict:
    with SPEC_PATH.open("rb") as f:
        return yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def event_types_in_spec() -> list[str]:
    return list(load_spec()["components"]["schemas"]["AuditLogEventType"]["enum"])


def typed_event_types_in_spec() -> list[str]:
    props = load_spec()["components"]["schemas"]["AuditLog"]["properties"]
    return [t for t in event_types_in_spec() if t in props]


@functools.cache
def is_tenant_scoped(event_type: str) -> bool:
    return event_type.startswith("tenant.") or event_type in _TENANT_TYPES_OUTSIDE_PREFIX


# --------------------------------------------------------------------------------------------------
# Data generation
# --------------------------------------------------------------------------------------------------

_ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"

_LONG_TEXT = ("Lorem ipsum dolor sit amet, «ünïcödé» 🚀 \u202etxet\u202c " * 260)[:10240]

# Strings that break naive SQL building, JSON escaping, text columns or terminal output.
# Never NUL (PostgreSQL jsonb rejects \u0000) and never lone surrogates (not valid UTF-8).
_HOSTILE = (
    "'; DROP TABLE audit_events; --",
    'Robert"); DELETE FROM audit_events WHERE ("1"="1',
    'back\\slash \\" and \\n literal',
    "\"double\" and 'single' quotes",
    "emoji 🚀🔥👩‍💻🇫🇷",
    "مشروع الاختبار",
    "שלום \u202eevil\u202c",
    "Z\u0351\u0364a\u0310l\u0346g\u0350o e\u0301",
    "line\u2028separator\u2029paragraph",
    "tab\there\nnewline\r\nend",
    "ctrl \x01\x07\x1b[31m\x1f",
    "%s %d {0} ${jndi:ldap://x} {{7*7}}",
    "<script>alert(1)</script>",
    "𝕳𝖊𝖑𝖑𝖔 \ufeffBOM",
    "",
    "null",
    _LONG_TEXT,
)

_TEXT = (
    "Production",
    "Staging",
    "Research",
    "Customer support bot",
    "Data pipeline",
    "Evals",
    "Billing service",
    "Marketing copy",
    "Internal tools",
    "Sandbox",
    "Legacy integration",
    "Nightly batch",
    "Rotated by security team",
    "Temporary access for audit",
    "Quarterly review",
)

_FIRST = ("ada", "grace", "alan", "linus", "margaret", "ken", "barbara", "dennis", "radia", "edsger")
_LAST = ("lovelace", "hopper", "turing", "torvalds", "hamilton", "thompson", "liskov", "ritchie", "perlman")

_PROJECT_NAMES = (
    "Default project",
    "Data Platform",
    "Support Bot",
    "Équipe données 🚀",
    "Robert'); DROP TABLE projects;--",
    "Search",
    "Evals",
    "Growth",
    "Finance",
    "Legal review",
    "Mobile app",
    "Recommendations",
    "Voice agent",
    "Internal tools",
    "Sandbox",
    "Translations 翻訳",
    "Security",
    "Batch jobs",
    "Partner API",
    'Quote "test" project',
)

_SCOPES = (
    "api.model.request",
    "api.model.read",
    "api.files.read",
    "api.files.write",
    "api.fine_tuning.jobs.write",
    "api.assistants.write",
    "api.vector_stores.read",
    "api.batch.write",
    "api.audit_logs.read",
    "api.organization.read",
)

_PERMISSIONS = (
    "api.model.request",
    "api.files.write",
    "api.projects.read",
    "api.organization.members.write",
    "chatgpt.connectors.read",
    "chatgpt.connectors.write",
    "chatgpt.workspace.admin",
)

_ALLOWED_IPS = (
    "203.0.113.0/24",
    "198.51.100.7",
    "192.0.2.0/28",
    "2001:db8::/32",
    "10.0.0.0/8",
    "100.64.12.34",
    "2001:db8:abcd:12::1",
)

_LOCATIONS = (
    ("US", "San Francisco", "California", "CA", "13335", "37.77490", "-122.41940"),
    ("US", "New York", "New York", "NY", "7922", "40.71280", "-74.00600"),
    ("GB", "London", "England", "ENG", "2856", "51.50740", "-0.12780"),
    ("DE", "Berlin", "Berlin", "BE", "3320", "52.52000", "13.40500"),
    ("JP", "Tokyo", "Tokyo", "13", "2516", "35.67620", "139.65030"),
    ("BR", "São Paulo", "São Paulo", "SP", "28573", "-23.55050", "-46.63330"),
    ("FR", "Paris", "Île-de-France", "IDF", "3215", "48.85660", "2.35220"),
    ("IN", "Bengaluru", "Karnataka", "KA", "24560", "12.97160", "77.59460"),
)

_USER_AGENTS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_4) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.4 Safari/605.1.15",
    "Mozilla/5.0 (X11; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148",
    "python-requests/2.31.0",
)

_LOGIN_ERRORS = (
    ("invalid_credentials", "Wrong email or password."),
    ("mfa_failed", "The MFA code was incorrect."),
    ("account_locked", "Too many failed attempts; the account is locked."),
    ("sso_required", "This organization requires single sign-on."),
)

_FREEFORM_KEYS = (
    "issuer",
    "audience",
    "provider",
    "region",
    "enabled",
    "settings",
    "limit",
    "threshold",
    "comment",
    "tags",
    "subject",
    "claims",
    "mode",
)

_INT_FIELD_VALUES = (60, 500, 3500, 10000, 30000, 150000, 2000000, 10000000)

_OUTSIDE_DOMAINS = ("gmail.com", "outlook.com", "contractor.io", "yahoo.co.jp")

# Resource-id pools per type family (the type without its last segment): prefix and size.
_POOLS: dict[str, tuple[str, int]] = {
    "project": ("proj_", 20),
    "user": ("user-", 30),
    "svc": ("svc_acct_", 10),
    "key": ("key_", 40),
    "admin_key": ("key_", 6),
    "invite": ("invite-", 40),
    "group": ("group_", 12),
    "role": ("role_", 15),
    "role_assignment": ("ra_", 30),
    "cert": ("cert_", 8),
    "checkpoint_permission": ("cp_", 15),
    "external_key": ("ekey_", 6),
    "ip_allowlist": ("ipal_", 6),
    "org": ("org-", 1),
    "rate_limit": ("rl-", 12),
    "wip": ("wip_", 5),
    "wip_mapping": ("wipm_", 10),
    "workspace": ("ws-", 3),
    "connector": ("connector_", 8),
}

_FAMILY_POOL = {
    "api_key": "key",
    "project": "project",
    "user": "user",
    "service_account": "svc",
    "invite": "invite",
    "group": "group",
    "role": "role",
    "role.assignment": "role_assignment",
    "certificate": "cert",
    "certificates": "cert",
    "checkpoint.permission": "checkpoint_permission",
    "external_key": "external_key",
    "ip_allowlist": "ip_allowlist",
    "ip_allowlist.config": "ip_allowlist",
    "organization": "org",
    "scim": "org",
    "rate_limit": "rate_limit",
    "workload_identity_provider": "wip",
    "workload_identity_provider_mapping": "wip_mapping",
    "tenant.user": "user",
    "tenant.group": "group",
    "tenant.group.member": "user",
    "tenant.service_account": "svc",
    "tenant.service_account.token": "svc",
    "tenant.admin_api_key": "admin_key",
    "tenant.project_api_key": "key",
}

# Relative frequencies: logins dominate a real audit log, tenant events are rarer.
_TYPE_WEIGHTS = {
    "login.succeeded": 20.0,
    "logout.succeeded": 6.0,
    "login.failed": 0.8,  # each draw starts a burst of several events
    "api_key.created": 4.0,
    "api_key.updated": 2.0,
    "api_key.deleted": 2.0,
    "project.updated": 2.0,
    "invite.sent": 2.0,
    "invite.accepted": 1.5,
    "user.added": 1.5,
    "user.updated": 1.0,
}
_TENANT_WEIGHT = 0.25
_DEFAULT_WEIGHT = 0.8
_UNKNOWN_SHARE = 0.01


def _token(rng: random.Random, n: int) -> str:
    return "".join(rng.choices(_ALNUM, k=n))


def _family(event_type: str) -> str:
    return event_type.rpartition(".")[0] or event_type


class _Generator:
    """Deterministic event factory: events draw from `rng`, id pools (created on first use) from a
    second RNG; both are seeded, so a seed always yields the same events."""

    def __init__(self, seed: int, company_domain: str) -> None:
        spec = load_spec()["components"]["schemas"]
        self.rng = random.Random(seed)
        self.domain = company_domain
        self.enum = event_types_in_spec()
        self.schemas = {t: spec["AuditLog"]["properties"][t] for t in typed_event_types_in_spec()}
        self._types = [*self.enum, *UNKNOWN_EVENT_TYPES]
        weights = [_TYPE_WEIGHTS.get(t, _TENANT_WEIGHT if is_tenant_scoped(t) else _DEFAULT_WEIGHT) for t in self.enum]
        unknown = sum(weights) * _UNKNOWN_SHARE / (1 - _UNKNOWN_SHARE) / len(UNKNOWN_EVENT_TYPES)
        weights += [unknown] * len(UNKNOWN_EVENT_TYPES)
        self._cum = list(itertools.accumulate(weights))

        prng = random.Random(f"pools:{seed}")
        self._pools: dict[str, list[str]] = {}
        self._pool_rng = prng
        self.names: dict[str, str] = {}  # stable display name per resource id
        self.pems: dict[str, str] = {}
        projects = self.pool("project")
        self.names.update(zip(projects, _PROJECT_NAMES, strict=False))
        for i, cid in enumerate(self.pool("cert")):
            self.names[cid] = f"mtls-client-{2024 + i // 4}-{i % 4}"
            body = "\n".join(_token(prng, 64) for _ in range(4))
            self.pems[cid] = f"-----BEGIN CERTIFICATE-----\n{body}\n-----END CERTIFICATE-----\n"
        for name, iid in zip(
            ("office", "vpn", "ci-runners", "datacenter", "home", "partner"), self.pool("ip_allowlist"), strict=False
        ):
            self.names[iid] = name

        self.emails: dict[str, str] = {}
        for i, uid in enumerate(self.pool("user")):
            first, last = _FIRST[i % len(_FIRST)], _LAST[(i * 7) % len(_LAST)]
            local = f"{first}.{last}{i // len(_FIRST) or ''}"
            if i == 7:
                local = "sean.o'brien"  # valid address with a quote in it
            elif i == 11:
                local = "ops+alerts"
            domain = "gmail.com" if i in (5, 23, 29) else company_domain
            self.emails[uid] = f"{local}@{domain}"

        # An API key always has the same owner: a user or a service account.
        users, svcs = self.pool("user"), self.pool("svc")
        self.key_owner: dict[str, tuple[str, str]] = {}
        for i, kid in enumerate(self.pool("key")):
            owner = svcs[i % len(svcs)] if i % 8 < 3 else users[prng.randrange(len(users))]
            self.key_owner[kid] = ("service_account" if owner in svcs else "user", owner)

        self.ips: list[str] = [
            f"{prng.randrange(1, 224)}.{prng.randrange(256)}.{prng.randrange(256)}.{prng.randrange(1, 255)}"
            for _ in range(18)
        ]
        self.ips += [f"2001:db8:{prng.randrange(65536):x}::{prng.randrange(65536):x}" for _ in range(7)]
        self.attacker_ips = self.ips[-3:] + self.ips[:1]
        self.ip_details = {ip: _LOCATIONS[prng.randrange(len(_LOCATIONS))] for ip in self.ips}
        # Users sign in from home: one country each (no RNG draw, so seeds keep their events), so that a
        # sign-in from a second country is an anomaly the scenarios plant (ingest.scenarios).
        self.home = {uid: self.ip_details[self.ips[i % len(self.ips)]] for i, uid in enumerate(users)}
        self.fingerprint = {
            uid: (
                _USER_AGENTS[prng.randrange(len(_USER_AGENTS))],
                f"{prng.getrandbits(128):032x}",
                f"t13d{prng.randrange(1000, 9999)}h2_{prng.getrandbits(48):012x}_{prng.getrandbits(48):012x}",
            )
            for uid in users
        }

        pem_values = tuple(self.pems.values())
        self._by_name = {
            "id": self._resource_id,
            "email": self._invite_email,
            "role": lambda _f: "owner" if self.rng.random() < 0.15 else "member",
            "scopes": lambda _f: self._sample(_SCOPES, 1, 3),
            "permissions": lambda _f: self._sample(_PERMISSIONS, 0, 4),
            "permissions_added": lambda _f: self._sample(_PERMISSIONS, 0, 3),
            "permissions_removed": lambda _f: self._sample(_PERMISSIONS, 0, 3),
            "allowed_ips": lambda _f: self._sample(_ALLOWED_IPS, 1, 4),
            "certificate": lambda _f: self.rng.choice(pem_values),
            "project_id": lambda _f: self.pick("project"),
            "service_account_id": lambda _f: self.pick("svc"),
            "identity_provider_id": lambda _f: self.pick("wip"),
            "role_id": lambda _f: self.pick("role"),
            "principal_id": lambda _f: self.pick("group" if self.rng.random() < 0.3 else "user"),
            "resource_id": lambda _f: self.pick("project"),
            "resource_type": lambda _f: self.rng.choice(("project", "organization", "workspace_connector")),
            "workspace_id": lambda _f: self.pick("workspace"),
            "connector_id": lambda _f: self.pick("connector"),
            "connector_name": lambda _f: self.rng.choice(("Google Drive", "SharePoint", "GitHub", "Jira 🧩")),
            "fine_tuned_model_checkpoint": lambda _f: (
                f"ft:gpt-4o-mini-2024-07-18:acme::{self.pick('checkpoint_permission')[3:11]}"
                f":ckpt-step-{self.rng.randrange(1, 50) * 100}"
            ),
            "error_code": lambda _f: self.rng.choice(_LOGIN_ERRORS)[0],
            "error_message": lambda _f: self.or_hostile(self.rng.choice(_LOGIN_ERRORS)[1]),
            "threads_ui_visibility": lambda _f: self.rng.choice(("ANY_ROLE", "OWNERS", "NONE")),
            "usage_dashboard_visibility": lambda _f: self.rng.choice(("ANY_ROLE", "OWNERS")),
            "api_call_logging": lambda _f: self.rng.choice(
                ("disabled", "enabled_per_call", "enabled_for_all_projects", "enabled_for_selected_projects")
            ),
            "api_call_logging_project_ids": lambda _f: ",".join(self._sample(self.pool("project"), 1, 3)),
        }

    # -- pools -------------------------------------------------------------------------------------
    def pool(self, name: str) -> list[str]:
        ids = self._pools.get(name)
        if ids is None:
            prefix, size = _POOLS.get(name, (f"{name.rpartition('.')[2]}_", 12))
            ids = self._pools[name] = [prefix + _token(self._pool_rng, 24) for _ in range(size)]
        return ids

    def pick(self, pool: str) -> str:
        ids = self.pool(pool)
        return ids[int(self.rng.random() * len(ids))]

    def _sample(self, values: tuple[str, ...] | list[str], lo: int, hi: int) -> list[str]:
        return self.rng.sample(values, self.rng.randint(lo, hi))

    def _resource_id(self, family: str) -> str:
        return self.pick(_FAMILY_POOL.get(family, family))

    def _invite_email(self, _family: str) -> str:
        rng = self.rng
        local = f"{rng.choice(_FIRST)}.{rng.choice(_LAST)}{rng.randrange(100)}"
        domain = self.domain if rng.random() < 0.85 else rng.choice(_OUTSIDE_DOMAINS)
        return f"{local}@{domain}"

    # -- values ------------------------------------------------------------------------------------
    def text(self) -> str:
        return self.or_hostile(self.rng.choice(_TEXT))

    def or_hostile(self, usual: str) -> str:
        return self.rng.choice(_HOSTILE) if self.rng.random() < 0.05 else usual

    def freeform(self, depth: int = 0) -> dict[str, Any]:
        rng = self.rng
        out: dict[str, Any] = {}
        for _ in range(rng.randint(1, 4)):
            r = rng.random()
            if r < 0.4:
                value: Any = self.text()
            elif r < 0.55:
                value = rng.randrange(-5, 100000)
            elif r < 0.6:
                value = round(rng.random() * 100, 3)
            elif r < 0.72:
                value = rng.random() < 0.5
            elif r < 0.84 and depth < 2:
                value = self.freeform(depth + 1)
            elif r < 0.94:
                value = [self.text() for _ in range(rng.randrange(4))]
            else:
                value = None
            out[rng.choice(_FREEFORM_KEYS)] = value
        return out

    def value(self, name: str, schema: dict, family: str) -> Any:
        by_name = self._by_name.get(name)
        if by_name is not None:
            return by_name(family)
        if "enum" in schema:
            return self.rng.choice(schema["enum"])
        kind = schema.get("type")
        if kind == "string":
            return self.text()
        if kind == "integer":
            return self.rng.choice(_INT_FIELD_VALUES)
        if kind == "boolean":
            return self.rng.random() < 0.5
        if kind == "array":
            items = schema.get("items", {})
            return [self.value("", items, family) for _ in range(self.rng.randrange(5))]
        if kind == "object":
            props = schema.get("properties")
            return self.obj(props, family) if props else self.freeform()
        return self.text()

    def obj(self, props: dict, family: str) -> dict[str, Any]:
        rng = self.rng
        out = {k: self.value(k, s, family) for k, s in props.items() if k == "id" or rng.random() >= 0.1}
        rid = out.get("id")
        if rid is not None:
            if "name" in out and rid in self.names:
                out["name"] = self.names[rid]
            if "certificate" in out and rid in self.pems:
                out["certificate"] = self.pems[rid]
        if "principal_type" in out and "principal_id" in out:
            out["principal_type"] = "group" if out["principal_id"].startswith("group_") else "user"
        if "workspace_id" in out and "connector_id" in out:
            # ChatGPT connector role events: the target id is <workspace_id>__<connector_id>.
            out["id"] = out["resource_id"] = f"{out['workspace_id']}__{out['connector_id']}"
        return out

    def payload(self, event_type: str) -> dict[str, Any]:
        family = _family(event_type)
        schema = self.schemas.get(event_type)
        if schema is not None:
            props = schema.get("properties")
            if not props:  # login.succeeded / logout.succeeded: "no additional fields"
                return {}
            out = self.obj(props, family)
            # The spec's own example sends `data` where the schema says `changes_requested`.
            if event_type == "api_key.updated" and "changes_requested" in out and self.rng.random() < 0.3:
                out["data"] = out.pop("changes_requested")
            return out
        if event_type in UNKNOWN_EVENT_TYPES:
            out = self.freeform()
            if self.rng.random() < 0.7:
                out["id"] = self._resource_id(family)
            return out
        out = {"id": self._resource_id(family)}
        if self.rng.random() < 0.3:
            action = event_type.rpartition(".")[2]
            key = {"created": "data", "updated": "changes_requested"}.get(action, "details")
            out[key] = self.freeform()
        return out

    # -- actors ------------------------------------------------------------------------------------
    def _session(self, uid: str, ip: str) -> dict[str, Any]:
        rng = self.rng
        session: dict[str, Any] = {"user": {"id": uid, "email": self.emails[uid]}, "ip_address": ip}
        if rng.random() < 0.95:
            ua, ja3, ja4 = self.fingerprint[uid]
            session["user_agent"] = ua
            session["ja3"] = ja3
            session["ja4"] = ja4
        if rng.random() < 0.85:
            country, city, region, code, asn, lat, lon = self.home[uid]
            session["ip_address_details"] = {
                "country": country,
                "city": city,
                "region": region,
                "region_code": code,
                "asn": asn,
                "latitude": lat,
                "longitude": lon,
            }
        return {"type": "session", "session": session}

    def actor(self, event_type: str) -> dict[str, Any] | None:
        rng = self.rng
        if event_type == "login.failed":
            return self._session(self.pick("user"), rng.choice(self.attacker_ips))
        r = rng.random()
        if r < 0.03:
            return None
        if r < 0.55 or event_type in ("login.succeeded", "logout.succeeded", "logout.failed"):
            return self._session(self.pick("user"), rng.choice(self.ips))
        kid = self.pick("key")
        owner_type, owner = self.key_owner[kid]
        key: dict[str, Any] = {"id": kid, "type": owner_type}
        if owner_type == "user":
            key["user"] = {"id": owner, "email": self.emails[owner]}
        else:
            key["service_account"] = {"id": owner}
        return {"type": "api_key", "api_key": key}

    # -- events ------------------------------------------------------------------------------------
    def next_type(self) -> str:
        # What rng.choices(cum_weights=...) does, without its per-call overhead.
        return self._types[bisect.bisect(self._cum, self.rng.random() * self._cum[-1])]

    def new_id(self) -> str:
        # 80 random bits: a collision among a million ids has a probability of about 1e-12.
        return f"audit_log-{self.rng.getrandbits(80):020x}"

    def event(self, event_type: str, effective_at: int, actor: dict[str, Any] | None) -> dict[str, Any]:
        # `object` is on every event on the wire (public captures), though absent from the spec's schema.
        ev: dict[str, Any] = {
            "id": self.new_id(), "object": "organization.audit_log", "type": event_type, "effective_at": effective_at
        }  # fmt: skip
        payload = self.payload(event_type)
        if event_type.startswith("project."):
            pid = payload["id"]
            ev["project"] = {"id": pid, "name": self.names[pid]}
        elif self.rng.random() < 0.7:
            pid = self.pick("project")
            ev["project"] = {"id": pid, "name": self.names[pid]}
        ev["actor"] = actor
        ev[event_type] = payload
        return ev

    def initial(self, n: int, now: int, span: int) -> Iterator[dict[str, Any]]:
        """`n` events over [now - span, now - 60], oldest first; every enum type occurs when n >= 145."""
        rng = self.rng
        newest = now - 60
        oldest = min(now - span, newest)
        width = newest - oldest + 1
        # Generating in time order keeps the records roughly in memory order, which makes the
        # index build cache-friendly (3x faster for 1M events than random order).
        times = sorted(oldest + int(rng.random() * width) for _ in range(n))
        covering = dict(zip(rng.sample(range(n), min(n, len(self.enum))), self.enum, strict=False))
        burst_left, burst_actor, t = 0, None, newest
        for i, slot in enumerate(times):
            if burst_left and i not in covering:
                # login.failed comes in bursts: same IP and target user, seconds apart.
                burst_left -= 1
                t = min(t + rng.randrange(1, 30), newest)
                yield self.event("login.failed", t, burst_actor)
                continue
            event_type = covering.get(i) or self.next_type()
            t = slot
            actor = self.actor(event_type)
            if event_type == "login.failed":
                burst_left, burst_actor = rng.randrange(2, 12), actor
            yield self.event(event_type, t, actor)


# --------------------------------------------------------------------------------------------------
# Storage: records sorted by (effective_at, id); the API walks them backwards (newest first).
# --------------------------------------------------------------------------------------------------


class _Rec(NamedTuple):
    # The first two fields are the sort key; ids are unique, so comparisons never reach the others.
    effective_at: int
    id: str
    type: str
    tenant: bool
    project: str | None
    actors: tuple[str, ...]
    email: str | None
    resource: str | None
    body: bytes


_DIMENSIONS = ("type", "project", "actor", "email", "resource")


@dataclass(slots=True)
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    fault: str | None = None  # "reset" or "truncated": the HTTP layer misbehaves on purpose
    delay: float = 0.0  # seconds the HTTP layer waits before answering (latency, "slow" fault)


class _BadRequest(Exception):
    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.param = param


def _error(
    status: int,
    message: str,
    type_: str,
    *,
    param: str | None = None,
    code: str | None = None,
    headers: list[tuple[str, str]] | None = None,
) -> Response:
    body = orjson.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}})
    return Response(status, [("Content-Type", "application/json"), *(headers or [])], body)


def _json(data: Any) -> Response:
    return Response(200, [("Content-Type", "application/json")], orjson.dumps(data))


_RANGE_PARAMS = ("effective_at[gt]", "effective_at[gte]", "effective_at[lt]", "effective_at[lte]")
_LIST_PARAMS = {
    "event_types[]": "type",
    "project_ids[]": "project",
    "actor_ids[]": "actor",
    "actor_emails[]": "email",
    "resource_ids[]": "resource",
}

_BAD_GATEWAY_HTML = (
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>cloudflare</center>\r\n</body>\r\n</html>\r\n"
)


class Simulator:
    """The data and behaviour, no sockets. Thread-safe (one lock)."""

    def __init__(
        self,
        *,
        events: int = 1000,
        seed: int = 0,
        key: str = "sk-admin-sim",
        fault_rate: float = 0.0,
        faults: tuple[str, ...] = ALL_FAULTS,
        latency: float = 0.0,
        span_seconds: int = 30 * 86400,
        now: int | None = None,
        audit_logging_enabled: bool = True,
        retention_seconds: int | None = None,
        company_domain: str = "example.com",
        tenant: bool = True,
        rate_limit: float | None = None,
    ) -> None:
        unknown = set(faults) - set(ALL_FAULTS)
        if unknown:
            raise ValueError(f"unknown faults: {sorted(unknown)}")
        self.key = key
        self.fault_rate = fault_rate
        self.faults = tuple(faults)
        self.latency = latency
        self.audit_logging_enabled = audit_logging_enabled
        self.retention_seconds = retention_seconds
        # An organization without a tenant: tenant_only=true is answered 400 (the API's behaviour there is
        # undocumented; 400 is what a parameter the organization cannot use gets elsewhere).
        self.tenant = tenant
        # A token bucket of `rate_limit` requests a second (a second's worth of burst); beyond it, 429 with
        # retry-after-ms, as the API's own rate limiter answers.
        self.rate_limit = rate_limit
        self._tokens, self._refilled = (rate_limit or 0.0), time.monotonic()
        self.rate_limited = 0
        self.requests = 0
        self.faults_injected: dict[str, int] = dict.fromkeys(self.faults, 0)
        self._lock = threading.Lock()
        self._fault_rng = random.Random(f"faults:{seed}")
        self._request_seq = 0
        self._gen = _Generator(seed, company_domain)
        # Two base indexes because the tenant_only flag always splits the result set.
        self._base: dict[bool, list[_Rec]] = {False: [], True: []}
        self._by_id: dict[str, _Rec] = {}
        self._postings: dict[str, dict[str, list[_Rec]]] = {d: {} for d in _DIMENSIONS}
        self._actor_tuples: dict[tuple[str, ...], tuple[str, ...]] = {}
        start = int(time.time()) if now is None else now
        # The cyclic GC would rescan the growing heap over and over while millions of (acyclic)
        # records are built; pausing it roughly halves the generation time of 1M events.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            self._add([self._record(ev) for ev in self._gen.initial(events, start, span_seconds)])
        finally:
            if gc_was_enabled:
                gc.enable()

    # -- storage -----------------------------------------------------------------------------------
    def _record(self, ev: dict[str, Any]) -> _Rec:
        actor, email = ev["actor"], None
        actors: tuple[str, ...] = ()
        if actor is not None:
            if actor["type"] == "session":
                user = actor["session"]["user"]
                actors, email = (user["id"],), user["email"]
            else:
                key = actor["api_key"]
                owner = key.get("user") or key["service_account"]
                actors, email = (key["id"], owner["id"]), owner.get("email")
            actors = self._actor_tuples.setdefault(actors, actors)  # share: memory for 1M events
        payload = ev.get(ev["type"])
        resource = payload.get("id") if isinstance(payload, dict) else None
        project = ev.get("project")
        return _Rec(
            ev["effective_at"],
            ev["id"],
            ev["type"],
            is_tenant_scoped(ev["type"]),
            project["id"] if project else None,
            actors,
            email,
            resource if isinstance(resource, str) else None,
            # orjson's result keeps a several-KB buffer; an exact-size copy keeps 1M events affordable.
            bytes(memoryview(orjson.dumps(ev))),
        )

    def _add(self, recs: list[_Rec]) -> None:
        recs.sort()
        base, by_id = self._base, self._by_id
        by_type, by_project, by_actor, by_email, by_resource = self._postings.values()
        unsorted: dict[int, list[_Rec]] = {}
        for rec in recs:
            by_id[rec.id] = rec
            lists = [base[rec.tenant], by_type.get(rec.type) or by_type.setdefault(rec.type, [])]
            if rec.project is not None:
                lists.append(by_project.get(rec.project) or by_project.setdefault(rec.project, []))
            for a in rec.actors:
                lists.append(by_actor.get(a) or by_actor.setdefault(a, []))
            if rec.email is not None:
                lists.append(by_email.get(rec.email) or by_email.setdefault(rec.email, []))
            if rec.resource is not None:
                lists.append(by_resource.get(rec.resource) or by_resource.setdefault(rec.resource, []))
            for lst in lists:
                if lst and lst[-1] > rec:  # a late event lands before the newest held ones
                    unsorted[id(lst)] = lst
                lst.append(rec)
        for lst in unsorted.values():
            lst.sort()  # timsort merges the two sorted runs in about linear time

    def _expire(self) -> None:
        if self.retention_seconds is None:
            return
        cutoff = (int(time.time()) - self.retention_seconds,)
        if not any(base and base[0] < cutoff for base in self._base.values()):
            return
        for base in self._base.values():
            for rec in base[: bisect.bisect_left(base, cutoff)]:
                del self._by_id[rec.id]
        every: list[dict[Any, list[_Rec]]] = [self._base, *self._postings.values()]
        for lists in every:
            for k in list(lists):
                lst = lists[k]
                if lst and lst[0] < cutoff:
                    del lst[: bisect.bisect_left(lst, cutoff)]
                    if not lst and lists is not self._base:
                        del lists[k]

    # -- public data API ---------------------------------------------------------------------------
    @property
    def events(self) -> list[dict]:
        """Every event held, newest first (decoded afresh on each access)."""
        with self._lock:
            self._expire()
            merged = heapq.merge(reversed(self._base[False]), reversed(self._base[True]), reverse=True)
            return [orjson.loads(rec.body) for rec in merged]

    def append(self, count: int, *, late_by: int = 0, types: list[str] | None = None) -> list[dict]:
        """Add `count` events with effective_at = real now - late_by; returns them."""
        effective_at = int(time.time()) - late_by
        with self._lock:
            gen = self._gen
            new = []
            for i in range(count):
                event_type = types[i % len(types)] if types else gen.next_type()
                new.append(gen.event(event_type, effective_at, gen.actor(event_type)))
            self._add([self._record(ev) for ev in new])
            self._expire()
        return new

    def insert(self, events: list[dict]) -> None:
        """Serve these events as given: tests stage payloads the generator never makes (wrong shapes)."""
        with self._lock:
            self._add([self._record(ev) for ev in events])

    def remove(self, ids: list[str]) -> None:
        """Serve these events no more: tests stage an event the warehouse holds and the API does not."""
        gone = set(ids)
        with self._lock:
            kept = [rec for base in self._base.values() for rec in base if rec.id not in gone]
            self._base, self._by_id = {False: [], True: []}, {}
            self._postings = {d: {} for d in _DIMENSIONS}
            self._add(kept)

    def replace(self, event: dict) -> None:
        """Serve `event` instead of the held event with its id: tests stage an event changed upstream."""
        self.remove([event["id"]])
        self.insert([event])

    # -- request handling --------------------------------------------------------------------------
    def handle(self, method: str, path: str, query: str, headers: Mapping[str, str]) -> Response:
        route = path.rstrip("/") or "/"
        if route == API_PATH and method == "GET":
            return self._api(query, headers)
        control = route.removeprefix("/v1")
        if control.startswith("/_sim/"):
            return self._control(method, control, query, headers)
        return _error(404, f"Invalid URL ({method} {path})", "invalid_request_error")

    def _auth_error(self, headers: Mapping[str, str]) -> Response | None:
        token = _bearer(headers)
        return None if token == self.key else _unauthorized(token)

    def _draw_fault(self) -> str | None:
        if self.fault_rate <= 0 or not self.faults or self._fault_rng.random() >= self.fault_rate:
            return None
        fault = self._fault_rng.choice(self.faults)
        self.faults_injected[fault] += 1
        return fault

    def _api(self, query: str, headers: Mapping[str, str]) -> Response:
        with self._lock:
            self.requests += 1
            self._request_seq += 1
            request_id = ("x-request-id", f"req_{self._request_seq:024x}")
            wait = self._take_token()
            fault = self._draw_fault() if not wait else None
        if wait:
            resp = _error(
                429, f"Rate limit reached: {self.rate_limit:g} requests per second.", "requests",
                code="rate_limit_exceeded", headers=[("retry-after-ms", str(max(1, round(wait * 1000))))],
            )  # fmt: skip
            resp.headers.append(request_id)
            return resp
        delay = self.latency + (_SLOW_SECONDS if fault == "slow" else 0.0)
        if fault in ("slow", "truncated", None):
            resp = self._list(query, headers)
            if fault == "truncated":
                resp.fault = "truncated"
        elif fault == "reset":
            resp = Response(0, [], b"", fault="reset")
        else:
            resp = _fault_response(fault)
        resp.headers.append(request_id)
        resp.delay = delay
        return resp

    def _take_token(self) -> float:
        """0 when a request may go (a token taken), else the seconds until the next token. Under the lock."""
        if not self.rate_limit:
            return 0.0
        now = time.monotonic()
        self._tokens = min(self.rate_limit, self._tokens + (now - self._refilled) * self.rate_limit)
        self._refilled = now
        if self._tokens >= 1:
            self._tokens -= 1
            return 0.0
        self.rate_limited += 1
        return (1 - self._tokens) / self.rate_limit

    def _list(self, query: str, headers: Mapping[str, str]) -> Response:
        auth = self._auth_error(headers)
        if auth is not None:
            return auth
        if not self.audit_logging_enabled:
            return _error(
                403,
                "Audit logging is not enabled for this organization: an owner must activate it in the "
                "organization's Data controls settings. Missing scopes: api.audit_logs.read.",
                "invalid_request_error",
                code="insufficient_permissions",
            )
        try:
            return self._page(query)
        except _BadRequest as e:
            return _error(400, str(e), "invalid_request_error", param=e.param)

    def _page(self, query: str) -> Response:
        lo, hi = None, None
        limit = 20
        after = before = None
        tenant_only = False
        filters: dict[str, set[str]] = {}
        for name, value in parse_qsl(query, keep_blank_values=True):
            if name in _RANGE_PARAMS:
                try:
                    n = int(value)
                except ValueError:
                    raise _BadRequest(f"Invalid '{name}': expected an integer, got {value!r}.", name) from None
                op = name[13:-1]
                if op in ("gt", "gte"):
                    n += op == "gt"
                    lo = n if lo is None else max(lo, n)
                else:
                    n -= op == "lt"
                    hi = n if hi is None else min(hi, n)
            elif name in _LIST_PARAMS:
                filters.setdefault(_LIST_PARAMS[name], set()).add(value)
            elif name == "limit":
                try:
                    limit = int(value)
                except ValueError:
                    limit = 0
                if not 1 <= limit <= 100:
                    raise _BadRequest(
                        f"Invalid 'limit': integer below minimum value or above maximum (1 to 100), got {value!r}.",
                        "limit",
                    )
            elif name == "tenant_only":
                if value.lower() not in ("true", "false"):
                    raise _BadRequest(f"Invalid 'tenant_only': expected a boolean, got {value!r}.", "tenant_only")
                tenant_only = value.lower() == "true"
                if tenant_only and not self.tenant:
                    raise _BadRequest("This organization has no tenant: 'tenant_only' cannot be used.", "tenant_only")
            elif name == "after" and value:
                after = value
            elif name == "before" and value:
                before = value
            # Other parameters are ignored, as the real API does with e.g. `order=asc`.
        if after is not None and before is not None:
            raise _BadRequest("Only one of 'after' and 'before' may be given.", "before")
        types = filters.get("type")
        if types is not None:
            if tenant_only:
                bad = sorted(t for t in types if not is_tenant_scoped(t))
                if bad:
                    raise _BadRequest(
                        f"When 'tenant_only' is true, all event types must be tenant-scoped; got {bad}.",
                        "event_types[]",
                    )
            else:
                # Tenant-scoped types need tenant_only=true: asking without it simply finds nothing.
                types.difference_update([t for t in types if is_tenant_scoped(t)])

        with self._lock:
            self._expire()
            cursor = None
            for param, cid in (("after", after), ("before", before)):
                if cid is not None:
                    cursor = self._by_id.get(cid)
                    if cursor is None:
                        raise _BadRequest(f"No audit log event found with id '{cid}'.", param)
            rows, more = self._select(filters, tenant_only, lo, hi, cursor, before is not None, limit)
            parts = [rec.body for rec in rows]
        first_id = rows[0].id if rows else None
        last_id = rows[-1].id if rows else None
        body = b"".join(
            (
                b'{"object":"list","data":[',
                b",".join(parts),
                b'],"first_id":',
                orjson.dumps(first_id),
                b',"last_id":',
                orjson.dumps(last_id),
                b',"has_more":',
                b"true" if more else b"false",
                b"}",
            )
        )
        return Response(200, [("Content-Type", "application/json")], body)

    def _select(
        self,
        filters: dict[str, set[str]],
        tenant_only: bool,
        lo: int | None,
        hi: int | None,
        cursor: _Rec | None,
        backwards: bool,
        limit: int,
    ) -> tuple[list[_Rec], bool]:
        """The matching page (newest first) and whether more match beyond it in that direction."""
        # Walk the smallest candidate set: the base index or the posting lists of one filter.
        sources = self._base[tenant_only]
        size = len(sources)
        lists: list[list[_Rec]] = [sources]
        for dim, values in filters.items():
            found = [p for v in values if (p := self._postings[dim].get(v))]
            total = sum(map(len, found))
            if total < size:
                lists, size = found, total
        if size == 0:
            return [], False

        lo_key = (lo,) if lo is not None else None
        hi_key = (hi + 1,) if hi is not None else None
        iters = []
        for lst in lists:
            start = bisect.bisect_left(lst, lo_key) if lo_key else 0
            end = bisect.bisect_left(lst, hi_key) if hi_key else len(lst)
            if cursor is not None:
                if backwards:
                    start = max(start, bisect.bisect_right(lst, cursor))
                else:
                    end = min(end, bisect.bisect_left(lst, cursor))
            if start < end:
                step = range(start, end) if backwards else range(end - 1, start - 1, -1)
                iters.append(map(lst.__getitem__, step))
        if not iters:
            return [], False
        # `before` walks upwards (oldest first), everything else downwards.
        candidates = iters[0] if len(iters) == 1 else heapq.merge(*iters, reverse=not backwards)

        types, projects = filters.get("type"), filters.get("project")
        actors, emails, resources = filters.get("actor"), filters.get("email"), filters.get("resource")
        out: list[_Rec] = []
        prev = None
        for rec in candidates:
            if rec is prev:  # an api-key event sits in two actor posting lists
                continue
            prev = rec
            if (
                rec.tenant is not tenant_only
                or (types is not None and rec.type not in types)
                or (projects is not None and rec.project not in projects)
                or (actors is not None and actors.isdisjoint(rec.actors))
                or (emails is not None and rec.email not in emails)
                or (resources is not None and rec.resource not in resources)
            ):
                continue
            out.append(rec)
            if len(out) > limit:
                break
        more = len(out) > limit
        del out[limit:]
        if backwards:
            out.reverse()
        return out, more

    def _control(self, method: str, route: str, query: str, headers: Mapping[str, str]) -> Response:
        auth = self._auth_error(headers)
        if auth is not None:
            return auth
        if route == "/_sim/append" and method == "POST":
            params = dict(parse_qsl(query))
            try:
                count, late_by = int(params.get("count", 1)), int(params.get("late_by", 0))
            except ValueError:
                return _error(400, "count and late_by must be integers.", "invalid_request_error")
            return _json(self.append(count, late_by=late_by))
        if route == "/_sim/events" and method == "GET":
            return _json(self.events)
        if route == "/_sim/stats" and method == "GET":
            with self._lock:
                self._expire()
                stats = {"requests": self.requests, "faults": dict(self.faults_injected), "events": len(self._by_id),
                         "rate_limited": self.rate_limited}  # fmt: skip
            return _json(stats)
        return _error(404, f"Invalid URL ({method} {route})", "invalid_request_error")


class Organizations:
    """Several organizations behind one server, each a Simulator with its own key: a request is answered by the
    organization whose key it carries (its events, its counters, its rate limit), a request with no such key 401."""

    def __init__(self, orgs: Iterable[Simulator]) -> None:
        self.by_key = {sim.key: sim for sim in orgs}

    def handle(self, method: str, path: str, query: str, headers: Mapping[str, str]) -> Response:
        token = _bearer(headers)
        sim = self.by_key.get(token)
        return _unauthorized(token) if sim is None else sim.handle(method, path, query, headers)


def organizations(count: int, *, key: str, seed: int, **options: Any) -> Organizations:
    """`count` organizations: the i-th (from 1) with key `<key>-<i>` and seed `seed + i - 1`, so each has a history
    of its own (its own event ids); `options` are every one's (Simulator keywords)."""
    return Organizations(Simulator(key=f"{key}-{i}", seed=seed + i - 1, **options) for i in range(1, count + 1))


def _bearer(headers: Mapping[str, str]) -> str:
    value = headers.get("Authorization") or headers.get("authorization") or ""
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _unauthorized(token: str) -> Response:
    if not token:
        message = (
            "You didn't provide an API key. You need to provide your API key in an Authorization header "
            "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
        )
    else:
        message = (
            f"Incorrect API key provided: {token[:8]}***{token[-4:]}. You can find your API key at "
            "https://platform.openai.com/account/api-keys."
        )
    return _error(401, message, "invalid_request_error", code="invalid_api_key")


def _fault_response(fault: str) -> Response:
    if fault in ("429", "429ms"):
        retry = ("Retry-After", "1") if fault == "429" else ("retry-after-ms", "20")
        return _error(
            429,
            "Rate limit reached for requests in organization org-sim on requests per min (RPM): "
            "Limit 60, Used 60, Requested 1. Please try again in 1s.",
            "requests",
            code="rate_limit_exceeded",
            headers=[retry],
        )
    if fault == "502":
        return Response(502, [("Content-Type", "text/html")], _BAD_GATEWAY_HTML)
    messages = {
        "500": "The server had an error while processing your request. Sorry about that!",
        "503": "The server is overloaded or not ready yet.",
        "504": "Gateway timeout.",
    }
    return _error(int(fault), messages[fault], "server_error")


# --------------------------------------------------------------------------------------------------
# HTTP layer
# --------------------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the real API behind its proxies
    disable_nagle_algorithm = True
    timeout = 60  # an idle keep-alive connection does not hold its thread forever
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.track(self.connection, False)

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        path, _, query = self.path.partition("?")
        resp = self.server.sim.handle(self.command, path, query, dict(self.headers.items()))
        if resp.delay:
            time.sleep(resp.delay)
        if resp.fault == "reset":
            # SO_LINGER 0 makes close() send a RST instead of a FIN: the client sees ECONNRESET.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            self.rfile.close()
            self.connection.close()
            return
        body = resp.body
        head = [f"HTTP/1.1 {resp.status} {HTTPStatus(resp.status).phrase}"]
        head += [f"{k}: {v}" for k, v in resp.headers]
        head.append(f"Content-Length: {len(body)}")
        if self.close_connection:
            head.append("Connection: close")
        if resp.fault == "truncated":
            # Announce the whole body, send half of it, then close.
            body = body[: len(body) // 2]
            self.close_connection = True
        self.wfile.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass


class _App(Protocol):
    def handle(self, method: str, path: str, query: str, headers: Mapping[str, str]) -> Response: ...


App = TypeVar("App", bound=_App)  # a Simulator, or Organizations


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, sim: _App, port: int) -> None:
        self.sim = sim
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        self._closed = False  # stopped: no connection is served any more
        super().__init__(("127.0.0.1", port), _Handler)

    def track(self, conn: socket.socket, alive: bool) -> None:
        with self._conns_lock:
            if alive and self._closed:  # accepted just before the stop, its handler started after it
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
            elif alive:
                self._conns.add(conn)
            else:
                self._conns.discard(conn)

    def close_connections(self) -> None:
        with self._conns_lock:
            self._closed = True
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients dropping connections (timeouts, our own resets) are normal here.
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class SimulatorServer(Generic[App]):
    """Context manager: serves a Simulator (or Organizations) on 127.0.0.1 (port 0 = ephemeral) in a background
    thread.

    The socket is bound at construction, so `url` is known before start()."""

    def __init__(self, sim: App, port: int = 0) -> None:
        self.sim = sim
        self._server = _HTTPServer(sim, port)
        self.port: int = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self._thread: threading.Thread | None = None

    def start(self) -> SimulatorServer[App]:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._server.serve_forever,
                kwargs={"poll_interval": 0.05},
                daemon=True,
                name=f"audit-log-simulator-{self.port}",
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()
        # Keep-alive connections would otherwise outlive the server in their handler threads.
        self._server.close_connections()

    def __enter__(self) -> SimulatorServer[App]:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(
    *,
    port: int,
    events: int,
    seed: int,
    fault_rate: float,
    key: str,
    latency: float = 0.0,
    tenant: bool = True,
    rate_limit: float | None = None,
    scenarios: tuple[str, ...] = (),
    orgs: int = 1,
) -> None:
    """Blocking, for `audit-ingest simulate`: prints the base URL on one line, serves until SIGINT/SIGTERM.
    `scenarios`: attacks (ingest.scenarios) planted among the events (of the first organization: their ids are
    fixed). `orgs` > 1: that many organizations (`organizations`), `events` each."""
    from ingest.scenarios import plant

    options: dict[str, Any] = dict(
        events=events, fault_rate=fault_rate, latency=latency, tenant=tenant, rate_limit=rate_limit
    )  # fmt: skip
    app: Simulator | Organizations
    if orgs > 1:
        app = organizations(orgs, key=key, seed=seed, **options)
        first = next(iter(app.by_key.values()))
        who = f"{orgs} organizations, seeds {seed} to {seed + orgs - 1}, keys {', '.join(map(repr, app.by_key))}"
    else:
        app = first = Simulator(key=key, seed=seed, **options)
        who = f"seed {seed}, key {key!r}"
    for name in scenarios:
        plant(first, name)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with SimulatorServer(app, port) as server:
        print(server.url, flush=True)
        print(
            f"audit-log simulator: {events} events, {who}, fault rate {fault_rate}"
            + (f", scenarios {', '.join(scenarios)}" if scenarios else ""),
            file=sys.stderr,
            flush=True,
        )
        while not stop.wait(0.5):
            pass
