"""Alert delivery: each alert POSTed at least once to a webhook that is down, then up; a receiver that is
down never blocks ingestion; a SIGKILL between an alert's insert and its delivery neither loses nor
doubles it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import sqlalchemy as sa
from support import KEY, settings_for, stored_events, sync

from ingest import model, scenarios
from ingest.store import Warehouse
from ingest.sync import feed_consumers


class Receiver:
    """A webhook on 127.0.0.1:`port`: records every POSTed body; `hold` makes it take requests and never
    answer them until released."""

    def __init__(self, port: int):
        self.port, self.bodies, self.answered = port, [], []
        self.hold = threading.Event()
        self.got = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                receiver.bodies.append(body)
                receiver.got.set()
                if receiver.hold.is_set():
                    receiver.release.wait(30)
                    return
                self.send_response(200)
                self.end_headers()
                receiver.answered.append(body)

            def log_message(self, *args):
                pass

        self.release = threading.Event()
        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/secret-token"

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deliveries(url: str) -> list[dict]:
    warehouse = Warehouse(url)
    try:
        with warehouse.connect() as conn:
            return [dict(r) for r in conn.execute(sa.select(model.alert_deliveries)).mappings()]
    finally:
        warehouse.dispose()


def alert_ids(url: str) -> set[str]:
    warehouse = Warehouse(url)
    try:
        with warehouse.connect() as conn:
            return {f"{r}:{h}" for r, h in conn.execute(sa.select(model.alerts.c.rule_id, model.alerts.c.events_hash))}
    finally:
        warehouse.dispose()


def test_alerts_wait_for_a_webhook_that_is_down_and_go_out_once_when_it_is_back(simulator, db_url, key_env):
    server = simulator(events=0, seed=3)
    server.sim.append(50, types=["logout.succeeded"])
    scenarios.plant(server.sim, "credential-stuffing")
    port = free_port()
    hook = f"http://127.0.0.1:{port}/hooks/secret-token"
    settings = dict(alert_webhooks=[hook], alert_retry_delay=0)
    [summary] = sync(server, db_url, **settings)  # nobody listens on the port
    assert summary.status == "ok" and len(stored_events(db_url)) == 50 + 25  # ingestion went on
    down = deliveries(db_url)
    assert all(d["delivered_at"] is None for d in down)
    # One failed POST, and the other alert waits for the next round instead of failing too.
    assert sorted((d["attempts"], d["last_error"] is not None) for d in down) == [(0, False), (1, True)]

    receiver = Receiver(port)
    try:
        warehouse = Warehouse(db_url)
        try:
            feed_consumers(settings_for(server, db_url, **settings), warehouse)
            feed_consumers(settings_for(server, db_url, **settings), warehouse)  # nothing left to send
        finally:
            warehouse.dispose()
    finally:
        receiver.stop()
    up = deliveries(db_url)
    assert all(d["delivered_at"] is not None for d in up) and sorted(d["attempts"] for d in up) == [1, 2]
    assert sorted(b["alert_id"] for b in receiver.answered) == sorted(alert_ids(db_url))
    burst = next(b for b in receiver.answered if b["rule_id"] == "openai_failed_login_burst")
    assert burst["text"].startswith("[high] Burst of failed sign-ins on one account: 20 events")
    assert len(burst["event_ids"]) == 20 and burst["level"] == "high"


def test_a_sigkill_between_an_alerts_insert_and_its_delivery_neither_loses_nor_doubles_it(simulator, duckdb_url):
    server = simulator(events=0, seed=3)
    scenarios.plant(server.sim, "defense-evasion")
    receiver = Receiver(free_port())
    receiver.hold.set()  # takes the first POST and never answers it: the run is killed meanwhile
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUDIT_INGEST_", "OPENAI_"))}
    env.update(OPENAI_ADMIN_KEY=KEY, OPENAI_BASE_URL=server.url, AUDIT_INGEST_DATABASE_URL=duckdb_url,
               AUDIT_INGEST_ALERT_WEBHOOK=receiver.url)  # fmt: skip
    try:
        run = subprocess.Popen([sys.executable, "-m", "ingest", "run"], env=env, stderr=subprocess.DEVNULL)
        try:
            assert receiver.got.wait(60)
        finally:
            run.send_signal(signal.SIGKILL)
            run.wait()
        stored = alert_ids(duckdb_url)
        assert len(stored) == 8 and all(d["delivered_at"] is None for d in deliveries(duckdb_url))
        receiver.hold.clear()
        receiver.release.set()
        again = subprocess.run([sys.executable, "-m", "ingest", "run"], env=env, capture_output=True, text=True,
                               timeout=120)  # fmt: skip
        assert again.returncode == 0, again.stderr
    finally:
        receiver.stop()
    assert alert_ids(duckdb_url) == stored  # not raised again
    assert sorted(b["alert_id"] for b in receiver.answered) == sorted(stored)  # each taken once
    assert all(d["delivered_at"] is not None for d in deliveries(duckdb_url))
