"""Signed evidence, checked as an auditor would on their own machine: the real `ssh-keygen -Y verify` on the
manifest, `sha256sum` on events.jsonl, the ledger's formulas on what the manifest and the file hold; and every
bad input one line, exit 2, nothing written."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from support import cli, select, stored_events, sync

from ingest import model

SSH_KEYGEN = shutil.which("ssh-keygen")


@pytest.fixture
def key(tmp_path) -> Path:
    if SSH_KEYGEN is None:
        if os.environ.get("CI") or os.environ.get("AUDIT_INGEST_REQUIRE_PG"):
            pytest.fail("ssh-keygen is not installed (.ci/run installs it)", pytrace=False)
        pytest.skip("ssh-keygen is not installed: apt-get install -y --no-install-recommends openssh-client")
    path = tmp_path / "evidence_key"
    subprocess.run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", "security@example.com", "-f", str(path)],
                   check=True)  # fmt: skip
    return path


def iso(unix: int) -> str:
    return datetime.fromtimestamp(unix, UTC).isoformat()


def auditor(*command: str, stdin: Path | None = None, cwd: Path) -> subprocess.CompletedProcess:
    with open(stdin, "rb") if stdin else open(os.devnull, "rb") as given:
        return subprocess.run(command, stdin=given, cwd=cwd, capture_output=True, text=True)


def test_evidence_of_a_window_checks_with_ssh_keygen_and_sha256sum_and_holds_the_events_as_served(
    simulator, db_url, key_env, key, tmp_path
):
    server = simulator(events=700, seed=41)
    sync(server, db_url)
    served = sorted(server.sim.events, key=lambda e: (e["effective_at"], e["id"]))
    since, until = served[100]["effective_at"], served[600]["effective_at"]  # [since, until): whole seconds
    chosen = [e for e in served if since <= e["effective_at"] < until]
    out = tmp_path / "evidence"
    env = {"AUDIT_INGEST_DATABASE_URL": db_url}
    result = cli("export", "--since", iso(since), "--until", iso(until), "--evidence", str(out),
                 "--signing-key", str(key), env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["allowed_signers", "events.jsonl", "manifest.json",
                                                     "manifest.json.sig"]  # fmt: skip

    # The auditor's own allowed_signers, from the public key the team gave them.
    signers = tmp_path / "auditor_allowed_signers"
    signers.write_text("security-team " + Path(f"{key}.pub").read_text())
    check = auditor(SSH_KEYGEN, "-Y", "verify", "-f", str(signers), "-I", "security-team", "-n",
                    "audit-ingest-evidence", "-s", "manifest.json.sig", stdin=out / "manifest.json", cwd=out)  # fmt: skip
    assert check.returncode == 0 and "Good" in check.stdout, check.stdout + check.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    sha = auditor("sha256sum", "events.jsonl", cwd=out).stdout.split()[0]
    assert sha == manifest["events"]["sha256"]

    lines = (out / "events.jsonl").read_bytes().split(b"\n")[:-1]  # not splitlines(): U+2028 is inside strings
    assert [json.loads(line) for line in lines] == chosen  # as served, oldest first
    assert manifest["events"]["count"] == len(chosen) and manifest["events"]["unledgered"] == 0
    assert manifest["events"]["first"]["id"] == chosen[0]["id"] and manifest["events"]["last"]["id"] == chosen[-1]["id"]
    assert manifest["window"] == {
        "since": iso(since).replace("+00:00", "Z"),
        "until": iso(until).replace("+00:00", "Z"),
    }

    # The ledger rows it lists are the warehouse's, for every batch that holds a chosen event, and chain.
    ev, ledger = model.audit_events, model.ingest_ledger
    ids = {e["id"] for e in chosen}
    seqs = {r.batch_seq for r in select(db_url, sa.select(ev.c.id, ev.c.batch_seq)) if r.id in ids}
    batches = manifest["ledger"]["batches"]
    assert {b["seq"] for b in batches} == seqs
    stored = {r.seq: r.hash for r in select(db_url, sa.select(ledger.c.seq, ledger.c.hash))}
    for b in batches:
        text = f"{b['prev_hash']}\n{b['seq']}\n{b['source']}\n{b['events']}\n{b['events_hash']}"
        assert hashlib.sha256(text.encode()).hexdigest() == b["hash"] == stored[b["seq"]]
    assert manifest["ledger"]["chain_head"]["hash"] == stored[max(stored)]
    # The first sync covered the window on both streams: no gap.
    assert manifest["coverage"] == [{"stream": "default", "complete": True, "gaps": []},
                                    {"stream": "default#tenant", "complete": True, "gaps": []}]  # fmt: skip

    # A changed byte of the manifest: OpenSSH refuses it.
    (out / "manifest.json").write_text((out / "manifest.json").read_text().replace('"count": ', '"count": 1'))
    forged = auditor(SSH_KEYGEN, "-Y", "verify", "-f", str(signers), "-I", "security-team", "-n",
                     "audit-ingest-evidence", "-s", "manifest.json.sig", stdin=out / "manifest.json", cwd=out)  # fmt: skip
    assert forged.returncode != 0


def test_each_bad_evidence_request_is_one_line_exit_2_and_writes_nothing(simulator, duckdb_url, key_env, key, tmp_path):
    server = simulator(events=200, seed=42)
    sync(server, duckdb_url)
    assert len(stored_events(duckdb_url)) == 200
    env = {"AUDIT_INGEST_DATABASE_URL": duckdb_url}
    full = ["--since", "2000-01-01", "--until", "2100-01-01"]
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    rsa = tmp_path / "rsa_key"
    subprocess.run([SSH_KEYGEN, "-q", "-t", "rsa", "-b", "2048", "-N", "", "-f", str(rsa)], check=True)
    cases = {
        "a folder that is not empty": ([*full, "--evidence", str(busy), "--signing-key", str(key)], "not an empty"),
        "no key file": ([*full, "--evidence", str(tmp_path / "a"), "--signing-key", str(tmp_path / "nope")], "nope"),
        "an RSA key": ([*full, "--evidence", str(tmp_path / "b"), "--signing-key", str(rsa)], "ssh-ed25519"),
        "no --signing-key": ([*full, "--evidence", str(tmp_path / "c")], "--signing-key"),
        "a window with no event": (
            [
                "--since",
                "2001-01-01",
                "--until",
                "2001-02-01",
                "--evidence",
                str(tmp_path / "d"),
                "--signing-key",
                str(key),
            ],
            "no events stored",
        ),  # fmt: skip
        "both --output and --evidence": (
            [
                *full,
                "--output",
                str(tmp_path / "e.jsonl"),
                "--evidence",
                str(tmp_path / "e"),
                "--signing-key",
                str(key),
            ],
            "one of them",
        ),  # fmt: skip
    }
    for case, (args, words) in cases.items():
        result = cli("export", *args, env=env)
        assert result.returncode == 2, (case, result.stderr)
        [line] = result.stderr.strip().splitlines()
        assert line.startswith("error: ") and words in line, (case, line)
        assert "PRIVATE KEY" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.name not in ("warehouse.duckdb", "warehouse.duckdb.wal")) == [
        "busy", "evidence_key", "evidence_key.pub", "rsa_key", "rsa_key.pub"
    ]  # fmt: skip
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
