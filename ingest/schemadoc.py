"""docs/schema.md's diagrams and table reference, generated from the model (`audit-ingest db schema-doc`).

Core tables are documented by their declaration in ingest/model.py: `info={"doc": ..., "notes": ...}` on the
sa.Table, `info={"doc": ..., "from": ..., "joins": ...}` on each sa.Column. Typed tables by the spec the model
is checked against: a column's meaning is its payload field's description (the first of the family's types
that has one), "from the payload" the field's paths in those types, and the "Types:" line the family's
(`model.FAMILIES`). The generated part sits between `BEGIN` and `END` in the document; the rest is hand-written.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa

from ingest import model
from ingest.errors import ConfigError
from ingest.simulator import SPEC_PATH, load_spec

BEGIN = "<!-- BEGIN GENERATED: audit-ingest db schema-doc -->"
END = "<!-- END GENERATED -->"
DOC_PATH = Path(__file__).parents[1] / "docs" / "schema.md"  # in a checkout of the repository

_WIDTH = 110  # prose is wrapped here; table rows are not
# Subclasses first: a Double is a Float, a BigInteger an Integer.
_TYPE_NAMES = (
    (sa.JSON, "json"), (sa.Double, "double"), (sa.Float, "float"), (sa.BigInteger, "bigint"),
    (sa.Integer, "integer"), (sa.Boolean, "boolean"), (sa.DateTime, "timestamp"), (sa.Text, "text"),
)  # fmt: skip
_EVENT_ID = "`audit_events.id`"


def type_name(column: sa.Column) -> str:
    """The column's type as docs/schema.md spells it."""
    return next(name for cls, name in _TYPE_NAMES if isinstance(column.type, cls))


# ---------------------------------------------------------------------------------------------- the spec
@dataclass
class _Field:
    paths: list[str] = field(default_factory=list)  # dotted, in the order of the family's types
    doc: str | None = None  # the first description


def _leaves(schema: dict, path: tuple[str, ...] = ()) -> dict[str, tuple[str, ...]]:
    """Leaf name -> its path in the payload; objects with properties are walked into (as the model flattens
    them), lists and free-form objects are leaves."""
    out = {}
    for name, sub in (schema.get("properties") or {}).items():
        if sub.get("type") == "object" and sub.get("properties"):
            out.update(_leaves(sub, (*path, name)))
        else:
            out[name] = (*path, name)
    return out


def _fields(family: model.Family) -> dict[str, _Field]:
    payloads = load_spec()["components"]["schemas"]["AuditLog"]["properties"]
    fields: dict[str, _Field] = {}
    for event_type in family.types:
        schema = payloads.get(event_type) or {}
        for name, path in _leaves(schema).items():
            entry = fields.setdefault(name, _Field())
            dotted = ".".join(path)
            if dotted not in entry.paths:
                entry.paths.append(dotted)
            if entry.doc is None:
                entry.doc = _node(schema, path).get("description")
    return fields


def _node(schema: dict, path: tuple[str, ...]) -> dict:
    for name in path:
        schema = schema["properties"][name]
    return schema


# ---------------------------------------------------------------------------------------------- checks
def undocumented(metadata: sa.MetaData) -> list[str]:
    """What the document would lack, one sentence each, saying where to add it; empty when complete."""
    add = "add info={'doc': ...} to its"
    problems = []
    for table in _core(metadata):
        if not table.info.get("doc"):
            problems.append(f"table {table.name} has no intro: {add} sa.Table in ingest/model.py")
        for column in table.columns:
            name = f"{table.name}.{column.name}"
            if not column.info.get("doc"):
                problems.append(f"column {name} has no meaning: {add} sa.Column in ingest/model.py")
            joins = column.info.get("joins")
            if joins and joins.partition(".")[0] not in metadata.tables:
                problems.append(f"column {name} joins {joins}, which is not a table of the model")
    for family in model.FAMILIES:
        fields = _fields(family)
        problems.extend(
            f"column {family.table}.{col.name}: payload field `{col.field}` has no description in"
            f" {SPEC_PATH.name} in any of the family's types (model.FAMILIES)"
            for col in family.columns
            if not (fields.get(col.field) or _Field()).doc
        )
    return problems


# ---------------------------------------------------------------------------------------------- rendering
def render(metadata: sa.MetaData) -> str:
    """The generated part of docs/schema.md: the diagrams and the reference of every table."""
    core = _core(metadata)
    typed = [metadata.tables[t.name] for t in model.TYPED_TABLES]
    events = metadata.tables["audit_events"]
    parts = [
        "## Diagrams",
        "Events, actors and run bookkeeping (dotted lines: joinable ids, not foreign keys):",
        _diagram([_entity(t, t.columns) for t in core], _links(core)),
        _wrap(
            "The typed tables; each family table has at most one row per event, each child table one row per list item:"
        ),
        # The table the typed ones hang from, with its key and the column that picks the family only.
        _diagram(
            [_entity(events, [events.c.id, events.c.type]), *(_entity(t, t.columns) for t in typed)],
            _typed_links(typed),
        ),
        "## Tables",
        "### Events, actors and runs",
        *(_core_table(t) for t in core),
        "### Typed tables",
    ]
    for family in model.FAMILIES:
        fields = _fields(family)
        parts.append(_family_table(metadata.tables[family.table], family, fields))
        parts.extend(_list_table(metadata.tables[lst.table], lst, fields) for lst in family.lists)
    return "\n\n".join(parts) + "\n"


def _core(metadata: sa.MetaData) -> list[sa.Table]:
    typed = {t.name for t in model.TYPED_TABLES}
    return [t for t in metadata.tables.values() if t.name not in typed]


def _links(tables: list[sa.Table]) -> list[str]:
    """Foreign keys as lines, `joins` (ids without a foreign key) as dotted lines."""
    links: list[str] = []
    for table in tables:
        for column in table.columns:
            links.extend(f"{fk.column.table.name} ||--o{{ {table.name} : {column.name}" for fk in column.foreign_keys)
            if column.info.get("joins"):
                links.append(f"{column.info['joins'].partition('.')[0]} ||..o{{ {table.name} : {column.name}")
    return links


def _typed_links(tables: list[sa.Table]) -> list[str]:
    parent_of = {lst.table: f.table for f in model.FAMILIES for lst in f.lists}
    links = []
    for table in tables:
        if table.name in parent_of:  # a list's child table: many rows per row of its family table
            links.append(f"{parent_of[table.name]} ||--o{{ {table.name} : event_id")
        else:  # keyed by the event it references: at most one row per event
            [fk] = table.c.event_id.foreign_keys
            links.append(f"{fk.column.table.name} ||--o| {table.name} : event_id")
    return links


def _entity(table: sa.Table, columns: Iterable[sa.Column]) -> str:
    lines = [f"    {table.name} {{"]
    for column in columns:
        keys = ", ".join(k for k, on in (("PK", column.primary_key), ("FK", column.foreign_keys)) if on)
        lines.append(f"        {type_name(column)} {column.name}{' ' + keys if keys else ''}")
    return "\n".join([*lines, "    }"])


def _diagram(entities: list[str], links: list[str]) -> str:
    return "\n".join(["```mermaid", "erDiagram", *entities, *(f"    {link}" for link in links), "```"])


def _core_table(table: sa.Table) -> str:
    with_from = any("from" in c.info for c in table.columns)
    header = ["column", "type", *(["from the event"] if with_from else []), "meaning"]
    rows = [
        [f"`{c.name}`", type_name(c), *([c.info.get("from", "")] if with_from else []), c.info.get("doc", "")]
        for c in table.columns
    ]
    notes = [_wrap(paragraph) for paragraph in table.info.get("notes", "").split("\n\n")]
    parts = [f"#### `{table.name}`", _wrap(table.info.get("doc", "")), _table(header, rows), *notes]
    return "\n\n".join(p for p in parts if p)


def _family_table(table: sa.Table, family: model.Family, fields: dict[str, _Field]) -> str:
    by_name = {c.name: c for c in family.columns}
    rows = []
    for column in table.columns:
        if column.name == "event_id":
            rows.append([f"`{column.name}`", type_name(column), "", f"primary key; {_EVENT_ID}"])
            continue
        entry = fields.get(by_name[column.name].field) or _Field()
        rows.append([
            f"`{column.name}`", type_name(column), " / ".join(f"`{p}`" for p in entry.paths), entry.doc or "",
        ])  # fmt: skip
    types = ", ".join(f"`{t}`" for t in family.types)
    header = ["column", "type", "from the payload", "meaning"]
    return "\n\n".join([f"#### `{table.name}`", f"Types: {types}.", _table(header, rows)])


def _list_table(table: sa.Table, lst: model.ListOf, fields: dict[str, _Field]) -> str:
    entry = fields.get(lst.field) or _Field()
    where = " / ".join(f"`{p}[]`" for p in entry.paths)
    doc = lst.doc or entry.doc
    intro = f"One row per item of {where}: {doc}" if doc else f"One row per item of {where}."
    item_fields = {c.name: c.field for c in lst.columns}
    rows = []
    for column in table.columns:
        if column.name == "event_id":
            meaning = f"{_EVENT_ID}; primary key with `position`"
        elif column.name == "position":
            meaning = "the item's index in the list, from 0"
        elif column.name == lst.value:
            meaning = "the item"
        else:
            meaning = f"the item's `{item_fields[column.name]}`"
        rows.append([f"`{column.name}`", type_name(column), meaning])
    return "\n\n".join([f"#### `{table.name}`", intro, _table(["column", "type", "meaning"], rows)])


def _table(header: list[str], rows: list[list[str]]) -> str:
    def line(cells: list[str]) -> str:
        escaped = (c.replace("|", "\\|") for c in cells)
        return "|" + "|".join(f" {c} " if c else " " for c in escaped) + "|"

    return "\n".join([line(header), "|" + "---|" * len(header), *(line(r) for r in rows)])


def _wrap(text: str) -> str:
    """Lines of at most _WIDTH characters, never breaking inside a `code span`."""
    lines: list[str] = []
    for word in re.findall(r"(?:`[^`]*`|[^\s`])+", text):
        if lines and len(lines[-1]) + 1 + len(word) <= _WIDTH:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- the file
def regenerated(text: str, metadata: sa.MetaData, name: str = "the document") -> str:
    """`text` with its generated region replaced by what the model generates now."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ConfigError(f"{name} has no region between {BEGIN} and {END}: add the two lines where it belongs")
    return f"{text[: start + len(BEGIN)]}\n\n{render(metadata)}\n{text[end:]}"
