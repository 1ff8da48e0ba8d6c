"""The failures a user can act on. The CLI prints `str(error)` as one line and exits with `exit_code`.

Every message names the cause and what to do; none may contain the admin key (they are built from
status codes and our own words, never from request headers).
"""


class IngestError(Exception):
    """Base class: one line for the user, and the process exit code."""

    exit_code = 1


class ConfigError(IngestError):
    """Bad settings, config file, dates or command-line values."""

    exit_code = 2


class AuthError(IngestError):
    """401: the admin key is missing or wrong."""

    exit_code = 3


class NotEnabledError(IngestError):
    """403: audit logging is not enabled, or the key lacks `api.audit_logs.read`."""

    exit_code = 4


class RateLimitedError(IngestError):
    """Still rate limited (429) after the whole retry budget."""

    exit_code = 5


class ApiUnavailableError(IngestError):
    """Unreachable, or 5xx / resets after the whole retry budget."""

    exit_code = 6


class BadResponseError(IngestError):
    """The API answered something we cannot use (4xx we do not retry, or an unusable body).

    `body` is the unusable body's text, which the sync engine quarantines in `rejected_events`."""

    exit_code = 7

    def __init__(self, message: str, status: int | None = None, body: str | None = None):
        super().__init__(message)
        self.status = status
        self.body = body


class DatabaseError(IngestError):
    """The warehouse is unreachable, read-only, or failed a statement."""

    exit_code = 8


class DatabaseInUseError(DatabaseError):
    """Another process holds the DuckDB file (or the source's lock on PostgreSQL)."""

    exit_code = 9


class SinkError(IngestError):
    """A forwarding sink could not deliver (receiver down, refused, or misconfigured); it resumes there."""

    exit_code = 10
