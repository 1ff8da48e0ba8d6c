"""The audit-log endpoint: `Client.get_page` fetches one page with retries, `fetch_pages` follows the cursor.

Each attempt's outcome is classified once (`classify`, a `Failure`); the retriable ones are retried: 429
(honouring `retry-after-ms` / `Retry-After`), 500/502/503/504, connection errors, resets, timeouts and
bodies that do not parse (truncated). Never 400/401/403/404: those need a person.
One Client may serve several threads (backfill slices): a 429 seen by one pauses them all.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import random
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import orjson

from ingest import __version__, model
from ingest.errors import (
    ApiError,
    ApiUnavailableError,
    AuthError,
    BadResponseError,
    CursorRejected,
    Failure,
    Interrupted,
    NotEnabledError,
    RateLimitedError,
)
from ingest.throttle import Budget, Throttle

log = logging.getLogger("ingest.api")

PATH = "/organization/audit_logs"
PAGE_SIZE = 100  # the API's maximum
MAX_IN_FLIGHT = 16  # requests one client has in flight at most (its connections)
_TRANSIENT_STATUS = {500, 502, 503, 504}


@dataclass(frozen=True)
class Query:
    """Server-side filters of one sweep. Times are Unix seconds, both bounds inclusive."""

    gte: int | None = None
    lte: int | None = None
    event_types: tuple[str, ...] = ()
    project_ids: tuple[str, ...] = ()
    tenant_only: bool = False

    def params(self, after: str | None) -> list[tuple[str, str | int | float | bool | None]]:
        params: list[tuple[str, str | int | float | bool | None]] = [("limit", PAGE_SIZE)]
        if self.gte is not None:
            params.append(("effective_at[gte]", self.gte))
        if self.lte is not None:
            params.append(("effective_at[lte]", self.lte))
        params += [("event_types[]", t) for t in self.event_types]
        params += [("project_ids[]", p) for p in self.project_ids]
        if self.tenant_only:
            params.append(("tenant_only", "true"))
        if after:
            params.append(("after", after))
        return params


@dataclass
class Page:
    events: list[dict]
    last_id: str | None
    has_more: bool
    # (text, reason) of array items that cannot be stored as events; they go to `rejected_events`.
    rejected: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Stats:
    requests: int = 0
    retries: int = 0
    rate_limited: int = 0  # requests answered 429
    rate_limit_wait: float = 0.0


class Client:
    def __init__(
        self,
        base_url: str,
        key: str,
        *,
        timeout: float = 30.0,
        max_retries: int = 8,
        retry_base_delay: float = 0.5,
        retry_max_delay: float = 60.0,
        stop: threading.Event | None = None,
        transport: httpx.BaseTransport | None = None,
        budget: Budget | None = None,
    ):
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {key}", "User-Agent": f"openai-audit-ingest/{__version__}"},
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            limits=httpx.Limits(max_connections=MAX_IN_FLIGHT, max_keepalive_connections=MAX_IN_FLIGHT),
            transport=transport,
            verify=_tls(),
        )
        self._max_retries = max_retries
        self._base_delay = retry_base_delay
        self._max_delay = retry_max_delay
        self._stop = stop or threading.Event()
        self._lock = threading.Lock()
        self._paused_until = 0.0  # shared by every thread using this client
        self.throttle = Throttle(MAX_IN_FLIGHT, budget)  # `budget`: the process's requests a second, if capped
        self.stats = Stats()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.close()

    def get_page(self, query: Query, after: str | None = None) -> Page:
        params = query.params(after)
        failure, detail, unusable = Failure.TRANSPORT, "no attempt made", b""
        for attempt in range(self._max_retries + 1):
            self._wait_for_pause()
            with self._lock:
                self.stats.requests += 1
            delay = None
            try:
                with self.throttle.slot(self._stop):
                    response = self._http.get(PATH, params=params)
            except httpx.TransportError as exc:
                failure, detail = Failure.TRANSPORT, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            else:
                found = classify(response, after)
                if found is Failure.RATE_LIMITED:
                    self.throttle.rate_limited()
                    with self._lock:
                        self.stats.rate_limited += 1
                elif found is None:
                    self.throttle.succeeded()
                if found is None:
                    try:
                        return parse_page(response.content)
                    except ValueError as exc:
                        found, detail, unusable = Failure.UNUSABLE_BODY, f"({exc})", response.content
                if not found.retriable:
                    raise _fatal(found, response, after)
                failure = found
                if failure is Failure.RATE_LIMITED:
                    detail, delay = "(429)", _retry_after(response.headers)
                elif failure is Failure.SERVER:
                    detail = f"HTTP {response.status_code}"
            if attempt == self._max_retries:
                break
            delay = self._backoff(attempt) if delay is None else min(delay, self._max_delay)
            log.warning(
                "request failed (%s %s); retry %d/%d in %.2fs", failure.value, detail, attempt + 1, self._max_retries,
                delay,
            )  # fmt: skip
            with self._lock:
                self.stats.retries += 1
                if failure is Failure.RATE_LIMITED:
                    self.stats.rate_limit_wait += delay
                    self._paused_until = max(self._paused_until, time.monotonic() + delay)
            self._sleep(delay)
        raise self._exhausted(failure, detail, unusable)

    def _exhausted(self, failure: Failure, detail: str, unusable: bytes) -> ApiError:
        """The error of a retriable failure that lasted through the whole retry budget."""
        if failure is Failure.RATE_LIMITED:
            return RateLimitedError(
                f"still rate limited by the API after {self._max_retries} retries; "
                "wait and run again, or lower the sync frequency"
            )
        if failure is Failure.UNUSABLE_BODY:
            return BadResponseError(
                f"the API kept returning an unusable response body {detail}; retried {self._max_retries} times "
                "(the checkpoint is safe: run again later, and report it if it persists)",
                body=unusable.decode("utf-8", "replace").replace("\0", "\ufffd"),  # text columns hold no NUL
                failure=failure,
            )
        return ApiUnavailableError(
            f"cannot reach the audit-log API at {self._http.base_url} ({detail}) after {self._max_retries} "
            "retries; check the network and OPENAI_BASE_URL, then run again (the checkpoint is safe)",
            failure=failure,
        )

    def _backoff(self, attempt: int) -> float:
        # Exponential backoff with full jitter, so that parallel fetchers do not retry in lockstep.
        return random.uniform(0, min(self._max_delay, self._base_delay * 2**attempt))

    def _wait_for_pause(self) -> None:
        while (remaining := self._paused_until - time.monotonic()) > 0:
            self._sleep(remaining)

    def _sleep(self, seconds: float) -> None:
        if self._stop.wait(seconds):
            raise Interrupted("stopped")


@functools.cache
def _tls() -> ssl.SSLContext:
    """httpx's default context, made once: loading the CA bundle costs 30 ms of CPU, and a daemon makes a client
    per run of each source (runs of 30 sources by 3 daemons on one machine: seconds a tick)."""
    return httpx.create_ssl_context()


def fetch_pages(client: Client, query: Query, after: str | None = None) -> Iterator[Page]:
    """Pages newest first, from `after` (exclusive) until the API says there are no more."""
    while True:
        page = client.get_page(query, after)
        yield page
        if not page.has_more or not page.last_id:
            return
        after = page.last_id


def parse_page(body: bytes) -> Page:
    """A list response -> Page. Raises ValueError when the body is not a usable page (retried).

    Items that cannot be stored as events go to `Page.rejected`. Of two items with one id the first is
    kept; a second one that differs is rejected, an identical one dropped.
    """
    documents, stdlib = _json_documents(body)
    data: list = []
    for doc in documents:
        if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
            raise ValueError("not a list object with `data`")
        data.extend(doc["data"])
    last_doc = documents[-1]
    # NUL arrives only as an escape, lone surrogates and overflowing numbers only via the stdlib parser:
    # only such bodies need the walk through every value.
    walk = stdlib or b"\\u0000" in body
    events, rejected, first = [], [], {}  # type: list[dict], list[tuple[str, str]], dict[str, dict]
    for item in data:
        reason = _invalid_event(item) or (_unstorable(item) if walk else None)
        if not reason and item["id"] in first:
            if item == first[item["id"]]:
                continue
            reason = "duplicate id in the page, with different content (the first one is kept)"
        if reason:
            rejected.append((_dumps(item), reason))
        else:
            first[item["id"]] = item
            events.append(item)
    last_id = last_doc.get("last_id")
    if not isinstance(last_id, str) or not last_id:
        ids = [i["id"] for i in data if isinstance(i, dict) and isinstance(i.get("id"), str) and i["id"]]
        last_id = ids[-1] if ids else None
    has_more = last_doc.get("has_more") is True
    if has_more and last_id is None:
        raise ValueError("has_more without a cursor")  # stopping here would silently skip the rest
    return Page(events, last_id, has_more, rejected)


def _json_documents(body: bytes) -> tuple[list, bool]:
    """One JSON document, or several concatenated (seen in production); and whether the stdlib parsed them."""
    if not model.has_long_number(body):  # else the stdlib, exact where orjson is not
        try:
            return [orjson.loads(body)], False
        except orjson.JSONDecodeError:
            pass
    text = body.decode("utf-8", errors="strict") if body else ""
    decoder, docs, pos = json.JSONDecoder(), [], 0
    while pos < len(text):
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos == len(text):
            break
        doc, pos = decoder.raw_decode(text, pos)  # raises ValueError: retried as a bad body
        docs.append(doc)
    if not docs:
        raise ValueError("empty body")
    return docs, True


def _invalid_event(item: object) -> str | None:
    if not isinstance(item, dict):
        return "not a JSON object"
    if not isinstance(item.get("id"), str) or not item["id"]:
        return "missing or non-string id"
    if not isinstance(item.get("type"), str) or not item["type"]:
        return "missing or non-string type"
    at = item.get("effective_at")
    if not isinstance(at, int) or isinstance(at, bool):
        return "missing or non-integer effective_at"
    if not _EARLIEST <= at <= _LATEST:
        return "effective_at out of range"
    return None


# The Unix seconds a timestamp column holds on both backends (and a Python datetime): years 1 to 9999.
_EARLIEST, _LATEST = -62_135_596_800, 253_402_300_799


def _unstorable(item: dict) -> str | None:
    """Why an event cannot be stored verbatim on every backend, if it cannot."""
    stack: list = [item]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            if "\0" in value:
                return "contains a NUL character (\\u0000), which PostgreSQL cannot store"
            if not value.isascii() and not _encodable(value):
                return "contains a lone UTF-16 surrogate (not valid Unicode)"
        elif isinstance(value, float) and not math.isfinite(value):
            return "contains a number out of range"
        elif isinstance(value, dict):
            stack += value.keys()
            stack += value.values()
        elif isinstance(value, list):
            stack += value
    return None


def _encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _dumps(value: object) -> str:
    # The text of a rejected item. Not orjson: it writes infinity as null. The stdlib keeps integers beyond
    # 64 bits, escapes lone surrogates, writes an overflowing number as Infinity.
    return json.dumps(value, separators=(",", ":"))


def _retry_after(headers: httpx.Headers) -> float | None:
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        try:
            return max(0.0, float(headers[name]) * scale)
        except (KeyError, ValueError):
            continue
    return None


def classify(response: httpx.Response, after: str | None) -> Failure | None:
    """How a response failed, or None for a 200 (whose body may still prove unusable)."""
    status = response.status_code
    if status == 200:
        return None
    if status == 429:
        return Failure.RATE_LIMITED
    if status in _TRANSIENT_STATUS:
        return Failure.SERVER
    if status == 401:
        return Failure.UNAUTHORIZED
    if status == 403:
        return Failure.FORBIDDEN
    if status in (400, 404) and after:
        return Failure.CURSOR_REJECTED
    return Failure.REJECTED


def _fatal(failure: Failure, response: httpx.Response, after: str | None) -> ApiError:
    """The error of a failure that needs a person (or, for a cursor, a restarted sweep)."""
    status, detail = response.status_code, _error_message(response)
    if failure is Failure.UNAUTHORIZED:
        return AuthError(
            "the API rejected the admin key (401): check OPENAI_ADMIN_KEY holds an organization admin key (sk-admin-...)"
        )
    if failure is Failure.FORBIDDEN:
        return NotEnabledError(
            "the API refused access (403): enable audit logging in the organization's settings "
            "(Data controls) and use an admin key with the api.audit_logs.read scope"
            + (f" [{detail}]" if detail else "")
        )
    if failure is Failure.CURSOR_REJECTED:
        return CursorRejected(f"the API rejected the cursor {after!r} ({status}: {detail})", status)
    return BadResponseError(f"the API answered {status}: {detail or response.reason_phrase}", status)


def _error_message(response: httpx.Response) -> str:
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return ""
    return str(message)[:300]
