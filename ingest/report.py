"""What `status` and `demo` show: plain rows read from the warehouse, rendered by the CLI."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import sqlalchemy as sa

from ingest import batchlog, coverage, model
from ingest.config import Settings
from ingest.state import Key
from ingest.store import Warehouse, now


def status_rows(warehouse: Warehouse, settings: Settings) -> list[dict]:
    """One row per source (configured or found in the warehouse)."""
    warehouse.ensure_schema()
    ev, runs, state = model.audit_events, model.sync_runs, model.sync_state
    with warehouse.connect() as conn:
        stored = {
            r.source: r
            for r in conn.execute(
                sa.select(
                    ev.c.source, sa.func.count().label("n"), sa.func.max(ev.c.effective_at).label("newest")
                ).group_by(ev.c.source)
            )
        }
        # A source's incremental state is one row per stream; its backfills one row per slice and stream.
        states: dict[str, list] = {}
        backfills: dict[str, dict[tuple[int, int], list[int]]] = {}
        consumers: dict[str, int] = {}
        slices: dict[str, list[int]] = {}  # source -> [slices left, slices] of its split sweeps
        for r in conn.execute(sa.select(state)):
            if r.kind == "incremental":
                states.setdefault(r.source, []).append(r)
            elif r.kind == "consumer":
                consumers[r.source] = r.checkpoint or 0
            elif r.kind == "slice":
                left_total = slices.setdefault(r.source, [0, 0])
                left_total[0] += r.checkpoint is None
                left_total[1] += 1
            elif r.kind == "backfill":
                done_total = backfills.setdefault(r.source, {}).setdefault(Key.parse(r.key).window, [0, 0])
                done_total[0] += r.checkpoint is not None
                done_total[1] += 1
        last = {}
        for status in ("ok", "failed"):
            q = (
                sa.select(runs.c.source, sa.func.max(runs.c.finished_at).label("at"))
                .where(runs.c.status == status, runs.c.kind == "incremental")
                .group_by(runs.c.source)
            )
            last[status] = {r.source: r.at for r in conn.execute(q)}
        last_batch = batchlog.last_seq(conn)
        covered: dict[str, list[coverage.Coverage]] = {}
        for c in coverage.streams(conn, now=int(time.time()), retention=int(settings.retention)):
            covered.setdefault(c.source, []).append(c)
        errors = {
            r.source: r.error
            for r in conn.execute(
                sa.select(runs.c.source, runs.c.error, runs.c.finished_at)
                .where(runs.c.status == "failed", runs.c.kind == "incremental")
                .order_by(runs.c.finished_at)
            )
        }
    found = stored.keys() | states.keys() | backfills.keys()
    # The implicit `default` source is listed only where nothing else is: a warehouse of other sources
    # (the demo's) never had it.
    configured = [s.name for s in settings.sources] if "sources" in settings.model_fields_set or not found else []
    names = configured + sorted(found - set(configured))
    rows, current = [], now()
    for name in names:
        streams, ev_row = states.get(name, []), stored.get(name)
        # The source is synced up to its least advanced stream, of those the API serves.
        checkpoints = [st.checkpoint for st in streams if st.unavailable is None]
        checkpoint = min(checkpoints) if checkpoints and None not in checkpoints else None
        refused = [st.unavailable for st in streams if st.unavailable is not None]
        newest = ev_row.newest if ev_row else None
        lag = (current - newest).total_seconds() if newest else None
        warning = ""
        if lag is not None and lag > 0.8 * settings.retention:
            warning = "lag near the API's retention: older events will be lost"
        if refused:
            warning = "; ".join(
                filter(None, [warning, f"tenant stream unavailable, retried every run: {refused[0][:120]}"])
            )
        rows.append(
            {
                "source": name,
                "checkpoint": _when(checkpoint) if checkpoint else "never synced",
                "sweep": ("in progress" if any(st.sweep_lte is not None for st in streams) else "")
                + (f" ({slices[name][0]} of {slices[name][1]} slices left)" if name in slices else ""),
                "events": f"{ev_row.n:,}" if ev_row else "0",
                "newest event": newest.isoformat(sep=" ") if newest else "",
                "lag": _age(lag) if lag is not None else "",
                "last success": _stamp(last["ok"].get(name)),
                "last failure": _stamp(last["failed"].get(name))
                + (f" ({errors[name][:80]})" if name in errors and last["failed"].get(name) else ""),
                "backfill": "; ".join(
                    f"[{_when(since)}, {_when(until)}): {total - done}/{total} sweeps left"
                    for (since, until), (done, total) in sorted(backfills.get(name, {}).items())
                    if done < total
                ),
                "coverage": "; ".join(_complete_from(c) for c in covered.get(name, [])),
                "gaps": "; ".join(_gap(c, g) for c in covered.get(name, []) for g in c.gaps),
                "warning": warning,
            }
        )
    for name, seq in sorted(consumers.items()):
        rows.append(
            {
                **dict.fromkeys(rows[0] if rows else ("source", "checkpoint", "sweep"), ""),
                "source": f"consumer {name}",
                "checkpoint": f"batch {seq} of {last_batch}",
                "sweep": f"{last_batch - seq:,} batches behind" if seq < last_batch else "",
            }
        )
    return rows


def demo_summary(warehouse: Warehouse) -> list[tuple[str, list[dict]]]:
    ev = model.audit_events
    with warehouse.connect() as conn:
        counts = []
        for table in (ev, *model.DIMENSIONS, *(t for t in model.TYPED_TABLES if t.name.endswith("_events"))):
            counts.append(
                {
                    "table": table.name,
                    "rows": f"{conn.execute(sa.select(sa.func.count()).select_from(table)).scalar():,}",
                }
            )
        top = conn.execute(
            sa.select(ev.c.type, sa.func.count().label("events"))
            .group_by(ev.c.type)
            .order_by(sa.desc("events"), ev.c.type)
            .limit(8)
        ).all()
    return [("tables", counts), ("top event types", [{"type": t, "events": n} for t, n in top])]


def _complete_from(c: coverage.Coverage) -> str:
    return f"{'tenant ' if c.tenant else ''}complete from {_when(c.complete_from or 0)}"


def _gap(c: coverage.Coverage, gap: coverage.Gap) -> str:
    return (f"{'tenant ' if c.tenant else ''}gap [{_when(gap.gte)}, {_when(gap.lte)}]"
            + (" lost upstream" if gap.lost else ""))  # fmt: skip


def _when(unix: int) -> str:
    return datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _stamp(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else ""


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"
