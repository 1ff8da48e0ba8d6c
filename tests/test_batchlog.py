"""The committed-batch log: every stored event belongs to exactly one committed batch, numbers follow commit
order (also with concurrent ingesters on PostgreSQL), and a consumer that reads after its checkpoint sees
every batch once, whatever kills happen."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from support import KEY, kill_run_after, settings_for, stored_events, sync

from ingest import batchlog, consumers, model
from ingest.state import Key
from ingest.store import Warehouse


def log_invariants(url: str) -> tuple[int, int]:
    """Asserts the log accounts for every stored event, once; returns (batches, events)."""
    warehouse = Warehouse(url)
    try:
        with warehouse.connect() as conn:
            if not sa.inspect(conn).has_table("ingest_batches"):
                return 0, 0
            ev, batches = model.audit_events, model.ingest_batches
            per_seq = dict(conn.execute(sa.select(ev.c.batch_seq, sa.func.count()).group_by(ev.c.batch_seq)).all())
            logged = {r.seq: r for r in conn.execute(sa.select(batches))}
            counter = conn.execute(sa.select(model.ingest_batch_counter.c.seq)).scalar()
    finally:
        warehouse.dispose()
    assert None not in per_seq, "an event without its batch"
    assert per_seq == {seq: r.events for seq, r in logged.items()}, "a batch without its events, or miscounted"
    assert sorted(logged) == list(range(1, len(logged) + 1)), "a gap in the sequence"
    assert counter == (max(logged) if logged else counter)
    return len(logged), sum(per_seq.values())


def test_every_stored_event_is_in_exactly_one_committed_batch(simulator, db_url, key_env):
    server = simulator(events=12_000, seed=61)
    [summary] = sync(server, db_url)
    batches, events = log_invariants(db_url)
    assert events == summary.events_new == 12_000 and batches >= 3  # batches of 5,000 events at most
    server.sim.append(300)
    sync(server, db_url)  # the lookback re-reads stored events: only the new ones get a batch
    after, events = log_invariants(db_url)
    assert events == 12_300 and batches < after <= batches + 2  # a batch per stream with new events
    warehouse = Warehouse(db_url)
    try:
        with warehouse.connect() as conn:
            read = list(batchlog.iter_after(conn, 0, max_events=4000))
            tail = batchlog.read_after(conn, batches)
    finally:
        warehouse.dispose()
    assert [b.seq for b in read] == list(range(1, after + 1))
    assert [b.seq for b in tail] == list(range(batches + 1, after + 1)) and sum(len(b.events) for b in tail) == 300
    ids = [e.id for b in read for e in b.events]
    assert len(ids) == len(set(ids)) and {e.id: e.raw for b in read for e in b.events} == stored_events(db_url)
    # Committed by the streams' sweeps, or by the slices a first sync is split into.
    assert all(b.source == "default" and Key.parse(b.state_key).kind in ("incremental", "slice") for b in read)


class Recorder:
    """A consumer that keeps the batches it was given."""

    def __init__(self, name: str = "recorder"):
        self.name, self.seqs, self.ids = name, [], []

    def process(self, conn, batches) -> None:
        self.seqs += [b.seq for b in batches]
        self.ids += [e.id for b in batches for e in b.events]


def test_a_consumer_resumes_from_its_checkpoint_and_status_shows_it(simulator, db_url, key_env):
    server = simulator(events=3000, seed=62)
    sync(server, db_url)
    warehouse = Warehouse(db_url)
    first = Recorder()
    try:
        assert consumers.run(warehouse, [first]) == {"recorder": len(set(first.seqs))}
        server.sim.append(50)
        sync(server, db_url)
        again = Recorder()
        consumers.run(warehouse, [again])
        with warehouse.connect() as conn:
            assert consumers.checkpoint(conn, "recorder") == again.seqs[-1] == batchlog.last_seq(conn)
    finally:
        warehouse.dispose()
    assert again.seqs[0] == first.seqs[-1] + 1 and len(again.ids) == 50
    assert set(first.ids) | set(again.ids) == stored_events(db_url).keys()
    from ingest.config import load_settings
    from ingest.report import status_rows

    rows = status_rows(Warehouse(db_url), load_settings(None, database_url=db_url))
    [row] = [r for r in rows if r["source"] == "consumer recorder"]
    assert row["checkpoint"] == f"batch {again.seqs[-1]} of {again.seqs[-1]}"


def test_a_failing_consumer_keeps_its_checkpoint_and_the_others_go_on(simulator, duckdb_url, key_env):
    from ingest.errors import IngestError

    class Failing:
        name = "failing"

        def process(self, conn, batches) -> None:
            raise IngestError("receiver down")

    sync(simulator(events=500, seed=63), duckdb_url)
    warehouse = Warehouse(duckdb_url)
    ok, errors = Recorder(), []
    try:
        consumers.run(warehouse, [Failing(), ok], on_error=lambda c, e: errors.append((c.name, str(e))))
        with warehouse.connect() as conn:
            assert consumers.checkpoint(conn, "failing") == 0
            assert consumers.checkpoint(conn, "recorder") == batchlog.last_seq(conn) > 0
    finally:
        warehouse.dispose()
    assert errors == [("failing", "receiver down")] and len(ok.ids) == 500


def test_a_consumer_failing_alongside_a_sync_is_logged_once_and_fed_no_more_until_the_next_run(
    simulator, duckdb_url, key_env, caplog
):
    from ingest.errors import IngestError
    from ingest.sync import run_sources

    class Failing:
        name = "failing"

        def __init__(self):
            self.calls = 0

        def process(self, conn, batches) -> None:
            self.calls += 1
            raise IngestError("receiver down")

    server = simulator(events=1500, seed=64, latency=0.02)
    settings = settings_for(server, duckdb_url, detections=False)
    warehouse = Warehouse(duckdb_url)
    failing, ok = Failing(), Recorder()
    try:
        warehouse.ensure_schema()
        with (
            caplog.at_level("ERROR", logger="ingest.consumers"),
            consumers.alongside(warehouse, [failing, ok]) as healthy,
        ):
            run_sources(settings, warehouse, settings.sources)
        assert healthy == [ok] and failing.calls == 1
        assert [r.getMessage() for r in caplog.records if r.name == "ingest.consumers"] == ["failing: receiver down"]
        consumers.run(warehouse, healthy)  # what committed after the last round: the caller's to feed
        with warehouse.connect() as conn:
            assert consumers.checkpoint(conn, "failing") == 0
            assert consumers.checkpoint(conn, "recorder") == batchlog.last_seq(conn) > 0
    finally:
        warehouse.dispose()
    assert sorted(ok.ids) == sorted(e["id"] for e in server.sim.events)


def test_batches_kept_for_a_follower_stay_bounded_and_a_chunk_reads_back_only_those_not_kept(
    simulator, duckdb_url, key_env, monkeypatch
):
    """ingest.batchlog.keeping: at most LIMIT events kept, the oldest dropped first; a chunk takes what is kept,
    reads the rest back, and leaves nothing kept behind it; a warehouse nobody keeps for hands nothing."""
    from ingest.sync import run_sources

    monkeypatch.setattr(batchlog._Kept, "LIMIT", 250)
    monkeypatch.setattr("ingest.sync.BATCH_EVENTS", 100)  # a batch a page
    server = simulator(events=1000, seed=66)
    settings = settings_for(server, duckdb_url, detections=False, workers=1)
    warehouse, other = Warehouse(duckdb_url), Warehouse(duckdb_url.replace(".duckdb", "-other.duckdb"))
    try:
        with batchlog.keeping(warehouse.engine):
            run_sources(settings, warehouse, settings.sources)
            assert 0 < batchlog._kept.events <= 250
            with warehouse.connect() as conn, conn.begin():
                newest = [seq for _, seq in batchlog._kept.batches]
                handed = batchlog._kept.batches[conn.engine, newest[-1]][0]
                chunk = batchlog.read_after(conn, 0)
            assert batchlog._kept.events == 0 and newest == [b.seq for b in chunk[-len(newest) :]]
            assert chunk[-1].events[0] is handed  # taken as kept, not read back
            other_settings = settings_for(server, other.url, detections=False, workers=1)
            run_sources(other_settings, other, other_settings.sources)
            assert batchlog._kept.events == 0
        with warehouse.connect() as conn, conn.begin():
            read_back = batchlog.read_after(conn, 0)
    finally:
        warehouse.dispose()
        other.dispose()
    assert len(read_back) > len(newest) and chunk == read_back


def test_a_sync_keeps_no_batch_once_every_consumer_following_it_has_failed(simulator, duckdb_url, key_env):
    from ingest.errors import IngestError
    from ingest.sync import run_sources

    class Failing:
        name = "failing"

        def process(self, conn, batches) -> None:
            raise IngestError("receiver down")

    server = simulator(events=3000, seed=67, latency=0.05)
    settings = settings_for(server, duckdb_url, detections=False, workers=1)  # 30 pages, 1.5 s at least
    warehouse = Warehouse(duckdb_url)
    keeping: list[bool] = []  # after each batch: whether the writers still keep their batches for a follower
    try:
        warehouse.ensure_schema()
        with consumers.alongside(warehouse, [Failing()]) as healthy:
            run_sources(
                settings, warehouse, settings.sources, on_progress=lambda _: keeping.append(batchlog.kept_now())
            )
    finally:
        warehouse.dispose()
    assert healthy == [] and keeping[0] and not keeping[-1] and batchlog._kept.events == 0


def test_a_consumer_another_postgresql_session_is_feeding_is_skipped_then_fed_once_it_is_free(
    simulator, pg_url, key_env
):
    sync(simulator(events=300, seed=65), pg_url)
    warehouse = Warehouse(pg_url)
    try:
        with warehouse.connect() as other, warehouse.lock(other, "consumer recorder") as held:
            assert held
            busy = Recorder()
            assert consumers.run(warehouse, [busy]) == {"recorder": 0} and busy.ids == []
        free = Recorder()
        assert consumers.run(warehouse, [free]) == {"recorder": len(set(free.seqs))} and len(free.ids) == 300
    finally:
        warehouse.dispose()


def ingester(url: str, server, source: str, log: Path) -> subprocess.Popen:
    config = log.with_suffix(".toml")
    config.write_text(f'source_lock = false\n[[sources]]\nname = "{source}"\n')
    env = {"OPENAI_ADMIN_KEY": KEY, "OPENAI_BASE_URL": server.url, "AUDIT_INGEST_DATABASE_URL": url,
           "AUDIT_INGEST_CONFIG": str(config), "PATH": "/usr/bin:/bin"}  # fmt: skip
    with log.open("w") as stderr:
        return subprocess.Popen([sys.executable, "-m", "ingest", "run"], env=env, stdout=stderr, stderr=stderr)


def test_concurrent_postgresql_ingesters_commit_in_sequence_order_for_a_consumer_reading_meanwhile(
    simulator, tmp_path, request
):
    # Two ingesters (sources a and b, one simulator: they race to store the same events) and a consumer
    # reading after its checkpoint in a loop while they write: it must see every batch once, in order.
    url = _pg_url(request)
    Warehouse(url).upgrade()
    server = simulator(events=20_000, seed=64, latency=0.002)
    procs = [ingester(url, server, name, tmp_path / f"{name}.log") for name in ("a", "b")]
    warehouse = Warehouse(url)
    seen: list[int] = []
    ids: list[str] = []
    try:
        with warehouse.connect() as conn:
            while True:
                running = any(p.poll() is None for p in procs)
                with conn.begin():
                    after = seen[-1] if seen else 0
                    for batch in batchlog.read_after(conn, after, max_events=2000):
                        seen.append(batch.seq)
                        ids += [e.id for e in batch.events]
                if not running:
                    break
                time.sleep(0.005)
    finally:
        warehouse.dispose()
    for p, name in zip(procs, ("a", "b"), strict=True):
        assert p.wait() == 0, (tmp_path / f"{name}.log").read_text()
    batches, events = log_invariants(url)
    assert seen == list(range(1, batches + 1)), "a batch skipped or read twice"
    assert len(ids) == len(set(ids)) == events == 20_000
    assert set(ids) == {e["id"] for e in server.sim.events}
    assert len(seen) > 4  # enough batches to interleave


@pytest.mark.parametrize("backend", ["duckdb", "postgresql"])
def test_a_sigkill_mid_batch_leaves_no_number_without_its_events_nor_an_event_without_its_batch(
    backend, simulator, tmp_path, request
):
    url = f"duckdb:///{tmp_path / 'kill.duckdb'}" if backend == "duckdb" else _pg_url(request)
    server = simulator(events=30_000, seed=65, latency=0.003)
    env = {"OPENAI_ADMIN_KEY": KEY, "OPENAI_BASE_URL": server.url, "AUDIT_INGEST_DATABASE_URL": url,
           "PATH": "/usr/bin:/bin"}  # fmt: skip
    counts = []
    # Killed after some requests (not some time: a busy machine starts slower), at a moment among commits.
    for requests, after in ((40, 0.05), (60, 0.3), (90, 0.1), (120, 0.2)):
        kill_run_after(server, env, ["run"], requests, after=after)
        counts.append(log_invariants(url)[1])
    assert counts == sorted(counts) and counts[-1] > 0
    result = subprocess.run([sys.executable, "-m", "ingest", "run"], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert log_invariants(url)[1] == 30_000


def _pg_url(request) -> str:
    from conftest import _schemas

    database, admin = request.getfixturevalue("pg_database")
    schema = f"test_{next(_schemas)}"
    admin(f'CREATE SCHEMA "{schema}"')
    return database.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(hide_password=False)
