"""Forwarding sinks against real receivers: an HTTP server (JSON lines, and Splunk HEC's request shape and
token), rsyslogd, a file. Each sink has its own checkpoint on the committed-batch log; a receiver that is
down blocks neither ingestion nor the other sinks and gets everything once it is back; a forwarder killed
mid-batch sends that batch again: every event arrives, at least once, in log order."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
from prometheus_client import generate_latest
from receivers import HttpReceiver, Rsyslog, free_port, make_certificates
from support import KEY, cli, logged_events, stored_events

from ingest import sinks
from ingest.config import load_settings
from ingest.metrics import Metrics
from ingest.store import Warehouse


def configure(tmp_path, server, url: str, sinks_toml: str, **env: str) -> dict:
    config = tmp_path / "audit-ingest.toml"
    config.write_text('retry_base_delay = "10ms"\nretry_max_delay = "100ms"\n' + sinks_toml)
    return {"OPENAI_BASE_URL": server.url, "AUDIT_INGEST_DATABASE_URL": url, "OPENAI_ADMIN_KEY": KEY,
            "AUDIT_INGEST_CONFIG": str(config), **env}  # fmt: skip


def log_order(url: str) -> list[str]:
    """Every stored event id in committed-batch log order: the order a sink delivers in."""
    return [e.id for e in logged_events(url)]


def sink_status(env: dict) -> dict[str, dict]:
    """`status`'s sinks table (tab-separated in a pipe), by sink name."""
    result = cli("status", env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("sink\t"))
    header = lines[start].split("\t")
    return {
        row[0]: dict(zip(header, row, strict=True)) for row in (line.split("\t") for line in lines[start + 1 :] if line)
    }


SINKS = """
[[sinks]]
name = "lake"
kind = "file"
format = "ocsf"
path = "{path}"

[[sinks]]
name = "siem"
kind = "http"
format = "ecs"
url = "{url}"
batch_size = 250
retries = 2
retry_base_delay = "10ms"
timeout = "5s"
"""


def test_a_receiver_that_is_down_blocks_neither_ingestion_nor_the_other_sinks_and_gets_everything_when_back(
    simulator, db_url, tmp_path
):
    server = simulator(events=2000, seed=201)
    receiver = HttpReceiver()  # not started yet: down
    out = tmp_path / "forwarded" / "events.jsonl"
    env = configure(tmp_path, server, db_url, SINKS.format(path=out, url=f"http://127.0.0.1:{receiver.port}/ingest"))

    result = cli("run", env=env)
    assert result.returncode == 0, result.stderr  # the sync succeeded; the sink's failure is logged
    order = log_order(db_url)
    assert len(order) == len(stored_events(db_url)) == 2000
    lines = [json.loads(line) for line in out.read_bytes().split(b"\n")[:-1]]
    assert [e["metadata"]["uid"] for e in lines] == order  # the file sink got everything, as OCSF, in order
    status = sink_status(env)
    assert status["lake"]["state"] == "ok" and status["lake"]["lag"].startswith("0 batches")
    assert status["siem"]["state"] == "failing" and "ConnectError" in status["siem"]["last error"]
    assert not status["siem"]["lag"].startswith("0 batches")

    receiver.start()
    try:
        receiver.fail_next = 2  # and busy at first: retried with backoff within the pass
        result = cli("forward", env=env)
        assert result.returncode == 0, result.stderr
        assert "siem: " in result.stdout and "lake: 0 batches delivered, ok" in result.stdout
        assert [e["event"]["id"] for e in receiver.events] == order  # ECS, in order, once (503s were not taken)
        assert receiver.requests[0]["headers"]["Content-Type"] == "application/x-ndjson"

        server.sim.append(300)
        assert cli("run", env=env).returncode == 0  # after each sync, each sink sends what committed since
        order = log_order(db_url)
        assert [e["event"]["id"] for e in receiver.events] == order and len(order) == 2300
        assert len(out.read_bytes().split(b"\n")[:-1]) == 2300
    finally:
        receiver.stop()
    status = sink_status(env)
    assert status["siem"]["state"] == "ok" and status["siem"]["lag"].startswith("0 batches")
    assert status["siem"]["delivered"] == "2,300"

    settings = load_settings(env["AUDIT_INGEST_CONFIG"], database_url=db_url)
    warehouse = Warehouse(db_url)
    try:
        sinks.observe(warehouse, settings)
    finally:
        warehouse.dispose()
    scrape = generate_latest(Metrics().registry).decode()
    assert 'audit_ingest_sink_lag_batches{sink="siem"} 0.0' in scrape
    assert 'audit_ingest_sink_events_delivered{sink="lake"} 2300.0' in scrape


HEC = """
[[sinks]]
name = "splunk"
kind = "splunk_hec"
format = "ocsf"
url = "{url}"
token_env = "HEC_TOKEN"
retries = 0
"""


def test_splunk_hec_gets_its_request_shape_and_the_token_from_the_environment_which_never_reaches_a_log(
    simulator, duckdb_url, tmp_path
):
    server = simulator(events=800, seed=202)
    token = "a6b5c2d1-hec-token-0000"
    receiver = HttpReceiver(hec_token=token).start()
    try:
        env = configure(tmp_path, server, duckdb_url, HEC.format(url=receiver.url), HEC_TOKEN="wrong-token-1234")
        result = cli("run", env=env)
        assert result.returncode == 0, result.stderr
        result = cli("forward", env=env)
        assert result.returncode == 11 and result.stderr.strip().split("\n")[-1] == (
            "error: 1 of 1 sinks could not deliver: splunk (see `status`)")  # fmt: skip
        assert "401" in sink_status(env)["splunk"]["last error"] and receiver.events == []

        del env["HEC_TOKEN"]
        result = cli("forward", env=env)
        assert result.returncode == 11 and "HEC_TOKEN is not set" in sink_status(env)["splunk"]["last error"]

        env["HEC_TOKEN"] = token
        result = cli("--debug", "forward", env=env)
        assert result.returncode == 0, result.stderr
        assert token not in result.stdout + result.stderr
    finally:
        receiver.stop()
    stored = stored_events(duckdb_url)
    assert [e["event"]["metadata"]["uid"] for e in receiver.events] == log_order(duckdb_url)
    for delivered in receiver.events:
        event = stored[delivered["event"]["metadata"]["uid"]]
        assert delivered["time"] == event["effective_at"] and delivered["sourcetype"] == "openai:audit:ocsf"
        assert delivered["event"]["class_uid"] in (3001, 3002, 3004, 3005, 3006, 6003)
    accepted = [r for r in receiver.requests if r["headers"]["Authorization"] == f"Splunk {token}"]
    assert accepted and all(r["path"] == "/services/collector/event" for r in accepted)
    assert sink_status(env)["splunk"]["state"] == "ok"


SYSLOG = """
[[sinks]]
name = "rsyslog"
kind = "syslog"
format = "raw"
host = "127.0.0.1"
port = {port}
batch_size = 200
retries = 1
retry_base_delay = "10ms"
timeout = "5s"
"""


def test_rsyslog_gets_every_event_as_rfc5424_and_those_sent_while_it_was_stopped_once_it_is_back(
    simulator, duckdb_url, tmp_path
):
    server = simulator(events=1500, seed=203)
    rsyslog = Rsyslog(tmp_path / "rsyslog").start()
    env = configure(tmp_path, server, duckdb_url, SYSLOG.format(port=rsyslog.port))
    try:
        assert cli("run", env=env).returncode == 0
        rsyslog.stop()  # rsyslogd writes out what it has read
        first = rsyslog.messages()
        assert [m[2]["id"] for m in first] == log_order(duckdb_url)
        stored = stored_events(duckdb_url)
        for msgid, sd, event in first:
            assert event == stored[event["id"]]  # the event as served
            assert msgid == event["type"][:32] and sd == f'[openai@32473 id="{event["id"]}"]'

        server.sim.append(500)
        result = cli("run", env=env)  # the receiver is down: the sync still stores everything
        assert result.returncode == 0 and len(stored_events(duckdb_url)) == 2000
        status = sink_status(env)["rsyslog"]
        assert status["state"] == "failing" and "Connection refused" in status["last error"]

        rsyslog.start()
        result = cli("forward", env=env)
        assert result.returncode == 0, result.stderr
    finally:
        rsyslog.stop()
    assert [m[2]["id"] for m in rsyslog.messages()] == log_order(duckdb_url)  # none lost, none twice
    assert sink_status(env)["rsyslog"]["lag"].startswith("0 batches")


KILLED = """
[[sinks]]
name = "siem"
kind = "http"
format = "raw"
url = "{url}"
batch_size = 100
"""


def test_a_forwarder_killed_mid_batch_sends_that_batch_again_and_loses_nothing(simulator, duckdb_url, tmp_path):
    server = simulator(events=3000, seed=204)
    env = configure(tmp_path, server, duckdb_url, "")
    assert cli("run", env=env).returncode == 0  # stored, before any sink is configured
    receiver = HttpReceiver().start()
    env = configure(tmp_path, server, duckdb_url, KILLED.format(url=receiver.url))
    receiver.hold_at = 3  # the third POST of the first pass: inside its first committed batch
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("AUDIT_INGEST_", "OPENAI_"))} | env
    forwarder = subprocess.Popen([sys.executable, "-m", "ingest", "forward"], env=full_env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        assert receiver.held.wait(60)
        forwarder.send_signal(signal.SIGKILL)
        assert forwarder.wait(30) == -signal.SIGKILL
    finally:
        receiver.release.set()
    before = [e["id"] for e in receiver.events]
    order = log_order(duckdb_url)
    assert before == order[:300]  # three chunks of 100 reached the receiver, then the kill
    receiver.hold_at = None
    try:
        result = cli("forward", env=env)
        assert result.returncode == 0, result.stderr
    finally:
        receiver.stop()
    after = [e["id"] for e in receiver.events][300:]
    assert after == order  # the killed pass's batch again, from its start: at least once, in order
    assert set(before) <= set(after) == set(stored_events(duckdb_url))


@pytest.mark.parametrize(
    ("sink", "message"),
    [
        ('name = "a"\nkind = "kafka"', "bad config: sinks.0.kind: Input should be 'http', 'splunk_hec', 'syslog' or 'file'"),
        ('name = "a"\nkind = "http"', "bad config: sinks.0: kind http needs url"),
        ('name = "a"\nkind = "splunk_hec"\nurl = "https://x/services/collector/event"', "kind splunk_hec needs token_env"),
        ('name = "a"\nkind = "file"\npath = "x"\nport = 514', "bad config: sinks.0: port: not a setting of kind file"),
        ('name = "a"\nkind = "http"\nurl = "https://x"\nheaders = { Authorization = "Bearer t" }',
         "put the token in the environment (token_env), not in headers"),
        ('name = "a"\nkind = "http"\nurl = "https://x"\nformat = "cef"', "bad config: sinks.0.format: Input should be"),
        ('name = "a b"\nkind = "file"\npath = "x"', "bad config: sinks.0.name: String should match pattern"),
    ],
)  # fmt: skip
def test_a_bad_sink_setting_is_one_line_and_exit_2(tmp_path, sink, message):
    config = tmp_path / "audit-ingest.toml"
    config.write_text(f"[[sinks]]\n{sink}\n")
    result = cli(
        "--config", str(config), "forward", env={"AUDIT_INGEST_DATABASE_URL": f"duckdb:///{tmp_path}/w.duckdb"}
    )
    assert result.returncode == 2 and len(result.stderr.strip().split("\n")) == 1
    assert result.stderr.startswith("error: ") and message in result.stderr


def test_two_sinks_of_one_name_and_forward_without_sinks_are_one_line_errors(tmp_path):
    config = tmp_path / "audit-ingest.toml"
    env = {"AUDIT_INGEST_DATABASE_URL": f"duckdb:///{tmp_path}/w.duckdb"}
    config.write_text('[[sinks]]\nname = "a"\nkind = "file"\npath = "x"\n' * 2)
    result = cli("--config", str(config), "forward", env=env)
    assert (result.returncode, result.stderr) == (2, "error: bad config: settings: sink names must be unique\n")
    config.write_text("")
    result = cli("--config", str(config), "forward", env=env)
    assert (result.returncode, result.stderr) == (2, "error: no [[sinks]] configured\n")
    config.write_text('[[sinks]]\nname = "a"\nkind = "file"\npath = "x"\n')
    result = cli("--config", str(config), "forward", "--sink", "b", env=env)
    assert (result.returncode, result.stderr) == (2, "error: no sink named 'b'; configured: a\n")


ROTATING = """
[[sinks]]
name = "archive"
kind = "file"
format = "ecs"
path = "{path}"
max_bytes = 400000
backups = 50
batch_size = 50
"""


def test_the_file_sink_rotates_whole_lines_and_cuts_the_torn_line_of_a_killed_writer(simulator, duckdb_url, tmp_path):
    server = simulator(events=1200, seed=205)
    path = tmp_path / "out" / "events.jsonl"
    path.parent.mkdir()
    path.write_bytes(b'{"torn": "a line a killed writer left ha')  # no line end: cut off, not continued
    env = configure(tmp_path, server, duckdb_url, ROTATING.format(path=path))
    assert cli("run", env=env).returncode == 0
    files = sorted(path.parent.iterdir(), key=lambda p: -int(p.suffix[1:]) if p.suffix[1:].isdigit() else 0)
    assert len(files) > 2 and files[-1] == path  # oldest rotated file first, the live one last
    assert all(p.stat().st_size <= 400000 for p in files)
    ids = [json.loads(line)["event"]["id"] for p in files for line in p.read_bytes().split(b"\n")[:-1]]
    assert ids == log_order(duckdb_url)


SYSLOG_TLS = """
[[sinks]]
name = "tls"
kind = "syslog"
format = "ocsf"
host = "127.0.0.1"
port = {port}
tls = true
ca_file = "{ca}"
retries = 0
"""


def test_syslog_over_tls_reaches_rsyslog_only_when_it_verifies_the_receivers_certificate(
    simulator, duckdb_url, tmp_path
):
    server = simulator(events=600, seed=206)
    rsyslog = Rsyslog(tmp_path / "rsyslog", tls=True).start()
    (tmp_path / "other").mkdir()
    other_ca = make_certificates(tmp_path / "other")  # a CA that did not sign the receiver's certificate
    try:
        env = configure(tmp_path, server, duckdb_url, SYSLOG_TLS.format(port=rsyslog.port, ca=other_ca))
        assert cli("run", env=env).returncode == 0
        status = sink_status(env)["tls"]
        assert status["state"] == "failing" and "CERTIFICATE_VERIFY_FAILED" in status["last error"]
        env = configure(tmp_path, server, duckdb_url, SYSLOG_TLS.format(port=rsyslog.port, ca=rsyslog.ca))
        result = cli("forward", env=env)
        assert result.returncode == 0, result.stderr
    finally:
        rsyslog.stop()
    messages = rsyslog.messages()
    assert [m[2]["metadata"]["uid"] for m in messages] == log_order(duckdb_url)
    assert all(m[0] == m[2]["metadata"]["event_code"][:32] for m in messages)


DAEMON = """
[[sinks]]
name = "archive"
kind = "file"
format = "raw"
path = "{path}"
"""


def test_the_daemon_forwards_after_each_sync_and_serves_each_sinks_lag_as_metrics(simulator, tmp_path):
    server = simulator(events=700, seed=207)
    out, port, url = tmp_path / "events.jsonl", free_port(), f"duckdb:///{tmp_path / 'w.duckdb'}"
    env = configure(tmp_path, server, url, DAEMON.format(path=out))
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("AUDIT_INGEST_", "OPENAI_"))} | env
    daemon = subprocess.Popen([sys.executable, "-m", "ingest", "daemon", "--interval", "1s", "--metrics-port",
                               str(port)], env=full_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip

    def forwarded() -> list[str]:
        return [json.loads(line)["id"] for line in out.read_bytes().split(b"\n")[:-1]] if out.exists() else []

    def scrape(name: str) -> str | None:
        try:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        except httpx.HTTPError:
            return None
        return next((line.rsplit(" ", 1)[1] for line in text.split("\n") if line.startswith(name)), None)

    try:
        want = {e["id"] for e in server.sim.events}
        wait_until(lambda: set(forwarded()) == want, daemon)
        want |= {e["id"] for e in server.sim.append(40)}
        wait_until(lambda: set(forwarded()) == want, daemon)
        wait_until(lambda: scrape('audit_ingest_sink_events_delivered{sink="archive"}') == "740.0", daemon)
        assert scrape('audit_ingest_sink_lag_batches{sink="archive"}') == "0.0"
        assert scrape('audit_ingest_sink_failing{sink="archive"}') == "0.0"
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0
    assert len(forwarded()) == 740  # each event once


def wait_until(condition, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_a_receiver_that_holds_its_request_delays_no_other_sink(simulator, duckdb_url, tmp_path):
    server = simulator(events=900, seed=208)
    env = configure(tmp_path, server, duckdb_url, "")
    assert cli("run", env=env).returncode == 0
    order = log_order(duckdb_url)
    receiver = HttpReceiver().start()
    receiver.hold_at = 1  # the slow one: its first request is read and then left unanswered
    out = tmp_path / "lake.jsonl"
    env = configure(tmp_path, server, duckdb_url, SINKS.format(path=out, url=receiver.url))
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("AUDIT_INGEST_", "OPENAI_"))} | env
    forwarder = subprocess.Popen([sys.executable, "-m", "ingest", "forward"], env=full_env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        assert receiver.held.wait(60)

        def lake_done() -> bool:
            return out.exists() and len(out.read_bytes().split(b"\n")[:-1]) == len(order)

        wait_until(lake_done, forwarder)  # while the other sink's request is still held
        assert not receiver.release.is_set() and forwarder.poll() is None
    finally:
        receiver.release.set()
    try:
        stdout, stderr = forwarder.communicate(timeout=120)
        assert forwarder.returncode == 0, stderr.decode()
    finally:
        receiver.stop()
    assert [json.loads(line)["metadata"]["uid"] for line in out.read_bytes().split(b"\n")[:-1]] == order
    assert {e["event"]["id"] for e in receiver.events} == set(order)
