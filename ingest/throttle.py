"""How many requests a client has in flight, and how often the clients of a process start one.

AIMD, as TCP's congestion control: a 429 halves the requests a client allows in flight, every `limit`
successes in a row add one back, up to the ceiling. A `Throttle` is one client's (the API limits each
organization on its own) and shared by its threads (backfill slices), so they back off together.
A `Budget` is the process's cap of requests a second (`max_requests_per_second`), shared by every client (the
daemon's concurrent sources): each start goes to the next client in turn among those waiting (round-robin), so a
source with lots of history, whose slices all wait for starts, cannot starve a source that waits for one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable, Iterator
from contextlib import contextmanager


class Budget:
    def __init__(self, max_rate: float | None = None) -> None:
        self._interval = 1.0 / max_rate if max_rate else 0.0
        self._next_start = 0.0
        self._waiting: dict[Hashable, int] = {}  # client -> its threads waiting; the first one's turn is next
        self._cond = threading.Condition()

    def take(self, client: Hashable, stop: threading.Event) -> None:
        """Returns when `client` may start a request: its turn came, and the rate cap allows (or `stop` is set)."""
        if not self._interval:
            return
        with self._cond:
            self._waiting[client] = self._waiting.get(client, 0) + 1
            try:
                while not stop.is_set():
                    now = time.monotonic()
                    if next(iter(self._waiting)) is client:
                        if now >= self._next_start:
                            self._next_start = max(now, self._next_start) + self._interval
                            return
                        self._cond.wait(self._next_start - now)
                    else:
                        self._cond.wait(0.1)  # notified at each start; the timeout only hears `stop`
            finally:
                # To the back of the turn, or out of it with no thread waiting.
                left = self._waiting.pop(client) - 1
                if left:
                    self._waiting[client] = left
                self._cond.notify_all()


class Throttle:
    def __init__(self, ceiling: int, budget: Budget | None = None) -> None:
        self.ceiling = ceiling
        self.limit = float(ceiling)
        self._budget = budget or Budget()
        self._in_flight = 0
        self._successes = 0
        self._cond = threading.Condition()

    @contextmanager
    def slot(self, stop: threading.Event) -> Iterator[None]:
        """Holds one of the requests allowed in flight, started when the budget gives this client its turn."""
        with self._cond:
            while self._in_flight >= int(self.limit) and not stop.is_set():
                self._cond.wait(0.1)
            self._in_flight += 1
        try:
            self._budget.take(self, stop)
            yield
        finally:
            with self._cond:
                self._in_flight -= 1
                self._cond.notify()

    def rate_limited(self) -> None:
        with self._cond:
            self.limit = max(1.0, self.limit / 2)
            self._successes = 0

    def succeeded(self) -> None:
        with self._cond:
            self._successes += 1
            if self._successes >= self.limit and self.limit < self.ceiling:
                self.limit, self._successes = min(float(self.ceiling), self.limit + 1), 0
                self._cond.notify()
