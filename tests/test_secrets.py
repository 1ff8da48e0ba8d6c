"""The admin key appears in no output, no exception text and no warehouse table, even at DEBUG with
httpx's own logs on; a config file that seems to hold a key and is readable by others gets a warning."""

from __future__ import annotations

import logging
import secrets

import pytest
import sqlalchemy as sa
from support import cli, stored_events

from ingest.config import load_settings
from ingest.store import Warehouse


def warehouse_text(url: str) -> str:
    """Every value of every table, as text."""
    warehouse = Warehouse(url)
    try:
        with warehouse.connect() as conn:
            tables = sa.inspect(conn).get_table_names()
            assert {"audit_events", "sync_runs", "sync_state", "rejected_events", "users"} <= set(tables)
            return "\n".join(repr(row) for t in tables for row in conn.execute(sa.text(f'SELECT * FROM "{t}"')))
    finally:
        warehouse.dispose()


def test_key_in_no_output_exception_or_table_at_debug(simulator, tmp_path):
    key = f"sk-admin-{secrets.token_hex(20)}"
    wrong = f"sk-admin-{secrets.token_hex(20)}"
    server = simulator(events=600, seed=51, key=key, fault_rate=0.15,
                       faults=("429ms", "500", "502", "reset", "truncated"))  # fmt: skip
    path = tmp_path / "w.duckdb"
    env = {"OPENAI_ADMIN_KEY": key, "OPENAI_BASE_URL": server.url, "AUDIT_INGEST_DATABASE_URL": f"duckdb:///{path}"}
    config = tmp_path / "c.toml"
    config.write_text("max_retries = 2\nretry_base_delay = 0.01\n")

    outputs = []

    def audit_ingest(*args: str, code: int, **extra: str) -> str:
        result = cli("--config", str(config), "--debug", *args, env={**env, **extra})
        assert result.returncode == code, result.stderr[-3000:]
        outputs.append(result.stdout + result.stderr)
        return result.stderr

    stderr = audit_ingest("run", code=0)
    assert "HTTP Request: GET" in stderr and "retry" in stderr  # httpx's own DEBUG logs, and the retries
    server.sim.append(20)
    audit_ingest("--log-format", "json", "run", code=0)
    audit_ingest("status", code=0)
    assert "Traceback" in audit_ingest("run", code=3, OPENAI_ADMIN_KEY=wrong)  # 401, with its traceback
    server.stop()
    assert "Traceback" in audit_ingest("run", code=6)  # the API gone: the failure is recorded in sync_runs
    assert len(stored_events(env["AUDIT_INGEST_DATABASE_URL"])) == 620

    for text in [*outputs, warehouse_text(env["AUDIT_INGEST_DATABASE_URL"])]:
        assert key not in text and wrong not in text
        assert key[9:] not in text and wrong[-20:] not in text  # nor the secret part alone
    for file in tmp_path.glob("w.duckdb*"):
        assert key.encode() not in file.read_bytes()


def test_a_key_logged_by_anyone_is_redacted(monkeypatch, capsys):
    """The last line of defence: the log handler's filter, whoever logs the key (here: httpx)."""
    from ingest.cli import _setup_logging

    key = f"sk-admin-{secrets.token_hex(20)}"
    monkeypatch.setenv("OPENAI_ADMIN_KEY", key)
    root = logging.getLogger()
    saved = root.handlers[:], root.level, logging.getLogger("httpx").level
    try:
        _setup_logging(load_settings(None), debug=True, log_format="text")
        logging.getLogger("httpx").debug("headers: Authorization: Bearer %s", key)
        logging.getLogger("ingest").warning(f"a careless message with {key} inside")
    finally:
        root.handlers[:], _, _ = saved
        root.setLevel(saved[1])
        logging.getLogger("httpx").setLevel(saved[2])
    err = capsys.readouterr().err
    assert key not in err and err.count("[redacted]") == 2


@pytest.mark.parametrize(("mode", "warned"), [(0o644, True), (0o640, True), (0o600, False)])
def test_config_file_holding_a_key_readable_by_others_gets_a_warning(tmp_path, mode, warned):
    config = tmp_path / "c.toml"
    config.write_text('# the old key was sk-admin-0123456789abcdef, rotated\nlookback = "10m"\n')
    config.chmod(mode)
    result = cli("--config", str(config), "status", env={"AUDIT_INGEST_DATABASE_URL": f"duckdb:///{tmp_path}/w.db"})
    assert result.returncode == 0, result.stderr
    assert ("readable by other users: chmod 600" in result.stderr) is warned
    assert "0123456789abcdef" not in result.stderr + result.stdout
