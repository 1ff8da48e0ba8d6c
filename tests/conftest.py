import itertools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import sqlalchemy as sa
from support import sync

from ingest import scenarios
from ingest.simulator import Simulator, SimulatorServer
from ingest.sync import RunSummary

SIMULATOR_KEY = "sk-admin-test"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--crash-kills", type=int, default=int(os.environ.get("AUDIT_INGEST_CRASH_KILLS", "6")),
        help="SIGKILLs per crash test (default 6, or env AUDIT_INGEST_CRASH_KILLS; the full test: 20 or more)",
    )  # fmt: skip


@pytest.fixture
def key_env(monkeypatch) -> None:
    """The simulator's key in OPENAI_ADMIN_KEY, for syncs run in the test's process."""
    monkeypatch.setenv("OPENAI_ADMIN_KEY", SIMULATOR_KEY)


@pytest.fixture
def simulator() -> Iterator[Callable[..., SimulatorServer]]:
    """Factory: `simulator(**Simulator kwargs)` -> a started SimulatorServer (key "sk-admin-test" unless
    given), stopped at teardown. The Simulator is `server.sim`, the base URL `server.url`."""
    servers: list[SimulatorServer] = []

    def start(**kwargs) -> SimulatorServer:
        kwargs.setdefault("key", SIMULATOR_KEY)
        server = SimulatorServer(Simulator(**kwargs)).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


# The PostgreSQL server the tests use (trust auth, a role that may create databases).
PG_SERVER = sa.make_url(os.environ.get("AUDIT_INGEST_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"))


@pytest.fixture(scope="session")
def pg_database() -> Iterator[tuple[sa.URL, Callable[[str], None]]]:
    """A fresh database for the test session, dropped at its end: (its URL, a function running admin SQL in it).

    Unreachable server: the PostgreSQL tests skip with one line, or fail when AUDIT_INGEST_REQUIRE_PG=1 (CI).
    """
    import psycopg

    def connect(database: str) -> psycopg.Connection:
        conninfo = PG_SERVER.set(drivername="postgresql", database=database).render_as_string(hide_password=False)
        return psycopg.connect(conninfo, autocommit=True, connect_timeout=5)

    try:
        admin = connect(PG_SERVER.database)
    except psycopg.OperationalError as exc:
        reason = (
            f"PostgreSQL not reachable at {PG_SERVER.host}:{PG_SERVER.port or 5432}: {str(exc).strip().splitlines()[0]}"
        )
        if os.environ.get("AUDIT_INGEST_REQUIRE_PG") == "1":
            pytest.fail(reason + " (AUDIT_INGEST_REQUIRE_PG=1)", pytrace=False)
        pytest.skip(reason)
    name = f"audit_ingest_test_{os.getpid()}"
    with admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{name}"')
        with connect(name) as conn:
            yield PG_SERVER.set(database=name), lambda sql: conn.execute(sql)
        admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')  # FORCE: engines a test did not dispose


_schemas = itertools.count(1)


@pytest.fixture(params=["duckdb", "postgresql"])
def db_url(request, tmp_path) -> str:
    """A fresh, empty warehouse for one test, on each backend: the whole suite runs on both.

    PostgreSQL: a fresh schema in the session's database, made the connections' search_path by the URL, so
    the warehouse sees an empty database. CREATE SCHEMA takes ~5 ms; CREATE + DROP DATABASE per test
    measured 100-200 ms.
    """
    if request.param == "duckdb":
        return f"duckdb:///{tmp_path / 'warehouse.duckdb'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def pg_url(pg_database) -> str:
    """A fresh, empty PostgreSQL warehouse: a schema of its own in the session's database (see db_url)."""
    database, admin = pg_database
    schema = f"test_{next(_schemas)}"
    admin(f'CREATE SCHEMA "{schema}"')
    return database.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(hide_password=False)


@pytest.fixture
def duckdb_url(tmp_path) -> str:
    """A fresh DuckDB warehouse, for what only DuckDB has (its file lock, read-only file opens)."""
    return f"duckdb:///{tmp_path / 'warehouse.duckdb'}"


@dataclass(frozen=True)
class Synced:
    url: str  # the warehouse
    events: list[dict]  # what the simulator held, newest first
    summary: RunSummary


@pytest.fixture(scope="session")
def synced_10k(tmp_path_factory) -> Synced:
    """One sync of a 10,000-event simulator (seed 0) over HTTP into DuckDB, made once per session and
    shared read-only (tests that write make their own warehouse)."""
    url = f"duckdb:///{tmp_path_factory.mktemp('synced') / 'warehouse.duckdb'}"
    # Simulated users sign in from home; the ready query of users in several countries needs a traveller:
    # the account-takeover scenario's two sign-ins (10,000 events in all).
    travel = [e for e, _ in scenarios.events("account-takeover") if e["type"] == "login.succeeded"]
    with (
        SimulatorServer(Simulator(events=10000 - len(travel), seed=0, key=SIMULATOR_KEY)) as server,
        pytest.MonkeyPatch.context() as mp,
    ):
        server.sim.insert(travel)
        mp.setenv("OPENAI_ADMIN_KEY", SIMULATOR_KEY)
        [summary] = sync(server, url)
        return Synced(url, server.sim.events, summary)
