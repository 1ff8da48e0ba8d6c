"""Typed rows derived in the engine: per typed table, a SELECT over `audit_events.raw` compiled from the declarations
(ingest.model), yielding the rows `model.typed_rows` yields for each stored event of the family.

Used by `verify` (stored rows against derived ones, in SQL) and `store.rebuild_typed` (INSERT ... SELECT). Each
select is two steps: the fields each family declares, looked up by the model's rule (payload, then the wrappers
it flattens; the first scope that has the key wins, a null value included), as JSON values; then each value
coerced as `model._convert` does (another JSON type is NULL) and list fields unnested with their position. The
engine's JSON functions are its backend module's `JSON_SQL` (a `JsonSQL`); this module names no engine.

A JSON object comes out as the engine keeps it: jsonb on PostgreSQL; on DuckDB, the object's text with raw's key
order (canonical, so sorted) and no whitespace, but numbers spelled by DuckDB (`1e+64` becomes `1e64`): compare
it through `normal`, which spells both sides alike.
"""

from __future__ import annotations

from typing import Any, Protocol, cast

import sqlalchemy as sa

from ingest import backends, model


class JsonSQL(Protocol):
    """The engine's JSON functions the compiler needs; each backend module has one (`JSON_SQL`)."""

    json: Any  # the SQL type of a JSON value there

    def found(
        self, family: model.Family, fields: list[str], where: sa.ColumnElement, events: sa.FromClause
    ) -> sa.Subquery:
        """Per event of the family in `events` (columns id, type, raw; and of `where`): its id and each field looked
        up by the model's rule, as JSON values `f0`, `f1`, ...: the payload, then the wrappers it flattens; the
        first scope with the key."""

    def convert(self, x: sa.ColumnElement, kind: str) -> sa.ColumnElement:
        """A JSON value as `model._convert` stores it: NULL when of another JSON type."""

    def elements(self, x: sa.ColumnElement) -> sa.TableValuedAlias:
        """A JSON array's items (`item`) with their 1-based ordinal (`ord`); none for anything else."""

    def member(self, item: sa.ColumnElement, name: str) -> sa.ColumnElement:
        """An object's member, NULL when absent."""

    def normal(self, x: sa.ColumnElement) -> sa.ColumnElement:
        """A JSON value spelled so that equal values compare equal."""


def json_sql(dialect: str) -> JsonSQL:
    return cast(JsonSQL, backends.for_dialect(dialect).JSON_SQL)


def derivations(
    dialect: str, where: sa.ColumnElement | None = None, events: sa.FromClause = model.audit_events
) -> dict[str, sa.Select]:
    """Table name -> the select of its rows derived from raw, columns in the table's order, for the events of
    `where` (a condition on `events`, by default `model.audit_events`; all of them when None)."""
    engine = json_sql(dialect)
    out: dict[str, sa.Select] = {}
    for family in model.FAMILIES:
        out.update(_family(engine, family, sa.true() if where is None else where, events))
    return out


def _family(
    engine: JsonSQL, family: model.Family, where: sa.ColumnElement, events: sa.FromClause
) -> dict[str, sa.Select]:
    fields = list(dict.fromkeys([c.field for c in family.columns] + [lst.field for lst in family.lists]))
    found = engine.found(family, fields, where, events)
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
