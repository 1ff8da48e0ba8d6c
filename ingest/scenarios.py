"""Attack scenarios for the simulator: sequences of events, as data, planted among its normal traffic.

Each step says which rules of the pack (ingest/rules) must alert on its events: the tests check that every
alerting rule has a step, and that each rule alerts on exactly the events of its steps.
`audit-ingest simulate --scenario NAME` and the demo plant them.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

# People and places the scenarios use (none is in the simulator's normal pools).
ACTORS: dict[str, dict[str, str]] = {
    "victim": {"user": "user-scnVictimAda00000000000", "email": "ada.victim@example.com", "ip": "198.51.100.20",
               "country": "US"},
    "victim_abroad": {"user": "user-scnVictimAda00000000000", "email": "ada.victim@example.com",
                      "ip": "203.0.113.99", "country": "KP"},
    "stuffer": {"user": "user-scnVictimBob00000000000", "email": "bob.target@example.com", "ip": "203.0.113.66",
                "country": "RU"},
    "admin": {"user": "user-scnRogueAdmin000000000", "email": "rogue.admin@example.com", "ip": "198.51.100.77",
              "country": "US"},
}  # fmt: skip
SPRAY_IP = "203.0.113.200"
PROJECT = {"id": "proj_scnPersistence0000000000", "name": "Persistence"}
OTHER_PROJECT = {"id": "proj_scnOther000000000000000", "name": "Other"}


@dataclass(frozen=True)
class Step:
    type: str
    fires: tuple[str, ...]  # the rules that alert on these events
    actor: str = "admin"
    at: int = 0  # seconds after the scenario's start (negative: before it)
    count: int = 1
    every: int = 5  # seconds between its events
    payload: dict[str, Any] = field(default_factory=dict)
    project: dict[str, str] | None = None
    targets: int = 0  # login.failed against this many distinct users (spraying), one event each, from SPRAY_IP


@dataclass(frozen=True)
class Scenario:
    description: str
    steps: tuple[Step, ...]


SCENARIOS: dict[str, Scenario] = {
    "credential-stuffing": Scenario(
        "20 failed sign-ins on one account in under two minutes, then one IP trying 5 accounts",
        (
            Step(
                "login.failed",
                ("openai_failed_login_burst",),
                actor="stuffer",
                count=20,
                every=4,
                payload={"error_code": "invalid_credentials", "error_message": "Wrong email or password."},
            ),
            Step(
                "login.failed",
                ("openai_password_spray",),
                at=600,
                targets=5,
                every=30,
                payload={"error_code": "invalid_credentials", "error_message": "Wrong email or password."},
            ),
        ),
    ),
    "account-takeover": Scenario(
        "a user signs in from a second country, then grants owner, mints keys and invites an outsider",
        (
            Step("login.succeeded", ("openai_login_new_country",), actor="victim", at=-3 * 86400),
            Step("login.succeeded", ("openai_login_new_country",), actor="victim_abroad"),
            Step(
                "user.updated",
                ("openai_owner_role_granted",),
                actor="victim_abroad",
                at=60,
                payload={"id": "user-scnAccomplice000000000", "changes_requested": {"role": "owner"}},
            ),
            Step(
                "api_key.created",
                ("openai_api_key_org_write_scope",),
                actor="victim_abroad",
                at=120,
                project=OTHER_PROJECT,
                payload={"id": "key_scnWriteScope0000000000", "data": {"scopes": ["api.organization.write"]}},
            ),
            Step(
                "service_account.created",
                ("openai_service_account_key_issued",),
                actor="victim_abroad",
                at=1200,
                project=PROJECT,
                payload={"id": "svc_acct_scnBackdoor00000000", "data": {"role": "member"}},
            ),
            Step(
                "api_key.created",
                ("openai_service_account_key_issued",),
                actor="victim_abroad",
                at=1260,
                project=PROJECT,
                payload={"id": "key_scnBackdoor000000000000", "data": {"scopes": ["api.model.request"]}},
            ),
            Step(
                "invite.sent",
                ("openai_invite_outside_domains",),
                actor="victim_abroad",
                at=1320,
                payload={"id": "invite-scnOutsider0000000000", "data": {"email": "drop@evil.test", "role": "owner"}},
            ),
        ),
    ),
    "defense-evasion": Scenario(
        "an admin lifts the organization's protections one after the other",
        (
            Step(
                "ip_allowlist.config.deactivated",
                ("openai_ip_allowlist_disabled",),
                payload={"configs": [{"id": "ipal_scnOffice00000000000", "name": "office"}]},
            ),
            Step("scim.disabled", ("openai_scim_changed",), at=30, payload={"id": "org-scn"}),
            Step(
                "certificates.deactivated",
                ("openai_mtls_certificates_deactivated",),
                at=60,
                payload={"certificates": [{"id": "cert_scnMtls00000000000000", "name": "mtls-client"}]},
            ),
            Step(
                "organization.updated",
                ("openai_org_settings_changed",),
                at=90,
                payload={"id": "org-scn", "changes_requested": {"api_call_logging": "disabled"}},
            ),
            Step(
                "tenant.policy.updated",
                ("openai_tenant_policy_changed",),
                at=120,
                payload={"id": "policy_scnSession0000000000"},
            ),
            Step(
                "tenant.sso_connection.deleted",
                ("openai_sso_connection_deleted",),
                at=150,
                payload={"id": "sso_scnConnection000000000"},
            ),
            Step("external_key.removed", ("openai_external_key_removed",), at=180, payload={"id": "ekey_scnByok0000"}),
            Step(
                "tenant.admin_api_key.created",
                ("openai_admin_api_key_created",),
                at=210,
                payload={"id": "key_scnAdmin0000000000000"},
            ),
        ),
    ),
    "resource-abuse": Scenario(
        "a rate limit raised to a hundred times the top tier, then 10 keys and projects deleted in 5 minutes",
        (
            Step(
                "rate_limit.updated",
                ("openai_rate_limit_raised",),
                payload={"id": "rl-scnGpt4o", "changes_requested": {"max_requests_per_1_minute": 1000000}},
            ),
            Step(
                "api_key.deleted", ("openai_mass_deletion",), at=60, count=6, every=20, payload={"id": "key_scnDeleted"}
            ),
            Step(
                "project.deleted",
                ("openai_mass_deletion",),
                at=200,
                count=4,
                every=20,
                payload={"id": "proj_scnDeleted"},
            ),
        ),
    ),
}


def names() -> list[str]:
    return sorted(SCENARIOS)


def events(name: str, start: int | None = None) -> list[tuple[dict, tuple[str, ...]]]:
    """The scenario's events starting at `start` (Unix s; default: an hour ago), each with the rules that
    must alert on it."""
    scenario = SCENARIOS[name]
    start = int(time.time()) - 3600 if start is None else start
    out: list[tuple[dict, tuple[str, ...]]] = []
    for s, step in enumerate(scenario.steps):
        for i in range(step.targets or step.count):
            actor = _session(ACTORS[step.actor])
            if step.targets:
                victim = f"user-scnSprayed{i:013d}"
                actor = _session({"user": victim, "email": f"sprayed{i}@example.com", "ip": SPRAY_IP, "country": "RU"})
            payload = dict(step.payload)
            if step.count > 1 and "id" in payload:
                payload["id"] = f"{payload['id']}{i:04d}"
            event: dict[str, Any] = {
                "id": _id(name, s, i),
                "type": step.type,
                "effective_at": start + step.at + i * step.every,
            }
            if step.project:
                event["project"] = dict(step.project)
            event["actor"] = actor
            event[step.type] = payload
            out.append((event, step.fires))
    return out


def plant(sim, name: str, start: int | None = None) -> list[tuple[dict, tuple[str, ...]]]:
    """Adds the scenario's events to a running Simulator; returns them with their rules."""
    planted = events(name, start)
    sim.insert([event for event, _ in planted])
    return planted


def _session(who: dict[str, str]) -> dict[str, Any]:
    return {
        "type": "session",
        "session": {
            "user": {"id": who["user"], "email": who["email"]},
            "ip_address": who["ip"],
            "ip_address_details": {"country": who["country"]},
        },
    }


def _id(name: str, step: int, i: int) -> str:
    return "audit_log-" + hashlib.sha256(f"{name}:{step}:{i}".encode()).hexdigest()[:20]
