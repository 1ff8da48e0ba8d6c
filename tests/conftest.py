from collections.abc import Callable, Iterator

import pytest

from ingest.simulator import Simulator, SimulatorServer

SIMULATOR_KEY = "sk-admin-test"


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


@pytest.fixture
def db_url(tmp_path) -> str:
    """A fresh, empty warehouse for one test."""
    return f"duckdb:///{tmp_path / 'warehouse.duckdb'}"
