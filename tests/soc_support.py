"""Helpers of the SIEM tests: the simulator's events of every type, synced into a warehouse and read back."""

from __future__ import annotations

import pytest
from support import KEY, logged_events, sync

from ingest.simulator import Simulator, SimulatorServer, event_types_in_spec


def every_type(url: str) -> list[dict]:
    """Syncs the simulator's events (every spec type five times, and the types it invents) into `url`; returns
    them as the committed-batch log hands them to consumers."""
    server = SimulatorServer(Simulator(events=6000, seed=181, key=KEY)).start()
    try:
        server.sim.append(5 * len(event_types_in_spec()), types=event_types_in_spec())
        with pytest.MonkeyPatch.context() as env:
            env.setenv("OPENAI_ADMIN_KEY", KEY)
            sync(server, url)
    finally:
        server.stop()
    return [e.raw for e in logged_events(url)]


# Events the warehouse keeps although they do not fit the spec (README, "Kept or quarantined").
HOSTILE = [
    {"id": "audit_log-h1", "type": "login.failed", "effective_at": 1_800_000_000, "actor": None},
    {"id": "audit_log-h2", "type": "api_key.created", "effective_at": 1_800_000_001, "actor": "session",
     "api_key.created": ["not", "an", "object"]},
    {"id": "audit_log-h3", "type": "user.added", "effective_at": 1_800_000_002,
     "user.added": {"id": 12, "data": {"role": 2**70, "email": None}},
     "actor": {"type": "session", "session": {"user": "nobody", "ip_address": 42, "user_agent": ["x"],
                                              "ip_address_details": {"latitude": "north", "asn": "AS1"}}}},
    {"id": "audit_log-h4", "type": "group.updated", "effective_at": 1_800_000_003, "project": {"id": 7},
     "group.updated": {"group_name": "«Ünïcödé» \u2028 '; DROP TABLE x;--"},
     "actor": {"type": "api_key", "api_key": {"id": "key_1", "service_account": "svc"}}},
    {"id": "audit_log-h5", "type": "role.bound_to_resource", "effective_at": 1_800_000_004, "role.bound_to_resource": None},
    {"id": "audit_log-h6", "type": "certificates.activated", "effective_at": 1_800_000_005,
     "certificates.activated": {"certificates": [{"id": "cert_1"}, "junk", {"name": {"nested": True}}]}},
]  # fmt: skip
