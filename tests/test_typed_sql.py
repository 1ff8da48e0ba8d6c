"""Property: the typed rows the engine derives from stored raw (ingest.typed_sql) are the rows `model.typed_rows`
derives from the same stored event, on both backends, whatever the payload holds."""

from __future__ import annotations

import itertools
import json
from decimal import Decimal

import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_properties import FREE_FORM, SCALAR, TEXT, warehouse  # noqa: F401  (warehouse: the fixture)

from ingest import model, store, typed_sql

# Values of every JSON type, and for each declared type the near misses its coercion must refuse.
ODD = st.one_of(SCALAR, FREE_FORM, st.lists(st.one_of(SCALAR, st.dictionaries(TEXT, SCALAR, max_size=2)), max_size=4))
NEAR = {
    "str": st.one_of(TEXT, st.sampled_from([1, 1.5, True, None, [], {}])),
    "int": st.one_of(
        st.integers(-(2**63), 2**63 - 1),
        st.integers(),
        st.sampled_from([1.0, -0.0, 1e16, 1e308, 2**63, 2**63 - 1, -(2**63), -(2**63) - 1, 2**64, True, "1", None]),
    ),
    "bool": st.one_of(st.booleans(), st.sampled_from([0, 1, "true", None])),
    "object": st.one_of(st.dictionaries(TEXT, FREE_FORM, max_size=4), st.sampled_from([[], "{}", None])),
}


def value_of(kind: str) -> st.SearchStrategy:
    return st.one_of(NEAR[kind], ODD)


@st.composite
def scope_of(draw, family: model.Family) -> dict:
    """A payload or a wrapper: some of the family's fields, each a fitting value, a near miss or anything."""
    fields = {c.field: value_of(c.type) for c in family.columns}
    for lst in family.lists:
        item = value_of("str") if lst.value else st.one_of(
            st.fixed_dictionaries({}, optional={c.field: value_of(c.type) for c in lst.columns}), ODD)  # fmt: skip
        fields[lst.field] = st.one_of(st.lists(item, max_size=4), ODD)
    fields["unknown"] = ODD
    names = draw(st.lists(st.sampled_from(sorted(fields)), unique=True, max_size=len(fields)))
    return {name: draw(fields[name]) for name in names}


@st.composite
def family_event(draw, family: model.Family) -> dict:
    event_type = draw(st.sampled_from(family.types))
    payload = draw(st.one_of(scope_of(family), ODD))
    if isinstance(payload, dict):  # wrappers absent, an object of fields, or anything else
        for wrapper in model.WRAPPERS:
            if wrapper not in payload and draw(st.booleans()):
                payload[wrapper] = draw(st.one_of(scope_of(family), ODD))
    return {"id": f"typed-{next(_ids)}", "type": event_type, "effective_at": 1_700_000_000, event_type: payload}


_ids = itertools.count()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(batch=st.tuples(*(family_event(f) for f in model.FAMILIES for _ in range(2))))  # two events of each family
def test_engine_derived_typed_rows_equal_model_typed_rows_of_the_stored_raw(warehouse, batch):  # noqa: F811
    ev = model.audit_events
    ids = [e["id"] for e in batch]
    with warehouse.connect() as conn:
        with conn.begin():
            store.save_batch(conn, store.stage(warehouse.dialect, model.normalise(batch, "default", store.now())))
        # The oracle reads raw as stored: jsonb keeps a number's value, not its spelling (1e16 comes back 10...0).
        stored = conn.execute(sa.select(ev.c.id, sa.cast(ev.c.raw, sa.Text)).where(ev.c.id.in_(ids))).all()
        expected: dict[str, list[dict]] = {t.name: [] for t in model.TYPED_TABLES}
        for event_id, raw in stored:
            event = json.loads(raw)
            model.typed_rows(expected, model.FAMILY_OF_TYPE[event["type"]], event_id, event.get(event["type"]))
        derived = typed_sql.derivations(warehouse.dialect, ev.c.id.in_(ids))
        for table in model.TYPED_TABLES:
            got = conn.execute(as_text(derived[table.name])).mappings().all()
            assert rows(got, table) == rows(expected[table.name], table), table.name


def as_text(select: sa.Select) -> sa.Select:
    """JSON columns as text, parsed by `rows` with numbers as decimals: each engine spells them its own way (DuckDB
    writes -1.2957141257881332e+16 as -12957141257881332.0), the value is the same."""
    sub = select.subquery()
    return sa.select(*(sa.cast(c, sa.Text).label(c.name) if isinstance(c.type, sa.JSON) else c for c in sub.c))


def rows(found, table: sa.Table) -> list[tuple]:
    def value(row, column: sa.Column):
        v = row[column.name]
        if isinstance(column.type, sa.JSON) and v is not None:
            return json.dumps(
                json.loads(v, parse_float=Decimal, parse_int=Decimal),
                sort_keys=True,
                default=lambda d: str(d.normalize()),
            )
        return v

    return sorted((tuple(value(r, c) for c in table.columns) for r in found), key=repr)
