"""Bad input from the user: each mistake is one line on stderr, `error: <cause and what to do>`, no
traceback, and the exit code the README's "Exit codes" table documents for its kind."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from support import KEY, cli

from ingest.config import load_settings
from ingest.errors import ConfigError

README = Path(__file__).parent.parent / "README.md"

# name -> (command line, environment, config file text or None, exit code, words the line must hold)
CASES = {
    "missing key": (["run"], {"OPENAI_ADMIN_KEY": ""}, None, 2, "OPENAI_ADMIN_KEY is not set"),
    "bad date in the config": (["run"], {}, 'start = "last tuesday"\n', 2, "start"),
    "bad date on the command line": (["backfill", "--since", "2026-13-45"], {}, None, 2, "--since"),
    "empty backfill window": (["backfill", "--since", "2026-02-01", "--until", "2026-01-01"], {}, None, 2, "empty"),
    "URL without a scheme": (["run"], {"OPENAI_BASE_URL": "api.openai.com/v1"}, None, 2, "not an http(s) URL"),
    "URL of another scheme": (["run"], {"OPENAI_BASE_URL": "ftp://api.openai.com/v1"}, None, 2, "not an http(s) URL"),
    "plain http to a remote host": (["run"], {"OPENAI_BASE_URL": "http://api.example.com/v1"}, None, 2, "https"),
    "unknown config key": (["run"], {}, 'colour = "red"\n', 2, "colour: unknown setting"),
    "unknown key in a source": (["run"], {}, '[[sources]]\nname = "a"\nkeyenv = "K"\n', 2, "unknown setting"),
    "bad duration": (["run"], {}, 'lookback = "a while"\n', 2, "not a duration"),
    "negative retries": (["run"], {}, "max_retries = -1\n", 2, "max_retries"),
    "bad TOML": (["run"], {}, 'start = "2026-01-01\n', 2, "bad config file"),
    "bad log level": (["run"], {"AUDIT_INGEST_LOG_LEVEL": "LOUD"}, None, 2, "log_level"),
    "not a database URL": (["run"], {"AUDIT_INGEST_DATABASE_URL": "warehouse.duckdb"}, None, 2, "not a database URL"),
    "SQLite URL": (["run"], {"AUDIT_INGEST_DATABASE_URL": "sqlite:///{tmp}/w.duckdb"}, None, 2,
                   "supported backends are duckdb and postgresql"),
    "MySQL URL": (["run"], {"AUDIT_INGEST_DATABASE_URL": "mysql://root@127.0.0.1:3306/test"}, None, 2,
                  "supported backends are duckdb and postgresql"),
    "database path under a file": (["run"], {"AUDIT_INGEST_DATABASE_URL": "duckdb:///{tmp}/file/w.duckdb"}, None, 8,
                                   "Not a directory"),
    "database directory missing": (["run"], {"AUDIT_INGEST_DATABASE_URL": "duckdb:///{tmp}/missing/w.duckdb"}, None,
                                   8, "No such file or directory"),
    "database server down": (["run"], {"AUDIT_INGEST_DATABASE_URL": "postgresql+psycopg://u@127.0.0.1:9/x"}, None, 8,
                             "Connection refused"),
}  # fmt: skip


@pytest.mark.parametrize("name", CASES)
def test_user_mistake_is_one_clear_line_and_its_exit_code(tmp_path, name):
    args, env, config, code, words = CASES[name]
    (tmp_path / "file").write_text("")
    env = {"OPENAI_ADMIN_KEY": KEY, "OPENAI_BASE_URL": "http://127.0.0.1:9/v1",
           "AUDIT_INGEST_DATABASE_URL": f"duckdb:///{tmp_path / 'w.duckdb'}", **env}  # fmt: skip
    env = {k: v.format(tmp=tmp_path) for k, v in env.items()}
    if config is not None:
        (tmp_path / "c.toml").write_text(config)
        args = ["--config", str(tmp_path / "c.toml"), *args]
    result = cli(*args, env=env, cwd=tmp_path)
    assert result.returncode == code, result.stderr
    assert result.stderr.splitlines() == [result.stderr.strip()], result.stderr  # one line, nothing else
    assert result.stderr.startswith("error: ") and words in result.stderr
    assert not (tmp_path / "w.duckdb").exists()  # refused before touching the warehouse
    assert code in documented_exit_codes()


def test_plain_http_to_a_remote_host_only_when_explicitly_allowed():
    with pytest.raises(ConfigError, match="plain http to a non-loopback host"):
        load_settings(None, base_url="http://audit.internal.example/v1")
    settings = load_settings(None, base_url="http://audit.internal.example/v1", allow_insecure_http=True)
    assert settings.base_url == "http://audit.internal.example/v1"
    for loopback in ("http://127.0.0.1:8080/v1", "http://localhost/v1", "http://[::1]:9/v1"):
        assert load_settings(None, base_url=loopback).base_url == loopback


def documented_exit_codes() -> set[int]:
    section = README.read_text().split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    return {int(m) for m in re.findall(r"^\| (\d+) \|", section, re.MULTILINE)}
