"""How many requests a client has in flight, and how often it starts one.

AIMD, as TCP's congestion control: a 429 halves the requests allowed in flight, every `limit` successes in a
row add one back, up to the ceiling. A cap of requests a second (`max_requests_per_second`) spaces the
starts. Shared by every thread of one client (backfill slices), so they back off together.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


class Throttle:
    def __init__(self, ceiling: int, max_rate: float | None = None) -> None:
        self.ceiling = ceiling
        self.limit = float(ceiling)
        self._interval = 1.0 / max_rate if max_rate else 0.0
        self._next_start = 0.0
        self._in_flight = 0
        self._successes = 0
        self._cond = threading.Condition()

    @contextmanager
    def slot(self, stop: threading.Event) -> Iterator[None]:
        """Holds one of the requests allowed in flight, started no sooner than the rate cap allows."""
        with self._cond:
            while self._in_flight >= int(self.limit) and not stop.is_set():
                self._cond.wait(0.1)
            self._in_flight += 1
            now = time.monotonic()
            start = max(now, self._next_start)
            self._next_start = start + self._interval
        try:
            if start > now:
                stop.wait(start - now)
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
