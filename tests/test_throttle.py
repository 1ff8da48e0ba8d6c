"""Requests in flight adapt to 429s (AIMD), and a cap on requests a second keeps a client under a rate limit:
against the simulator's token bucket over real HTTP, every event lands whatever the limit. The cap is a budget
the clients of a process share, each in turn."""

from __future__ import annotations

import threading
import time

from ingest.throttle import Budget, Throttle


def test_a_429_halves_the_requests_in_flight_and_successes_add_one_back():
    throttle = Throttle(16)
    throttle.rate_limited()
    throttle.rate_limited()
    assert throttle.limit == 4
    for _ in range(4):
        throttle.succeeded()
    assert throttle.limit == 5
    for _ in range(10):
        throttle.rate_limited()
    assert throttle.limit == 1  # never below one


def test_a_slot_waits_while_the_requests_allowed_are_in_flight():
    throttle, stop = Throttle(1), threading.Event()
    entered = threading.Event()

    def second() -> None:
        with throttle.slot(stop):
            entered.set()

    with throttle.slot(stop):
        thread = threading.Thread(target=second)
        thread.start()
        assert not entered.wait(0.3)
    assert entered.wait(5)
    thread.join()


def test_the_shared_budget_gives_a_client_waiting_for_one_start_every_other_turn_beside_one_with_eight_waiting():
    budget, stop, started = Budget(50), threading.Event(), {"big": 0, "small": []}
    big, small = object(), object()

    def hammer() -> None:  # a source with lots of history: 8 slices wanting starts all the time
        while not stop.is_set():
            budget.take(big, stop)
            started["big"] += not stop.is_set()  # a take that `stop` ended started nothing

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for thread in threads:
        thread.start()
    begin = time.monotonic()
    for _ in range(10):
        budget.take(small, stop)
        started["small"].append(time.monotonic() - begin)
    took = time.monotonic() - begin
    stop.set()
    for thread in threads:
        thread.join()
    # Round-robin: the small client's 10 starts took about 20 of the budget's 50 a second (FIFO: 90), and the two
    # together stayed within the budget.
    assert took < 0.7, started
    assert started["big"] + 10 <= 50 * took + 2


def test_a_backfill_against_a_rate_limited_api_backs_off_and_is_exact(simulator, duckdb_url, key_env):
    server = simulator(events=3000, seed=51, rate_limit=10, latency=0.1)
    from ingest.sync import backfill

    since = min(e["effective_at"] for e in server.sim.events)
    # 8 slices at 0.1 s a request ask for 80 a second: the 429s must bring them down to the API's 10.
    stored = _backfill(server, duckdb_url, since, workers=8, backfill=backfill, retry_max_delay=2.0)
    assert stored == {e["id"] for e in server.sim.events}
    assert server.sim.rate_limited > 0  # the limit was met, and the 429s retried


def test_a_client_capped_below_the_apis_rate_gets_no_429(simulator, duckdb_url, key_env):
    server = simulator(events=3000, seed=52, rate_limit=20)
    from ingest.sync import backfill

    since = min(e["effective_at"] for e in server.sim.events)
    stored = _backfill(server, duckdb_url, since, workers=8, backfill=backfill, max_requests_per_second=8)
    assert stored == {e["id"] for e in server.sim.events}
    assert server.sim.rate_limited == 0


def _backfill(server, url, since, *, workers, backfill, **overrides) -> set[str]:
    from datetime import UTC, datetime

    from support import settings_for, stored_events

    from ingest.store import Warehouse

    settings = settings_for(server, url, **overrides)
    warehouse = Warehouse(settings.database_url)
    try:
        backfill(settings, warehouse, settings.sources, datetime.fromtimestamp(since, UTC), workers=workers)
    finally:
        warehouse.dispose()
    return set(stored_events(url))
