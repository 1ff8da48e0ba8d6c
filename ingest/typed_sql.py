"""Typed rows derived in the engine: per typed table, a SELECT over `audit_events.raw` compiled from the declarations
(ingest.model), yielding the rows `model.typed_rows` yields for each stored event of the family.

Used by `verify` (stored rows against derived ones, in SQL) and `store.rebuild_typed` (INSERT ... SELECT). Each
select is two steps: the fields each family declares, looked up by the model's rule (payload, then the wrappers
it flattens; the first scope that has the key wins, a null value included), as JSON values; then each value
coerced as `model._convert` does (another JSON type is NULL) and list fields unnested with their position.

A JSON object comes out as the engine keeps it: jsonb on PostgreSQL; on DuckDB, the object's text with raw's key
order (canonical, so sorted) and no whitespace, but numbers spelled by DuckDB (`1e+64` becomes `1e64`): compare
it through `normal`, which spells both sides alike.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB

from ingest import model

INT64 = (-(2**63), 2**63 - 1)


class _DuckDB:
    """JSON text and DuckDB's json functions. A path list parses raw once per event for all fields."""

    json: Any = model.JSON

    def found(self, family: model.Family, fields: list[str], where: sa.ColumnElement) -> sa.Subquery:
        ev = model.audit_events
        scopes = ["", *model._shape(family).wrappers]

        def paths(event_type: str) -> sa.ColumnElement:
            listed = ", ".join(_quote(_path(event_type, *filter(None, [s]), f)) for s in scopes for f in fields)
            return sa.func.json_extract(ev.c.raw, sa.literal_column(f"[{listed}]"), type_=sa.ARRAY(self.json))

        values = sa.case(*((ev.c.type == t, paths(t)) for t in family.types)).label("v")
        step = sa.select(ev.c.id.label("event_id"), values).where(ev.c.type.in_(family.types), where).subquery("raw")
        width = len(fields)

        def lookup(i: int) -> sa.ColumnElement:
            at = [sa.func.list_extract(step.c.v, s * width + i + 1, type_=self.json) for s in range(len(scopes))]
            return sa.func.coalesce(*at, type_=self.json) if len(at) > 1 else at[0]

        return sa.select(step.c.event_id, *(lookup(i).label(f"f{i}") for i in range(width))).subquery("found")

    def convert(self, x: sa.ColumnElement, kind: str) -> sa.ColumnElement:
        kind_of = sa.func.json_type(x)
        if kind == "str":
            return sa.case((kind_of == "VARCHAR", sa.func.json_extract_string(x, "$", type_=sa.Text)))
        if kind == "int":  # positive integers are UBIGINT to DuckDB, up to 2**64 - 1; larger ones and 1.0 DOUBLE
            fits = sa.or_(kind_of == "BIGINT", sa.and_(kind_of == "UBIGINT", sa.cast(x, sa.Numeric(20, 0)) <= INT64[1]))
            return sa.case((fits, sa.cast(x, sa.BigInteger)))
        if kind == "bool":
            return sa.case((kind_of == "BOOLEAN", sa.cast(x, sa.Boolean)))
        return sa.case((kind_of == "OBJECT", x), else_=sa.null()).cast(self.json)

    def elements(self, x: sa.ColumnElement) -> sa.TableValuedAlias:
        items = sa.case((sa.func.json_type(x) == "ARRAY", sa.func.json_extract(x, "$[*]", type_=sa.ARRAY(self.json))))
        return sa.func.unnest(items).table_valued("item", with_ordinality="ord").render_derived("items")

    def member(self, item: sa.ColumnElement, name: str) -> sa.ColumnElement:
        return sa.func.json_extract(item, _path(name), type_=self.json)

    def normal(self, x: sa.ColumnElement) -> sa.ColumnElement:
        # DuckDB's own serialisation of the value: stored canonical text and derived text then compare equal.
        return sa.func.json_extract(x, "$", type_=self.json)


class _PostgreSQL:
    """jsonb and its operators: `->` is NULL for a missing key (or a non-object), JSON null otherwise."""

    json: Any = JSONB

    def found(self, family: model.Family, fields: list[str], where: sa.ColumnElement) -> sa.Subquery:
        ev = model.audit_events
        payload = ev.c.raw.op("->", return_type=JSONB)(ev.c.type).label("p")
        step = sa.select(ev.c.id.label("event_id"), payload).where(ev.c.type.in_(family.types), where).subquery("raw")
        scopes = [step.c.p, *(self.member(step.c.p, w) for w in model._shape(family).wrappers)]
        return sa.select(
            step.c.event_id,
            *(
                sa.func.coalesce(*(self.member(s, f) for s in scopes), type_=JSONB).label(f"f{i}")
                for i, f in enumerate(fields)
            ),
        ).subquery("found")

    def convert(self, x: sa.ColumnElement, kind: str) -> sa.ColumnElement:
        kind_of = sa.func.jsonb_typeof(x)
        if kind == "str":
            return sa.case((kind_of == "string", x.op("#>>", return_type=sa.Text)(sa.literal_column("'{}'"))))
        if kind == "int":  # jsonb keeps a number's scale: 1.0 is text with a '.'
            text = sa.cast(x, sa.Text)
            integral = sa.and_(
                kind_of == "number", sa.func.strpos(text, ".") == 0, sa.func.strpos(sa.func.lower(text), "e") == 0
            )
            fits = sa.and_(integral, sa.cast(text, sa.Numeric).between(*INT64))
            return sa.case((fits, sa.cast(text, sa.BigInteger)))
        if kind == "bool":
            return sa.case((kind_of == "boolean", sa.cast(x, sa.Boolean)))
        return sa.case((kind_of == "object", x), else_=sa.null()).cast(JSONB)

    def elements(self, x: sa.ColumnElement) -> sa.TableValuedAlias:
        items = sa.case((sa.func.jsonb_typeof(x) == "array", x), else_=sa.cast(sa.literal("[]"), JSONB))
        return sa.func.jsonb_array_elements(items).table_valued("item", with_ordinality="ord").render_derived("items")

    def member(self, item: sa.ColumnElement, name: str) -> sa.ColumnElement:
        return item.op("->", return_type=JSONB)(sa.literal(name, sa.Text))

    def normal(self, x: sa.ColumnElement) -> sa.ColumnElement:
        return x  # jsonb compares by value


DIALECTS: dict[str, Any] = {"duckdb": _DuckDB(), "postgresql": _PostgreSQL()}


def _path(*keys: str) -> str:
    """A JSON path of quoted keys: event types have dots."""
    return "$" + "".join('."' + k.replace('"', '\\"') + '"' for k in keys)


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def derivations(dialect: str, where: sa.ColumnElement | None = None) -> dict[str, sa.Select]:
    """Table name -> the select of its rows derived from raw, columns in the table's order, for the events of
    `where` (a condition on `model.audit_events`; all of them when None)."""
    engine = DIALECTS[dialect]
    out: dict[str, sa.Select] = {}
    for family in model.FAMILIES:
        out.update(_family(engine, family, sa.true() if where is None else where))
    return out


def _family(engine: Any, family: model.Family, where: sa.ColumnElement) -> dict[str, sa.Select]:
    fields = list(dict.fromkeys([c.field for c in family.columns] + [lst.field for lst in family.lists]))
    found = engine.found(family, fields, where)
    value = {f: found.c[f"f{i}"] for i, f in enumerate(fields)}
    out = {
        family.table: sa.select(
            found.c.event_id, *(engine.convert(value[c.field], c.type).label(c.name) for c in family.columns)
        )
    }
    for lst in family.lists:
        items = engine.elements(value[lst.field])
        item = items.c.item
        if lst.value:
            columns = [engine.convert(item, "str").label(lst.value)]
        else:
            columns = [engine.convert(engine.member(item, c.field), c.type).label(c.name) for c in lst.columns]
        position = sa.cast(items.c.ord - 1, sa.Integer).label("position")
        out[lst.table] = sa.select(found.c.event_id, position, *columns).select_from(found.join(items, sa.true()))
    return out
