"""An organization without a tenant: the API refuses `tenant_only=true` (400 here; the real API's answer is
undocumented). The main stream is stored and checkpointed, the tenant stream kept as unavailable with the
API's words, tried again with one request each run, and synced as soon as the API accepts it."""

from __future__ import annotations

import logging

import pytest
from support import KEY, cli, scalar, stored_events, sync

from ingest.model import is_tenant_scoped
from ingest.simulator import Simulator, SimulatorServer


def main_stream_ids(sim) -> set[str]:
    return {e["id"] for e in sim.events if not is_tenant_scoped(e["type"])}


def test_a_run_without_a_tenant_stores_the_main_stream_and_records_the_tenant_one_unavailable(
    simulator, db_url, key_env
):
    server = simulator(events=600, seed=41, tenant=False)
    [summary] = sync(server, db_url)
    assert summary.status == "ok"
    assert set(stored_events(db_url)) == main_stream_ids(server.sim)
    assert "tenant stream unavailable" in summary.line()
    why = scalar(db_url, "SELECT unavailable FROM sync_state WHERE key = 'default#tenant'")
    assert "This organization has no tenant" in why
    assert scalar(db_url, "SELECT checkpoint FROM sync_state WHERE key = 'default'") is not None


def test_a_first_sync_in_slices_without_a_tenant_stores_the_main_stream_and_records_the_tenant_one_unavailable(
    simulator, db_url, key_env, caplog
):
    server = simulator(events=3000, seed=45, tenant=False, latency=0.03)  # slow enough a page to be split
    with caplog.at_level(logging.INFO, logger="ingest.sync"):
        [summary] = sync(server, db_url, workers=4)
    # The main stream split first: the tenant stream's sweep started among its slices, and was refused there.
    assert any(r.getMessage().startswith("default: the sweep goes on in") for r in caplog.records)
    [refused] = [r for r in caplog.records if "refuses the tenant stream" in r.getMessage()]
    assert refused.threadName.startswith("slice")
    assert summary.status == "ok" and "tenant stream unavailable" in summary.line()
    assert set(stored_events(db_url)) == main_stream_ids(server.sim)
    assert "This organization has no tenant" in scalar(
        db_url, "SELECT unavailable FROM sync_state WHERE key = 'default#tenant'"
    )
    assert scalar(db_url, "SELECT checkpoint FROM sync_state WHERE key = 'default'") is not None
    assert scalar(db_url, "SELECT count(*) FROM sync_state WHERE kind = 'slice'") == 0


def test_each_later_run_tries_the_tenant_stream_with_one_request_and_syncs_it_once_accepted(
    simulator, duckdb_url, key_env
):
    server = simulator(events=600, seed=42, tenant=False)
    sync(server, duckdb_url)
    before = server.sim.requests
    [summary] = sync(server, duckdb_url)
    assert server.sim.requests - before == 2  # one for the main stream, one for the tenant stream
    assert summary.status == "ok" and summary.unavailable

    server.sim.tenant = True  # the organization gets a tenant
    [summary] = sync(server, duckdb_url)
    assert not summary.unavailable
    assert set(stored_events(duckdb_url)) == {e["id"] for e in server.sim.events}
    assert scalar(duckdb_url, "SELECT unavailable FROM sync_state WHERE key = 'default#tenant'") is None
    assert scalar(duckdb_url, "SELECT checkpoint FROM sync_state WHERE key = 'default#tenant'") is not None


def test_the_cli_exits_0_with_one_warning_and_status_shows_the_stream_unavailable(tmp_path):
    with SimulatorServer(Simulator(events=300, seed=43, key=KEY, tenant=False)) as server:
        env = {"OPENAI_ADMIN_KEY": KEY, "OPENAI_BASE_URL": server.url,
               "AUDIT_INGEST_DATABASE_URL": f"duckdb:///{tmp_path / 'w.duckdb'}"}  # fmt: skip
        first = cli("run", env=env, cwd=tmp_path)
        assert first.returncode == 0, first.stderr
        assert sum("refuses the tenant stream" in line for line in first.stderr.splitlines()) == 1
        second = cli("run", env=env, cwd=tmp_path)
        assert second.returncode == 0 and "refuses the tenant stream" not in second.stderr  # warned once
        status = cli("status", env=env, cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert "never synced" not in status.stdout
    assert "tenant stream unavailable" in status.stdout


@pytest.mark.parametrize("event_types", [("role.bound_to_resource",)])
def test_a_source_of_tenant_types_only_still_fails_when_the_api_refuses_them(
    simulator, duckdb_url, key_env, event_types
):
    from ingest.errors import BadResponseError

    server = simulator(events=300, seed=44, tenant=False)
    with pytest.raises(BadResponseError, match="400"):
        sync(server, duckdb_url, sources=[{"name": "default", "event_types": list(event_types)}])
