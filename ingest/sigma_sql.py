"""A pySigma backend: a detection rule as a SQL query over `audit_events`, reading fields from the `raw`
JSON column (DuckDB: json_extract_string, PostgreSQL: jsonb #>>), for `audit-ingest rules sql`.

Matching follows Sigma's: case-insensitive (ILIKE), wildcards, `re`, numeric comparisons on JSON numbers
only. A field the spec declares a list (`api_key.created.data.scopes`) has no portable SQL on both
warehouses and is refused: the engine (ingest.detect) evaluates those rules itself.
"""

from __future__ import annotations

import re
from typing import ClassVar

from sigma.conditions import ConditionAND, ConditionNOT, ConditionOR
from sigma.conversion.base import TextQueryBackend
from sigma.conversion.state import ConversionState
from sigma.exceptions import SigmaFeatureNotSupportedByBackendError
from sigma.types import CompareOperators

from ingest.errors import RulesError


class AuditEventsBackend(TextQueryBackend):
    """Sigma -> `SELECT id FROM audit_events WHERE ...` for `dialect` (duckdb or postgresql)."""

    name = "openai-audit-ingest SQL"
    formats = {"default": "a SELECT of the matching audit_events ids"}
    requires_pipeline = False

    precedence: ClassVar = (ConditionNOT, ConditionAND, ConditionOR)
    group_expression: ClassVar[str] = "({expr})"
    token_separator = " "
    or_token: ClassVar[str] = "OR"
    and_token: ClassVar[str] = "AND"
    not_token: ClassVar[str] = "NOT"
    eq_token: ClassVar[str] = " ILIKE "
    # COALESCE: a missing field matches nothing, also under NOT, as in the engine (SQL's NULL would not).
    eq_expression: ClassVar[str] = "COALESCE({field} ILIKE {value} ESCAPE '\\', FALSE)"
    str_quote: ClassVar[str] = "'"
    escape_char: ClassVar[str] = "\\"
    wildcard_multi: ClassVar[str] = "%"
    wildcard_single: ClassVar[str] = "_"
    add_escaped: ClassVar[str] = "%_\\"
    bool_values: ClassVar = {True: "'true'", False: "'false'"}
    wildcard_match_expression: ClassVar[str] = "COALESCE({field} ILIKE {value} ESCAPE '\\', FALSE)"
    compare_op_expression: ClassVar[str] = "{field} {operator} {value}"
    compare_operators: ClassVar = {
        CompareOperators.LT: "<", CompareOperators.LTE: "<=", CompareOperators.GT: ">", CompareOperators.GTE: ">=",
    }  # fmt: skip
    field_null_expression: ClassVar[str] = "{field} IS NULL"
    field_exists_expression: ClassVar[str] = "{field} IS NOT NULL"
    field_not_exists_expression: ClassVar[str] = "{field} IS NULL"

    def __init__(self, dialect: str, list_fields: frozenset[str] = frozenset(), event_types: tuple[str, ...] = ()):
        super().__init__()
        self.dialect = dialect
        self.list_fields = list_fields
        self.event_types = sorted(event_types, key=len, reverse=True)  # longest first: a type holds dots
        self.re_expression = (  # type: ignore[misc]  # pySigma reads it from the instance: per dialect here
            "COALESCE(regexp_matches({field}, '{regex}'), FALSE)"
            if dialect == "duckdb"
            else "COALESCE({field} ~ '{regex}', FALSE)"
        )

    def _keys(self, field: str) -> list[str]:
        """A field's JSON keys: the payload sits under the event type, whose name holds dots."""
        for event_type in self.event_types:
            if field == event_type or field.startswith(event_type + "."):
                rest = field[len(event_type) + 1 :]
                return [event_type, *(rest.split(".") if rest else [])]
        return field.split(".")

    def _json(self, field: str, text: bool = True) -> str:
        if field in self.list_fields or any(field.startswith(f + ".") for f in self.list_fields):
            raise SigmaFeatureNotSupportedByBackendError(f"field {field!r} is a list")
        keys = self._keys(field)
        if self.dialect == "duckdb":
            path = "$" + "".join('."' + k.replace('"', '\\"') + '"' for k in keys)
            function = "json_extract_string" if text else "json_extract"
            return f"{function}(raw, '{path}')"
        path = "{" + ",".join('"' + k.replace('"', '\\"') + '"' for k in keys) + "}"
        return f"(raw {'#>>' if text else '#>'} '{path}')"

    def escape_and_quote_field(self, field_name: str) -> str:
        return "type" if field_name == "type" else self._json(field_name)

    def convert_condition_field_eq_val_num(self, cond, state: ConversionState) -> str:
        return f"COALESCE({self.escape_and_quote_field(cond.field)} = '{cond.value}', FALSE)"

    def convert_condition_field_compare_op_val(self, cond, state: ConversionState) -> str:
        # JSON numbers only, as the engine compares: a string "100000" is not a number. CASE, not AND:
        # SQL does not promise to test the type before the cast.
        op, number = self.compare_operators[cond.value.op], cond.value.number
        node = self._json(cond.field, text=False)
        if self.dialect == "duckdb":
            value = (
                f"CASE WHEN json_type({node}) IN ('BIGINT', 'UBIGINT', 'DOUBLE') THEN TRY_CAST({node} AS DOUBLE) END"
            )
        else:
            value = f"CASE WHEN jsonb_typeof({node}) = 'number' THEN CAST({self._json(cond.field)} AS numeric) END"
        return f"COALESCE({value} {op} {number}, FALSE)"

    def convert_value_str(self, s, state: ConversionState) -> str:
        # SQL doubles a quote inside a literal; the escape character only escapes LIKE's wildcards.
        converted = s.convert(self.escape_char, self.wildcard_multi, self.wildcard_single, self.add_escaped)
        return "'" + converted.replace("'", "''") + "'"

    def finalize_query_default(self, rule, query: str, index: int, state: ConversionState) -> str:
        return f"SELECT id FROM audit_events WHERE {query}"


def to_sql(rule, dialect: str) -> str:
    """The rule (a loaded detect.Rule, not a correlation) as SQL; RulesError when it has no SQL form."""
    from ingest.detect import list_fields
    from ingest.simulator import event_types_in_spec

    backend = AuditEventsBackend(dialect, list_fields(), tuple(event_types_in_spec()))
    try:
        [query] = backend.convert_rule(rule.sigma)
    except SigmaFeatureNotSupportedByBackendError as exc:
        raise RulesError(f"{rule.path}: rule {rule.rule_id!r} has no SQL form: {exc}") from None
    return re.sub(r"\s+", " ", query)
