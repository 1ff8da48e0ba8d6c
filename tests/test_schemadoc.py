"""docs/schema.md's reference is generated from the model: the committed file is what `audit-ingest db
schema-doc` writes, every table and column has a meaning, and the command touches only its region."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import sqlalchemy as sa
from support import cli

from ingest import model, schemadoc

DOC = Path(__file__).parents[1] / "docs" / "schema.md"


def model_copy() -> sa.MetaData:
    metadata = sa.MetaData()
    for table in model.metadata.tables.values():
        table.to_metadata(metadata)
    return metadata


def reference_rows(text: str) -> dict[str, list[list[str]]]:
    """Table -> its rows' cells, from the document's `#### `table`` sections."""
    region = text.split(schemadoc.BEGIN, 1)[1].split(schemadoc.END, 1)[0]
    tables = {}
    for name, body in re.findall(r"^#### `(\w+)`\n(.*?)(?=^#|\Z)", region, re.S | re.M):
        rows = [line.strip("|").split(" | ") for line in body.splitlines() if line.startswith("| `")]
        tables[name] = [[cell.strip() for cell in row] for row in rows]
    return tables


def test_the_committed_schema_document_is_what_the_command_generates(tmp_path):
    checked = cli("db", "schema-doc", "--check")
    assert checked.returncode == 0, checked.stderr

    copy = tmp_path / "schema.md"
    shutil.copy(DOC, copy)
    written = cli("db", "schema-doc", "--output", str(copy))
    assert written.returncode == 0, written.stderr
    assert copy.read_text() == DOC.read_text()


def test_every_table_and_column_of_the_model_has_a_documented_meaning():
    problems = schemadoc.undocumented(model.metadata)
    assert not problems, "\n".join(problems)

    documented = reference_rows(DOC.read_text())
    assert set(documented) == set(model.metadata.tables)
    for table in model.metadata.tables.values():
        rows = documented[table.name]
        assert [r[0] for r in rows] == [f"`{c.name}`" for c in table.columns], table.name
        assert all(r[-1] for r in rows), f"{table.name}: a column without a meaning"
    # Typed columns carry the spec's words: one example of each kind.
    assert ["`api_key_id`", "text", "`id`", "The tracking ID of the API key."] in documented["api_key_events"]
    assert ["`role_name`", "text", "`role_name` / `changes_requested.role_name`", "The name of the role."] in (
        documented["role_events"]
    )


def test_a_table_or_column_without_documentation_is_named_with_where_to_add_it():
    metadata = model_copy()
    sa.Table(
        "audit_annotations", metadata,
        sa.Column("id", sa.Text, primary_key=True, info={"doc": "primary key"}),
        sa.Column("event_id", sa.Text, info={"doc": "the event annotated", "joins": "audit_events.id"}),
        sa.Column("batch", sa.BigInteger, sa.ForeignKey("ingest_batches.seq"), info={"doc": "the batch"}),
        sa.Column("note", sa.Text),
    )  # fmt: skip
    metadata.tables["sync_runs"].append_column(sa.Column("host", sa.Text))
    metadata.tables["users"].append_column(sa.Column("team_id", sa.Text, info={"doc": "x", "joins": "teams.id"}))

    assert schemadoc.undocumented(metadata) == [
        "column users.team_id joins teams.id, which is not a table of the model",
        "column sync_runs.host has no meaning: add info={'doc': ...} to its sa.Column in ingest/model.py",
        "table audit_annotations has no intro: add info={'doc': ...} to its sa.Table in ingest/model.py",
        "column audit_annotations.note has no meaning: add info={'doc': ...} to its sa.Column in ingest/model.py",
    ]

    # Documented, the new table gets its section and its place in the diagram.
    metadata.tables["audit_annotations"].info["doc"] = "Notes people attached to events."
    text = schemadoc.render(metadata)
    assert "#### `audit_annotations`\n\nNotes people attached to events.\n" in text
    assert "    audit_events ||..o{ audit_annotations : event_id\n" in text  # joins: a dotted line
    assert "    ingest_batches ||--o{ audit_annotations : batch\n" in text  # a foreign key: a line
    assert "    audit_annotations {\n        text id PK\n        text event_id\n        bigint batch FK\n" in text
    assert "| `batch` | bigint | the batch |\n| `note` | text | |\n" in text


def test_schema_doc_rewrites_only_its_region_and_check_fails_on_a_difference(tmp_path):
    copy = tmp_path / "schema.md"
    original = DOC.read_text()
    edited = original.replace("| `ja3` | text | `actor.session.ja3` | TLS fingerprint |", "| `ja3` | text | | |")
    edited = edited.replace("## Ready queries\n", "## Ready queries\n\nA hand-written line.\n")
    assert edited.count("A hand-written line.") == 1 and "TLS fingerprint |" in edited  # ja4's row is left
    copy.write_text(edited)

    checked = cli("db", "schema-doc", "--check", "--output", str(copy))
    assert checked.returncode == 1
    assert checked.stderr.splitlines() == [
        f"error: {copy} is not what the model generates: run `audit-ingest db schema-doc`"
    ]
    assert copy.read_text() == edited  # --check changes nothing

    written = cli("db", "schema-doc", "--output", str(copy))
    assert written.returncode == 0, written.stderr
    assert copy.read_text() == original.replace("## Ready queries\n", "## Ready queries\n\nA hand-written line.\n")
    assert cli("db", "schema-doc", "--check", "--output", str(copy)).returncode == 0


def test_a_document_without_the_generated_region_is_one_line_and_exit_2(tmp_path):
    copy = tmp_path / "schema.md"
    copy.write_text(DOC.read_text().replace(schemadoc.END, ""))
    result = cli("db", "schema-doc", "--output", str(copy))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"error: {copy} has no region between {schemadoc.BEGIN} and {schemadoc.END}: add the two lines where it belongs"
    ]
    missing = cli("db", "schema-doc", "--output", str(tmp_path / "absent.md"))
    assert missing.returncode == 2 and len(missing.stderr.splitlines()) == 1
    assert f"cannot read {tmp_path / 'absent.md'}" in missing.stderr
