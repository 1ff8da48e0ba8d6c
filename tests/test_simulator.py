"""The audit-log simulator, exercised over real HTTP and checked against brute force over `sim.events`."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import httpx
import openai
import pytest

from ingest.simulator import (
    ALL_FAULTS,
    UNKNOWN_EVENT_TYPES,
    Simulator,
    SimulatorServer,
    event_types_in_spec,
    load_spec,
    typed_event_types_in_spec,
)

KEY = "sk-admin-test"
AUDIT_LOGS = "/organization/audit_logs"
TENANT_OUTSIDE_PREFIX = {"role.bound_to_resource", "role.unbound_from_resource"}


def tenant_scoped(event_type: str) -> bool:
    return event_type.startswith("tenant.") or event_type in TENANT_OUTSIDE_PREFIX


def client(server: SimulatorServer, key: str = KEY) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=10)


def fetch_all(c: httpx.Client, params: dict, limit: int = 100) -> list[str]:
    """Page with `after` until has_more is false, checking the list envelope on every page."""
    ids: list[str] = []
    after = None
    while True:
        query = dict(params, limit=limit, **({"after": after} if after else {}))
        r = c.get(AUDIT_LOGS, params=query)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "list"
        page = [e["id"] for e in body["data"]]
        assert body["first_id"] == (page[0] if page else None)
        assert body["last_id"] == (page[-1] if page else None)
        ids += page
        if not body["has_more"]:
            return ids
        assert len(page) == limit
        after = body["last_id"]


def actor_ids(e: dict) -> set[str]:
    actor = e.get("actor")
    if actor is None:
        return set()
    if actor["type"] == "session":
        return {actor["session"]["user"]["id"]}
    key = actor["api_key"]
    return {key["id"], (key.get("user") or key.get("service_account"))["id"]}


def actor_email(e: dict) -> str | None:
    actor = e.get("actor")
    if actor is None:
        return None
    user = actor["session"]["user"] if actor["type"] == "session" else actor["api_key"].get("user")
    return user["email"] if user else None


def brute_force(events: list[dict], params: dict) -> list[str]:
    """The ids the API should return for these wire parameters, newest first."""

    def ok(e: dict) -> bool:
        t = e["effective_at"]
        bounds = {"gt": t.__gt__, "gte": t.__ge__, "lt": t.__lt__, "lte": t.__le__}
        for op, check in bounds.items():
            if f"effective_at[{op}]" in params and not check(int(params[f"effective_at[{op}]"])):
                return False
        if tenant_scoped(e["type"]) != (params.get("tenant_only") == "true"):
            return False
        checks = {
            "event_types[]": {e["type"]},
            "project_ids[]": {(e.get("project") or {}).get("id")},
            "actor_ids[]": actor_ids(e),
            "actor_emails[]": {actor_email(e)},
            "resource_ids[]": {e[e["type"]].get("id")},
        }
        return all(name not in params or set(params[name]) & values for name, values in checks.items())

    return [e["id"] for e in events if ok(e)]


@pytest.fixture(scope="module")
def shared():
    """Read-only data set: 3,000 events within one hour, so many share the same second."""
    with SimulatorServer(Simulator(events=3000, seed=7, span_seconds=3600, key=KEY)) as server:
        yield server


@pytest.fixture(scope="module")
def shared_events(shared) -> list[dict]:
    return shared.sim.events


# -- spec and generated data -----------------------------------------------------------------------


def test_spec_helpers():
    types = event_types_in_spec()
    typed = typed_event_types_in_spec()
    assert len(types) == 145 == len(set(types))
    assert types[0] == "api_key.created"
    assert len(typed) == 55
    assert set(typed) <= set(types)
    assert set(typed) <= set(load_spec()["components"]["schemas"]["AuditLog"]["properties"])


def test_every_enum_type_present_in_1000_events():
    events = Simulator(events=1000, seed=0).events
    assert set(event_types_in_spec()) <= {e["type"] for e in events}
    assert len(events) == 1000
    assert len({e["id"] for e in events}) == 1000
    assert all(re.fullmatch(r"audit_log-[0-9a-f]{20}", e["id"]) for e in events)


def test_time_spread_and_order():
    now = int(time.time())
    events = Simulator(events=10_000, seed=2, now=now).events
    assert all(now - 30 * 86400 <= e["effective_at"] <= now - 60 for e in events)
    keys = [(e["effective_at"], e["id"]) for e in events]
    assert keys == sorted(keys, reverse=True)
    assert sum(e["effective_at"] > now - 900 for e in events) < 20


def test_generation_is_deterministic():
    now = int(time.time())
    a = Simulator(events=400, seed=3, now=now).events
    assert a == Simulator(events=400, seed=3, now=now).events
    assert {e["id"] for e in a}.isdisjoint(e["id"] for e in Simulator(events=400, seed=4, now=now).events)


def conforms(value, schema: dict) -> bool:
    if "enum" in schema:
        return value in schema["enum"]
    kind = schema.get("type")
    if kind == "string":
        return isinstance(value, str)
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "array":
        return isinstance(value, list) and all(conforms(v, schema.get("items", {})) for v in value)
    if kind == "object":
        props = schema.get("properties")
        if not isinstance(value, dict):
            return False
        return props is None or all(k in props and conforms(v, props[k]) for k, v in value.items())
    return True


def test_payloads_follow_the_spec_schema(shared_events):
    props = load_spec()["components"]["schemas"]["AuditLog"]["properties"]
    typed = set(typed_event_types_in_spec())
    for e in shared_events:
        payload = e[e["type"]]
        assert isinstance(payload, dict)
        if e["type"] == "api_key.updated" and "data" in payload:
            # The wire quirk from the spec's example: `data` instead of `changes_requested`.
            payload = {("changes_requested" if k == "data" else k): v for k, v in payload.items()}
        if e["type"] in typed:
            assert conforms(payload, props[e["type"]]), e
        elif e["type"] not in UNKNOWN_EVENT_TYPES:
            assert isinstance(payload["id"], str)
    updates = [e["api_key.updated"] for e in shared_events if e["type"] == "api_key.updated"]
    assert any("data" in p for p in updates)
    assert any("changes_requested" in p for p in updates)
    assert any(e["type"] in UNKNOWN_EVENT_TYPES for e in shared_events)


def test_actors_projects_and_hostile_strings(shared_events):
    kinds = Counter()
    key_owner: dict[str, str] = {}
    for e in shared_events:
        actor = e["actor"]
        if actor is None:
            kinds["null"] += 1
            continue
        if actor["type"] == "session":
            s = actor["session"]
            assert s["user"]["id"].startswith("user-") and "@" in s["user"]["email"]
            details = s.get("ip_address_details")
            if details:
                assert all(isinstance(details[k], str) for k in ("asn", "latitude", "longitude"))
            kinds["session"] += 1
        else:
            key = actor["api_key"]
            assert key["id"].startswith("key_")
            owner = (key.get("user") or key.get("service_account"))["id"]
            assert key_owner.setdefault(key["id"], owner) == owner  # a key always has the same owner
            kinds[key["type"]] += 1
        if "project" in e:
            assert e["project"]["id"].startswith("proj_") and isinstance(e["project"]["name"], str)
    assert all(kinds[k] > 0 for k in ("null", "session", "user", "service_account"))
    assert 0.6 < sum("project" in e for e in shared_events) / len(shared_events) < 0.8

    invites = [e["invite.sent"].get("data", {}).get("email") for e in shared_events if e["type"] == "invite.sent"]
    domains = {email.split("@")[1] for email in invites if email}
    assert "example.com" in domains and len(domains) > 1

    failed_ips = Counter(e["actor"]["session"]["ip_address"] for e in shared_events if e["type"] == "login.failed")
    assert len(failed_ips) <= 4 and sum(failed_ips.values()) >= 10

    text = json.dumps(shared_events, ensure_ascii=False)
    assert "\x00" not in text
    assert "DROP TABLE audit_events" in text and "\u2028" in text
    assert any(len(s) >= 10_000 for s in re.findall(r'"((?:[^"\\]|\\.)*)"', text))


# -- listing and filters ---------------------------------------------------------------------------


def test_full_paging_covers_every_event_once_newest_first(shared, shared_events):
    with client(shared) as c:
        org = fetch_all(c, {})
        tenant = fetch_all(c, {"tenant_only": "true"}, limit=37)
    assert org == brute_force(shared_events, {})
    assert tenant == brute_force(shared_events, {"tenant_only": "true"})
    assert sorted(org + tenant) == sorted(e["id"] for e in shared_events)
    assert len(org) + len(tenant) == len(shared_events)


def filter_cases(events: list[dict]) -> dict[str, dict]:
    mid = events[len(events) // 2]["effective_at"]
    projects = Counter((e.get("project") or {}).get("id") for e in events)
    del projects[None]
    user_key = next(e["actor"]["api_key"] for e in events if (e["actor"] or {}).get("api_key", {}).get("user"))
    svc = next(
        e["actor"]["api_key"]["service_account"]["id"]
        for e in events
        if (e["actor"] or {}).get("api_key", {}).get("service_account")
    )
    session_user = next(e["actor"]["session"]["user"]["id"] for e in events if (e["actor"] or {}).get("session"))
    emails = {actor_email(e) for e in events} - {None}
    odd_emails = sorted(m for m in emails if "+" in m or "'" in m)
    resources = Counter(e[e["type"]].get("id") for e in events if not tenant_scoped(e["type"]))
    return {
        "gt": {"effective_at[gt]": mid},
        "gte": {"effective_at[gte]": mid},
        "lt": {"effective_at[lt]": mid},
        "lte": {"effective_at[lte]": mid},
        "window": {"effective_at[gte]": mid - 300, "effective_at[lt]": mid + 300},
        "event_types": {"event_types[]": ["login.failed", "invite.sent", "api_key.updated"]},
        "project_ids": {"project_ids[]": [p for p, _ in projects.most_common(2)]},
        "actor_ids": {"actor_ids[]": [user_key["id"], user_key["user"]["id"], svc, session_user]},
        "actor_emails": {"actor_emails[]": [*odd_emails, sorted(emails)[0]]},
        "resource_ids": {"resource_ids[]": [r for r, _ in resources.most_common(3) if r]},
        "tenant_only": {"tenant_only": "true"},
        "tenant_types": {"tenant_only": "true", "event_types[]": ["role.bound_to_resource", "tenant.user.added"]},
        "tenant_types_without_tenant_only": {"event_types[]": ["role.bound_to_resource", "tenant.user.added"]},
        "combined": {
            "project_ids[]": [p for p, _ in projects.most_common(3)],
            "event_types[]": ["login.succeeded", "api_key.created"],
            "effective_at[gte]": mid - 900,
        },
        "no_match": {"actor_ids[]": ["user-nobody"]},
    }


FILTER_CASES = [
    "gt", "gte", "lt", "lte", "window", "event_types", "project_ids", "actor_ids", "actor_emails", "resource_ids",
    "tenant_only", "tenant_types", "tenant_types_without_tenant_only", "combined", "no_match",
]  # fmt: skip


@pytest.mark.parametrize("case", FILTER_CASES)
def test_filters_match_brute_force(shared, shared_events, case):
    cases = filter_cases(shared_events)
    assert list(cases) == FILTER_CASES
    params = cases[case]
    expected = brute_force(shared_events, params)
    if case not in ("no_match", "tenant_types_without_tenant_only"):
        assert expected, "the case should select something"
    with client(shared) as c:
        assert fetch_all(c, params, limit=100) == expected
        assert fetch_all(c, params, limit=7) == expected


def test_cursor_outside_the_filter_and_window(shared, shared_events):
    params = {"event_types[]": ["login.succeeded"]}
    expected = brute_force(shared_events, params)
    other = next(i for i, e in enumerate(shared_events[500:], 500) if e["type"] != "login.succeeded")
    newer = sum(1 for e in shared_events[:other] if e["id"] in set(expected))
    with client(shared) as c:
        after = c.get(AUDIT_LOGS, params={**params, "after": shared_events[other]["id"], "limit": 5}).json()
        before = c.get(AUDIT_LOGS, params={**params, "before": shared_events[other]["id"], "limit": 5}).json()
    assert [e["id"] for e in after["data"]] == expected[newer : newer + 5]
    assert [e["id"] for e in before["data"]] == expected[newer - 5 : newer]
    assert after["has_more"] and before["has_more"]


def test_before_cursor(shared, shared_events):
    full = brute_force(shared_events, {})
    with client(shared) as c:
        body = c.get(AUDIT_LOGS, params={"before": full[500], "limit": 10}).json()
        assert [e["id"] for e in body["data"]] == full[490:500]
        assert body["has_more"] is True
        body = c.get(AUDIT_LOGS, params={"before": full[5], "limit": 10}).json()
        assert [e["id"] for e in body["data"]] == full[:5]
        assert body["has_more"] is False
        body = c.get(AUDIT_LOGS, params={"before": full[0]}).json()
        assert body == {"object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False}
        # Walking backwards from the oldest event rebuilds the whole list.
        pages, cursor = [], full[-1]
        while True:
            body = c.get(AUDIT_LOGS, params={"before": cursor, "limit": 100}).json()
            pages.insert(0, [e["id"] for e in body["data"]])
            if not body["has_more"]:
                break
            cursor = body["first_id"]
    assert [i for p in pages for i in p] + [full[-1]] == full


def test_default_limit_and_limit_errors(shared):
    with client(shared) as c:
        assert len(c.get(AUDIT_LOGS).json()["data"]) == 20
        assert len(c.get(AUDIT_LOGS, params={"limit": 1}).json()["data"]) == 1
        for bad in ("0", "101", "-1", "abc", ""):
            r = c.get(AUDIT_LOGS, params={"limit": bad})
            assert r.status_code == 400, bad
            assert r.json()["error"]["param"] == "limit"
            assert r.json()["error"]["type"] == "invalid_request_error"


def test_bad_requests(shared):
    with client(shared) as c:
        for param in ("after", "before"):
            r = c.get(AUDIT_LOGS, params={param: "audit_log-00000000000000000000"})
            assert r.status_code == 400 and r.json()["error"]["param"] == param
        r = c.get(AUDIT_LOGS, params={"effective_at[gte]": "yesterday"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "effective_at[gte]"
        r = c.get(AUDIT_LOGS, params={"tenant_only": "true", "event_types[]": ["tenant.user.added", "login.failed"]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "event_types[]"
        r = c.get("/organization/audit_log")
        assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"


def test_auth_and_disabled(simulator):
    server = simulator(events=10)
    with client(server, key="sk-admin-wrong") as c:
        r = c.get(AUDIT_LOGS)
    assert r.status_code == 401
    assert r.json() == {
        "error": {
            "message": r.json()["error"]["message"],
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }
    assert httpx.get(server.url + AUDIT_LOGS).status_code == 401
    assert httpx.get(server.url.removesuffix("/v1") + "/_sim/stats").status_code == 401

    disabled = simulator(events=10, audit_logging_enabled=False)
    with client(disabled) as c:
        r = c.get(AUDIT_LOGS)
    assert r.status_code == 403
    assert "api.audit_logs.read" in r.json()["error"]["message"]


def test_retention_drops_old_events_and_their_cursors(simulator):
    now = int(time.time())
    everything = Simulator(events=500, seed=5, now=now).events
    server = simulator(events=500, seed=5, now=now, retention_seconds=7 * 86400)
    kept = server.sim.events
    assert kept == [e for e in everything if e["effective_at"] >= now - 7 * 86400]
    assert 0 < len(kept) < len(everything)
    with client(server) as c:
        assert fetch_all(c, {}) == brute_force(kept, {})
        r = c.get(AUDIT_LOGS, params={"after": everything[-1]["id"]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "after"


def test_append_new_and_late_events(simulator):
    server = simulator(events=300, seed=1)
    sim = server.sim
    with client(server) as c:
        before = fetch_all(c, {})
        new = sim.append(3, types=["login.succeeded", "api_key.created", "tenant.user.added"])
        late = sim.append(2, late_by=5 * 86400, types=["project.created", "login.failed"])
        assert [e["type"] for e in late] == ["project.created", "login.failed"]
        assert all(e["effective_at"] >= int(time.time()) - 2 for e in new)
        after = fetch_all(c, {})
        tenant = fetch_all(c, {"tenant_only": "true"})
    assert sorted(after) == sorted(before + [e["id"] for e in new[:2] + late])
    assert after == brute_force(sim.events, {})
    assert set(after[:2]) == {e["id"] for e in new[:2]}
    assert tenant[0] == new[2]["id"]
    assert after.index(late[0]["id"]) > 2
    assert len(sim.append(50)) == 50 and len(sim.events) == 355


def test_control_endpoints(simulator):
    server = simulator(events=50, fault_rate=1.0)  # control endpoints are never faulted
    root = server.url.removesuffix("/v1")
    headers = {"Authorization": f"Bearer {KEY}"}
    appended = httpx.post(root + "/_sim/append", params={"count": 2, "late_by": 60}, headers=headers).json()
    assert len(appended) == 2 and all(e["effective_at"] <= time.time() - 59 for e in appended)
    events = httpx.get(root + "/_sim/events", headers=headers).json()
    assert events == server.sim.events and len(events) == 52
    stats = httpx.get(root + "/_sim/stats", headers=headers).json()
    assert stats == {"requests": 0, "faults": dict.fromkeys(ALL_FAULTS, 0), "events": 52, "rate_limited": 0}


# -- faults and latency ----------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["429", "429ms", "500", "502", "503", "504"])
def test_http_faults(simulator, fault):
    server = simulator(events=20, fault_rate=1.0, faults=(fault,))
    with client(server) as c:
        r = c.get(AUDIT_LOGS)
    assert r.status_code == int(fault[:3])
    if fault == "429":
        assert r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
    elif fault == "429ms":
        assert r.headers["retry-after-ms"] == "20"
    elif fault == "502":
        assert r.headers["content-type"].startswith("text/html") and b"502 Bad Gateway" in r.content
    else:
        assert r.json()["error"]["type"] == "server_error"
    assert server.sim.faults_injected == {fault: 1}
    assert server.sim.requests == 1


def test_transport_faults(simulator):
    reset = simulator(events=20, fault_rate=1.0, faults=("reset",))
    with client(reset) as c, pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
        c.get(AUDIT_LOGS)
    truncated = simulator(events=20, fault_rate=1.0, faults=("truncated",))
    with client(truncated) as c, pytest.raises(httpx.RemoteProtocolError):
        c.get(AUDIT_LOGS)
    slow = simulator(events=20, fault_rate=1.0, faults=("slow",))
    with client(slow) as c:
        t = time.perf_counter()
        assert c.get(AUDIT_LOGS).status_code == 200
        assert time.perf_counter() - t >= 0.3
    assert reset.sim.faults_injected["reset"] == truncated.sim.faults_injected["truncated"] == 1


def test_fault_rate_and_every_kind(simulator):
    server = simulator(events=100, fault_rate=0.3, faults=tuple(f for f in ALL_FAULTS if f != "slow"))
    seen = Counter()
    with client(server) as c:
        for _ in range(400):
            try:
                seen[c.get(AUDIT_LOGS, params={"limit": 1}).status_code] += 1
            except httpx.TransportError:
                seen["transport"] += 1
    injected = server.sim.faults_injected
    assert server.sim.requests == 400
    assert 80 <= sum(injected.values()) <= 160
    assert all(n > 0 for n in injected.values()), injected
    assert seen[200] == 400 - sum(injected.values())
    assert seen["transport"] == injected["reset"] + injected["truncated"]


def test_latency_and_concurrency(simulator):
    server = simulator(events=500, latency=0.05)
    expected = brute_force(server.sim.events, {})
    results: list[list[str]] = []

    def worker():
        with client(server) as c:
            results.append(fetch_all(c, {}, limit=100))

    t = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    pages = len(expected) // 100 + 1
    # 8 clients in parallel take far less than 8 serial ones: the latency does not serialise requests.
    assert pages * 0.05 <= time.perf_counter() - t < pages * 0.05 * 4 * 2
    assert results == [expected] * 8


# -- OpenAI's official SDK and the CLI entry point -------------------------------------------------


def test_official_sdk_pages_and_filters(shared, shared_events):
    sdk = openai.OpenAI(admin_api_key=KEY, base_url=shared.url, max_retries=0)
    audit_logs = sdk.admin.organization.audit_logs
    assert [e.id for e in audit_logs.list(limit=100)] == brute_force(shared_events, {})

    mid = shared_events[len(shared_events) // 2]["effective_at"]
    project = next(e["project"]["id"] for e in shared_events if "project" in e)
    got = audit_logs.list(
        limit=50,
        effective_at={"gte": mid},
        event_types=["login.succeeded", "api_key.created", "project.updated"],
        project_ids=[project],
    )
    expected = brute_force(
        shared_events,
        {
            "effective_at[gte]": mid,
            "event_types[]": ["login.succeeded", "api_key.created", "project.updated"],
            "project_ids[]": [project],
        },
    )
    assert [e.id for e in got] == expected and expected
    tenant = [e.id for e in audit_logs.list(limit=100, tenant_only=True)]
    assert tenant == brute_force(shared_events, {"tenant_only": "true"})
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(
            admin_api_key="sk-admin-nope", base_url=shared.url, max_retries=0
        ).admin.organization.audit_logs.list()


def test_serve_runs_until_sigterm():
    code = "from ingest.simulator import serve; serve(port=0, events=200, seed=1, fault_rate=0.0, key='sk-cli')"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip()
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/v1", url)
        r = httpx.get(url + AUDIT_LOGS, headers={"Authorization": "Bearer sk-cli"})
        assert r.status_code == 200 and len(r.json()["data"]) == 20
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        proc.wait()


def test_simulate_with_orgs_serves_each_organization_its_own_history_to_its_own_key_only():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUDIT_INGEST_", "OPENAI_"))}
    env["OPENAI_ADMIN_KEY"] = "sk-admin-multi"
    args = ["simulate", "--port", "0", "--orgs", "3", "--events", "150", "--seed", "4"]
    proc = subprocess.Popen([sys.executable, "-m", "ingest", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        url = proc.stdout.readline().strip()
        banner = proc.stderr.readline()
        keys = [f"sk-admin-multi-{i}" for i in (1, 2, 3)]
        assert "3 organizations, seeds 4 to 6" in banner and all(repr(k) in banner for k in keys), banner
        served = {}
        for i, key in enumerate(keys):
            with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=10) as c:
                served[key] = fetch_all(c, {}) + fetch_all(c, {"tenant_only": "true"})
            # The i-th organization is the simulator of seed 4 + i: its own deterministic history.
            assert sorted(served[key]) == sorted(e["id"] for e in Simulator(events=150, seed=4 + i).events)
        assert len(set().union(*served.values())) == 3 * 150  # no event in two organizations
        # Each key's counters are its organization's: two requests (one page per stream) each.
        root = url.removesuffix("/v1")
        for key in keys:
            stats = httpx.get(root + "/_sim/stats", headers={"Authorization": f"Bearer {key}"}).json()
            assert stats["requests"] == 2 and stats["events"] == 150
        for key in ("sk-admin-multi", "sk-admin-multi-4", "sk-admin-multi-0"):
            assert httpx.get(url + AUDIT_LOGS, headers={"Authorization": f"Bearer {key}"}).status_code == 401
        assert httpx.get(url + AUDIT_LOGS).status_code == 401
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        proc.wait()
