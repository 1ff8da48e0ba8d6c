"""DuckDB: audit_events and the typed tables without primary and foreign keys.

DuckDB holds every index in memory (those not checkpointed yet cannot even be evicted), so a run's memory
grew with the log, and each index roughly doubled the cost of an insert. On DuckDB, `store.save_batch`
keeps event ids unique instead. PostgreSQL keeps its keys: this revision changes nothing there.

DuckDB cannot drop a constraint: each table is copied into a new one without it.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27
"""

from alembic import context, op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "duckdb":
        for table in [*_referencing("audit_events"), "audit_events"]:  # the referencing tables go first
            _rebuild(table, keys="")


def downgrade() -> None:
    if op.get_bind().dialect.name == "duckdb":
        _rebuild("audit_events", keys=", PRIMARY KEY (id)")
        for table in _unkeyed_with_event_id():
            position = ", position" if "position" in _columns(table) else ""
            events = f'"{_schema()}".audit_events'
            _rebuild(table, keys=f", PRIMARY KEY (event_id{position}), FOREIGN KEY (event_id) REFERENCES {events} (id)")


def _schema() -> str:
    return context.config.attributes.get("schema") or "main"


def _referencing(table: str) -> list[str]:
    rows = op.get_bind().exec_driver_sql(
        "SELECT DISTINCT table_name FROM duckdb_constraints() WHERE database_name = current_database()"
        " AND schema_name = ? AND constraint_type = 'FOREIGN KEY' AND referenced_table = ? ORDER BY 1",
        (_schema(), table),
    )
    return [name for (name,) in rows]


def _unkeyed_with_event_id() -> list[str]:
    rows = op.get_bind().exec_driver_sql(
        "SELECT table_name FROM duckdb_tables() t WHERE database_name = current_database() AND schema_name = ?"
        " AND EXISTS (SELECT 1 FROM duckdb_columns() c WHERE c.database_name = t.database_name"
        " AND c.schema_name = t.schema_name AND c.table_name = t.table_name AND c.column_name = 'event_id')"
        " ORDER BY 1",
        (_schema(),),
    )
    return [name for (name,) in rows]


def _columns(table: str) -> dict[str, str]:
    """name -> its definition, in column order."""
    rows = op.get_bind().exec_driver_sql(
        "SELECT column_name, data_type, is_nullable FROM duckdb_columns() WHERE database_name = current_database()"
        " AND schema_name = ? AND table_name = ? ORDER BY column_index",
        (_schema(), table),
    )
    return {name: f'"{name}" {kind}{"" if nullable else " NOT NULL"}' for name, kind, nullable in rows}


def _rebuild(table: str, keys: str) -> None:
    """`table` replaced by a table of the same columns and rows with `keys` (constraint clauses).

    DuckDB records a foreign key by table name on both of its tables and refuses to drop a table it still
    believes referenced: a table losing its keys is copied, then dropped, and the copy renamed; a table
    getting keys is renamed first, so that the new one has the right name from the start."""
    bind, schema = op.get_bind(), _schema()
    columns = ", ".join(_columns(table).values())
    final, aside = f'"{schema}"."{table}"', f'"{schema}"."{table}__0003"'
    if keys:
        bind.exec_driver_sql(f'ALTER TABLE {final} RENAME TO "{table}__0003"')
        bind.exec_driver_sql(f"CREATE TABLE {final} ({columns}{keys})")
        bind.exec_driver_sql(f"INSERT INTO {final} SELECT * FROM {aside}")
        bind.exec_driver_sql(f"DROP TABLE {aside}")
    else:
        bind.exec_driver_sql(f"CREATE TABLE {aside} ({columns})")
        bind.exec_driver_sql(f"INSERT INTO {aside} SELECT * FROM {final}")
        bind.exec_driver_sql(f"DROP TABLE {final}")
        bind.exec_driver_sql(f'ALTER TABLE {aside} RENAME TO "{table}"')
