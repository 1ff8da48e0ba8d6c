"""The ledger and `verify`: the chain recomputed from the stored events by the documented formula, and each way of
tampering with the warehouse, done directly in the database, named by `verify` with its event id."""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime

import sqlalchemy as sa
from support import KEY, assert_verified, cli, migrate, select, stored_events, sync

from ingest import model
from ingest.backends.common import TABLES
from ingest.store import Warehouse

LOGINS = TABLES["login_events"]


def synced(simulator, db_url, batches: int = 3):
    """A warehouse holding `batches` committed batches of the simulator's events."""
    server = simulator(events=900, seed=31)
    sync(server, db_url)
    for _ in range(batches - 1):
        server.sim.append(40)
        sync(server, db_url)
    return server


def chain_head_by_the_docs(db_url: str) -> str:
    """The chain head as ingest/ledger.py's docstring defines it, computed here without the tool's code."""
    events = model.audit_events
    rows = select(db_url, sa.select(events.c.batch_seq, events.c.id, events.c.effective_at, events.c.raw))
    by_batch: dict[int, list[str]] = {}
    for seq, event_id, at, raw in rows:
        raw = raw if isinstance(raw, dict) else json.loads(raw)
        unix = int((at - datetime(1970, 1, 1)).total_seconds())
        text = json.dumps(raw, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        line = hashlib.sha256(f"{event_id}\x1f{unix}\x1f{text}".encode()).hexdigest()
        by_batch.setdefault(seq, []).append(f"{event_id} {line}\n")
    sources = dict(select(db_url, sa.select(model.ingest_ledger.c.seq, model.ingest_ledger.c.source)))
    head = "0" * 64
    for seq in sorted(by_batch):
        entries = "".join(sorted(by_batch[seq]))
        events_hash = hashlib.sha256(entries.encode()).hexdigest()
        head = hashlib.sha256(
            f"{head}\n{seq}\n{sources[seq]}\n{len(by_batch[seq])}\n{events_hash}".encode()
        ).hexdigest()
    return head


def test_every_committed_batch_is_ledgered_and_the_chain_head_is_what_the_documented_formula_gives(
    simulator, db_url, key_env
):
    synced(simulator, db_url)
    logged = [r.seq for r in select(db_url, sa.select(model.ingest_batches.c.seq).order_by(model.ingest_batches.c.seq))]
    ledgered = [r.seq for r in select(db_url, sa.select(model.ingest_ledger.c.seq).order_by(model.ingest_ledger.c.seq))]
    assert ledgered == logged == list(range(1, len(logged) + 1)) and len(logged) >= 3
    head = assert_verified(db_url, 980)
    assert head == chain_head_by_the_docs(db_url)

    result = cli("verify", env={"AUDIT_INGEST_DATABASE_URL": db_url})
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == f"verified 980 events in {len(logged)} batches, chain head {head}"


def tamper(db_url: str, *statements) -> None:
    warehouse = Warehouse(db_url)
    try:
        with warehouse.connect() as conn, conn.begin():
            for statement in statements:
                conn.execute(statement)
    finally:
        warehouse.dispose()


def findings(db_url: str) -> tuple[int, set[tuple[str, str]], str]:
    """verify's exit code, its findings as (event id, kind), and its stderr."""
    result = cli("verify", env={"AUDIT_INGEST_DATABASE_URL": db_url})
    found = set()
    for line in result.stdout.splitlines():
        match = re.fullmatch(r"(\S+(?: \d+)?): ([a-z ]+?)(?: \(.*\))?", line)
        assert match, line
        found.add((match[1], match[2]))
    return result.returncode, found, result.stderr


def test_verify_names_each_event_changed_deleted_or_added_behind_the_tools_back(simulator, db_url, key_env):
    synced(simulator, db_url)
    stored = stored_events(db_url)
    ev = model.audit_events
    ids = sorted(stored)
    changed, moved, deleted = ids[10], ids[20], ids[30]
    login = min(i for i, e in stored.items() if e["type"] == "login.failed")
    [row] = select(db_url, sa.select(ev).where(ev.c.id == ids[40]))
    copy = {**row._mapping, "id": "audit_log-planted", "batch_seq": None}
    copy["raw"] = {**stored[ids[40]], "id": "audit_log-planted"}
    tamper(
        db_url,
        ev.update().where(ev.c.id == changed).values(raw={**stored[changed], "object": "forged"}),
        ev.update().where(ev.c.id == moved).values(effective_at=sa.func.now()),
        ev.delete().where(ev.c.id == deleted),
        ev.insert().values(copy),
        LOGINS.update().where(LOGINS.c.event_id == login).values(error_code="tampered"),
    )
    code, found, stderr = findings(db_url)
    assert code == 10 and stderr.startswith("error: 6 findings")
    assert found == {
        ("audit_log-planted", "typed rows disagree with raw"),  # planted without the typed rows its raw derives
        (changed, "modified"),
        (moved, "modified"),
        (deleted, "missing"),
        ("audit_log-planted", "unledgered"),
        (login, "typed rows disagree with raw"),
    }


def test_verify_names_a_changed_or_deleted_ledger_row_as_a_broken_chain(simulator, db_url, key_env):
    synced(simulator, db_url)
    ledger, entries = model.ingest_ledger, model.ingest_ledger_entries
    first_of: dict[int, str] = {}
    for seq, event_id in select(db_url, sa.select(entries.c.seq, entries.c.event_id)):
        first_of[seq] = min(first_of.get(seq, event_id), event_id)
    last = max(first_of)
    tamper(db_url, ledger.update().where(ledger.c.seq == 2).values(events=ledger.c.events + 1))
    code, found, _ = findings(db_url)
    assert code == 10 and found == {(first_of[2], "broken chain")}

    # An entry's digest changed: its batch's hash no longer covers its entries; the event itself is as ledgered.
    tamper(db_url, entries.update().where(entries.c.event_id == first_of[1]).values(digest="0" * 64))
    code, found, _ = findings(db_url)
    assert code == 10 and found == {(first_of[1], "broken chain"), (first_of[2], "broken chain")}

    # The last row deleted: its batch is in the batch log, not in the ledger, and its events are unledgered.
    tamper(db_url, ledger.delete().where(ledger.c.seq == last))
    ev = model.audit_events
    orphans = {r.id for r in select(db_url, sa.select(ev.c.id).where(ev.c.batch_seq == last))}
    code, found, _ = findings(db_url)
    assert code == 10 and orphans
    assert found == {
        (first_of[1], "broken chain"),
        (first_of[2], "broken chain"),
        (f"batch {last}", "broken chain"),
    } | {(i, "unledgered") for i in orphans}


def test_a_raw_stored_in_another_key_order_or_spacing_is_the_same_event(simulator, duckdb_url, key_env):
    """DuckDB keeps raw's text: the engine's hash of a batch differs, the event's canonical form does not."""
    synced(simulator, duckdb_url, batches=1)
    stored = stored_events(duckdb_url)
    some = sorted(stored)[5]
    respaced = json.dumps(dict(reversed(stored[some].items())), indent=2)
    tamper(duckdb_url, sa.text("UPDATE audit_events SET raw = :raw WHERE id = :id").bindparams(raw=respaced, id=some))
    assert assert_verified(duckdb_url, 900) == chain_head_by_the_docs(duckdb_url)


def test_a_warehouse_from_before_the_ledger_is_ledgered_by_its_migration(simulator, db_url, monkeypatch):
    """Downgraded to revision 0008 and upgraded, as `db upgrade` does it: the stored batches get their ledger rows
    again, and the chain verifies."""
    monkeypatch.setenv("OPENAI_ADMIN_KEY", KEY)
    synced(simulator, db_url, batches=2)
    migrate(db_url, "downgrade", "0008")
    warehouse = Warehouse(db_url)
    try:
        with warehouse.connect() as conn:
            assert not sa.inspect(conn).has_table("ingest_ledger")
    finally:
        warehouse.dispose()
    upgrade = cli("db", "upgrade", env={"AUDIT_INGEST_DATABASE_URL": db_url})
    assert upgrade.returncode == 0, upgrade.stderr
    assert re.search(r"ledgered the \d+ stored batches as they are now", upgrade.stderr)  # and says so
    assert assert_verified(db_url, 940) == chain_head_by_the_docs(db_url)
