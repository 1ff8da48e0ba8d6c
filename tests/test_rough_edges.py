"""What a new user meets first: the `duckdb` command, `status` on the demo's warehouse, one line per failure on
a terminal, `status` while a sync holds the file, and the `object` field every served event carries."""

from __future__ import annotations

import os
import pty
import shutil
import subprocess
import sys
import time
from pathlib import Path

import duckdb
from support import cli, scalar, stored_events, sync

from ingest.cli import DEMO_SCENARIO
from ingest.scenarios import events as scenario_events

PLANTED = len(scenario_events(DEMO_SCENARIO))  # the demo plants one attack among its events, so an alert fires


def rows_of(stdout: str) -> list[dict]:
    header, *lines = stdout.splitlines()
    return [dict(zip(header.split("\t"), line.split("\t"), strict=True)) for line in lines]


def test_the_duckdb_command_installed_with_the_tool_reads_the_demo_warehouse(tmp_path):
    url = f"duckdb:///{tmp_path / 'demo.duckdb'}"
    result = cli("demo", "--events", "300", "--database", url, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"duckdb {tmp_path / 'demo.duckdb'}" in result.stdout  # what the demo tells the user to run

    duckdb_command = Path(sys.executable).parent / "duckdb"
    sql = "select type, count(*) as n from audit_events group by 1 order by 2 desc, 1"
    out = subprocess.run(
        [str(duckdb_command), "-readonly", "-csv", str(tmp_path / "demo.duckdb"), sql],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    got = [line.split(",") for line in out.splitlines()[1:]]
    with duckdb.connect(str(tmp_path / "demo.duckdb"), read_only=True) as conn:
        expected = [[t, str(n)] for t, n in conn.execute(sql).fetchall()]
    assert got == expected and sum(int(n) for _, n in got) == 300 + PLANTED + 25  # 25 appended before run two


def test_status_on_the_demo_warehouse_lists_only_the_demo_source(tmp_path):
    url = f"duckdb:///{tmp_path / 'demo.duckdb'}"
    assert cli("demo", "--events", "200", "--database", url, cwd=tmp_path).returncode == 0
    result = cli("status", env={"AUDIT_INGEST_DATABASE_URL": url})
    assert result.returncode == 0, result.stderr
    [row] = [r for r in rows_of(result.stdout) if not r["source"].startswith("consumer ")]
    assert row["source"] == "demo" and row["events"] == str(200 + PLANTED + 25) and row["checkpoint"] != "never synced"

    # A warehouse that holds no source yet still shows the one configured by default.
    empty = f"duckdb:///{tmp_path / 'empty.duckdb'}"
    result = cli("status", env={"AUDIT_INGEST_DATABASE_URL": empty})
    assert [(r["source"], r["checkpoint"]) for r in rows_of(result.stdout)] == [("default", "never synced")]


def run_on_a_terminal(*args: str, env: dict) -> tuple[int, str]:
    """Runs `audit-ingest` with its stderr on a pseudo-terminal, as a person at a shell; (exit code, stderr)."""
    master, slave = pty.openpty()
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("AUDIT_INGEST_", "OPENAI_"))}
    process = subprocess.Popen(
        [sys.executable, "-m", "ingest", *args], env={**clean, **env, "COLUMNS": "200"}, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=slave,
    )  # fmt: skip
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    process.communicate(timeout=120)
    return process.returncode, b"".join(chunks).decode(errors="replace").replace("\r\n", "\n")


def test_a_failure_prints_its_message_once_on_a_terminal_and_keeps_the_log_line_elsewhere(simulator, tmp_path):
    server = simulator(events=50)
    env = {
        "OPENAI_ADMIN_KEY": "sk-admin-wrong-key-123456",
        "OPENAI_BASE_URL": server.url,
        "AUDIT_INGEST_DATABASE_URL": f"duckdb:///{tmp_path / 'w.duckdb'}",
    }
    code, stderr = run_on_a_terminal("run", env=env)
    assert code == 3
    mentions = [line for line in stderr.splitlines() if "401" in line]
    assert len(mentions) == 1 and mentions[0].startswith("error: ")

    piped = cli("run", env=env)  # cron mail, journald: the log line with its time, and the `error:` line
    assert piped.returncode == 3
    mentions = [line for line in piped.stderr.splitlines() if "401" in line]
    assert len(mentions) == 2 and " ERROR " in mentions[0] and mentions[1].startswith("error: ")
    assert scalar(env["AUDIT_INGEST_DATABASE_URL"], "select count(*) from sync_runs where status = 'failed'") == 2


def test_status_waits_while_a_sync_holds_the_duckdb_file(synced_10k, tmp_path):
    path = tmp_path / "held.duckdb"
    shutil.copy(synced_10k.url.removeprefix("duckdb:///"), path)
    env = {"AUDIT_INGEST_DATABASE_URL": f"duckdb:///{path}"}
    holder = duckdb.connect(str(path))  # a writer, as a sync is
    result = cli("status", "--wait", "0.5s", env=env)
    assert result.returncode == 9 and result.stderr.startswith("error: ") and "in use" in result.stderr

    clean = {k: v for k, v in os.environ.items() if not k.startswith(("AUDIT_INGEST_", "OPENAI_"))}
    waiting = subprocess.Popen([sys.executable, "-m", "ingest", "status"], env={**clean, **env},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    time.sleep(1.5)
    assert waiting.poll() is None  # still waiting for the file
    holder.close()
    out, err = waiting.communicate(timeout=60)
    assert waiting.returncode == 0, err
    [row] = [r for r in rows_of(out) if not r["source"].startswith("consumer ")]
    assert row["source"] == "default" and row["events"] == "10,000"


def test_every_served_event_carries_its_object_and_is_stored_as_served_without_a_mismatch(simulator, db_url, key_env):
    server = simulator(events=600, seed=19)
    [summary] = sync(server, db_url)
    server.sim.append(20)
    sync(server, db_url)
    served = {e["id"]: e for e in server.sim.events}
    assert len(served) == 620 and all(e["object"] == "organization.audit_log" for e in served.values())
    assert stored_events(db_url) == served
    assert not summary.mismatches
    assert scalar(db_url, "select coalesce(sum(mismatches), 0) from sync_runs") == 0
