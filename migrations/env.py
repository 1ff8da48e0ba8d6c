"""Alembic environment. Run through `audit-ingest db upgrade` (ingest.store), which passes the
connection (and the optional schema) in `config.attributes`; there is no alembic.ini."""

from alembic import context
from alembic.ddl.impl import DefaultImpl

from ingest.model import metadata


class DuckDBImpl(DefaultImpl):
    """Alembic has no DuckDB dialect; DuckDB runs DDL inside transactions, so migrations are atomic."""

    __dialect__ = "duckdb"
    transactional_ddl = True


connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    version_table_schema=context.config.attributes.get("schema"),
)
with context.begin_transaction():
    context.run_migrations()
