"""`audit-ingest`: the commands only wire settings, the API client, the sync engine and the warehouse.

Every failure a user can act on is an `IngestError`: one line on stderr, its own exit code (README,
"Exit codes"), and a traceback only with --debug. Heavy modules are imported inside the commands so
that a run with nothing to do starts fast.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import sys
import time
from pathlib import Path

import click

from ingest.errors import ConfigError, IngestError
from ingest.scenarios import names as scenario_names

log = logging.getLogger("ingest")


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except IngestError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                import traceback

                traceback.print_exc()  # then the same line and exit code as without --debug
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", type=click.Path(dir_okay=False), envvar="AUDIT_INGEST_CONFIG",
              help="TOML config file (default: none; env AUDIT_INGEST_CONFIG).")  # fmt: skip
@click.option("--debug", is_flag=True, help="DEBUG logging and tracebacks on errors.")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.version_option(package_name="openai-audit-ingest")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, debug: bool, log_format: str) -> None:
    """Copy an OpenAI organization's audit log into DuckDB or PostgreSQL, exactly."""
    ctx.ensure_object(dict)
    ctx.obj.update(config_path=config_path, debug=debug, log_format=log_format)


def _settings(ctx: click.Context, **overrides):
    from ingest.config import load_settings

    obj = ctx.find_root().obj
    if "settings" not in obj:
        obj["settings"] = load_settings(obj["config_path"], **overrides)
        _setup_logging(obj["settings"], obj["debug"], obj["log_format"])
    return obj["settings"]


def _warehouse(settings):
    from ingest.store import Warehouse

    warehouse = Warehouse(settings.database_url, settings.db_schema)
    # The heavy imports are done: their objects need no garbage collection, neither during the run nor
    # at exit, where it takes a third of a second, a third of a run with nothing to do.
    gc.freeze()
    return warehouse


@cli.command()
@click.option("--source", "source_name", help="Only this configured source.")
@click.option("--workers", type=click.IntRange(1, 64),
              help="Slices a long sweep (a first sync) is fetched in at once.  [default: the config's, 4]")  # fmt: skip
@click.pass_context
def run(ctx: click.Context, source_name: str | None, workers: int | None) -> None:
    """One incremental sync of every source, then exit."""
    from ingest.sync import run_sources

    settings = _settings(ctx, **({"workers": workers} if workers else {}))
    sources = settings.source(source_name)
    for source in sources:
        source.admin_key()  # fail on a missing key before touching the database
    _check_rules(settings)
    with _progress() as on_progress:
        summaries = run_sources(settings, _warehouse(settings), sources, on_progress=on_progress)
    for summary in summaries:
        click.echo(summary.line())


@cli.command()  # (a lambda: _duration is defined below)
@click.option("--wait", default="10s", show_default=True, callback=lambda *a: _duration(*a),
              help="How long to wait while a sync holds the DuckDB file.")  # fmt: skip
@click.pass_context
def status(ctx: click.Context, wait: float) -> None:
    """Checkpoint, events stored, newest event and recent runs, per source."""
    from ingest.export import waiting
    from ingest.report import status_rows

    settings = _settings(ctx)
    warehouse = _warehouse(settings)
    rows = waiting(wait, lambda: status_rows(warehouse, settings))
    _print_table(rows, title="audit-ingest status")
    if settings.sinks:
        from ingest.sinks import lag_rows

        with warehouse.connect() as conn:
            sinks = lag_rows(conn, settings)
        _print_table([_sink_row(r) for r in sinks], title="sinks")


def _sink_row(row: dict) -> dict:
    error = f"{row['last_error_at']:%Y-%m-%d %H:%M:%S}: {row['last_error']}" if row["last_error"] else ""
    return {
        "sink": row["sink"], "kind": row["kind"], "format": row["format"], "checkpoint": row["checkpoint"],
        "lag": f"{row['lag_batches']:,} batches, {row['lag_seconds']:,}s", "delivered": f"{row['delivered']:,}",
        "state": "failing" if row["failing"] else "ok", "last error": error,
    }  # fmt: skip


@cli.command()
@click.option("--sink", "sink_name", help="Only this configured sink.")
@click.pass_context
def forward(ctx: click.Context, sink_name: str | None) -> None:
    """Send each sink what committed since its checkpoint, then exit (`run` and the daemon do it after each
    sync). Exit code 11 if a sink could not deliver: it resumes there next time."""
    from ingest import sinks
    from ingest.errors import SinkError

    settings = _settings(ctx)
    chosen = sinks.configured(settings, sink_name)
    if not chosen:
        names = ", ".join(s.name for s in settings.sinks) or "none"
        raise ConfigError(
            f"no sink named {sink_name!r}; configured: {names}" if sink_name else "no [[sinks]] configured"
        )
    warehouse = _warehouse(settings)
    warehouse.ensure_schema()
    failed: list[str] = []
    done = sinks.run(warehouse, chosen, on_error=lambda sink, error: failed.append(sink.config.name))  # type: ignore[attr-defined]
    sinks.observe(warehouse, settings)
    for sink in chosen:
        outcome = "failed, resumes there next time" if sink.config.name in failed else "ok"
        click.echo(f"{sink.config.name}: {done.get(sink.name, 0):,} batches delivered, {outcome}")
    if failed:
        raise SinkError(f"{len(failed)} of {len(chosen)} sinks could not deliver: {', '.join(failed)} (see `status`)")


@cli.command()
@click.option("--events-only", is_flag=True, help="Skip deriving typed rows from raw again (most of the time).")
@click.option("--against-api", is_flag=True, help="Instead: re-read [since, until) from the API, both streams of "
              "each source, and compare it with the warehouse event by event.")  # fmt: skip
@click.option("--since", callback=lambda *a: _time(*a),
              help="With --against-api: start, inclusive (ISO-8601, UTC unless zoned).")  # fmt: skip
@click.option("--until", callback=lambda *a: _time(*a), help="With --against-api: end, exclusive.  [default: now]")
@click.option("--repair", is_flag=True, help="With --against-api: store the events missing here, as a sync would, "
              "and record the window as covered.")  # fmt: skip
@click.option("--source", "source_name", help="With --against-api: only this configured source.")
@click.option("--wait", default="10s", show_default=True, callback=lambda *a: _duration(*a),
              help="How long to wait while a sync holds the DuckDB file.")  # fmt: skip
@click.pass_context
def verify(
    ctx: click.Context, events_only: bool, against_api: bool, since, until, repair: bool, source_name: str | None,
    wait: float,
) -> None:  # fmt: skip
    """Recompute the ledger's hash chain over every stored event: all well, exit 0 and `verified N events in M
    batches, chain head H`. With --against-api, compare a window with the API instead (`missing here`, `changed
    upstream`, `not upstream`). Otherwise one line per finding, with its event id, and exit 10."""
    from ingest.errors import VerifyFailed

    if (since or until or repair or source_name) and not against_api:
        raise ConfigError("--since, --until, --repair and --source go with --against-api")
    settings = _settings(ctx)
    if against_api:
        from ingest import reconcile

        if since is None:
            raise ConfigError("--against-api needs --since DATE (and --until DATE, default now): the window to compare")
        sources = settings.source(source_name)
        for source in sources:
            source.admin_key()
        report = reconcile.run(settings, _warehouse(settings), since, until, repair, sources=sources)
        for finding in report.findings:
            click.echo(finding.line())
        click.echo(report.summary())
        if report.findings:
            raise VerifyFailed(f"{len(report.findings):,} findings: the warehouse differs from what the API serves")
        return
    from ingest import verify as verifying
    from ingest.export import waiting

    warehouse = _warehouse(settings)
    waiting(wait, warehouse.ensure_schema)  # a database from before the ledger is ledgered first
    result = waiting(wait, lambda: verifying.run(warehouse, typed=not events_only))
    for changed in result.findings:
        click.echo(changed.line())
    if result.findings:
        raise VerifyFailed(f"{len(result.findings):,} findings in {result.events:,} events (above, one per line)")
    click.echo(result.line())


def _duration(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    from ingest.config import parse_duration

    try:
        return None if value is None else parse_duration(value)
    except ValueError as exc:
        raise ConfigError(f"bad --{param.name.replace('_', '-')}: {exc}") from None


def _time(ctx: click.Context, param: click.Parameter, value: str | None):
    from ingest.config import parse_time

    try:
        return None if value is None else parse_time(value)
    except ValueError as exc:
        raise ConfigError(f"bad --{param.name}: {exc}") from None


@cli.command()
@click.option("--interval", callback=_duration, help="Time between runs: 30s, 5m, 1h.  [default: 5m]")
@click.option("--cron", help='Instead of --interval: a five-field cron line, in UTC (e.g. "*/5 * * * *").')
@click.option("--source", "source_name", help="Only this configured source.")
@click.option("--metrics-port", type=int, help="Serve Prometheus metrics at http://ADDR:PORT/metrics.")
@click.option("--metrics-addr", default="127.0.0.1", show_default=True, help="Address the metrics server binds.")
@click.pass_context
def daemon(ctx: click.Context, interval, cron, source_name, metrics_port, metrics_addr) -> None:
    """Sync every source now, then on the schedule, until SIGTERM or Ctrl-C (exit 0)."""
    from ingest.schedule import run_daemon

    settings = _settings(ctx)
    _check_rules(settings)
    run_daemon(settings, settings.source(source_name), interval=interval, cron=cron, progress=_progress,
               metrics_port=metrics_port, metrics_addr=metrics_addr)  # fmt: skip


@cli.command()
@click.option(
    "--since", required=True, callback=_time, help="Start, inclusive: ISO-8601 date or datetime, UTC unless zoned."
)
@click.option("--until", callback=_time,
              help="End, exclusive. Default: the end of the unfinished backfill from --since, else now.")  # fmt: skip
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Time slices of the window fetched concurrently.")  # fmt: skip
@click.option("--source", "source_name", help="Only this configured source.")
@click.pass_context
def backfill(ctx: click.Context, since, until, workers: int, source_name: str | None) -> None:
    """Load the window [since, until); rerun the same command to resume a killed backfill."""
    from ingest.sync import backfill as run_backfill

    settings = _settings(ctx)
    sources = settings.source(source_name)
    for source in sources:
        source.admin_key()
    _check_rules(settings)
    with _progress() as on_progress:
        summaries = run_backfill(settings, _warehouse(settings), sources, since, until, workers=workers,
                                 on_progress=on_progress)  # fmt: skip
    for summary in summaries:
        click.echo(summary.line())


@cli.command()
@click.argument("sql")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True,
              help="table: drawn on a terminal, tab-separated in a pipe.")  # fmt: skip
@click.option("--wait", default="10s", show_default=True, callback=_duration,
              help="How long to wait while a sync holds the DuckDB file.")  # fmt: skip
@click.pass_context
def query(ctx: click.Context, sql: str, fmt: str, wait: float) -> None:
    """Run read-only SQL on the warehouse, e.g. "select type, count(*) from audit_events group by 1"."""
    from ingest.export import reader, run_query, text, write_result

    settings = _settings(ctx)
    with reader(settings, wait) as conn:
        columns, rows = run_query(conn, sql, settings.db_schema)
    if fmt == "table":
        _print_table([dict(zip(columns, map(text, row), strict=True)) for row in rows], title=f"{len(rows):,} rows")
    else:
        write_result(columns, rows, fmt, sys.stdout)


@cli.command()
@click.option(
    "--since", required=True, callback=_time, help="Start, inclusive: ISO-8601 date or datetime, UTC unless zoned."
)
@click.option("--until", callback=_time, help="End, exclusive.  [default: now]")
@click.option("--format", "fmt", type=click.Choice(["parquet", "jsonl", "csv", "ocsf", "ecs", "security-lake"]),
              default="parquet", show_default=True,
              help="parquet and csv: the audit_events columns; jsonl: each event's JSON as served; ocsf, ecs: "
                   "JSON lines of OCSF events, ECS documents; security-lake: OCSF Parquet in Amazon Security "
                   "Lake's custom-source layout (--output is a folder).")  # fmt: skip
@click.option("--output", type=click.Path(path_type=Path), help="The file (or folder) to write.")
@click.option("--region", help="security-lake: the AWS region of the partitions (region=...).")
@click.option("--account-id", help="security-lake: the source's AWS account id (accountId=...).")
@click.option("--evidence", type=click.Path(path_type=Path, file_okay=False),
              help="Instead of --output: a new folder of signed evidence for an auditor (README, Evidence).")  # fmt: skip
@click.option("--signing-key", type=click.Path(path_type=Path),
              help="With --evidence: the OpenSSH Ed25519 private key file that signs its manifest.")  # fmt: skip
@click.option("--wait", default="10s", show_default=True, callback=_duration,
              help="How long to wait while a sync holds the DuckDB file.")  # fmt: skip
@click.pass_context
def export(
    ctx: click.Context, since, until, fmt: str, output: Path | None, region, account_id, evidence: Path | None,
    signing_key: Path | None, wait: float,
) -> None:  # fmt: skip
    """Write the events of [since, until) to a file, oldest first; or, with --evidence, signed evidence of them."""
    from datetime import UTC, datetime

    from ingest.export import export_events, reader

    settings = _settings(ctx)
    if (output is None) == (evidence is None):
        raise ConfigError("export needs --output FILE, or --evidence DIR with --signing-key KEY (one of them)")
    if evidence is not None:
        from ingest import evidence as evidence_dir
        from ingest import sshsig

        if signing_key is None:
            raise ConfigError("--evidence needs --signing-key KEY: an OpenSSH Ed25519 private key file")
        key = sshsig.load_signing_key(signing_key)
        naive = [(t or datetime.now(UTC)).astimezone(UTC).replace(tzinfo=None) for t in (since, until)]
        with reader(settings, wait) as conn:
            manifest = evidence_dir.write(conn, naive[0], naive[1], evidence, key, int(settings.retention))
        click.echo(f"wrote the evidence of {manifest['events']['count']:,} events to {evidence}/ (manifest.json "
                   f"signed in namespace {evidence_dir.NAMESPACE})")  # fmt: skip
        return
    assert output is not None
    if fmt == "security-lake":
        from ingest import security_lake

        if not (region and account_id):
            raise ConfigError("--format security-lake needs --region and --account-id (its partitions name them)")
        security_lake.check(region, account_id)
    with reader(settings, wait) as conn:
        if fmt == "security-lake":
            count = security_lake.export(conn, since, until or datetime.now(UTC), output, region=region,
                                         account_id=account_id)  # fmt: skip
        else:
            count = export_events(conn, settings.db_schema, since, until or datetime.now(UTC), fmt, output)
    click.echo(f"wrote {count:,} events to {output}")


@cli.command()
@click.option(
    "--since", callback=_time, help="Start, inclusive: ISO-8601 date or datetime.  [default: --until - 7 days]"
)
@click.option("--until", callback=_time, help="End, exclusive.  [default: now]")
@click.option("--output", default="report.html", show_default=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The HTML file to write.")  # fmt: skip
@click.option("--wait", default="10s", show_default=True, callback=_duration,
              help="How long to wait while a sync holds the DuckDB file.")  # fmt: skip
@click.pass_context
def report(ctx: click.Context, since, until, output: Path, wait: float) -> None:
    """Write a self-contained HTML report of the organization's activity in [since, until)."""
    from ingest.html_report import write_report

    events, window = write_report(_settings(ctx), since, until, output, wait)
    click.echo(
        f"wrote {output}: {events:,} events from {window.since:%Y-%m-%d %H:%M} to {window.until:%Y-%m-%d %H:%M} UTC"
    )


@cli.command()
@click.option("--events", default=5000, show_default=True, help="Events the simulator holds.")
@click.option("--database", default="duckdb:///audit-ingest-demo.duckdb", show_default=True,
              help="Where the demo writes (kept apart from the real warehouse).")  # fmt: skip
@click.pass_context
def demo(ctx: click.Context, events: int, database: str) -> None:
    """No key needed: the built-in simulator -> DuckDB -> a summary of what landed."""
    from ingest.config import Source
    from ingest.report import demo_summary
    from ingest.simulator import Simulator, SimulatorServer
    from ingest.sync import run_sources

    key = "sk-admin-demo-not-a-real-key"
    os.environ["AUDIT_INGEST_DEMO_KEY"] = key
    from ingest.scenarios import plant

    with SimulatorServer(Simulator(events=events, seed=7, key=key)) as server:
        plant(server.sim, DEMO_SCENARIO)  # so that an alert fires
        settings = _settings(ctx, base_url=server.url, database_url=database, db_schema=None,
                             sources=(Source(name="demo", key_env="AUDIT_INGEST_DEMO_KEY"),))  # fmt: skip
        warehouse = _warehouse(settings)
        click.echo(f"simulator at {server.url} with {events:,} events; warehouse {database}")
        with _progress() as on_progress:
            first = run_sources(settings, warehouse, settings.sources, on_progress=on_progress)[0]
        click.echo("first run:  " + first.line())
        server.sim.append(25)
        second = run_sources(settings, warehouse, settings.sources)[0]
        click.echo("second run: " + second.line() + "  (25 new events were appended in between)")
    for title, rows in demo_summary(warehouse):
        click.echo()
        _print_table(rows, title=title)
    if settings.detections:
        from ingest import alerts

        with warehouse.connect() as conn:
            found = alerts.read(conn)
        per_rule: dict[tuple[str, str], int] = {}
        for alert in found:
            per_rule[alert["level"], alert["rule_id"]] = per_rule.get((alert["level"], alert["rule_id"]), 0) + 1
        rows = [{"rule": rule, "level": level, "alerts": n} for (level, rule), n in sorted(per_rule.items())]
        click.echo()
        _print_table(
            rows, title=f"alerts by rule (the {DEMO_SCENARIO} scenario was planted; see `audit-ingest alerts`)"
        )
    click.echo(f"\nExplore it: duckdb {database.removeprefix('duckdb:///')}   or   "
               f"AUDIT_INGEST_DATABASE_URL={database} audit-ingest status   (or report: an HTML page)")  # fmt: skip


@cli.command()
@click.option("--port", default=8080, show_default=True)
@click.option("--events", default=10000, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--fault-rate", default=0.0, show_default=True, help="Share of requests answered with a fault.")
@click.option("--latency", default=0.0, show_default=True, help="Seconds added to every response.")
@click.option("--no-tenant", is_flag=True, help="Play an organization without a tenant: tenant_only=true gets 400.")
@click.option("--rate-limit", type=click.FloatRange(min=0, min_open=True), help="Requests a second; beyond, 429.")
@click.option("--orgs", default=1, show_default=True, type=click.IntRange(min=1),
              help="Serve this many organizations, --events each: keys $OPENAI_ADMIN_KEY-1 to -N, seeds SEED to SEED+N-1.")  # fmt: skip
@click.option("--scenario", "scenario_names", multiple=True, type=click.Choice(scenario_names()),
              help="Plant this attack (ingest/scenarios.py) among the normal events; repeatable.")  # fmt: skip
def simulate(
    port: int, events: int, seed: int, fault_rate: float, latency: float, no_tenant: bool, rate_limit: float | None,
    orgs: int, scenario_names,
) -> None:  # fmt: skip
    """Serve the built-in audit-log API simulator on 127.0.0.1 (key: $OPENAI_ADMIN_KEY, or one per organization)."""
    from ingest.simulator import serve

    key = os.environ.get("OPENAI_ADMIN_KEY", "").strip()
    if not key:
        raise ConfigError("OPENAI_ADMIN_KEY is not set: export the key the simulator should accept")
    serve(port=port, events=events, seed=seed, fault_rate=fault_rate, key=key, latency=latency, tenant=not no_tenant,
          rate_limit=rate_limit, scenarios=scenario_names, orgs=orgs)  # fmt: skip


DEMO_SCENARIO = "credential-stuffing"


def _check_rules(settings):
    """Every start validates the rules: a bad one is one line naming its file and field, exit 2."""
    if not settings.detections:
        return None
    from ingest import detect

    return detect.load(settings.rules_dir, detect.placeholders_of(settings))


@cli.group()
def rules() -> None:
    """The detection rules: the Sigma pack and the files of `rules_dir`."""


@rules.command("check")
@click.pass_context
def rules_check(ctx: click.Context) -> None:
    """Parse and validate every rule (exit 2 naming the file and field of the first bad one)."""
    from ingest import detect

    settings = _settings(ctx)
    loaded = detect.load(settings.rules_dir, detect.placeholders_of(settings))
    active = loaded.active()
    files = len({r.path for r in loaded.rules})
    click.echo(f"{len(loaded.rules)} rules in {files} files are valid: {len(active)} alerting "
               f"({sum(r.correlation for r in active)} correlations)")  # fmt: skip


@rules.command("list")
@click.option("--wait", default="10s", show_default=True, callback=_duration,
              help="How long to wait while a sync holds the DuckDB file.")  # fmt: skip
@click.pass_context
def rules_list(ctx: click.Context, wait: float) -> None:
    """Each rule, its level, whether it alerts, and its alerts so far."""
    from ingest import alerts, detect
    from ingest.errors import DatabaseError

    settings = _settings(ctx)
    loaded = detect.load(settings.rules_dir, detect.placeholders_of(settings))
    try:
        from ingest.export import reader

        with reader(settings, wait) as conn:
            counts = alerts.counts(conn)
    except DatabaseError:  # no warehouse yet: no alerts yet
        counts = {}
    rows = [
        {"rule": r.rule_id, "level": r.level, "kind": r.sigma.type.name.lower() if r.correlation else "detection",
         "status": f"off: {r.disabled}" if r.disabled else "alerts" if r.alerts else "building block",
         "alerts": f"{counts.get(r.rule_id, 0):,}", "title": r.title, "file": r.path.name}
        for r in loaded.rules
    ]  # fmt: skip
    _print_table(rows, title=f"{len(rows)} rules")


@rules.command("sql")
@click.argument("rule_ids", nargs=-1)
@click.option("--dialect", type=click.Choice(["duckdb", "postgresql"]),
              help="Default: the configured warehouse's.")  # fmt: skip
@click.pass_context
def rules_sql(ctx: click.Context, rule_ids, dialect: str | None) -> None:
    """Each detection rule (or those named) as SQL over audit_events, to run where the data lives."""
    import sqlalchemy as sa

    from ingest import detect, sigma_sql

    settings = _settings(ctx)
    loaded = detect.load(settings.rules_dir, detect.placeholders_of(settings))
    by_id = loaded.by_id()
    unknown = [r for r in rule_ids if r not in by_id]
    if unknown:
        raise ConfigError(f"no rule {unknown[0]!r}; see `audit-ingest rules list`")
    dialect = dialect or sa.make_url(settings.database_url).get_backend_name()
    for rule in [by_id[r] for r in rule_ids] if rule_ids else loaded.rules:
        if rule.correlation or rule.disabled:
            continue
        try:
            click.echo(f"-- {rule.rule_id}: {rule.title}\n{sigma_sql.to_sql(rule, dialect)};")
        except IngestError as exc:
            click.echo(f"-- {rule.rule_id}: no SQL form ({str(exc).rsplit(': ', 1)[-1]})")


@cli.command("alerts")
@click.option("--since", callback=_time, help="Only alerts whose last event is at or after this (ISO-8601).")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True)
@click.option("--wait", default="10s", show_default=True, callback=_duration,
              help="How long to wait while a sync holds the DuckDB file.")  # fmt: skip
@click.pass_context
def alerts_command(ctx: click.Context, since, fmt: str, wait: float) -> None:
    """The alerts the detection rules raised, oldest first."""
    from ingest import alerts
    from ingest.export import reader

    settings = _settings(ctx)
    with reader(settings, wait) as conn:
        rows = alerts.read(conn, since)
    if fmt == "table":
        _print_table(alerts.table_rows(rows), title=f"{len(rows):,} alerts")
    else:
        alerts.write(rows, fmt, sys.stdout)


@cli.group()
def db() -> None:
    """Warehouse schema maintenance."""


@db.command()
@click.pass_context
def upgrade(ctx: click.Context) -> None:
    """Apply the schema migrations (run does this by itself)."""
    applied = _warehouse(_settings(ctx)).upgrade()
    click.echo(f"upgraded: {' -> '.join(applied)}" if applied else "already up to date")


@db.command("rebuild-typed")
@click.pass_context
def rebuild_typed(ctx: click.Context) -> None:
    """Re-derive every typed table from the stored raw JSON (no API call)."""
    from ingest.store import rebuild_typed as rebuild

    warehouse = _warehouse(_settings(ctx))
    warehouse.ensure_schema()
    with warehouse.connect() as conn, conn.begin():
        count = rebuild(conn)
    click.echo(f"re-derived typed rows of {count:,} events")


@db.command("schema-doc")
@click.option("--check", is_flag=True, help="Change nothing; exit 1 if the document is not what the model generates.")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path),
              help="The document to update (default: docs/schema.md of this checkout).")  # fmt: skip
@click.pass_context
def schema_doc(ctx: click.Context, check: bool, output: Path | None) -> None:
    """Regenerate docs/schema.md's diagrams and table reference from the model."""
    from ingest import model, schemadoc

    path = output or schemadoc.DOC_PATH
    problems = schemadoc.undocumented(model.metadata)
    if problems:
        click.echo(f"error: {len(problems)} undocumented: {'; '.join(problems)}", err=True)
        ctx.exit(1)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}; pass the document with --output") from None
    new = schemadoc.regenerated(text, model.metadata, str(path))
    if new == text:
        click.echo(f"{path} is up to date")
    elif check:
        click.echo(f"error: {path} is not what the model generates: run `audit-ingest db schema-doc`", err=True)
        ctx.exit(1)
    else:
        path.write_text(new, encoding="utf-8")
        click.echo(f"rewrote the generated part of {path}")


# ------------------------------------------------------------------------------------------ output
def _print_table(rows: list[dict], title: str) -> None:
    """A table on a terminal; tab-separated values with a header line for pipes and scripts."""
    if not sys.stdout.isatty():
        if rows:
            click.echo("\t".join(rows[0]))
        for row in rows:
            click.echo("\t".join("" if v is None else str(v) for v in row.values()))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not rows:
        console.print(f"{title}: nothing yet")
        return
    table = Table(title=title, title_justify="left")
    names = [n for n in rows[0] if any(row[n] not in (None, "") for row in rows)]  # terminals are narrow
    for name in names:
        table.add_column(name, overflow="fold")
    for row in rows:
        table.add_row(*("" if row[n] is None else str(row[n]) for n in names))
    console.print(table)


class _progress:
    """Progress of a run: a rich bar on a terminal (pages, events, events/s, ETA when the window is known),
    otherwise a log line per source every LOG_EVERY seconds (cron mail, journald, log shippers)."""

    LOG_EVERY = 10.0

    def __enter__(self):
        self.bar, self.tasks, self.logged = None, {}, {}
        if sys.stderr.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[stats]}"),
                TimeElapsedColumn(), TimeRemainingColumn(), transient=True,
            )  # fmt: skip
            self.bar.start()
        return self.update

    def update(self, s) -> None:
        covered = s.progress()
        rate = s.events_seen / max(1e-6, time.monotonic() - s.started)
        stats = f"{s.pages:,} pages  {s.events_seen:,} events  {rate:,.0f}/s"
        if self.bar is None:
            now = time.monotonic()
            if now - self.logged.get(s.source, s.started) >= self.LOG_EVERY:
                self.logged[s.source] = now
                share = f", {100 * covered[0] / max(1, covered[1]):.0f}% of the window" if covered else ""
                log.info("%s: %s %s%s", s.source, s.kind, stats.replace("  ", ", "), share)
            return
        task = self.tasks.get(s.source)
        if task is None:
            task = self.tasks[s.source] = self.bar.add_task(s.source, total=None, stats="")
        done, total = covered or (0, None)
        self.bar.update(task, total=total, completed=done, stats=stats)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()


# ------------------------------------------------------------------------------------------ logging
class _Redact(logging.Filter):
    """Last line of defence: no log record may carry an admin key, whoever logs it (httpx included)."""

    def __init__(self, secrets: list[str]):
        super().__init__()
        self.secrets = [s for s in secrets if len(s) >= 8]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if any(s in message for s in self.secrets):
            for secret in self.secrets:
                message = message.replace(secret, "[redacted]")
            record.msg, record.args = message, None
        return True


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def _setup_logging(settings, debug: bool, log_format: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        _JsonFormatter()
        if log_format == "json"
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    if sys.stderr.isatty() and log_format == "text":
        handler.addFilter(lambda record: not getattr(record, "raised", False))  # printed once, as `error: ...`
    handler.addFilter(
        _Redact(
            [os.environ.get(s.key_env, "") for s in settings.sources]
            + [os.environ.get("OPENAI_ADMIN_KEY", "")]
            + settings.webhooks()  # a webhook's URL holds its secret (Slack's do)
            + [os.environ.get(s.token_env, "") for s in settings.sinks if s.token_env]
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    level = logging.DEBUG if debug else getattr(logging, settings.log_level)
    root.setLevel(level)
    # httpx logs every request and Alembic every plugin at INFO; keep that for DEBUG.
    for noisy in ("httpx", "alembic", "apscheduler"):
        logging.getLogger(noisy).setLevel(level if debug else logging.WARNING)


def main() -> None:
    cli(prog_name="audit-ingest")
