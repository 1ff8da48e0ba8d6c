"""Signed evidence of a window for an auditor: `export --evidence DIR --signing-key KEY`.

DIR gets `events.jsonl` (the window's events as served, oldest first, one canonical JSON text a line: the text
each event's ledger digest covers), `manifest.json` (counts, first and last event, the SHA-256 of events.jsonl,
the ledger rows of the batches holding the window's events, the chain head, per stream whether completed sweeps
cover the window and its gaps, the tool's version), `manifest.json.sig` (an SSH signature of manifest.json, namespace `audit-ingest-evidence`) and
`allowed_signers` (the signing key as principal `audit-ingest`, for a first look: an auditor checks against the
public key they got from the team, not this copy). DIR appears complete or not at all: written aside, renamed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa

from ingest import coverage, ledger, model, sshsig
from ingest.errors import ConfigError

NAMESPACE = "audit-ingest-evidence"
PRINCIPAL = "audit-ingest"
CHUNK = 10_000


def write(
    conn: sa.Connection, since: datetime, until: datetime, directory: Path, key: sshsig.SigningKey, retention: int
) -> dict:
    """Writes the evidence of [since, until) (naive UTC) to `directory`; returns the manifest. `retention`: the
    API's, which tells a gap lost upstream from one a backfill can still fill."""
    if until <= since:
        raise ConfigError("the evidence window is empty: --until must be later than --since")
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise ConfigError(f"{directory} exists and is not an empty folder: evidence goes into a new one")
    ev = model.audit_events
    window = (ev.c.effective_at >= since) & (ev.c.effective_at < until)
    if not conn.execute(sa.select(sa.func.count()).where(window)).scalar():
        raise ConfigError(f"no events stored in [{_iso(since)}, {_iso(until)}): no evidence to give")
    partial = directory.with_name(f".{directory.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)  # a killed earlier try
    try:
        partial.mkdir(parents=True)
        events = _events_file(conn, window, partial / "events.jsonl")
        manifest = _manifest(conn, window, since, until, events)
        manifest["coverage"] = _coverage(conn, since, until, retention)
        text = orjson.dumps(manifest, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"
        (partial / "manifest.json").write_bytes(text)
        (partial / "manifest.json.sig").write_text(sshsig.sign(key, text, NAMESPACE))
        (partial / "allowed_signers").write_text(f"{PRINCIPAL} {sshsig.public_key_line(key)}\n")
        if directory.exists():
            directory.rmdir()  # empty, checked above
        os.replace(partial, directory)
    except OSError as exc:
        raise ConfigError(f"cannot write {directory}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return manifest


def _events_file(conn: sa.Connection, window: sa.ColumnElement, path: Path) -> dict[str, Any]:
    """events.jsonl, oldest first; its count, first and last event, and SHA-256."""
    ev = model.audit_events
    query = (
        sa.select(ev.c.id, ev.c.effective_at, sa.cast(ev.c.raw, sa.Text).label("raw"))
        .where(window)
        .order_by(ev.c.effective_at, ev.c.id)
    )
    digest, count, first, last = hashlib.sha256(), 0, None, None
    with path.open("wb") as out:
        for row in conn.execution_options(yield_per=CHUNK).execute(query):
            line = ledger.canonical_raw(row.raw).encode() + b"\n"
            out.write(line)
            digest.update(line)
            count += 1
            last = {"id": row.id, "effective_at": _iso(row.effective_at)}
            first = first or last
    return {"count": count, "first": first, "last": last, "sha256": digest.hexdigest()}


def _manifest(
    conn: sa.Connection, window: sa.ColumnElement, since: datetime, until: datetime, events: dict
) -> dict[str, Any]:
    ev, table = model.audit_events, model.ingest_ledger
    seqs = sa.select(ev.c.batch_seq).where(window).distinct().scalar_subquery()
    rows = conn.execute(
        sa.select(table.c.seq, table.c.source, table.c.events, table.c.events_hash, table.c.prev_hash, table.c.hash)
        .where(table.c.seq.in_(seqs))
        .order_by(table.c.seq)
    ).all()
    unledgered = conn.execute(sa.select(sa.func.count()).where(window, ev.c.batch_seq.is_(None))).scalar()
    head = ledger.head(conn)
    return {
        "tool": {"name": "openai-audit-ingest", "version": version("openai-audit-ingest")},
        "created_at": _iso(datetime.now(UTC).replace(tzinfo=None)),
        "window": {"since": _iso(since), "until": _iso(until)},
        "events": {**events, "file": "events.jsonl", "unledgered": unledgered},
        "ledger": {
            "batches": [{str(k): v for k, v in r._mapping.items()} for r in rows],  # keys: str, not quoted_name
            "chain_head": None if head is None else {"seq": head.seq, "hash": head.hash},
            "digest": "sha256(id 0x1f effective_at_unix 0x1f line of events.jsonl without its newline)",
            "hash": "sha256(prev_hash \\n seq \\n source \\n events \\n events_hash)",
        },
        "signature": {"file": "manifest.json.sig", "namespace": NAMESPACE, "format": "SSHSIG (ssh-keygen -Y)"},
    }


def _coverage(conn: sa.Connection, since: datetime, until: datetime, retention: int) -> list[dict[str, Any]]:
    """Per stream: whether completed sweeps cover the whole window, and the gaps in it."""
    lo, hi, now = ledger.unix(since), ledger.unix(until) - 1, int(time.time())
    out = []
    for stream in coverage.streams(conn, now=now, retention=retention):
        holes = coverage.gaps(stream.windows, lo, hi, now=now, retention=retention)
        out.append({
            "stream": coverage.stream_key(stream.source, stream.tenant),
            "complete": not holes,
            "gaps": [{"since": _iso(_at(g.gte)), "until": _iso(_at(g.lte + 1)), "lost_upstream": g.lost} for g in holes],
        })  # fmt: skip
    return out


def _at(unix: int) -> datetime:
    return datetime.fromtimestamp(unix, UTC).replace(tzinfo=None)


def _iso(at: datetime) -> str:
    return at.replace(tzinfo=UTC).isoformat().replace("+00:00", "Z")
