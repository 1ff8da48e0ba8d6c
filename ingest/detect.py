"""Detections: Sigma rules (the pack in ingest/rules/*.yml and the files of `rules_dir`) run over every
committed batch, raising rows of `alerts`.

pySigma parses and validates the rules; their detection trees are evaluated here, in Python, over each
event's raw JSON, with Sigma's semantics (a list value matches when one of its items does; strings match
case-insensitively, with wildcards). A SQL backend was the other way: the JSON arrays in the events (scopes,
certificates, configs) have no portable SQL form on DuckDB and PostgreSQL, so it would have needed a
translation per backend of each modifier; the evaluation here is one, and it runs in every SIEM's way.

Correlations (event_count, value_count, temporal) read the events of their timespan from the warehouse
(by `effective_at`, up to the batch being processed), so events stored by earlier runs count. A newly
committed event raises a correlation alert when it makes the condition true in the timespan that ends at it
(the window without it does not satisfy the condition): one alert per burst, not one per event of it.
The alert holds: event_count, every event of the window; value_count, the last event of each value;
temporal, the last event of each rule.
"""

from __future__ import annotations

import bisect
import hashlib
import ipaddress
import itertools
import logging
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import yaml

from ingest import batchlog, model, store
from ingest.errors import DatabaseError, RulesError
from ingest.state import Key

log = logging.getLogger("ingest.detect")

PACK = Path(__file__).parent / "rules"
# What the API sends beyond the spec's schema (the spec's own examples, api-facts.md): session fingerprints.
SESSION_EXTRAS = ("user_agent", "ja3", "ja4", "ip_address_details")
# Placeholders a rule may expand (`field|expand: '%name%'`): the setting of the same name.
PLACEHOLDERS = ("allowed_email_domains",)


# ---------------------------------------------------------------------------------------------- loading
@dataclass
class Rule:
    """A Sigma rule or correlation, as loaded: `alerts` is False for building blocks of correlations."""

    rule_id: str
    title: str
    level: str
    tags: list[str]
    path: Path
    sigma: Any  # SigmaRule | SigmaCorrelationRule: the two share no base with their attributes
    alerts: bool = True
    disabled: str | None = None  # why it cannot run (a placeholder with no value)
    types: frozenset[str] | None = None  # the event types it can match; None: any

    @property
    def correlation(self) -> bool:
        return self.sigma.__class__.__name__ == "SigmaCorrelationRule"


@dataclass
class RuleSet:
    rules: list[Rule] = field(default_factory=list)

    def by_id(self) -> dict[str, Rule]:
        return {r.rule_id: r for r in self.rules}

    def active(self) -> list[Rule]:
        return [r for r in self.rules if r.alerts and not r.disabled]


def rule_files(rules_dir: str | Path | None) -> list[Path]:
    files = sorted(PACK.glob("*.yml"))
    if rules_dir:
        folder = Path(rules_dir)
        if not folder.is_dir():
            raise RulesError(f"rules_dir {folder} is not a directory")
        files += sorted([*folder.glob("*.yml"), *folder.glob("*.yaml")])
    return files


def load(rules_dir: str | Path | None = None, placeholders: dict[str, list[str]] | None = None) -> RuleSet:
    """Every rule of the pack and of `rules_dir`, parsed and validated: a rule that does not parse, names
    a field no event has, or uses what this engine cannot evaluate raises RulesError naming file and field.
    Parsed once while the files stay as they are: a run checks its rules at start and evaluates them after
    (the same parse), and a daemon reads an edited file at its next tick."""
    placeholders = placeholders or {}
    files = rule_files(rules_dir)
    try:
        key = (
            tuple((str(p), *_stamp(p)) for p in files),
            tuple(sorted((name, tuple(values)) for name, values in placeholders.items())),
        )
    except OSError:  # a file gone: the parse names it
        return _parse(files, placeholders)
    if key not in _loaded:
        _loaded.clear()
        _loaded[key] = _parse(files, placeholders)
    return _loaded[key]


_loaded: dict[tuple, RuleSet] = {}


def _stamp(path: Path) -> tuple[int, ...]:
    """What changes when a file is edited or replaced, even by a copy that keeps its time (`cp -p`)."""
    stat = path.stat()
    return stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


def _parse(files: list[Path], placeholders: dict[str, list[str]]) -> RuleSet:
    from sigma.collection import SigmaCollection
    from sigma.exceptions import SigmaError

    loaded: list[Rule] = []
    for path in files:
        try:
            collection = SigmaCollection.from_yaml(path.read_text(encoding="utf-8"), resolve_references=False)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise RulesError(f"{path}: not YAML{where}: {getattr(exc, 'problem', None) or _first_line(exc)}") from None
        except (SigmaError, OSError, ValueError) as exc:
            raise RulesError(f"{path}: {_first_line(exc)}") from None
        for sigma in collection.rules:
            loaded.append(_rule(path, sigma, placeholders))
    ids = [r.rule_id for r in loaded]
    for rule in loaded:
        if ids.count(rule.rule_id) > 1:
            raise RulesError(f"{rule.path}: rule {rule.rule_id!r} is defined twice")
    rules = RuleSet(loaded)
    _resolve(rules)
    return rules


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _rule(path: Path, sigma, placeholders: dict[str, list[str]]) -> Rule:
    rule_id = sigma.name or (str(sigma.id) if sigma.id else None)
    if not rule_id:
        raise RulesError(f"{path}: rule {sigma.title!r} has neither name nor id")
    if sigma.level is None:
        raise RulesError(f"{path}: rule {rule_id!r} has no level")
    rule = Rule(rule_id, sigma.title, str(sigma.level.name).lower(), [str(t) for t in sigma.tags], path, sigma)
    if rule.correlation:
        _check_correlation(rule)
        return rule
    logsource = sigma.logsource
    if (logsource.product, logsource.service) != ("openai", "audit_logs"):
        raise RulesError(f"{path}: rule {rule_id!r}: logsource must be product openai, service audit_logs")
    for item in _items(sigma):
        if item.field is not None and not known_field(item.field):
            raise RulesError(f"{path}: rule {rule_id!r}: field {item.field!r} is in no event of the spec")
        item.value = _expanded(rule, item, placeholders)
        for value in item.value:
            if type(value).__name__ not in _MATCHERS:
                raise RulesError(f"{path}: rule {rule_id!r}: field {item.field!r}: {type(value).__name__} unsupported")
    try:
        rule.types = _types(sigma.detection.parsed_condition[0].parse(False), sigma.detection.detections)
    except Exception as exc:  # pySigma raises its own and pyparsing errors for a bad condition
        raise RulesError(f"{path}: rule {rule_id!r}: condition: {_first_line(exc)}") from None
    return rule


def _items(sigma) -> Iterator:
    def walk(detection) -> Iterator:
        for item in detection.detection_items:
            if hasattr(item, "detection_items"):
                yield from walk(item)
            else:
                yield item

    for detection in sigma.detection.detections.values():
        yield from walk(detection)


def _expanded(rule: Rule, item, placeholders: dict[str, list[str]]) -> list:
    from sigma.types import SigmaString

    out = []
    for value in item.value:
        if isinstance(value, SigmaString) and value.contains_placeholder():
            names = [getattr(p, "name", "") for p in value.s if p.__class__.__name__ == "Placeholder"]
            unknown = [n for n in names if n not in PLACEHOLDERS]
            if unknown:
                raise RulesError(f"{rule.path}: rule {rule.rule_id!r}: unknown placeholder %{unknown[0]}%")
            if not all(placeholders.get(n) for n in names):
                rule.disabled = f"set {names[0]}"
            out.extend(value.replace_placeholders(lambda p: iter(placeholders.get(p.name) or ())))
        else:
            out.append(value)
    return out


_CORRELATION_OPS = {"GTE": lambda n, c: n >= c, "GT": lambda n, c: n > c, "EQ": lambda n, c: n == c}


def _check_correlation(rule: Rule) -> None:
    sigma, where = rule.sigma, f"{rule.path}: rule {rule.rule_id!r}"
    kind = sigma.type.name.lower()
    if kind not in ("event_count", "value_count", "temporal"):
        raise RulesError(f"{where}: correlation type {kind} unsupported (event_count, value_count, temporal)")
    if sigma.condition.__class__.__name__ != "SigmaCorrelationCondition" or sigma.condition.op.name not in (
        _CORRELATION_OPS
    ):
        raise RulesError(f"{where}: correlation condition must be gte, gt or eq")
    for name in [*(sigma.group_by or []), *([sigma.condition.fieldref] if kind == "value_count" else [])]:
        if not isinstance(name, str) or (name not in {a.alias for a in sigma.aliases} and not known_field(name)):
            raise RulesError(f"{where}: field {name!r} is in no event of the spec")


def _resolve(rules: RuleSet) -> None:
    by_id = rules.by_id()
    for rule in rules.rules:
        if not rule.correlation:
            continue
        for ref in rule.sigma.rules:
            base = by_id.get(ref.reference)
            if base is None or base.correlation:
                raise RulesError(f"{rule.path}: rule {rule.rule_id!r}: no detection rule {ref.reference!r}")
            if not rule.sigma.generate:
                base.alerts = False
            if base.disabled:
                rule.disabled = base.disabled
    for rule in rules.rules:  # a rule referenced by a correlation alerts on its own only with `generate`
        if not rule.correlation and any(
            ref.reference == rule.rule_id and c.sigma.generate
            for c in rules.rules
            if c.correlation
            for ref in c.sigma.rules
        ):
            rule.alerts = True


def _types(tree, detections) -> frozenset[str] | None:
    """The event types the condition can match, when its `type` selections say (None: any), so that
    correlations read only those events of their timespan."""
    kind = tree.__class__.__name__
    if kind == "ConditionIdentifier":
        return _detection_types(detections[tree.identifier])
    if kind == "ConditionAND":
        known = [t for t in (_types(a, detections) for a in tree.args) if t is not None]
        return frozenset.intersection(*known) if known else None
    if kind == "ConditionOR":
        parts = [_types(a, detections) for a in tree.args]
        return None if any(p is None for p in parts) else frozenset().union(*(p or () for p in parts))
    if kind == "ConditionSelector":
        regex = re.compile(tree.pattern.replace("*", ".*"))
        names = [n for n in detections if tree.pattern == "them" or regex.fullmatch(n)]
        parts = [_detection_types(detections[n]) for n in names]
        if tree.cond_class.__name__ == "ConditionAND":
            known = [p for p in parts if p is not None]
            return frozenset.intersection(*known) if known else None
        return None if any(p is None for p in parts) else frozenset().union(*(p or () for p in parts))
    return None  # NOT and the rest


def _detection_types(detection) -> frozenset[str] | None:
    if detection.item_linking.__name__ != "ConditionAND":
        return None
    for item in detection.detection_items:
        if getattr(item, "field", None) == "type" and not item.negated and all(map(_plain_or_prefix, item.value)):
            return frozenset(str(v) for v in item.value)
    return None


def _plain_or_prefix(value) -> bool:
    """A type pattern the prefilter can use: a plain string, or one with a single trailing `*`."""
    from sigma.types import SigmaString, SpecialChars

    if type(value) is not SigmaString:
        return False
    parts = list(value.s)
    if parts and parts[-1] == SpecialChars.WILDCARD_MULTI:
        parts = parts[:-1]
    return all(isinstance(p, str) for p in parts) and "*" not in "".join(map(str, parts))


@cache
def _known_fields() -> tuple[frozenset[str], tuple[str, ...], frozenset[str]]:
    """(paths of the spec's event schema, prefixes under which any path may occur: free-form objects,
    the paths of lists)."""
    from ingest.simulator import load_spec

    schemas = load_spec()["components"]["schemas"]
    exact: set[str] = set()
    free: list[str] = []
    lists: set[str] = set()

    def walk(prefix: str, schema: dict, depth: int = 0) -> None:
        if "$ref" in schema:
            schema = schemas[schema["$ref"].rsplit("/", 1)[1]]
        for option in schema.get("anyOf", []) + schema.get("oneOf", []):
            walk(prefix, option, depth)
        exact.add(prefix)
        if schema.get("type") == "array":
            lists.add(prefix)
            walk(prefix, schema.get("items", {}), depth)
        props = schema.get("properties")
        if props:
            for name, sub in props.items():
                walk(f"{prefix}.{name}", sub, depth + 1)
        elif schema.get("type") == "object" or (not schema.get("type") and "anyOf" not in schema and depth):
            free.append(prefix + ".")

    for name, sub in schemas["AuditLog"]["properties"].items():
        walk(name, sub)
    for name in SESSION_EXTRAS:
        exact.add(f"actor.session.{name}")
    free.append("actor.session.ip_address_details.")
    for event_type in schemas["AuditLogEventType"]["enum"]:
        if event_type not in schemas["AuditLog"]["properties"]:
            exact.add(event_type)
            free.append(event_type + ".")  # a type without a schema: whatever its payload holds
    return frozenset(exact), tuple(free), frozenset(lists)


def known_field(name: str) -> bool:
    exact, free, _ = _known_fields()
    return name in exact or name.startswith(free)


def list_fields() -> frozenset[str]:
    """The paths the spec declares lists (of strings or objects)."""
    return _known_fields()[2]


# ---------------------------------------------------------------------------------------------- matching
def _values(event: dict, path: str) -> list:
    """The values at a dotted path; lists on the way are flattened (any item may match). Keys may hold
    dots themselves: the payload is under the event's type (`api_key.created.data.scopes`)."""
    out: list = []
    _walk(event, _steps(path), 0, out)
    return out


@cache
def _steps(path: str) -> tuple[tuple[tuple[str, int], ...], ...]:
    """Per part of the path: the keys that may start there (one part, or several joined by dots), each with the
    part the rest of the path starts at. Built once per path: the walk runs for every field of every event."""
    parts = path.split(".")
    return tuple(tuple((".".join(parts[i:j]), j) for j in range(i + 1, len(parts) + 1)) for i in range(len(parts)))


def _walk(value, steps: tuple[tuple[tuple[str, int], ...], ...], at: int, out: list) -> None:
    if isinstance(value, list):
        for item in value:
            _walk(item, steps, at, out)
    elif at == len(steps):
        out.append(value)
    elif isinstance(value, dict):
        for key, rest in steps[at]:
            if key in value:
                _walk(value[key], steps, rest, out)


def _leaves(value) -> Iterator:
    if isinstance(value, dict):
        for v in value.values():
            yield from _leaves(v)
    elif isinstance(value, list):
        for v in value:
            yield from _leaves(v)
    else:
        yield value


@cache
def _regex(pattern: str, flags: int) -> re.Pattern:
    return re.compile(pattern, flags)


_STRING_REGEX: dict[int, tuple[object, re.Pattern]] = {}  # id(SigmaString) -> (it, its regex): to_regex is slow


def _string(value, found: list) -> bool:
    cached = _STRING_REGEX.get(id(value))
    if cached is None or cached[0] is not value:
        cased = value.__class__.__name__ == "SigmaCasedString"
        flags = re.DOTALL | (0 if cased else re.IGNORECASE)
        cached = _STRING_REGEX[id(value)] = (value, _regex(str(value.to_regex().regexp), flags))
    regex = cached[1]
    return any(
        regex.fullmatch(v if isinstance(v, str) else model.canonical(v))  # canonical: integers beyond 64 bits too
        for v in found
        if v is not None and not isinstance(v, dict | list)
    )


def _number(value, found: list) -> bool:
    want = value.number
    return any(
        (isinstance(v, int | float) and not isinstance(v, bool) and v == want)
        or (isinstance(v, str) and v == str(want))
        for v in found
    )


def _compare(value, found: list) -> bool:
    op, limit = value.op.name, value.number.number
    test = {"LT": limit.__gt__, "LTE": limit.__ge__, "GT": limit.__lt__, "GTE": limit.__le__}[op]
    return any(isinstance(v, int | float) and not isinstance(v, bool) and test(v) for v in found)


def _cidr(value, found: list) -> bool:
    for v in found:
        try:
            if isinstance(v, str) and ipaddress.ip_address(v) in value.network:
                return True
        except ValueError:
            continue
    return False


def _regexp(value, found: list) -> bool:
    flags = re.IGNORECASE if any(f.name == "IGNORECASE" for f in value.flags) else 0
    flags |= re.MULTILINE if any(f.name == "MULTILINE" for f in value.flags) else 0
    flags |= re.DOTALL if any(f.name == "DOTALL" for f in value.flags) else 0
    regex = _regex(str(value.regexp), flags)
    return any(isinstance(v, str) and regex.search(v) for v in found)


_MATCHERS = {
    "SigmaString": _string,
    "SigmaCasedString": _string,
    "SigmaNumber": _number,
    "SigmaBool": lambda value, found: any(v is value.boolean for v in found),
    "SigmaNull": lambda value, found: not found or any(v is None for v in found),
    "SigmaExists": lambda value, found: any(v is not None for v in found) == value.exists,
    "SigmaCompareExpression": _compare,
    "SigmaCIDRExpression": _cidr,
    "SigmaRegularExpression": _regexp,
}


def _item_matches(item, event: dict) -> bool:
    found = _values(event, item.field) if item.field is not None else list(_leaves(event))
    results = (_MATCHERS[type(v).__name__](v, found) for v in item.value)
    hit = all(results) if item.value_linking.__name__ == "ConditionAND" else any(results)
    return hit != item.negated


def _detection_matches(detection, event: dict) -> bool:
    parts = (
        _detection_matches(i, event) if hasattr(i, "detection_items") else _item_matches(i, event)
        for i in detection.detection_items
    )
    return all(parts) if detection.item_linking.__name__ == "ConditionAND" else any(parts)


def _condition_matches(tree, detections, event: dict) -> bool:
    kind = tree.__class__.__name__
    if kind == "ConditionIdentifier":
        return _detection_matches(detections[tree.identifier], event)
    if kind == "ConditionAND":
        return all(_condition_matches(a, detections, event) for a in tree.args)
    if kind == "ConditionOR":
        return any(_condition_matches(a, detections, event) for a in tree.args)
    if kind == "ConditionNOT":
        return not _condition_matches(tree.args[0], detections, event)
    if kind == "ConditionSelector":
        regex = _regex(tree.pattern.replace("*", ".*"), 0)
        names = [n for n in detections if tree.pattern == "them" or regex.fullmatch(n)]
        hits = (_detection_matches(detections[n], event) for n in names)
        return all(hits) if tree.cond_class.__name__ == "ConditionAND" else any(hits)
    raise RulesError(f"unsupported condition element {kind}")


class Matcher:
    """A detection rule's condition, parsed once."""

    def __init__(self, rule: Rule):
        self.rule = rule
        self.tree = rule.sigma.detection.parsed_condition[0].parse(False)
        self.detections = rule.sigma.detection.detections

    def __call__(self, event: dict) -> bool:
        if self.rule.types is not None and not _type_in(event.get("type"), self.rule.types):
            return False
        return _condition_matches(self.tree, self.detections, event)


def _type_in(event_type, types: frozenset[str]) -> bool:
    return isinstance(event_type, str) and (
        event_type in types or any(t.endswith("*") and event_type.startswith(t[:-1]) for t in types)
    )


# ---------------------------------------------------------------------------------------------- alerts
@dataclass(frozen=True)
class Alert:
    rule: Rule
    events: tuple[batchlog.StoredEvent, ...]
    historical: bool

    @property
    def event_ids(self) -> list[str]:
        return sorted({e.id for e in self.events})

    @property
    def events_hash(self) -> str:
        return events_hash(self.event_ids)

    def row(self, seq: int) -> dict:
        times = [e.effective_at for e in self.events]
        return {
            "rule_id": self.rule.rule_id, "events_hash": self.events_hash, "title": self.rule.title,
            "level": self.rule.level, "tags": self.rule.tags, "event_ids": self.event_ids,
            "first_event_at": min(times), "last_event_at": max(times), "created_at": store.now(),
            "historical": self.historical, "batch_seq": seq,
        }  # fmt: skip


def events_hash(event_ids: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(sorted(event_ids)).encode()).hexdigest()


def evaluate(
    conn: sa.Connection, rules: RuleSet, batches: list[batchlog.CommittedBatch], earlier: Earlier
) -> list[Alert]:  # fmt: skip
    """The alerts the events of `batches` raise. `earlier`: what the evaluation of the batches just before these
    matched (the same consumer's run, which reads the log in chunks); it takes this evaluation's matches too."""
    active = rules.active()
    by_id = rules.by_id()
    matchers = {r.rule_id: Matcher(r) for r in rules.rules if not r.correlation}
    historical = {e.id for b in batches if Key.parse(b.state_key).kind == "backfill" for e in b.events}
    new = [e for b in batches for e in b.events]
    alerts: list[Alert] = []
    needed = {r.rule_id for r in active if not r.correlation}
    needed |= {ref.reference for r in active if r.correlation for ref in r.sigma.rules}
    by_type: dict[str, list[batchlog.StoredEvent]] = {}
    for event in new:
        by_type.setdefault(str(event.raw.get("type")), []).append(event)
    hits: dict[str, list[batchlog.StoredEvent]] = {}
    for rule_id in needed:
        types = matchers[rule_id].rule.types
        candidates = new if types is None else [e for t, es in by_type.items() if _type_in(t, types) for e in es]
        hits[rule_id] = [e for e in candidates if matchers[rule_id](e.raw)]
    for rule in active:
        if not rule.correlation:
            alerts.extend(Alert(rule, (e,), e.id in historical) for e in hits[rule.rule_id])
    for rule in active:
        if rule.correlation:
            bases = [by_id[ref.reference] for ref in rule.sigma.rules]
            triggers = [(b.rule_id, e) for b in bases for e in hits[b.rule_id]]
            if triggers:
                alerts.extend(_correlate(conn, rule, bases, matchers, triggers, historical, earlier, hits))
    for base_id in {ref.reference for r in active if r.correlation for ref in r.sigma.rules}:  # once: bases are shared
        earlier.add(base_id, hits[base_id])
    return alerts


@dataclass
class Earlier:
    """The events a consumer's run has matched so far, by base rule of a correlation, in time order, from batch
    `first` on: a correlation's window reads only what committed before `first` back from the warehouse."""

    first: int
    hits: dict[str, list[batchlog.StoredEvent]] = field(default_factory=dict)

    def add(self, base_id: str, events: list[batchlog.StoredEvent]) -> None:
        found = self.hits.setdefault(base_id, [])
        found.extend(events)
        found.sort(key=_time)  # two sorted runs: merged in linear time

    def near(self, base_id: str, spans: list[tuple[datetime, datetime]]) -> Iterator[batchlog.StoredEvent]:
        """The matches of `base_id` within the (disjoint, ordered) spans."""
        found = self.hits.get(base_id, [])
        for lo, hi in spans:
            yield from found[bisect.bisect_left(found, lo, key=_time) : bisect.bisect_right(found, hi, key=_time)]


def _time(event: batchlog.StoredEvent) -> datetime:
    return event.effective_at


def _spans(times: list[datetime], span: timedelta) -> list[tuple[datetime, datetime]]:
    """The union of [t - span, t + span] over `times` (sorted), as disjoint intervals in order."""
    merged: list[tuple[datetime, datetime]] = []
    for t in times:
        if merged and t - span <= merged[-1][1]:
            merged[-1] = (merged[-1][0], t + span)
        else:
            merged.append((t - span, t + span))
    return merged


def _group(rule: Rule, aliases: dict[str, dict[str, str]], base_id: str, event: dict) -> tuple | None:
    """The event's values of the correlation's group-by fields (aliases resolved); None when one is absent."""
    key = []
    for name in rule.sigma.group_by or []:
        path = aliases[name].get(base_id, name) if name in aliases else name
        values = _values(event, path)
        if not values or values[0] is None:
            return None
        # Canonical: equal objects are one group whatever their key order (as served, or as stored: sorted).
        key.append(values[0] if isinstance(values[0], str) else model.canonical(values[0]))
    return tuple(key)


def _correlate(
    conn, rule: Rule, bases: list[Rule], matchers, triggers, historical: set[str], earlier: Earlier, hits: dict
):
    """The correlation's alerts among the events of its window: those of the batches being evaluated and of the
    run's earlier ones, matched already (`hits`, `earlier`, by base rule), and those stored before the run, matched
    here. A first sync's window is most of the log: reading it back would cost more than the evaluation.

    A window counts when it holds one of the batches' matches (a trigger): those end at a trigger or up to a span
    after it, since a sweep commits newest first and the later events of a window may have committed before; so
    only the events within a span of a trigger count. A window alerted on already has the same events, and
    its alert the same hash: it is not stored twice."""
    sigma = rule.sigma
    span = timedelta(seconds=sigma.timespan.seconds)
    kind = sigma.type.name.lower()
    spans = _spans(sorted(e.effective_at for _, e in triggers), span)
    types = None if any(b.types is None for b in bases) else frozenset().union(*(b.types or () for b in bases))
    fieldref = sigma.condition.fieldref if kind == "value_count" else None
    aliases = {a.alias: {ref.reference: f for ref, f in a.mapping.items()} for a in sigma.aliases}
    # Every matched event of the windows, per group: (time, id, rule, event, the value counted).
    groups: dict[tuple, list] = {}
    # Batch numbers start at 1: a run from the log's first batch (a first sync) has nothing stored before it.
    older = _stored(conn, spans[0][0], spans[-1][1], types, earlier.first) if earlier.first > 1 else ()
    stored = ((b, e) for e in older for b in bases if matchers[b.rule_id](e.raw))
    run = ((b, e) for b in bases for e in earlier.near(b.rule_id, spans))
    for base, event in itertools.chain(stored, run, ((b, e) for b in bases for e in hits.get(b.rule_id, ()))):
        key = _group(rule, aliases, base.rule_id, event.raw)
        if key is not None:
            value = base.rule_id if kind == "temporal" else _value(event.raw, fieldref) if fieldref else None
            groups.setdefault(key, []).append((event.effective_at, event.id, base.rule_id, event, value))
    wanted = {(base_id, e.id) for base_id, e in triggers}
    test = _CORRELATION_OPS[sigma.condition.op.name]
    count = len(bases) if kind == "temporal" else sigma.condition.count
    for rows in groups.values():
        rows.sort(key=lambda r: r[:3])
        times = [r[0] for r in rows if (r[2], r[1]) in wanted]  # the group's triggers, in time order
        # The window ending at each row, slid once over the group: rows[first:j + 1].
        first, counts, latest = 0, {}, {}  # type: int, dict, dict
        for j, (at, event_id, _, event, value) in enumerate(rows):
            while rows[first][0] < at - span:
                old = rows[first][4]
                if old is not None:
                    counts[old] -= 1
                    if not counts[old]:
                        del counts[old], latest[old]
                first += 1
            if value is not None:
                counts[value] = counts.get(value, 0) + 1
                latest[value] = event
            k = bisect.bisect_left(times, at - span)
            if k == len(times) or times[k] > at:  # no trigger in this window
                continue
            if kind == "event_count":
                size = j + 1 - first
                if test(size, count) and not test(size - 1, count):
                    yield Alert(rule, tuple(r[3] for r in rows[first : j + 1]), event_id in historical)
            else:
                before = len(counts) - (1 if value is not None and counts[value] == 1 else 0)
                if test(len(counts), count) and not test(before, count):
                    yield Alert(rule, tuple(latest.values()), event_id in historical)


def _value(event: dict, path: str):
    found = _values(event, path)
    return found[0] if found and isinstance(found[0], str | int | float | bool) else None


def _stored(conn: sa.Connection, lo: datetime, hi: datetime, types, before: int) -> Iterator[batchlog.StoredEvent]:
    """The events of [lo, hi] (of `types`) in batches before `before`."""
    ev = model.audit_events
    query = sa.select(ev.c.id, ev.c.effective_at, ev.c.raw).where(
        ev.c.effective_at.between(lo, hi), ev.c.batch_seq < before
    )
    if types is not None:
        exact = sorted(t for t in types if not t.endswith("*"))
        prefixes = [ev.c.type.startswith(t[:-1], autoescape=True) for t in sorted(types) if t.endswith("*")]
        query = query.where(sa.or_(ev.c.type.in_(exact), *prefixes))
    for event_id, at, raw in conn.execute(query):
        yield batchlog.StoredEvent(event_id, at, model.parsed(raw))


def save(conn: sa.Connection, alerts: list[Alert], seq: int) -> list[dict]:
    """Inserts the alerts not stored yet (one statement per rule); returns the rows inserted."""
    per_rule: dict[str, dict[str, dict]] = {}
    for alert in alerts:
        per_rule.setdefault(alert.rule.rule_id, {})[alert.events_hash] = alert.row(seq)
    inserted = []
    for rows in per_rule.values():
        stored = [
            {**r, "tags": model.dumps(r["tags"]), "event_ids": model.dumps(r["event_ids"])} for r in rows.values()
        ]
        new = set(store.insert_rows(conn, model.alerts, stored, returning="events_hash"))
        inserted += [row for key, row in rows.items() if key in new]
    return inserted


class Detector:
    """The consumer: evaluates the rules over newly committed batches and stores their alerts (and their
    pending deliveries) in the consumer's transaction, so each is stored exactly once."""

    name = "rules"

    def __init__(self, rules: RuleSet, webhooks: tuple[str, ...] = ()):
        self.rules = rules
        self.webhooks = webhooks
        self._earlier: Earlier | None = None  # this run's matches so far (consumers.run reads the log in chunks)
        self._next = 0  # the batch after the last one processed

    def process(self, conn: sa.Connection, batches: list[batchlog.CommittedBatch]) -> None:
        try:
            # Matches kept cover the batches from `first` on only if this consumer processed all of them: batches
            # not right after its last (another session fed those, or a failure rolled them back) start afresh,
            # and the warehouse gives back what came before.
            if self._earlier is None or batches[0].seq != self._next:
                self._earlier = Earlier(batches[0].seq)
            alerts = evaluate(conn, self.rules, batches, self._earlier)
            inserted = save(conn, alerts, batches[-1].seq)
            if inserted and self.webhooks:
                from ingest import delivery

                delivery.enqueue(conn, inserted, self.webhooks)
            self._next = batches[-1].seq + 1
        except sa.exc.SQLAlchemyError as exc:  # as an IngestError, consumers.run logs it and retries next run
            raise DatabaseError(f"rules: {_first_line(getattr(exc, 'orig', None) or exc)}") from None
        # A line per rule, not per alert: a first sync over a long history raises thousands.
        for (rule_id, level), n in Counter((row["rule_id"], row["level"]) for row in inserted).items():
            log.info("%d %s raised by %s (%s)", n, "alert" if n == 1 else "alerts", rule_id, level)


def placeholders_of(settings) -> dict[str, list[str]]:
    return {name: list(getattr(settings, name, ()) or ()) for name in PLACEHOLDERS}


def consumers_for(settings) -> list:
    return [Detector(load(settings.rules_dir, placeholders_of(settings)), tuple(settings.webhooks()))]
