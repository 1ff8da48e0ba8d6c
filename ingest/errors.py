"""Every exception the tool raises on purpose. The CLI prints `str(error)` as one line and exits with
`exit_code` (README, "Exit codes"). Every message names the cause and what to do; none may contain the admin
key (they are built from status codes and our own words, never from request headers).

    IngestError                  1  base class
    ├── ConfigError              2  bad settings, config file, dates, command-line values, database URL
    │   └── RulesError           2  a detection rule that does not parse or names a field no event has
    ├── Interrupted              0  a stop was requested (SIGTERM/SIGINT) while waiting
    ├── ApiError                    the audit-log API failed; `failure` says how (a `Failure`)
    │   ├── AuthError            3  401: the admin key is missing or wrong
    │   ├── NotEnabledError      4  403: audit logging is off, or the key lacks the scope
    │   ├── RateLimitedError     5  still 429 after the whole retry budget
    │   ├── ApiUnavailableError  6  unreachable, or 5xx / resets after the whole retry budget
    │   └── BadResponseError     7  a 4xx we do not retry, or a body we cannot use
    │       └── CursorRejected   7  the API refused a stored `after` cursor: the sweep restarts
    ├── DatabaseError            8  the warehouse is unreachable, read-only, or failed a statement
    │   └── DatabaseInUseError   9  another process holds the DuckDB file (or the source's lock)
    ├── VerifyFailed            10  verify found a stored event or ledger row changed, or the copy unlike the API
    └── SinkError               11  a forwarding sink could not deliver; it resumes there next time
"""

from __future__ import annotations

import enum


class Failure(enum.Enum):
    """How one API request failed, classified once (api.classify); `retriable` decides whether to try again."""

    TRANSPORT = "transport"  # connect error, reset, timeout
    RATE_LIMITED = "rate limited"  # 429
    SERVER = "server error"  # 500, 502, 503, 504
    UNUSABLE_BODY = "unusable body"  # 200 whose body is not a page (truncated, not JSON)
    UNAUTHORIZED = "unauthorized"  # 401
    FORBIDDEN = "forbidden"  # 403
    CURSOR_REJECTED = "cursor rejected"  # 400/404 to a request with a cursor
    REJECTED = "rejected"  # any other 4xx

    @property
    def retriable(self) -> bool:
        return self in _RETRIABLE


_RETRIABLE = {Failure.TRANSPORT, Failure.RATE_LIMITED, Failure.SERVER, Failure.UNUSABLE_BODY}


class IngestError(Exception):
    """Base class: one line for the user, and the process exit code."""

    exit_code = 1


class ConfigError(IngestError):
    """Bad settings, config file, dates, command-line values or database URL."""

    exit_code = 2


class Interrupted(IngestError):
    """A stop was requested (SIGTERM/SIGINT) while waiting."""

    exit_code = 0


class ApiError(IngestError):
    """The audit-log API failed in the way `failure` names."""

    failure: Failure

    def __init__(
        self, message: str, status: int | None = None, body: str | None = None, failure: Failure | None = None
    ):
        super().__init__(message)
        self.status = status
        self.body = body
        if failure is not None:
            self.failure = failure


class AuthError(ApiError):
    """401: the admin key is missing or wrong."""

    exit_code = 3
    failure = Failure.UNAUTHORIZED


class NotEnabledError(ApiError):
    """403: audit logging is not enabled, or the key lacks `api.audit_logs.read`."""

    exit_code = 4
    failure = Failure.FORBIDDEN


class RateLimitedError(ApiError):
    """Still rate limited (429) after the whole retry budget."""

    exit_code = 5
    failure = Failure.RATE_LIMITED


class ApiUnavailableError(ApiError):
    """Unreachable, or 5xx / resets after the whole retry budget."""

    exit_code = 6
    failure = Failure.TRANSPORT


class BadResponseError(ApiError):
    """The API answered something we cannot use (4xx we do not retry, or an unusable body).

    `body` is the unusable body's text, which the sync engine quarantines in `rejected_events`."""

    exit_code = 7
    failure = Failure.REJECTED


class CursorRejected(BadResponseError):
    """The API refused a stored `after` cursor (e.g. its event expired): the sweep restarts."""

    failure = Failure.CURSOR_REJECTED


class DatabaseError(IngestError):
    """The warehouse is unreachable, read-only, or failed a statement."""

    exit_code = 8


class DatabaseInUseError(DatabaseError):
    """Another process holds the DuckDB file (or the source's lock on PostgreSQL)."""

    exit_code = 9


class RulesError(ConfigError):
    """A detection rule that does not parse, names a field no event has, or cannot be evaluated."""


class VerifyFailed(IngestError):
    """`verify` found something: the warehouse changed behind the tool's back, or differs from what the API
    serves; each finding was printed on its own line."""

    exit_code = 10


class SinkError(IngestError):
    """A forwarding sink could not deliver (receiver down, refused, or misconfigured); it resumes there."""

    exit_code = 11
