"""`audit-ingest report`, opened in a real browser (Debian's headless Chromium): the page loads nothing and logs
nothing, and the numbers in its DOM are those the warehouse gives for the same window."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path

import pytest
import sqlalchemy as sa
from support import cli, select, sync

from ingest import html_report, model
from ingest.store import Warehouse

CHROMIUM = shutil.which("chromium")
# The browser's own chatter on a machine without a display or D-Bus; a console message of the page is never one.
BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0"]


def chromium(*args: str) -> subprocess.CompletedProcess:
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (.ci/run installs it)", pytrace=False)
        pytest.skip("chromium is not installed: apt-get install -y --no-install-recommends chromium")
    with tempfile.TemporaryDirectory() as profile:  # a profile of its own: xdist workers run browsers at once
        command = [CHROMIUM, *BROWSER_FLAGS, f"--user-data-dir={profile}", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=120)


class Page(HTMLParser):
    """The report's DOM as read back: tables by id -> [(row key, {column: value}, row class)], sections, links."""

    def __init__(self, text: str):
        super().__init__()
        self.tables: dict[str, list[tuple[str, dict, str]]] = {}
        self.sections: list[str] = []
        self.external: list[str] = []
        self.svgs: list[str] = []
        self.window: dict = {}
        self.tags: Counter = Counter()
        self._table = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags[tag] += 1
        for name in ("src", "href"):
            if a.get(name) and not a[name].startswith("#"):
                self.external.append(a[name])
        if tag == "section":
            self.sections.append(a["id"])
        elif tag == "svg":
            self.svgs.append(a.get("id", ""))
        elif tag == "p" and a.get("id") == "window":
            self.window = a
        elif tag == "table":
            self._table = self.tables.setdefault(a["id"].removeprefix("table-"), [])
        elif tag == "tr" and "data-key" in a and self._table is not None:
            self._table.append((a["data-key"], {}, a.get("class", "")))
        elif tag == "td" and self._table:
            self._table[-1][1][a["data-col"]] = a["data-value"]

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None

    def rows(self, table: str) -> dict[str, dict]:
        return {key: values for key, values, _ in self.tables[table]}


def day_of(value) -> str:
    return (value.date() if isinstance(value, datetime) else value).isoformat()


def test_the_report_in_a_browser_shows_the_warehouses_numbers_for_its_window(simulator, db_url, tmp_path, key_env):
    server = simulator(events=4000, seed=23, span_seconds=12 * 86400)
    newest = max(e["effective_at"] for e in server.sim.events)
    # Markup in the data stays text: an actor's email and a country that would be an image and a script.
    session = {
        "user": {"id": "user-hostile", "email": '<img src=x onerror="console.error(1)">@evil.test'},
        "ip_address": "203.0.113.9",
        "ip_address_details": {"country": "<script>console.error(2)</script>"},
    }
    server.sim.insert([{"id": "audit_log-hostile", "object": "organization.audit_log", "type": "login.failed",
                        "effective_at": newest - 5, "actor": {"type": "session", "session": session},
                        "login.failed": {"error_code": "invalid_credentials"}}])  # fmt: skip
    sync(server, db_url)
    until = datetime.fromtimestamp(newest, UTC).replace(minute=0, second=0) + timedelta(hours=1)
    since = until - timedelta(days=9, hours=5)  # not on a day's boundary: the first day is partial
    output = tmp_path / "report.html"
    result = cli("report", "--since", since.isoformat(), "--until", until.isoformat(), "--output", str(output),
                 env={"AUDIT_INGEST_DATABASE_URL": db_url})  # fmt: skip
    assert result.returncode == 0, result.stderr

    dom = chromium("--dump-dom", output.as_uri())
    assert dom.returncode == 0, dom.stderr
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    assert console == []  # no error, no CSP violation (nothing is loaded), no message at all
    page = Page(dom.stdout)
    assert page.external == []  # self-contained: no stylesheet, script, image or link to load
    assert page.tags["script"] == page.tags["img"] == 0 and "&lt;script&gt;console.error(2)" in output.read_text()
    # The screenshot of this known dataset: kept in AUDIT_INGEST_TEST_ARTIFACTS when set, else with the test's files.
    artifacts = Path(os.environ.get("AUDIT_INGEST_TEST_ARTIFACTS") or tmp_path)
    artifacts.mkdir(parents=True, exist_ok=True)
    shot = artifacts / f"report-{db_url.split(':', 1)[0].split('+')[0]}.png"
    taken = chromium("--hide-scrollbars", "--window-size=1000,2400", f"--screenshot={shot}", output.as_uri())
    assert taken.returncode == 0 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000

    ev = model.audit_events
    lo, hi = since.replace(tzinfo=None), until.replace(tzinfo=None)
    inside = [ev.c.effective_at >= lo, ev.c.effective_at < hi]
    day = sa.cast(ev.c.effective_at, sa.Date)
    by_day_type = select(db_url, sa.select(day, ev.c.type, sa.func.count()).where(*inside).group_by(day, ev.c.type))
    assert page.window == {**page.window, "data-since": lo.isoformat(), "data-until": hi.isoformat()}
    assert set(page.sections) >= {s.id for s in html_report.SECTIONS} | {"health"}
    assert {"chart-events", "chart-logins", "chart-login_countries", "chart-actors"} <= set(page.svgs)

    # Events per day, by family: every day of the window, each family's count, the total.
    per_day: dict[str, Counter] = defaultdict(Counter)
    for d, event_type, n in by_day_type:
        per_day[day_of(d)][html_report.family_of(event_type)] += n
    events = page.rows("events")
    last = (hi - timedelta(microseconds=1)).date()
    assert list(events) == [(lo.date() + timedelta(days=i)).isoformat() for i in range((last - lo.date()).days + 1)]
    assert sum(int(r["total"]) for r in events.values()) == sum(n for *_, n in by_day_type) > 2000
    for d, row in events.items():
        assert int(row["total"]) == sum(per_day[d].values())
        named = [c for c in row if c not in ("day", "total", html_report.OTHERS)]
        assert named and all(int(row[f]) == per_day[d][f] for f in named)
        assert int(row.get(html_report.OTHERS, 0)) == sum(n for f, n in per_day[d].items() if f not in named)

    # Logins per day, succeeded and failed.
    logins = page.rows("logins")
    for d, row in logins.items():
        for t in html_report.LOGINS:
            assert int(row[t]) == sum(n for dd, tt, n in by_day_type if day_of(dd) == d and tt == t)
    assert sum(int(r["login.failed"]) for r in logins.values()) > 0

    # Logins by country: the busiest countries each, the rest summed.
    country = sa.func.coalesce(ev.c.ip_country, html_report.UNKNOWN)
    by_country = select(db_url, sa.select(country, ev.c.type, sa.func.count())
                        .where(*inside, ev.c.type.in_(html_report.LOGINS)).group_by(country, ev.c.type))  # fmt: skip
    expected: dict[str, Counter] = defaultdict(Counter)
    for c, t, n in by_country:
        expected[c][t] += n
    countries = page.rows("login_countries")
    named = [c for c in countries if c != html_report.OTHERS]
    assert len(named) >= 3
    for c in named:
        assert {t: int(countries[c][t]) for t in html_report.LOGINS} == {t: expected[c][t] for t in html_report.LOGINS}
    assert sum(int(r["total"]) for r in countries.values()) == sum(n for *_, n in by_country)

    # API keys created and deleted: every one, with its scopes (in order) and its creator.
    keys = model.metadata.tables["api_key_events"]
    scopes = model.metadata.tables["api_key_event_scopes"]
    listed = select(db_url, sa.select(ev.c.id, ev.c.type, ev.c.actor_email, keys.c.api_key_id)
                    .join(keys, keys.c.event_id == ev.c.id)
                    .where(*inside, ev.c.type.in_(("api_key.created", "api_key.deleted"))))  # fmt: skip
    scope_rows = select(
        db_url, sa.select(scopes.c.event_id, scopes.c.scope).order_by(scopes.c.event_id, scopes.c.position)
    )
    scope_of: dict[str, list[str]] = defaultdict(list)
    for event_id, scope in scope_rows:
        scope_of[event_id].append(scope)
    api_keys = page.rows("api_key_changes")
    assert set(api_keys) == {r.id for r in listed} and listed
    for r in listed:
        row = api_keys[r.id]
        assert (row["type"], row["api_key_id"], row["scope"]) == (r.type, r.api_key_id, " ".join(scope_of[r.id]))
        assert r.actor_email is None or row["actor"] == r.actor_email
    counts = page.rows("api_key_changes-counts")
    assert {t: int(v["events"]) for t, v in counts.items()} == {
        t: sum(1 for r in listed if r.type == t) for t in ("api_key.created", "api_key.deleted")
    }

    # Role and owner changes: owner grants flagged.
    users = model.metadata.tables["user_events"]
    owners = select(db_url, sa.select(ev.c.id).join(users, users.c.event_id == ev.c.id)
                    .where(*inside, users.c.role == "owner"))  # fmt: skip
    flagged = {key for key, _, cls in page.tables["role_changes"] if cls == "flag"}
    assert flagged == {r.id for r in owners} and flagged

    # Invites.
    invites = model.metadata.tables["invite_events"]
    sent = select(
        db_url, sa.select(ev.c.id, invites.c.email).join(invites, invites.c.event_id == ev.c.id).where(*inside)
    )
    assert {k: v["email"] for k, v in page.rows("invites").items()} == {r.id: r.email or "" for r in sent}

    # The most active actors.
    actor = sa.func.coalesce(*(ev.c[c] for c in html_report.ACTOR), html_report.UNKNOWN).label("actor")
    top = select(db_url, sa.select(actor, sa.func.count().label("n")).where(*inside).group_by(actor)
                 .order_by(sa.desc("n"), actor).limit(10))  # fmt: skip
    assert [(k, int(v["total"])) for k, v in page.rows("actors").items()] == [(r.actor, r.n) for r in top]

    # The copy's health, as `status` gives it.
    # The source's row (the consumers, detections' among them, have rows of their own).
    [health] = [row for row in page.rows("health").values() if row["source"] == "default"]
    assert health["events"] == f"{len(server.sim.events):,}"
    # The ledger's newest batches and chain head, as the warehouse has them.
    ledger = model.ingest_ledger
    newest = select(db_url, sa.select(ledger.c.seq, ledger.c.events, ledger.c.hash).order_by(ledger.c.seq.desc()))
    shown = page.rows("verify")
    assert [(int(k), int(v["events"]), v["hash"]) for k, v in shown.items()] == [tuple(r) for r in newest[:10]]
    assert f"chain head {newest[0].hash} over" in output.read_text()


def test_the_alerts_section_shows_the_alerts_table_newest_first(simulator, db_url, tmp_path, key_env):
    server = simulator(events=300, seed=5)
    sync(server, db_url)
    warehouse = Warehouse(db_url)
    with warehouse.connect() as conn, conn.begin():
        conn.execute(sa.text("drop table if exists alert_deliveries"))
        conn.execute(sa.text("drop table alerts"))
        conn.execute(sa.text("create table alerts (id text, rule text, created_at timestamp)"))
        conn.execute(sa.text("insert into alerts values ('a1', 'failed login burst', '2026-01-02 03:04:05'), "
                             "('a2', 'owner granted', '2026-01-03 03:04:05')"))  # fmt: skip
    warehouse.dispose()
    output = tmp_path / "report.html"
    result = cli("report", "--output", str(output), env={"AUDIT_INGEST_DATABASE_URL": db_url})
    assert result.returncode == 0, result.stderr
    page = Page(output.read_text())
    assert "alerts" in page.sections
    since, until = (datetime.fromisoformat(page.window[f"data-{k}"]) for k in ("since", "until"))
    assert until - since == timedelta(days=7)  # the default window: the last 7 days
    assert [v["rule"] for v in page.rows("alerts").values()] == ["owner granted", "failed login burst"]


def test_report_window_mistakes_are_one_line(tmp_path):
    env = {"AUDIT_INGEST_DATABASE_URL": f"duckdb:///{tmp_path / 'absent.duckdb'}"}
    result = cli("report", "--since", "2026-02-01", "--until", "2026-01-01", env=env)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    result = cli("report", "--output", str(tmp_path / "r.html"), env=env)
    assert result.returncode == 8 and "no warehouse" in result.stderr and not Path(tmp_path / "r.html").exists()


def test_a_window_without_events_is_a_report_of_zeros(synced_10k, tmp_path):
    output = tmp_path / "empty.html"
    result = cli("report", "--since", "2020-01-01", "--until", "2020-01-03T12:00", "--output", str(output),
                 env={"AUDIT_INGEST_DATABASE_URL": synced_10k.url})  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"wrote {output}: 0 events")
    page = Page(output.read_text())
    assert [(d, r["total"]) for d, r in page.rows("events").items()] == [
        ("2020-01-01", "0"), ("2020-01-02", "0"), ("2020-01-03", "0")
    ]  # fmt: skip
    assert page.rows("api_key_changes") == {} and page.rows("actors") == {}
    assert page.rows("health")["default"]["events"] == "10,000"
    assert list(page.rows("gaps")) == ["2020-01-01", "2020-01-02", "2020-01-03"]
