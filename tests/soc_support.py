"""Helpers of the SIEM tests: the simulator's events of every type, synced into a warehouse and read back."""

from __future__ import annotations

import pytest
from support import KEY, sync

from ingest import batchlog
from ingest.simulator import Simulator, SimulatorServer, event_types_in_spec
from ingest.store import Warehouse


def every_type(url: str) -> list[dict]:
    """Syncs the simulator's events (every spec type five times, and the types it invents) into `url`; returns
    them as the committed-batch log hands them to consumers."""
    server = SimulatorServer(Simulator(events=6000, seed=181, key=KEY)).start()
    try:
        server.sim.append(5 * len(event_types_in_spec()), types=event_types_in_spec())
        with pytest.MonkeyPatch.context() as env:
            env.setenv("OPENAI_ADMIN_KEY", KEY)
            sync(server, url)
    finally:
        server.stop()
    warehouse = Warehouse(url)
    try:
        with warehouse.connect() as conn:
            return [e.raw for b in batchlog.iter_after(conn, 0) for e in b.events]
    finally:
        warehouse.dispose()
