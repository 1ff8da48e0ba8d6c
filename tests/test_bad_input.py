"""Bad input from the API: every item is kept as an event or quarantined in `rejected_events` with its
text and a reason, and counted; nothing is silently lost.

The simulator serves real pages over HTTP; a transport in front of it splices in what no real API
should send (httpx.MockTransport forwarding to the simulator: the simulator itself only serves good data).
"""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import pytest
import sqlalchemy as sa
from support import KEY, handed_batches, scalar, settings_for, stored_events, sync

import ingest.sync
from ingest import batchlog
from ingest.errors import BadResponseError
from ingest.model import is_tenant_scoped
from ingest.simulator import Simulator
from ingest.store import Warehouse
from ingest.sync import run_sources

T = 1_790_000_000  # inside no test's window: the API may send events it was not asked for
HUGE = ("Grüße 🚀 'quoted' \"double\" \\ back " * 70_000)[:2_000_000]
OVERFLOW = "__1e400__"  # replaced by a bare 1e400 in the body: a number no float holds

# (name, item): kept as events, raw exactly as sent.
KEPT = [
    ("unknown type", {"id": "bad-unknown", "type": "frobnicator.exploded", "effective_at": T,
                      "frobnicator.exploded": {"id": "frob_1", "level": 11}}),
    ("null actor", {"id": "bad-null-actor", "type": "project.created", "effective_at": T, "actor": None,
                    "project.created": {"id": "proj_null_actor", "name": "n"}}),
    ("wrong payload types", {"id": "bad-types", "type": "api_key.created", "effective_at": T,
                             "api_key.created": {"id": 42, "data": {"scopes": "api.model.request"}}}),
    ("integer beyond 64 bits in a typed field", {
        "id": "bad-bigint", "type": "rate_limit.updated", "effective_at": T,
        "rate_limit.updated": {"id": "rl_1", "changes_requested": {"max_requests_per_1_minute": 2**70 + 1}}}),
    ("integers beyond 64 bits anywhere", {"id": "bad-bigint-2", "type": "tunnel.created", "effective_at": T,
                                          "tunnel.created": {"id": "tun_1"}, "n": [-(2**80) - 3, 2**64]}),
    ("huge string", {"id": "bad-huge", "type": "project.updated", "effective_at": T,
                     "project.updated": {"id": "proj_huge", "changes_requested": {"title": HUGE}}}),
    ("outside the requested window", {"id": "bad-old", "type": "login.succeeded", "effective_at": 1,
                                      "login.succeeded": {}}),
    ("actor of the wrong shape", {"id": "bad-actor", "type": "logout.succeeded", "effective_at": T,
                                  "actor": {"type": "session", "session": "not an object"}}),
    ("SQL, quotes, backslashes, unicode", {
        "id": "bad-'; DROP TABLE audit_events; --", "type": "group.created", "effective_at": T,
        "group.created": {"id": "grp_\\\"x\"", "group_name": "Robert'); DELETE FROM users; -- ½ \u202e 𝕳"}}),
]  # fmt: skip
DUPLICATE = KEPT[1][1]  # served twice in the page: stored once

# (name, item): quarantined in rejected_events with a reason.
REJECTED = [
    ("no id", {"type": "project.created", "effective_at": T}),
    ("id not a string", {"id": 12345, "type": "project.created", "effective_at": T}),
    ("empty id", {"id": "", "type": "project.created", "effective_at": T}),
    ("no effective_at", {"id": "rej-no-time", "type": "project.created"}),
    ("effective_at a string", {"id": "rej-str-time", "type": "project.created", "effective_at": "2026-01-01"}),
    ("effective_at a float", {"id": "rej-float-time", "type": "project.created", "effective_at": 1.7e9}),
    ("effective_at beyond any date", {"id": "rej-far", "type": "project.created", "effective_at": 10**12}),
    ("no type", {"id": "rej-no-type", "effective_at": T}),
    ("not an object", "just a string"),
    ("a number", 42),
    ("null", None),
    ("a list", [{"id": "rej-in-list"}]),
    ("NUL in a string", {"id": "rej-nul", "type": "project.created", "effective_at": T,
                         "project.created": {"id": "proj_nul", "name": "a\x00b"}}),
    ("lone surrogate", {"id": "rej-surrogate", "type": "project.created", "effective_at": T,
                        "project.created": {"name": "\ud800"}}),
    ("number out of range", {"id": "rej-overflow", "type": "project.created", "effective_at": T,
                             "project.created": {"n": OVERFLOW}}),
    ("duplicate id, different content", {**DUPLICATE, "project.created": {"id": "proj_other"}}),
]  # fmt: skip


class Corrupting(httpx.MockTransport):
    """Forwards each request to the simulator over HTTP and lets `corrupt(request, body)` rewrite the body."""

    def __init__(self, corrupt: Callable[[httpx.Request, bytes], bytes | None]):
        self.upstream = httpx.Client()
        self.corrupt = corrupt
        super().__init__(self.forward)

    def forward(self, request: httpx.Request) -> httpx.Response:
        upstream = self.upstream.send(request)
        body = upstream.read()
        if upstream.status_code == 200:
            body = self.corrupt(request, body) or body
        return httpx.Response(upstream.status_code, content=body, headers={"content-type": "application/json"})


def first_page(request: httpx.Request) -> bool:
    params = request.url.params
    return "after" not in params and params.get("tenant_only") != "true"


def inject(body: bytes, items: list) -> bytes:
    page = json.loads(body)
    page["data"] = items + page["data"]
    return json.dumps(page).replace(json.dumps(OVERFLOW), "1e400").encode()


def as_parsed(item: object) -> object:
    """The item as a JSON parser reads it from the body (1e400 becomes infinity)."""
    return json.loads(json.dumps(item).replace(json.dumps(OVERFLOW), "1e400"))


def rejected_rows(url: str) -> list[tuple[str, str]]:
    warehouse = Warehouse(url)
    try:
        with warehouse.connect() as conn:
            return [tuple(r) for r in conn.execute(sa.text("SELECT raw_text, reason FROM rejected_events"))]
    finally:
        warehouse.dispose()


@pytest.fixture(autouse=True)
def key_env(monkeypatch):
    monkeypatch.setenv("OPENAI_ADMIN_KEY", KEY)


def test_bad_items_are_kept_or_quarantined_never_lost(simulator, db_url):
    server = simulator(events=1200, seed=41)
    items = [item for _, item in KEPT] + [DUPLICATE] + [item for _, item in REJECTED]
    transport = Corrupting(lambda request, body: inject(body, items) if first_page(request) else None)
    [summary] = sync(server, db_url, transport=transport, workers=1)  # one first page a stream

    kept = {item["id"]: item for _, item in KEPT}
    served = {e["id"]: e for e in server.sim.events}
    assert stored_events(db_url) == {**served, **kept}
    assert summary.events_new == len(served) + len(kept)
    assert summary.rejected == len(REJECTED)
    assert summary.mismatches["api_key.created"] == 1 and summary.mismatches["rate_limit.updated"] == 1
    assert scalar(db_url, "SELECT rejected FROM sync_runs") == len(REJECTED)
    assert (
        scalar(db_url, "SELECT max_requests_per_1_minute FROM rate_limit_events WHERE event_id = 'bad-bigint'") is None
    )
    assert scalar(db_url, "SELECT title FROM project_events WHERE event_id = 'bad-huge'") == HUGE
    assert scalar(db_url, "SELECT actor_type FROM audit_events WHERE id = 'bad-null-actor'") is None

    quarantined = rejected_rows(db_url)
    assert len(quarantined) == len(REJECTED)
    for name, item in REJECTED:
        [reason] = [r for text, r in quarantined if json.loads(text) == as_parsed(item)]
        assert reason, name
    reasons = {json.loads(text).get("id"): r for text, r in quarantined if isinstance(json.loads(text), dict)}
    assert "NUL" in reasons["rej-nul"] and "surrogate" in reasons["rej-surrogate"]
    assert "out of range" in reasons["rej-overflow"] and "duplicate" in reasons["bad-null-actor"]

    # A rerun is served the same page again: nothing is stored twice.
    [summary] = sync(server, db_url, transport=transport)
    assert summary.events_new == 0 and summary.rejected == len(REJECTED)
    assert len(rejected_rows(db_url)) == len(REJECTED)
    assert len(stored_events(db_url)) == len(served) + len(kept)


def test_the_batches_a_duckdb_sync_hands_the_rules_following_it_are_what_the_warehouse_reads_back(
    simulator, duckdb_url, monkeypatch
):
    """While a consumer follows a sync (ingest.batchlog.keeping), a DuckDB writer hands it each committed batch's
    events as served, unread: odd payloads, integers beyond 64 bits, an id served again changed on a later page."""
    server = simulator(events=1200, seed=43)
    items = [item for _, item in KEPT] + [DUPLICATE] + [item for _, item in REJECTED]
    stream = [e for e in server.sim.events if not is_tenant_scoped(e["type"])]
    changed = {"id": stream[0]["id"], "type": "user.added", "effective_at": stream[0]["effective_at"],
               "user.added": {"id": "user_changed", "role": "owner"}}  # fmt: skip

    def corrupt(request: httpx.Request, body: bytes) -> bytes | None:
        if first_page(request):
            return inject(body, items)
        return inject(body, [changed]) if request.url.params.get("after") == stream[99]["id"] else None

    transport = Corrupting(corrupt)
    handed = handed_batches(monkeypatch)
    warehouse = Warehouse(duckdb_url)
    try:
        with batchlog.keeping(warehouse.engine):
            settings = settings_for(server, duckdb_url, workers=1, detections=False)
            run_sources(settings, warehouse, settings.sources, transport=transport)
            with warehouse.connect() as conn, conn.begin():
                kept = batchlog.read_after(conn, 0)
        with warehouse.connect() as conn, conn.begin():
            read_back = batchlog.read_after(conn, 0)
    finally:
        warehouse.dispose()
    assert handed == [b.seq for b in read_back] and len(read_back) > 1
    assert kept == read_back  # ids in order, effective_at, raw: the values the warehouse gives back
    assert {"bad-bigint", "bad-null-actor"} <= {e.id for b in kept for e in b.events}
    assert [e.raw for b in kept for e in b.events if e.id == changed["id"]] == [stream[0]]  # the first served


def test_odd_events_written_as_bound_parameters_store_what_arrow_tables_store(tmp_path, monkeypatch):
    """DuckDB binds a small batch's rows when pyarrow is not imported yet (a quiet run): every table holds what the
    Arrow path writes, value for value."""
    from ingest import model, store
    from ingest.backends import duckdb as duckdb_backend

    rows = model.normalise([item for _, item in KEPT], "odd", store.now())
    tables = {}
    for way, values in (("bound", 10**9), ("arrow", 10)):
        monkeypatch.setattr(duckdb_backend, "_BOUND_VALUES", values)
        warehouse = Warehouse(f"duckdb:///{tmp_path / way}.duckdb")
        try:
            warehouse.ensure_schema()
            with warehouse.connect() as conn:
                staged = store.stage("duckdb", rows)
                store.atomically(conn, lambda: ingest.sync.write_batch(conn, "odd", "odd", staged))  # noqa: B023
                tables[way] = {
                    table.name: sorted(repr(tuple(r)) for r in conn.execute(sa.select(*(
                        c for c in table.columns if c.name != "committed_at"))))  # the log's: the clock's
                    for table in model.metadata.sorted_tables
                }  # fmt: skip
        finally:
            warehouse.dispose()
    assert tables["bound"] == tables["arrow"] and len(tables["arrow"]["audit_events"]) == len(KEPT)


HUGE_LIMIT_RULE = """title: Huge rate limit asked for
name: huge_rate_limit
status: test
logsource: {product: openai, service: audit_logs}
detection:
  selection:
    rate_limit.updated.changes_requested.max_requests_per_1_minute|startswith: '11805916207174113034'
  condition: selection
level: low
"""


def test_a_rule_matching_an_integer_beyond_64_bits_alerts_on_its_event(simulator, db_url, tmp_path):
    """A string match against a number spells it as JSON does, exactly, integers beyond 64 bits included."""
    (tmp_path / "huge.yml").write_text(HUGE_LIMIT_RULE)
    server = simulator(events=300, seed=44)
    items = [item for _, item in KEPT]
    transport = Corrupting(lambda request, body: inject(body, items) if first_page(request) else None)
    [summary] = sync(server, db_url, transport=transport, workers=1, rules_dir=str(tmp_path))
    assert summary.status == "ok"
    found = scalar(db_url, "SELECT event_ids FROM alerts WHERE rule_id = 'huge_rate_limit'")
    assert (found if isinstance(found, list) else json.loads(found)) == ["bad-bigint"]


def test_concatenated_json_documents_in_one_body(simulator, db_url):
    """Seen in production: a body made of several JSON documents, one after the other."""
    server = simulator(events=900, seed=42)
    url = db_url

    def split(request: httpx.Request, body: bytes) -> bytes:
        page = json.loads(body)
        half = len(page["data"]) // 2
        head = {"object": "list", "data": page["data"][:half], "has_more": True}
        return (json.dumps(head) + "\n" + json.dumps({**page, "data": page["data"][half:]})).encode()

    [summary] = sync(server, url, transport=Corrupting(split))
    assert summary.rejected == 0
    assert stored_events(url) == {e["id"]: e for e in server.sim.events}


def test_an_event_served_again_on_a_later_page_is_stored_once_as_first_served(simulator, db_url):
    """Pages of one batch repeating an id, changed: the first copy wins, typed rows included (as it would
    across batches, where the stored event is never replaced)."""
    server = simulator(events=700, seed=45)
    stream = [e for e in server.sim.events if not is_tenant_scoped(e["type"])]
    first = stream[0]
    changed = {"id": first["id"], "type": "user.added", "effective_at": first["effective_at"],
               "user.added": {"id": "user_changed", "role": "owner"}}  # fmt: skip

    def repeat(request: httpx.Request, body: bytes) -> bytes | None:
        return inject(body, [changed]) if request.url.params.get("after") == stream[99]["id"] else None

    [summary] = sync(server, db_url, transport=Corrupting(repeat), workers=1)  # one sweep: page 2 is asked for
    assert summary.rejected == 0 and summary.events_new == 700
    assert stored_events(db_url) == {e["id"]: e for e in server.sim.events}
    assert scalar(db_url, f"SELECT count(*) FROM user_events WHERE event_id = '{first['id']}'") == 0


BAD_BODIES = {
    "malformed JSON": b'{"object": "list", "data": [{"id": "x", "type": ',
    "a page without data": b'{"object": "list", "has_more": false}',
    "an error object with status 200": b'{"error": {"message": "internal", "type": "server_error"}}',
    "has_more without a cursor": b'{"object": "list", "data": [], "has_more": true, "last_id": null}',
    "HTML": b"<html><body>Service Unavailable \xff</body></html>",
}


def test_unusable_pages_are_quarantined_and_fail_the_run_then_it_resumes(simulator, db_url, monkeypatch):
    """A page that never parses has no cursor beyond it: its body goes to rejected_events, the run fails
    with one line (exit 7), the checkpoint stays. One run per kind of bad body, each at the same page of one
    sweep (one worker: a first sync is otherwise split after its first page); the run after the API recovers
    is exact."""
    monkeypatch.setattr(ingest.sync, "BATCH_EVENTS", 100)  # a commit per page: all pages before the bad one land
    server = simulator(events=700, seed=43)
    stream = [e for e in server.sim.events if not is_tenant_scoped(e["type"])]
    poisoned = stream[199]["id"]  # the cursor of the third page
    url = db_url
    served_body = None

    def corrupt(request: httpx.Request, body: bytes) -> bytes | None:
        return served_body if request.url.params.get("after") == poisoned else None

    for number, (kind, served_body) in enumerate(BAD_BODIES.items(), 1):
        with pytest.raises(BadResponseError) as caught:
            sync(server, url, transport=Corrupting(corrupt), max_retries=1, workers=1)
        assert caught.value.exit_code == 7
        assert "\n" not in str(caught.value) and "unusable response body" in str(caught.value), kind
        quarantined = dict(rejected_rows(url))
        assert len(quarantined) == number
        assert quarantined[served_body.decode("utf-8", "replace")].startswith("unusable page"), kind
        assert scalar(url, "SELECT count(*) FROM sync_runs WHERE status = 'failed' AND rejected = 1") == number
        assert scalar(url, "SELECT count(*) FROM sync_state WHERE checkpoint IS NOT NULL AND kind <> 'consumer'") == 0
        assert scalar(url, "SELECT sweep_cursor FROM sync_state WHERE key = 'default'") == poisoned
        assert set(stored_events(url)) == {e["id"] for e in stream[:200]}  # the pages before it, whole

    served_body = None
    [summary] = sync(server, url, transport=Corrupting(corrupt))
    assert summary.events_new == 700 - 200
    assert stored_events(url) == {e["id"]: e for e in server.sim.events}


def test_a_transiently_bad_body_is_retried_not_quarantined(simulator, db_url):
    server = simulator(events=600, seed=44)
    seen = []

    def corrupt(request: httpx.Request, body: bytes) -> bytes | None:
        seen.append(str(request.url))  # a page of a slice: its bounds, stream and cursor
        return body[: len(body) // 3] if seen.count(seen[-1]) <= 2 else None  # each page: twice bad, then good

    url = db_url
    [summary] = sync(server, url, transport=Corrupting(corrupt), max_retries=2)
    assert summary.retries == 2 * summary.pages and summary.rejected == 0
    assert rejected_rows(url) == []
    assert stored_events(url) == {e["id"]: e for e in server.sim.events}


def test_events_far_larger_than_usual_outgrow_duckdbs_memory_limit_and_still_land(simulator, duckdb_url, caplog):
    """A batch of unusually large events needs more memory than the DuckDB writer's limit: the batch is
    written again with the limit doubled, instead of failing every run at that batch."""
    server = simulator(events=0)
    events = Simulator(events=1500, seed=46).events
    for event in events:
        event["padding"] = "x" * 5000  # unknown to the spec: kept in raw
    server.sim.insert(events)
    # No detections: the batch log's reader takes up to 20,000 events at a time, 100 MB of these.
    [summary] = sync(server, duckdb_url + "?memory_limit=16MB", detections=False)
    assert summary.status == "ok" and summary.events_new == 1500
    assert stored_events(duckdb_url) == {e["id"]: e for e in events}
    assert "needed more than DuckDB's memory limit" in caplog.text
