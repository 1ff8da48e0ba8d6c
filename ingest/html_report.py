"""`audit-ingest report`: one self-contained HTML file of the organization's activity in a window.

What the report shows is the data in `SECTIONS`: each declaration names the event types it covers and how
they are grouped; the engine below knows no event type. Every aggregation runs in the warehouse (a handful of
GROUP BY queries over `audit_events` and the typed tables), so the size of the log costs the database, not
Python. Charts are SVG drawn here; the page has no script and loads nothing (its Content-Security-Policy
forbids it), so it reads the same offline, attached to a ticket. Under each chart a table holds its numbers,
marked up for machines too: `<table id="table-<section>">`, rows `data-key`, cells `data-col`/`data-value`.
"""

from __future__ import annotations

import html
import os
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa

from ingest import model
from ingest.config import Settings
from ingest.errors import ConfigError

# The actor of an event, as a person reads it: who it was, else the service account or key that acted.
ACTOR = ("actor_email", "actor_service_account_id", "actor_api_key_id")
UNKNOWN = "(unknown)"
OTHERS = "(others)"


@dataclass(frozen=True)
class Window:
    since: datetime  # inclusive, naive UTC (as the warehouse stores time)
    until: datetime  # exclusive

    def days(self) -> list[date]:
        last = (self.until - timedelta(microseconds=1)).date()
        return [self.since.date() + timedelta(days=i) for i in range((last - self.since.date()).days + 1)]


@dataclass(frozen=True)
class Daily:
    """Events per day (a stacked bar a day), one series per type, or per family with `by_family`."""

    id: str
    title: str
    types: tuple[str, ...] = ()  # none: every event
    by_family: bool = False
    top: int = 9  # series beyond these are summed as OTHERS


@dataclass(frozen=True)
class Breakdown:
    """Events per value of a column (the first non-null of `by`), stacked by the column `series`."""

    id: str
    title: str
    label: str  # the name of the value, the table's first column
    by: tuple[str, ...]
    series: str = "type"
    types: tuple[str, ...] = ()
    top: int = 10
    others: bool = True  # a row summing the values beyond the top ones (False: the top ones are the point)


@dataclass(frozen=True)
class Join:
    table: str  # a typed table, joined by event_id
    columns: tuple[str, ...]


@dataclass(frozen=True)
class Listing:
    """The events themselves, newest first, with columns of their typed tables and list items; a bar of
    their counts by type above them. `flag` marks the rows whose column equals the value (an owner grant)."""

    id: str
    title: str
    types: tuple[str, ...]
    joins: tuple[Join, ...] = ()
    items: tuple[Join, ...] = ()  # child tables of list items: (table, (value column,)), joined in order
    flag: tuple[str, str] | None = None
    limit: int = 200
    columns: tuple[str, ...] = ("resource_id", "project_name")  # of audit_events, after time, type and actor


LOGINS = ("login.succeeded", "login.failed")
SECTIONS: tuple[Daily | Breakdown | Listing, ...] = (
    Daily("events", "Events per day, by family", by_family=True),
    Daily("logins", "Logins per day", types=LOGINS),
    Breakdown("login_countries", "Logins by country", "country", by=("ip_country",), types=LOGINS, top=15),
    Daily("api_keys", "API keys created and deleted per day", types=("api_key.created", "api_key.deleted")),
    Listing(
        "api_key_changes", "API keys created and deleted", ("api_key.created", "api_key.deleted"),
        columns=("project_name",), joins=(Join("api_key_events", ("api_key_id",)),),
        items=(Join("api_key_event_scopes", ("scope",)),),
    ),
    Listing(
        "role_changes", "Role and owner changes",
        ("user.added", "user.updated", "user.deleted", "role.assignment.created", "role.assignment.deleted",
         "role.created", "role.updated", "role.deleted"),
        joins=(Join("user_events", ("role",)), Join("role_assignment_events", ("principal_type", "principal_id")),
               Join("role_events", ("role_name",))),
        flag=("role", "owner"),
    ),
    Listing(
        "invites", "Invites", ("invite.sent", "invite.accepted", "invite.deleted"),
        joins=(Join("invite_events", ("email", "role")),), flag=("role", "owner"),
    ),
    Breakdown("actors", "Most active actors", "actor", by=ACTOR, series="actor_type", others=False),
)  # fmt: skip


@dataclass(frozen=True)
class Extension:
    """A section another feature owns, shown only where its table exists (until then the report omits it)."""

    id: str
    title: str
    table: str
    order_by: str | None = None  # newest first by this column, when the table has it


# ---- EXTENSION POINT: a feature's table shown as its latest rows, until a richer declaration replaces it.
EXTENSIONS: tuple[Extension, ...] = (Extension("alerts", "Alerts", "alerts", order_by="created_at"),)
LEDGER_ROWS = 10  # the newest batches the ledger section lists


# ------------------------------------------------------------------------------------------- data
@dataclass
class Table:
    """The numbers of one chart: rows of (key, {column: value})."""

    id: str
    columns: list[str]
    rows: list[tuple[str, dict]] = field(default_factory=list)
    note: str = ""


@dataclass
class Rendered:
    id: str
    title: str
    chart: str  # SVG, or ""
    tables: list[Table]


def family_of(event_type: str) -> str:
    """The family an event type belongs to: its typed table's, else the first part of its name."""
    family = model.FAMILY_OF_TYPE.get(event_type)
    return family.table.removesuffix("_events") if family else event_type.split(".", 1)[0]


def _where(ev: sa.Table, window: Window, types: tuple[str, ...]) -> list:
    clauses = [ev.c.effective_at >= window.since, ev.c.effective_at < window.until]
    if types:
        clauses.append(ev.c.type.in_(types))
    return clauses


def _top(totals: dict[str, int], top: int, others: bool = True) -> list[str]:
    """The keys of the largest totals; with `others`, one fewer when an OTHERS row or series is needed."""
    named = sorted(totals, key=lambda k: (-totals[k], k))
    return named if len(named) <= top else named[: top - others]


def daily(conn: sa.Connection, section: Daily, window: Window) -> Rendered:
    ev = model.audit_events
    day = sa.cast(ev.c.effective_at, sa.Date).label("day")
    rows = conn.execute(
        sa.select(day, ev.c.type, sa.func.count().label("n"))
        .where(*_where(ev, window, section.types))
        .group_by(day, ev.c.type)
    ).all()
    counts: dict[date, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    totals: dict[str, int] = defaultdict(int)
    for d, event_type, n in rows:
        series = family_of(event_type) if section.by_family else event_type
        counts[_date(d)][series] += n
        totals[series] += n
    named = list(section.types) if section.types and not section.by_family else _top(totals, section.top)
    series = named + ([OTHERS] if set(totals) - set(named) else [])
    table = Table(section.id, ["day", *series, "total"])
    for d in window.days():
        by = counts.get(d, {})
        values = {s: by.get(s, 0) for s in named}
        if OTHERS in series:
            values[OTHERS] = sum(n for s, n in by.items() if s not in named)
        table.rows.append((d.isoformat(), {"day": d.isoformat(), **values, "total": sum(by.values())}))
    return Rendered(section.id, section.title, stacked_bars(table, series, vertical=True), [table])


def breakdown(conn: sa.Connection, section: Breakdown, window: Window) -> Rendered:
    ev = model.audit_events
    key = sa.func.coalesce(*(ev.c[c] for c in section.by)).label("key")
    stack = ev.c[section.series].label("series")
    rows = conn.execute(
        sa.select(key, stack, sa.func.count().label("n")).where(*_where(ev, window, section.types)).group_by(key, stack)
    ).all()
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for k, s, n in rows:
        counts[UNKNOWN if k is None else str(k)][UNKNOWN if s is None else str(s)] += n
    totals = {k: sum(v.values()) for k, v in counts.items()}
    keys = _top(totals, section.top, section.others)
    series_totals: dict[str, int] = defaultdict(int)
    for k in keys:
        for s, n in counts[k].items():
            series_totals[s] += n
    series = list(section.types) if section.series == "type" and section.types else sorted(series_totals)
    label = section.label
    table = Table(section.id, [label, *series, "total"])
    for k in keys:
        table.rows.append((k, {label: k, **{s: counts[k].get(s, 0) for s in series}, "total": totals[k]}))
    rest = [k for k in totals if k not in keys]
    if rest and section.others:
        others = {s: sum(counts[k].get(s, 0) for k in rest) for s in series}
        table.rows.append((OTHERS, {label: OTHERS, **others, "total": sum(totals[k] for k in rest)}))
    elif rest:
        table.note = f"the top {len(keys)} of {len(totals):,}"
    return Rendered(section.id, section.title, stacked_bars(table, series, vertical=False), [table])


def listing(conn: sa.Connection, section: Listing, window: Window) -> Rendered:
    ev = model.audit_events
    counts: dict[str, int] = dict(
        conn.execute(
            sa.select(ev.c.type, sa.func.count()).where(*_where(ev, window, section.types)).group_by(ev.c.type)
        ).all()
    )
    count_table = Table(f"{section.id}-counts", ["type", "events"])
    for t in section.types:
        count_table.rows.append((t, {"type": t, "events": counts.get(t, 0)}))

    actor = sa.func.coalesce(*(ev.c[c] for c in ACTOR)).label("actor")
    columns = [ev.c.id, ev.c.effective_at, ev.c.type, actor, *(ev.c[c] for c in section.columns)]
    source: sa.FromClause = ev
    for join in section.joins:
        typed = model.metadata.tables[join.table]
        source = source.outerjoin(typed, typed.c.event_id == ev.c.id)
        columns += [typed.c[c] for c in join.columns]
    query = (
        sa.select(*columns)
        .select_from(source)
        .where(*_where(ev, window, section.types))
        .order_by(ev.c.effective_at.desc(), ev.c.id.desc())
        .limit(section.limit)
    )
    events = conn.execute(query).mappings().all()
    items: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    ids = [e["id"] for e in events]
    for join in section.items:
        child = model.metadata.tables[join.table]
        (value,) = join.columns
        q = sa.select(child.c.event_id, child.c[value]).where(child.c.event_id.in_(ids))  # at most `limit` ids
        for event_id, item in conn.execute(q.order_by(child.c.event_id, child.c.position)):
            items[event_id][value].append("" if item is None else item)
    names = ["time", "type", "actor", *(c for join in (*section.joins, *section.items) for c in join.columns)]
    names += section.columns  # last: the typed columns say more
    table = Table(section.id, names)
    for e in events:
        row = {n: e[n] for n in names if n in e and n not in ("time",)}
        row["time"] = e["effective_at"].strftime("%Y-%m-%d %H:%M:%S")
        for join in section.items:
            (value,) = join.columns
            row[value] = " ".join(items[e["id"]][value])
        if section.flag and row.get(section.flag[0]) == section.flag[1]:
            row["_flag"] = True
        table.rows.append((e["id"], row))
    total = sum(counts.values())
    if total > len(events):
        table.note = f"the newest {len(events):,} of {total:,}"
    chart = stacked_bars(count_table, ["events"], vertical=False)
    return Rendered(section.id, section.title, chart, [count_table, table])


RENDERERS: dict[type, Callable] = {Daily: daily, Breakdown: breakdown, Listing: listing}


def every_event(sections: list[Rendered]) -> Rendered:
    """The rendered daily counts of every event (a Daily section without types: one is declared)."""
    (first, *_) = (s.id for s in SECTIONS if isinstance(s, Daily) and not s.types)
    return next(r for r in sections if r.id == first)


def health(rows: list[dict], events: Rendered) -> Rendered:
    """The copy's health, from `status`, and the days of the window without a single event."""
    table = Table("health", [c for c in (rows[0] if rows else ("source",)) if any(r.get(c) for r in rows)])
    for r in rows:
        table.rows.append((r["source"], {c: r.get(c, "") for c in table.columns}))
    empty = [key for key, row in events.tables[0].rows if row["total"] == 0]
    gaps = Table("gaps", ["day"], [(d, {"day": d}) for d in empty])
    gaps.note = "no day without events" if not empty else f"{len(empty)} days without any event"
    return Rendered("health", "The copy's health", "", [table, gaps])


def extension(conn: sa.Connection, ext: Extension, schema: str | None) -> Rendered | None:
    info = sa.table("columns", sa.column("table_schema"), sa.column("table_name"), sa.column("column_name"),
                    sa.column("ordinal_position"), schema="information_schema")  # fmt: skip
    in_schema = sa.literal(schema) if schema else sa.func.current_schema()
    names = (
        conn.execute(
            sa.select(info.c.column_name)
            .where(info.c.table_name == ext.table, info.c.table_schema == in_schema)
            .order_by(info.c.ordinal_position)
        )
        .scalars()
        .all()
    )
    if not names:  # the feature has not landed in this warehouse
        return None
    table = sa.table(ext.table, *(sa.column(n) for n in names), schema=schema)
    query = sa.select(table).limit(50)
    if ext.order_by is not None and ext.order_by in names:
        query = query.order_by(table.c[ext.order_by].desc())
    out = Table(ext.id, list(names))
    for i, r in enumerate(conn.execute(query).mappings()):
        out.rows.append((str(i), {k: r[k] for k in names}))
    return Rendered(ext.id, ext.title, "", [out])


def ledger(conn: sa.Connection) -> Rendered:
    """The ledger's chain head and newest batches: what `audit-ingest verify` recomputes (not run here: it reads
    every stored event)."""
    table, batches = model.ingest_ledger, model.ingest_batches
    count, events = conn.execute(sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(table.c.events), 0))).one()
    rows = conn.execute(
        sa.select(table.c.seq, table.c.source, table.c.events, batches.c.committed_at, table.c.hash)
        .join(batches, batches.c.seq == table.c.seq)
        .order_by(table.c.seq.desc())
        .limit(LEDGER_ROWS)
    ).all()
    out = Table("verify", ["batch", "source", "events", "committed", "hash"])
    for r in rows:
        committed = r.committed_at.strftime("%Y-%m-%d %H:%M:%S")
        out.rows.append((str(r.seq), {"batch": r.seq, "source": r.source, "events": r.events, "committed": committed,
                                      "hash": r.hash}))  # fmt: skip
    head = rows[0].hash if rows else "none yet"
    out.note = f"chain head {head} over {events:,} events in {count:,} batches; `audit-ingest verify` recomputes it"
    return Rendered("verify", "The ledger", "", [out])


# ------------------------------------------------------------------------------------------ build
def build(conn: sa.Connection, window: Window, status: list[dict], schema: str | None) -> list[Rendered]:
    sections = [RENDERERS[type(s)](conn, s, window) for s in SECTIONS]
    sections += [health(status, every_event(sections)), ledger(conn)]
    sections += [r for ext in EXTENSIONS if (r := extension(conn, ext, schema)) is not None]
    return sections


def write_report(settings: Settings, since: datetime | None, until: datetime | None, output: Path,
                 wait: float) -> tuple[int, Window]:  # fmt: skip
    """Writes the report of [since, until) (default: the 7 days before now) to `output`; (events, window)."""
    from ingest.export import read_only_warehouse, waiting
    from ingest.report import status_rows

    until = until or datetime.now(UTC)
    since = since or until - timedelta(days=7)
    if until <= since:
        raise ConfigError("the report's window is empty: --until must be later than --since")
    window = Window(*(t.astimezone(UTC).replace(tzinfo=None) for t in (since, until)))
    warehouse = read_only_warehouse(settings)

    def read() -> list[Rendered]:
        status = status_rows(warehouse, settings)
        with warehouse.connect() as conn:
            return build(conn, window, status, settings.db_schema)

    try:
        sections = waiting(wait, read)
    finally:
        warehouse.dispose()
    page = render(sections, window, generated=datetime.now(UTC))
    partial = output.with_name(f".{output.name}.partial")
    try:
        partial.write_text(page, encoding="utf-8")
        os.replace(partial, output)
    except OSError as exc:
        raise ConfigError(f"cannot write {output}: {exc.strerror or exc}") from None
    finally:
        partial.unlink(missing_ok=True)
    return sum(row["total"] for _, row in every_event(sections).tables[0].rows), window


# ------------------------------------------------------------------------------------------- SVG
PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f",
           "#bab0ac")  # fmt: skip
SUCCESS, FAILURE = "#59a14f", "#e15759"


def _colors(series: list[str]) -> dict[str, str]:
    colors = {}
    for i, s in enumerate(series):
        colors[s] = (
            FAILURE if s.endswith("failed") else SUCCESS if s.endswith("succeeded") else PALETTE[i % len(PALETTE)]
        )
    return colors


def _nice(top: int) -> int:
    """A round tick step at or above `top`: 1, 2, 3, 4, 5, 6 or 8 times a power of ten."""
    power = 1
    while power * 10 < max(top, 1):
        power *= 10
    return next(m * power for m in (1, 2, 3, 4, 5, 6, 8, 10) if m * power >= top)


def stacked_bars(table: Table, series: list[str], *, vertical: bool) -> str:
    """Stacked bars of `table`'s rows (vertical: a column a row, as days; else a bar a row, labelled)."""
    colors = _colors(series)
    rows = [(key, row) for key, row in table.rows]
    if not rows:
        return ""
    top = 4 * _nice(-(-max(sum(row.get(s, 0) for s in series) for _, row in rows) // 4))  # 4 round ticks
    legend = "".join(
        f'<span class="key"><i style="background:{colors[s]}"></i>{_e(s)}</span>' for s in series if len(series) > 1
    )
    parts: list[str] = []
    if vertical:
        width, height, left, bottom, top_pad = 900, 240, 48, 40, 8
        plot_w, plot_h = width - left - 8, height - bottom - top_pad
        step = plot_w / len(rows)
        for i in range(5):
            y = top_pad + plot_h * (1 - i / 4)
            parts.append(f'<line x1="{left}" x2="{width - 8}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>')
            parts.append(f'<text x="{left - 4}" y="{y + 4:.1f}" class="axis" text-anchor="end">{top * i // 4:,}</text>')
        for i, (key, row) in enumerate(rows):
            x, y = left + i * step + step * 0.1, top_pad + plot_h
            for s in series:
                h = plot_h * row.get(s, 0) / top
                if h > 0:
                    y -= h
                    parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{step * 0.8:.1f}" height="{h:.1f}" '
                                 f'fill="{colors[s]}"><title>{_e(key)} {_e(s)}: {row[s]:,}</title></rect>')  # fmt: skip
            if len(rows) <= 16 or i % (len(rows) // 12 + 1) == 0:
                parts.append(f'<text x="{x + step * 0.4:.1f}" y="{height - bottom + 16}" class="axis" '
                             f'text-anchor="middle">{_e(key[5:] if len(key) == 10 else key)}</text>')  # fmt: skip
    else:
        bar_h, gap, label_w, width = 18, 6, 260, 900
        height = len(rows) * (bar_h + gap) + 8
        plot_w = width - label_w - 70
        for i, (key, row) in enumerate(rows):
            y, x = 4 + i * (bar_h + gap), label_w
            parts.append(f'<text x="{label_w - 6}" y="{y + 13}" class="label" text-anchor="end">{_e(key[:40])}</text>')
            for s in series:
                w = plot_w * row.get(s, 0) / top
                if w > 0:
                    parts.append(f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{colors[s]}">'
                                 f'<title>{_e(key)} {_e(s)}: {row[s]:,}</title></rect>')  # fmt: skip
                    x += w
            total = sum(row.get(s, 0) for s in series)
            parts.append(f'<text x="{x + 6:.1f}" y="{y + 13}" class="label">{total:,}</text>')
    svg = (
        f'<svg id="chart-{_e(table.id)}" class="chart" viewBox="0 0 {width} {height}" role="img" '
        f'xmlns="http://www.w3.org/2000/svg" aria-label="{_e(table.id)}">{"".join(parts)}</svg>'
    )
    return (f'<div class="legend">{legend}</div>' if legend else "") + svg


# ------------------------------------------------------------------------------------------ HTML
CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
header{background:#1d2330;color:#fff;padding:18px 28px}header h1{margin:0;font-size:20px}
header p{margin:4px 0 0;color:#c7cbd4}main{max-width:960px;margin:0 auto;padding:8px 16px 40px}
section{background:#fff;border:1px solid #dde1e7;border-radius:8px;margin:18px 0;padding:14px 18px}
h2{font-size:16px;margin:0 0 10px}.chart{width:100%;height:auto;display:block}
.grid{stroke:#e6e8ec}.axis,.label{font-size:11px;fill:#5b6372}
.legend{display:flex;flex-wrap:wrap;gap:4px 14px;margin:0 0 6px;font-size:12px}
.key i{display:inline-block;width:10px;height:10px;margin-right:5px;border-radius:2px}
table{border-collapse:collapse;width:100%;margin-top:10px;font-size:12px}
th,td{border-bottom:1px solid #eceef2;padding:3px 6px;text-align:left;vertical-align:top}
td.n{text-align:right;font-variant-numeric:tabular-nums}th{background:#f1f3f6}
tr.flag td{background:#fdecea;font-weight:600}details summary{cursor:pointer;color:#3b5b8c}
.scroll{overflow-x:auto}td[data-col=time],td[data-col=day]{white-space:nowrap}
.note{color:#5b6372;font-size:12px;margin:6px 0 0}nav a{color:#c7cbd4;margin-right:12px;font-size:12px}
"""


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _cell(column: str, value: object) -> str:
    if isinstance(value, bool) or value is None or not isinstance(value, int | float):
        text = "" if value is None else str(value)
        return f'<td data-col="{_e(column)}" data-value="{_e(text)}">{_e(text)}</td>'
    return f'<td class="n" data-col="{_e(column)}" data-value="{value}">{value:,}</td>'


FLAG = ' class="flag"'


def _table(table: Table) -> str:
    head = "".join(f"<th>{_e(c)}</th>" for c in table.columns)
    body = "".join(
        f'<tr data-key="{_e(key)}"{FLAG if row.get("_flag") else ""}>'
        + "".join(_cell(c, row.get(c)) for c in table.columns)
        + "</tr>"
        for key, row in table.rows
    )
    note = f'<p class="note">{_e(table.note)}</p>' if table.note else ""
    empty = "" if table.rows else '<p class="note">nothing in this window</p>'
    return (
        f'<div class="scroll"><table id="table-{_e(table.id)}" data-rows="{len(table.rows)}"><thead><tr>{head}</tr>'
        f"</thead><tbody>{body}</tbody></table></div>{note}{empty}"
    )


def render(sections: Iterable[Rendered], window: Window, generated: datetime) -> str:
    sections = list(sections)
    nav = "".join(f'<a href="#{_e(s.id)}">{_e(s.title)}</a>' for s in sections)
    body = "".join(
        f'<section id="{_e(s.id)}"><h2>{_e(s.title)}</h2>{s.chart}{"".join(_table(t) for t in s.tables)}</section>'
        for s in sections
    )
    span = f"{window.since:%Y-%m-%d %H:%M} to {window.until:%Y-%m-%d %H:%M} UTC"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>Audit log report, {_e(span)}</title><style>{CSS}</style></head><body>"
        f'<header><h1>OpenAI organization audit log</h1><p id="window" data-since="{window.since.isoformat()}" '
        f'data-until="{window.until.isoformat()}">{_e(span)}; generated {generated:%Y-%m-%d %H:%M:%S} UTC</p>'
        f"<nav>{nav}</nav></header><main>{body}</main></body></html>\n"
    )


def _date(value: date | datetime) -> date:
    return value.date() if isinstance(value, datetime) else value
