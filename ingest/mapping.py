"""What the SIEM mappings (ingest.ocsf, ingest.ecs) share: which family an event type belongs to, and the
facts of an event (actor, session, payload) read once in one place.

Families are declared by type prefix, longest prefix first wins; a type no prefix matches (a new one the
API started sending, say) is in the `activity` family, which every mapping handles. Each rule also says
what the event is about (its subject): the payload fields naming the user, group or entity changed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ingest.model import WRAPPERS


@dataclass(frozen=True)
class Rule:
    family: str  # authentication | account | user_access | group | entity | activity
    prefixes: tuple[str, ...]
    # subject attribute -> payload fields, the first present wins (lookup rule of ingest.model)
    subject: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    entity_type: str | None = None  # entity family: what kind of thing is managed
    list_field: str | None = None  # a list of {id, name} items standing for the subject (bulk activations)


_USER = {"uid": ("id",), "email_addr": ("email",)}
_INVITE = {"name": ("email", "id"), "email_addr": ("email",)}
_PRINCIPAL = {"uid": ("principal_id",), "type": ("principal_type",), "privileges": ("permissions", "role_id")}
_GROUP = {"uid": ("id",), "name": ("group_name", "name")}
_ENTITY = {"uid": ("id",), "name": ("name", "title", "group_name")}

RULES: tuple[Rule, ...] = (
    Rule("authentication", ("login.", "logout.")),
    Rule("account", ("user.", "tenant.user."), _USER),
    Rule("account", ("invite.", "tenant.user.invited", "tenant.api_organization_invite.",
                     "tenant.chatgpt_workspace_invite.", "tenant.membership."), _INVITE),
    Rule("user_access", ("role.assignment.", "role.bound_to_resource", "role.unbound_from_resource",
                         "tenant.role_assignment.", "tenant.resource_role_assignment."), _PRINCIPAL),
    Rule("group", ("group.", "tenant.group."), _GROUP),
    Rule("entity", ("api_key.", "external_key.", "tenant.admin_api_key.", "tenant.project_api_key."), _ENTITY,
         "API Key"),
    Rule("entity", ("service_account.", "tenant.service_account."), _ENTITY, "Service Account"),
    Rule("entity", ("project.",), _ENTITY, "Project"),
    Rule("entity", ("certificate.",), _ENTITY, "Certificate"),
    Rule("entity", ("certificates.",), _ENTITY, "Certificate", list_field="certificates"),
    Rule("entity", ("ip_allowlist.",), _ENTITY, "IP Allowlist"),
    Rule("entity", ("ip_allowlist.config.",), _ENTITY, "IP Allowlist", list_field="configs"),
    Rule("entity", ("organization.",), _ENTITY, "Organization"),
    Rule("entity", ("rate_limit.",), _ENTITY, "Rate Limit"),
)  # fmt: skip

ACTIVITY = Rule("activity", ())
_BY_PREFIX = sorted(((p, r) for r in RULES for p in r.prefixes), key=lambda pr: -len(pr[0]))


def rule_of(event_type: str) -> Rule:
    for prefix, rule in _BY_PREFIX:
        if event_type == prefix or (prefix.endswith(".") and event_type.startswith(prefix)):
            return rule
    return ACTIVITY


def verb_of(event_type: str, rule: Rule) -> str:
    """The action: what follows the matched prefix (`role.bound_to_resource` is its own verb), else the last
    dotted part. `login.failed` -> `failed`, `tenant.group.member.added` -> `added`."""
    for prefix in rule.prefixes:
        if event_type == prefix:
            return prefix.rsplit(".", 1)[-1]
    return event_type.rsplit(".", 1)[-1]


FAILED_VERBS = frozenset({"failed"})

# What a verb does to its subject, for the mappings' activity and event type; other verbs are "other".
KINDS = {
    **dict.fromkeys(("created", "registered", "added", "sent", "upserted", "provisioned", "issued", "invited",
                     "bound_to_resource"), "create"),
    "looked_up": "read",
    **dict.fromkeys(("updated", "activated", "deactivated", "enabled", "disabled", "attached", "detached",
                     "accepted", "declined", "resolved", "completed", "migrated", "started", "requested",
                     "redemption"), "update"),
    **dict.fromkeys(("deleted", "removed", "archived", "revoked", "unbound_from_resource"), "delete"),
}  # fmt: skip


@dataclass
class Facts:
    """An event's parts as the mappings need them; `payload` is flattened (ingest.model's lookup rule)."""

    event: dict
    rule: Rule
    verb: str
    payload: dict
    actor_type: str | None = None
    user: dict = field(default_factory=dict)  # {id, email} of the acting user
    api_key_id: str | None = None
    service_account_id: str | None = None
    session: dict = field(default_factory=dict)
    ip_details: dict = field(default_factory=dict)
    used: set[str] = field(default_factory=set)  # payload fields a mapping placed

    @property
    def failed(self) -> bool:
        return self.verb in FAILED_VERBS

    @property
    def kind(self) -> str:
        return KINDS.get(self.verb, "other")

    def take(self, names: tuple[str, ...]) -> Any:
        """The first of the payload fields present (marked as placed), or None."""
        for name in names:
            value = self.payload.get(name)
            if value not in (None, "", [], {}):
                self.used.add(name)
                return value
        return None

    def subject(self) -> dict[str, Any]:
        """The subject's attributes the rule declares, those present."""
        found = {attr: self.take(fields) for attr, fields in self.rule.subject.items()}
        return {k: v for k, v in found.items() if v is not None}

    def listed(self) -> list[dict]:
        """The {id, name} items of a bulk payload (certificates.activated)."""
        items = self.payload.get(self.rule.list_field) if self.rule.list_field else None
        if not isinstance(items, list) or self.rule.list_field is None:
            return []
        self.used.add(self.rule.list_field)
        return [i for i in items if isinstance(i, dict)]

    def unplaced(self) -> dict:
        return {k: v for k, v in self.payload.items() if k not in self.used}


def facts(event: dict) -> Facts:
    event_type = str(event.get("type") or "")
    rule = rule_of(event_type)
    result = Facts(event, rule, verb_of(event_type, rule), _flatten(event.get(event_type)))
    actor = event.get("actor")
    if not isinstance(actor, dict):
        return result
    result.actor_type = string(actor.get("type"))
    session, key = _obj(actor.get("session")), _obj(actor.get("api_key"))
    user = _obj(session.get("user")) or _obj(key.get("user"))
    result.user = {k: string(user.get(k)) for k in ("id", "email") if string(user.get(k))}
    result.api_key_id = string(key.get("id"))
    result.service_account_id = string(_obj(key.get("service_account")).get("id"))
    result.session = session
    result.ip_details = _obj(session.get("ip_address_details"))
    return result


def _flatten(payload: Any) -> dict:
    """The payload's own fields, then those inside `data` and `changes_requested` (the own key wins)."""
    if not isinstance(payload, dict):
        return {} if payload is None else {"value": payload}
    flat = {k: v for k, v in payload.items() if k not in WRAPPERS or not isinstance(v, dict)}
    for wrapper in WRAPPERS:
        inner = payload.get(wrapper)
        if isinstance(inner, dict):
            for k, v in inner.items():
                flat.setdefault(k, v)
    return flat


def _obj(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def string(value: Any) -> str | None:
    """A non-empty string, else None."""
    return value if isinstance(value, str) and value else None


def number(value: Any) -> float | None:
    """A coordinate served as a number or as text ("35.67620")."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return None
