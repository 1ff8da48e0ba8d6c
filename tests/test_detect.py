"""Detections: the Sigma pack alerts on exactly the events the scenarios plant, once, on both backends;
its correlation rules stay quiet over normal traffic; backfilled alerts are historical."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from support import KEY, cli, handed_batches, settings_for, stored_events, sync

from ingest import detect, model, scenarios
from ingest.errors import RulesError
from ingest.store import Warehouse
from ingest.sync import backfill, feed_consumers

# Normal traffic no rule of the pack matches, around the planted events.
QUIET_TYPES = ["logout.succeeded", "project.updated", "api_key.updated", "invite.accepted"]
DOMAINS = ["example.com"]


def alerts(url: str) -> list[dict]:
    warehouse = Warehouse(url)
    try:
        with warehouse.connect() as conn:
            rows = conn.execute(sa.select(model.alerts)).mappings().all()
    finally:
        warehouse.dispose()
    return [{**r, "event_ids": _list(r["event_ids"]), "tags": _list(r["tags"])} for r in rows]


def _list(value) -> list:
    return value if isinstance(value, list) else json.loads(value)


def plant_all(sim) -> dict[str, set[str]]:
    """Every scenario, hours apart; rule id -> the ids of the events it must alert on."""
    expected: dict[str, set[str]] = {}
    now = int(time.time())
    for i, name in enumerate(scenarios.names()):
        for event, fires in scenarios.plant(sim, name, start=now - (i + 1) * 5 * 3600):
            for rule_id in fires:
                expected.setdefault(rule_id, set()).add(event["id"])
    return expected


def test_every_alerting_rule_of_the_pack_has_a_level_attack_tags_and_a_scenario_step():
    rules = detect.load(None, {"allowed_email_domains": DOMAINS})
    active = rules.active()
    assert len(active) >= 15
    planted = {rule_id for name in scenarios.names() for _, fires in scenarios.events(name) for rule_id in fires}
    assert {r.rule_id for r in active} == planted
    for rule in active:
        assert rule.level in ("low", "medium", "high", "critical")
        assert any(t.startswith("attack.t") for t in rule.tags), rule.rule_id


def test_each_rule_alerts_on_exactly_the_events_its_scenario_planted(simulator, db_url, key_env):
    server = simulator(events=0, seed=3)
    server.sim.append(300, types=QUIET_TYPES)
    expected = plant_all(server.sim)
    sync(server, db_url, allowed_email_domains=DOMAINS)
    found: dict[str, set[str]] = {}
    for alert in alerts(db_url):
        found.setdefault(alert["rule_id"], set()).update(alert["event_ids"])
        assert not alert["historical"]
    assert found == expected
    by_rule = {a["rule_id"]: a for a in alerts(db_url)}
    burst = by_rule["openai_failed_login_burst"]
    assert (burst["level"], len(burst["event_ids"])) == ("high", 20)
    assert "attack.t1110.001" in burst["tags"] and burst["first_event_at"] < burst["last_event_at"]


def test_rules_rerun_over_the_same_batches_raise_no_second_alert(simulator, db_url, key_env):
    server = simulator(events=0, seed=3)
    plant_all(server.sim)
    sync(server, db_url, allowed_email_domains=DOMAINS)
    before = sorted((a["rule_id"], a["events_hash"]) for a in alerts(db_url))
    settings = settings_for(server, db_url, allowed_email_domains=DOMAINS)
    warehouse = Warehouse(db_url)
    try:
        with warehouse.connect() as conn, conn.begin():  # the consumer forgets its checkpoint
            conn.execute(model.sync_state.delete().where(model.sync_state.c.key == "consumer:rules"))
        feed_consumers(settings, warehouse)
    finally:
        warehouse.dispose()
    assert sorted((a["rule_id"], a["events_hash"]) for a in alerts(db_url)) == before and before


def test_correlations_spanning_the_consumers_chunks_alert_as_over_one_chunk(
    simulator, duckdb_url, key_env, monkeypatch
):
    """The consumer reads the log in chunks of whole batches, newest events first (as a sweep commits them); a
    correlation's window reaches into the chunks before, whose matches the run keeps, and into batches committed
    before the run, which it reads back: every planted burst and spray still alerts, on exactly its events."""
    from ingest import consumers

    server = simulator(events=0, seed=3)
    server.sim.append(300, types=QUIET_TYPES)
    expected = plant_all(server.sim)
    monkeypatch.setattr("ingest.api.PAGE_SIZE", 10)  # a batch a page: the failed-login burst spans two or three
    monkeypatch.setattr("ingest.sync.BATCH_EVENTS", 10)
    sync(server, duckdb_url, detections=False, workers=1)  # some forty batches, none evaluated yet
    warehouse = Warehouse(duckdb_url)
    settings = settings_for(server, duckdb_url, allowed_email_domains=DOMAINS)
    try:
        with warehouse.connect() as conn:
            batches = conn.execute(sa.select(sa.func.count()).select_from(model.ingest_batches)).scalar()
        # The first half in one run, the rest in another, each in chunks of a batch or two.
        first, second = detect.consumers_for(settings)[0], detect.consumers_for(settings)[0]
        consumers.run(warehouse, [_StopAfter(first, batches // 2)], max_events=15)
        consumers.run(warehouse, [second], max_events=15)
    finally:
        warehouse.dispose()
    assert batches > 20
    found: dict[str, set[str]] = {}
    for alert in alerts(duckdb_url):
        found.setdefault(alert["rule_id"], set()).update(alert["event_ids"])
    assert found == expected
    assert [len(a["event_ids"]) for a in alerts(duckdb_url) if a["rule_id"] == "openai_failed_login_burst"] == [20]


def test_rules_keep_up_with_the_sync_as_it_commits_and_raise_what_one_pass_after_it_raises(
    simulator, db_url, key_env, monkeypatch
):
    """The rules run alongside the sync (ingest.consumers.alongside), in rounds over what committed since their
    last: a sync that waits for them mid-way is not waiting in vain, and their alerts are those of one pass over
    every batch once the sync has ended."""
    from ingest import consumers
    from ingest.sync import run_sources

    server = simulator(events=0, seed=5, latency=0.03)  # slow enough a page to be split: slices commit concurrently
    server.sim.append(2000, types=QUIET_TYPES)
    expected = plant_all(server.sim)
    monkeypatch.setattr("ingest.sync.BATCH_EVENTS", 100)  # a batch a page
    handed = handed_batches(monkeypatch)  # batches the sync's writers handed the rules unread (DuckDB)
    settings = settings_for(server, db_url, allowed_email_domains=DOMAINS, workers=4)
    warehouse = Warehouse(db_url)
    caught_up: list[int] = []  # the rules' checkpoint, read once while the sync waits a few pages in

    def on_progress(summary) -> None:
        if summary.pages < 5 or caught_up:
            return
        deadline, seq = time.monotonic() + 20, 0
        while not seq and time.monotonic() < deadline:
            time.sleep(0.05)
            with warehouse.connect() as conn:
                seq = consumers.checkpoint(conn, "rules")
        caught_up.append(seq)

    try:
        [summary] = run_sources(settings, warehouse, settings.sources, on_progress=on_progress)
        assert summary.events_new == len(server.sim.events) and caught_up[0] > 0
        assert bool(handed) == db_url.startswith("duckdb")  # PostgreSQL's jsonb respells numbers: read back there
        found: dict[str, set[str]] = {}
        for alert in alerts(db_url):
            found.setdefault(alert["rule_id"], set()).update(alert["event_ids"])
        assert found == expected
        during = sorted((a["rule_id"], a["events_hash"]) for a in alerts(db_url))
        with warehouse.connect() as conn, conn.begin():  # one pass over every batch, from scratch
            conn.execute(model.alerts.delete())
            conn.execute(model.sync_state.delete().where(model.sync_state.c.key == "consumer:rules"))
        feed_consumers(settings, warehouse)
    finally:
        warehouse.dispose()
    assert sorted((a["rule_id"], a["events_hash"]) for a in alerts(db_url)) == during


def test_two_feeders_taking_turns_over_the_log_raise_every_alert_one_feeder_raises(
    simulator, duckdb_url, key_env, monkeypatch
):
    """Two sessions feeding the rules by turns (two daemons' consumers on one PostgreSQL): each has seen only
    every other batch, and reads the rest back from the warehouse."""
    from ingest import batchlog

    server = simulator(events=0, seed=3)
    server.sim.append(300, types=QUIET_TYPES)
    expected = plant_all(server.sim)
    monkeypatch.setattr("ingest.api.PAGE_SIZE", 10)  # a batch a page: a burst spans several
    monkeypatch.setattr("ingest.sync.BATCH_EVENTS", 10)
    sync(server, duckdb_url, detections=False, workers=1)
    settings = settings_for(server, duckdb_url, allowed_email_domains=DOMAINS)
    feeders = [detect.consumers_for(settings)[0] for _ in range(2)]
    warehouse = Warehouse(duckdb_url)
    try:
        with warehouse.connect() as conn:
            with conn.begin():
                batches = list(batchlog.iter_after(conn, 0))
            for turn, batch in enumerate(batches):
                with conn.begin():
                    feeders[turn % 2].process(conn, [batch])
    finally:
        warehouse.dispose()
    assert len(batches) > 20
    found: dict[str, set[str]] = {}
    for alert in alerts(duckdb_url):
        found.setdefault(alert["rule_id"], set()).update(alert["event_ids"])
    assert found == expected


def test_a_rule_file_broken_after_the_start_is_one_error_line_and_the_sync_still_stores_everything(
    simulator, db_url, key_env, tmp_path, caplog
):
    (tmp_path / "mine.yml").write_text("title: [unclosed\n")  # `run` checked the rules before this edit
    server = simulator(events=300, seed=7)
    with caplog.at_level(logging.ERROR):
        [summary] = sync(server, db_url, rules_dir=str(tmp_path))
    assert summary.status == "ok" and set(stored_events(db_url)) == {e["id"] for e in server.sim.events}
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and str(tmp_path / "mine.yml") in errors[0]
    assert alerts(db_url) == []


class _StopAfter:
    """A consumer that processes `n` batches, then fails (and so keeps its checkpoint there)."""

    def __init__(self, consumer, n: int):
        self.consumer, self.n, self.name = consumer, n, consumer.name

    def process(self, conn, batches) -> None:
        from ingest.errors import IngestError

        if self.n <= 0:
            raise IngestError("stop here")
        self.consumer.process(conn, batches)
        self.n -= len(batches)


def test_alerts_raised_by_backfilled_events_are_historical(simulator, duckdb_url, key_env):
    server = simulator(events=0, seed=3)
    now = int(time.time())
    planted = scenarios.plant(server.sim, "defense-evasion", start=now - 2 * 86400)
    settings = settings_for(server, duckdb_url)
    warehouse = Warehouse(duckdb_url)
    try:
        backfill(settings, warehouse, settings.sources, datetime.fromtimestamp(now - 3 * 86400, UTC),
                 datetime.fromtimestamp(now - 86400, UTC))  # fmt: skip
    finally:
        warehouse.dispose()
    found = alerts(duckdb_url)
    assert {a["rule_id"] for a in found} == {r for _, fires in planted for r in fires}
    assert all(a["historical"] for a in found)


def test_correlation_rules_raise_no_alert_over_50000_normal_simulator_events(simulator, duckdb_url, key_env):
    server = simulator(events=50000, seed=0)
    sync(server, duckdb_url)
    rules = detect.load(None, {})
    correlations = {r.rule_id for r in rules.rules if r.correlation}
    raised = [a for a in alerts(duckdb_url) if a["rule_id"] in correlations]
    single = [a for a in alerts(duckdb_url) if a["rule_id"] not in correlations]
    assert raised == [] and single  # the single-event rules do fire on the simulator's random payloads


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("title: t\nname: x\nlevel: high\nlogsource: {product: openai, service: audit_logs}\n"
         "detection: {sel: {actor.session.nickname: bob}, condition: sel}\n",
         "field 'actor.session.nickname' is in no event"),
        ("title: t\nname: x\nlevel: high\nlogsource: {product: openai, service: audit_logs}\n"
         "detection: {sel: {type: a}, condition: sel and}\n", "condition"),
        ("title: [unclosed\n", "mine.yml"),
    ],
)  # fmt: skip
def test_a_bad_rule_in_rules_dir_is_one_error_naming_its_file_and_field(tmp_path, text, message):
    (tmp_path / "mine.yml").write_text(text)
    with pytest.raises(RulesError) as error:
        detect.load(tmp_path)
    assert str(tmp_path / "mine.yml") in str(error.value) and message in str(error.value)
    assert "\n" not in str(error.value) and error.value.exit_code == 2


def test_a_rule_naming_an_unknown_field_stops_every_start_with_one_line_and_exit_2(tmp_path):
    (tmp_path / "mine.yml").write_text(
        "title: t\nname: mine\nlevel: high\nlogsource: {product: openai, service: audit_logs}\n"
        "detection: {sel: {actor.session.shoe_size: 44}, condition: sel}\n"
    )
    env = {"AUDIT_INGEST_RULES_DIR": str(tmp_path), "OPENAI_ADMIN_KEY": "sk-admin-test",
           "AUDIT_INGEST_DATABASE_URL": f"duckdb:///{tmp_path / 'w.duckdb'}", "OPENAI_BASE_URL": "http://127.0.0.1:9"}  # fmt: skip
    for args in (("rules", "check"), ("run",), ("backfill", "--since", "2026-01-01")):
        result = cli(*args, env=env)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.strip().splitlines() == [
            f"error: {tmp_path / 'mine.yml'}: rule 'mine': field 'actor.session.shoe_size' is in no event of the spec"
        ]
    assert not (tmp_path / "w.duckdb").exists()  # stopped before touching the warehouse


def test_alerts_json_lists_rule_level_event_ids_and_iso_times_and_rules_list_counts_them(
    simulator, duckdb_url, key_env
):
    server = simulator(events=0, seed=3)
    planted = scenarios.plant(server.sim, "credential-stuffing")
    sync(server, duckdb_url)
    env = {"AUDIT_INGEST_DATABASE_URL": duckdb_url}
    result = cli("alerts", "--format", "json", env=env)
    assert result.returncode == 0, result.stderr
    found = {a["rule_id"]: a for a in json.loads(result.stdout)}
    assert set(found) == {"openai_failed_login_burst", "openai_password_spray"}
    burst = found["openai_failed_login_burst"]
    assert sorted(burst["event_ids"]) == sorted(e["id"] for e, fires in planted if "openai_failed_login_burst" in fires)
    first = min(e["effective_at"] for e, fires in planted if "openai_failed_login_burst" in fires)
    assert burst["first_event_at"] == datetime.fromtimestamp(first, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert burst["level"] == "high" and burst["title"] and burst["last_event_at"] > burst["first_event_at"]
    between = datetime.fromtimestamp(first + 300, UTC).isoformat()  # after the burst, before the spraying
    later = cli("alerts", "--format", "json", "--since", between, env=env)
    assert {a["rule_id"] for a in json.loads(later.stdout)} == {"openai_password_spray"}
    listed = cli("rules", "list", env=env)
    counts = {line.split("\t")[0]: line.split("\t")[4] for line in listed.stdout.splitlines()[1:]}
    assert counts["openai_failed_login_burst"] == "1" and counts["openai_owner_role_granted"] == "0"


def test_simulate_with_a_scenario_serves_its_attack_and_the_run_alerts_on_it(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUDIT_INGEST_", "OPENAI_"))}
    env["OPENAI_ADMIN_KEY"] = KEY
    served = subprocess.Popen(
        [sys.executable, "-m", "ingest", "simulate", "--port", "0", "--events", "300", "--scenario", "account-takeover"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        url = served.stdout.readline().strip()
        config = tmp_path / "audit-ingest.toml"
        config.write_text('allowed_email_domains = ["example.com"]\n')
        db = f"duckdb:///{tmp_path / 'w.duckdb'}"
        result = cli("--config", str(config), "run", env={"OPENAI_ADMIN_KEY": KEY, "OPENAI_BASE_URL": url,
                                                          "AUDIT_INGEST_DATABASE_URL": db})  # fmt: skip
        assert result.returncode == 0, result.stderr
    finally:
        served.terminate()
        served.wait()
    planted = {r for name in ["account-takeover"] for _, fires in scenarios.events(name) for r in fires}
    assert planted <= {a["rule_id"] for a in alerts(db)}


def test_the_demo_shows_the_alerts_of_its_planted_attack(tmp_path):
    result = cli("demo", "--events", "500", "--database", f"duckdb:///{tmp_path / 'demo.duckdb'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    shown = result.stdout.split("rule\tlevel\talerts\n", 1)[1]  # in a pipe: the table as TSV
    assert "openai_failed_login_burst\thigh\t1" in shown and "openai_password_spray\thigh\t1" in shown


def test_each_detection_rule_as_sql_selects_the_events_the_engine_matches(simulator, db_url, key_env):
    from ingest import sigma_sql
    from ingest.export import run_query

    server = simulator(events=3000, seed=5)
    plant_all(server.sim)
    sync(server, db_url, detections=False)
    events = stored_events(db_url)
    rules = detect.load(None, {"allowed_email_domains": DOMAINS})
    dialect = "duckdb" if db_url.startswith("duckdb") else "postgresql"
    warehouse = Warehouse(db_url)
    compared = 0
    try:
        with warehouse.connect() as conn:
            for rule in rules.rules:
                if rule.correlation or rule.rule_id == "openai_api_key_org_write_scope":  # a list field: no SQL
                    continue
                matcher = detect.Matcher(rule)
                expected = {i for i, raw in events.items() if matcher(raw)}
                _, rows = run_query(conn, sigma_sql.to_sql(rule, dialect), None)  # as `audit-ingest query` runs it
                assert {r[0] for r in rows} == expected, rule.rule_id
                compared += bool(expected)
    finally:
        warehouse.dispose()
    assert compared >= 15
    with pytest.raises(RulesError, match="is a list"):
        sigma_sql.to_sql(rules.by_id()["openai_api_key_org_write_scope"], dialect)


def test_a_correlation_groups_equal_objects_together_whatever_their_key_order():
    """The sync hands the rules events as served and the warehouse gives them back with sorted keys: one value."""
    from types import SimpleNamespace

    rule = SimpleNamespace(sigma=SimpleNamespace(group_by=["actor.session.ip_address_details"]))
    served = {"actor": {"session": {"ip_address_details": {"country": "US", "asn": "AS1", "city": "Reno"}}}}
    stored = {"actor": {"session": {"ip_address_details": {"asn": "AS1", "city": "Reno", "country": "US"}}}}
    assert detect._group(rule, {}, "base", served) == detect._group(rule, {}, "base", stored) is not None
