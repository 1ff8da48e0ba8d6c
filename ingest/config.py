"""Settings: an optional TOML file, overlaid by environment variables, validated by pydantic.

Environment wins over the file so that one deployment's secrets and URLs stay out of shared config.
The admin key is never a setting of its own: each source names the environment variable that
holds its key, and the key is read only when a command needs the API.
"""

from __future__ import annotations

import os
import re
import stat
import tomllib
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ingest.errors import ConfigError

DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_DATABASE_URL = "duckdb:///audit_logs.duckdb"

# environment variable -> setting; OPENAI_* names match OpenAI's own SDK.
ENVIRONMENT = {
    "OPENAI_BASE_URL": "base_url",
    "AUDIT_INGEST_DATABASE_URL": "database_url",
    "AUDIT_INGEST_DB_SCHEMA": "db_schema",
    "AUDIT_INGEST_LOG_LEVEL": "log_level",
    "AUDIT_INGEST_RULES_DIR": "rules_dir",
}

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_duration(text: str | int | float) -> float:
    """`30s`, `5m`, `1h`, `2d`, `250ms` or a number of seconds -> seconds."""
    if isinstance(text, int | float):
        return float(text)
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"not a duration: {text!r} (use e.g. 30s, 5m, 1h)")
    return float(match[1]) * _UNITS[match[2]]


def parse_time(text: str | int | datetime | date) -> datetime:
    """ISO-8601 date or datetime (UTC unless zoned), or Unix seconds -> aware UTC datetime."""
    if isinstance(text, datetime):
        value = text
    elif isinstance(text, date):
        value = datetime(text.year, text.month, text.day)
    elif isinstance(text, int) or (isinstance(text, str) and text.strip().isdigit()):
        return datetime.fromtimestamp(int(text), UTC)
    else:
        try:
            value = datetime.fromisoformat(text.strip())
        except ValueError:
            raise ValueError(f"not an ISO-8601 date or datetime: {text!r} (e.g. 2026-01-31T12:00Z)") from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Source(BaseModel):
    """One organization to copy: its own key, checkpoint and optional server-side filters."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    key_env: str = "OPENAI_ADMIN_KEY"
    event_types: tuple[str, ...] = ()
    project_ids: tuple[str, ...] = ()
    # Also sweep with tenant_only=true: the API returns tenant-scoped events (tenant.*,
    # role.bound_to_resource, ...) only to such requests.
    tenant_events: bool = True

    def admin_key(self) -> str:
        key = os.environ.get(self.key_env, "").strip()
        if not key:
            raise ConfigError(
                f"{self.key_env} is not set: export the organization's admin key (sk-admin-...) "
                f"for source {self.name!r}"
            )
        return key


class Sink(BaseModel):
    """One forwarding destination (`[[sinks]]`): its kind's fields, and how its batches are retried."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    kind: Literal["http", "splunk_hec", "syslog", "file"]
    format: Literal["raw", "ocsf", "ecs"] = "raw"
    url: str | None = None  # http, splunk_hec
    headers: dict[str, str] = Field(default_factory=dict)  # http
    token_env: str | None = None  # http (Bearer), splunk_hec (required): the variable holding the token
    host: str | None = None  # syslog
    port: int | None = Field(default=None, ge=1, le=65535)  # syslog
    tls: bool = False  # syslog: RFC 5425
    ca_file: str | None = None  # syslog over TLS: the CA to verify the receiver with (default: the system's)
    facility: int = Field(default=13, ge=0, le=23)  # syslog: 13, log audit
    path: str | None = None  # file
    max_bytes: int = Field(default=100 * 2**20, ge=1024)  # file: rotate past this size
    backups: int = Field(default=5, ge=0)  # file: rotated files kept
    batch_size: int = Field(default=500, ge=1, le=100_000)  # events per request, message burst or write
    timeout: float = 10.0
    retries: int = Field(default=3, ge=0)  # a batch's attempts after the first, within one pass
    retry_base_delay: float = Field(default=0.5, ge=0)
    retry_max_delay: float = Field(default=10.0, ge=0)

    _NEEDS: ClassVar[dict[str, tuple[str, ...]]] = {
        "http": ("url",), "splunk_hec": ("url", "token_env"), "syslog": ("host", "port"), "file": ("path",),
    }  # fmt: skip
    _ONLY: ClassVar[dict[str, tuple[str, ...]]] = {
        "url": ("http", "splunk_hec"), "headers": ("http",), "token_env": ("http", "splunk_hec"),
        "host": ("syslog",), "port": ("syslog",), "tls": ("syslog",), "ca_file": ("syslog",),
        "facility": ("syslog",), "path": ("file",), "max_bytes": ("file",), "backups": ("file",),
    }  # fmt: skip

    @field_validator("timeout", "retry_base_delay", "retry_max_delay", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> float:
        return parse_duration(value)

    @model_validator(mode="after")
    def _fields_of_kind(self) -> Sink:
        missing = [f for f in self._NEEDS[self.kind] if getattr(self, f) in (None, "")]
        if missing:
            raise ValueError(f"kind {self.kind} needs {', '.join(missing)}")
        foreign = [f for f in self.model_fields_set if self.kind not in self._ONLY.get(f, (self.kind,))]
        if foreign:
            raise ValueError(f"{', '.join(sorted(foreign))}: not a setting of kind {self.kind}")
        if self.url:
            parts = urlsplit(self.url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"not an http(s) URL: {self.url!r}")
        if any(k.lower() == "authorization" for k in self.headers):
            raise ValueError("put the token in the environment (token_env), not in headers")
        return self

    def token(self) -> str | None:
        """The token from the environment (never from the file); None when the sink names none."""
        if not self.token_env:
            return None
        token = os.environ.get(self.token_env, "").strip()
        if not token:
            raise ConfigError(f"{self.token_env} is not set: export the token of sink {self.name!r}")
        return token


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    base_url: str = DEFAULT_BASE_URL
    database_url: str = DEFAULT_DATABASE_URL
    db_schema: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
    log_level: str = "INFO"
    sources: tuple[Source, ...] = (Source(name="default"),)
    # Re-read this much before the checkpoint on every run: the API may publish events late.
    lookback: float = 900.0
    # Where a source's very first run starts; None takes everything the API still holds.
    start: datetime | None = None
    # The API's retention, for the lag warning in `status` (not documented by OpenAI; 30 days is
    # the most conservative figure collectors report).
    retention: float = 30 * 86400.0
    timeout: float = 30.0
    max_retries: int = Field(default=8, ge=0)
    max_requests_per_second: float | None = Field(default=None, gt=0)
    workers: int = Field(default=4, ge=1, le=64)  # a long sweep is split into this many slices fetched at once
    # The daemon syncs this many sources at once (PostgreSQL; DuckDB's one writer takes them in turn).
    max_concurrent_sources: int = Field(default=4, ge=1, le=64)
    retry_base_delay: float = Field(default=0.5, ge=0)
    retry_max_delay: float = Field(default=60.0, ge=0)
    # Plain http is only for loopback (the simulator) unless explicitly allowed.
    allow_insecure_http: bool = False
    # PostgreSQL: one ingester at a time per source (an advisory lock); the others skip it, or wait.
    source_lock: bool = True
    lock_wait: bool = False
    # Detections (ingest.detect): the Sigma rule pack runs after every sync, with the rules of rules_dir.
    detections: bool = True
    rules_dir: Path | None = None
    # Invites to other domains raise openai_invite_outside_domains (off while empty).
    allowed_email_domains: tuple[str, ...] = ()
    # Each new alert is POSTed to each of these (and to $AUDIT_INGEST_ALERT_WEBHOOK).
    alert_webhooks: tuple[str, ...] = ()
    # A failed POST is retried after this, doubling per attempt (at most an hour).
    alert_retry_delay: float = Field(default=30.0, ge=0)
    sinks: tuple[Sink, ...] = ()
    # The daemon re-reads the last day from the API this often and keeps what differs (ingest.reconcile); 0: never.
    reconcile_every: float = Field(default=86400.0, ge=0)

    @field_validator("alert_webhooks")
    @classmethod
    def _webhooks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for url in value:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError("each must be an http(s) URL")
        return value

    @field_validator(
        "lookback", "retention", "timeout", "retry_base_delay", "retry_max_delay", "alert_retry_delay",
        "reconcile_every", mode="before",
    )  # fmt: skip
    @classmethod
    def _duration(cls, value: Any) -> float:
        return parse_duration(value)

    @field_validator("start", mode="before")
    @classmethod
    def _time(cls, value: Any) -> datetime | None:
        return None if value in (None, "") else parse_time(value)

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        if value.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError("must be DEBUG, INFO, WARNING or ERROR")
        return value.upper()

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {value!r}")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _checks(self) -> Settings:
        parts = urlsplit(self.base_url)
        host = parts.hostname or ""
        loopback = host in ("localhost", "::1") or host.startswith("127.")
        if parts.scheme == "http" and not loopback and not self.allow_insecure_http:
            raise ValueError(
                f"base_url {self.base_url!r} is plain http to a non-loopback host, which would send the "
                "admin key in clear text; use https (or set allow_insecure_http = true)"
            )
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError("source names must be unique")
        sinks = [s.name for s in self.sinks]
        if len(set(sinks)) != len(sinks):
            raise ValueError("sink names must be unique")
        return self

    def webhooks(self) -> list[str]:
        """The alert receivers: `alert_webhooks`, then $AUDIT_INGEST_ALERT_WEBHOOK."""
        extra = os.environ.get("AUDIT_INGEST_ALERT_WEBHOOK", "").strip()
        return [*self.alert_webhooks, *([extra] if extra and extra not in self.alert_webhooks else [])]

    def source(self, name: str | None) -> tuple[Source, ...]:
        """The sources a command works on: all of them, or the one named."""
        if name is None:
            return self.sources
        for source in self.sources:
            if source.name == name:
                return (source,)
        raise ConfigError(f"no source named {name!r}; configured: {', '.join(s.name for s in self.sources)}")


def load_settings(config_path: str | Path | None = None, **overrides: Any) -> Settings:
    """File (from the argument or AUDIT_INGEST_CONFIG), then environment, then `overrides`."""
    values: dict[str, Any] = {}
    path = config_path or os.environ.get("AUDIT_INGEST_CONFIG")
    if path:
        values.update(_read_toml(Path(path)))
    for env, field in ENVIRONMENT.items():
        if os.environ.get(env):
            values[field] = os.environ[env]
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return Settings.model_validate(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "settings"
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            message = "unknown setting (see config/audit-ingest.example.toml)"
        raise ConfigError(f"bad config: {where}: {message}") from None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
        mode = path.stat().st_mode
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    if "sk-" in text and mode & (stat.S_IRGRP | stat.S_IROTH):
        import logging

        logging.getLogger("ingest").warning(
            "config file %s seems to hold a key and is readable by other users: chmod 600 it, "
            "or better, keep keys in environment variables (key_env)",
            path,
        )
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"bad config file {path}: {exc}") from None
