"""The rule model: typed rules, the tables they may read, and their columns.

A rule reads one source table (``audit_events``, ``infra_events`` or ``access_log``), keeps the
rows its ``detection`` matches (Sigma: named selections of ``field|modifier: value`` and a
``condition`` over their names), then correlates them (Sigma's ``event_count``,
``value_count``, ``temporal``, ``temporal_ordered``, plus ``absent``, ``lookup`` and ``none``)
per ``group-by`` key over windows of ``timespan``. See docs/rules.md for the format.

Only whitelisted columns of the source table may be named; encrypted columns never (use their
``*_bidx`` blind index). Values never reach SQL as text: the compiler binds every one of them
as a typed query parameter. Every validation error names the rule id and the key path.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from phiaudit.storage import (
    ACCESS_LOG_COLUMNS,
    AUDIT_COLUMNS,
    CARE_COLUMNS,
    INFRA_COLUMNS,
    Column,
    ConfigError,
)

__all__ = [
    "CORRELATION_TYPES",
    "COUNTING_TYPES",
    "LOOKUP_TABLES",
    "MODIFIERS",
    "OPERATORS",
    "SCHEDULE_SELECTION",
    "SEVERITIES",
    "SOURCES",
    "Correlation",
    "FieldMatch",
    "Param",
    "Rule",
    "Selection",
    "Source",
    "Step",
    "column_kind",
    "parse_duration",
]

SEVERITIES = ("low", "medium", "high", "critical")
CORRELATION_TYPES = ("none", "event_count", "value_count", "temporal", "temporal_ordered",
                     "absent", "lookup")
#: correlations that count events (or distinct values) per group and window
COUNTING_TYPES = ("event_count", "value_count", "absent", "lookup")
MODIFIERS = ("gt", "gte", "lt", "lte", "contains", "startswith", "endswith", "re", "all")
OPERATORS = ("gt", "gte", "lt", "lte", "eq")
#: pseudo-selections the compiler provides (off-hours): need the ``schedule`` parameter
SCHEDULE_SELECTION = "outside_schedule"

_DURATION = re.compile(r"^([1-9][0-9]{0,5})(s|m|h|d)$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_NUMERIC = ("UInt8", "UInt16", "UInt32", "UInt64", "Int64", "Bool")


@dataclass(frozen=True)
class Source:
    """A table rules may read: its whitelisted columns (name -> ClickHouse type)."""

    table: str
    time_column: str
    id_column: str
    trace_column: str | None
    columns: Mapping[str, str]
    encrypted: frozenset[str]


def _source(table: str, cols: list[Column], time_col: str, trace: str | None) -> Source:
    plain = {c.name: c.type for c in cols if c.kind == "plain"}
    enc = frozenset(c.name for c in cols if c.kind == "encrypted")
    return Source(table, time_col, "event_id", trace, plain, enc)


SOURCES: dict[str, Source] = {
    "audit_events": _source("audit_events", AUDIT_COLUMNS, "event_time", "trace_id"),
    "infra_events": _source("infra_events", INFRA_COLUMNS, "event_time", "trace_id"),
    "access_log": _source("access_log", ACCESS_LOG_COLUMNS, "time", None),
}
#: reference tables of ``lookup`` correlations
LOOKUP_TABLES: dict[str, Mapping[str, str]] = {
    "care_relationships": {c.name: c.type for c in CARE_COLUMNS},
}


def column_kind(ch_type: str) -> str:
    """``string``, ``number``, ``bool``, ``array`` or ``time`` for a ClickHouse column type."""
    t = ch_type
    if t.startswith("LowCardinality("):
        t = t[len("LowCardinality("):-1]
    if t.startswith("Array("):
        return "array"
    if t == "Bool":
        return "bool"
    if t in _NUMERIC:
        return "number"
    if t.startswith("DateTime"):
        return "time"
    return "string"  # String, UUID


def parse_duration(value: Any, path: str, errors: list[str]) -> int:
    """``30s``, ``15m``, ``1h``, ``1d`` -> seconds (0 and an error when invalid)."""
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return int(m.group(1)) * _UNITS[m.group(2)]
    errors.append(f"{path}: must be a duration like 30s, 15m, 1h or 1d")
    return 0


@dataclass(frozen=True)
class Param:
    """A reference to a rule parameter (``$name`` in the YAML)."""

    name: str


Value = str | int | bool | Param


@dataclass(frozen=True)
class FieldMatch:
    """``field|modifiers: values``: any value matches (all of them with ``|all``)."""

    field: str
    modifiers: tuple[str, ...]
    values: tuple[Value, ...] | Param


@dataclass(frozen=True)
class Selection:
    """A named selection: a list of alternatives, each an AND of field matches."""

    name: str
    alternatives: tuple[tuple[FieldMatch, ...], ...]


@dataclass(frozen=True)
class Step:
    """One element of a temporal sequence: a selection that must occur at least ``min``
    times."""

    selection: str
    min: int | Param = 1


@dataclass(frozen=True)
class Correlation:
    type: str = "none"
    group_by: tuple[str, ...] = ()
    timespan_s: int = 0
    step_s: int = 0  # 0: the engine's step
    op: str = "gte"
    threshold: int | Param = 1
    field: str = ""  # value_count
    steps: tuple[Step, ...] = ()  # temporal, temporal_ordered
    # absent: no row of `other` with other.key = key within +/- within_s
    other: str = ""
    match: tuple[tuple[str, str], ...] = ()  # (this column, other column)
    within_s: int | Param = 0
    empty_is_absent: bool = True
    # lookup: no row of `table` with the keys equal and start <= time < end
    table: str = ""
    period: tuple[str, str] = ("", "")


@dataclass(frozen=True)
class Rule:
    id: str
    title: str
    description: str
    severity: str
    source: str
    selections: Mapping[str, Selection]
    condition: Any  # the parsed condition tree (see _parse_condition)
    condition_text: str
    correlation: Correlation
    summary: str
    params: Mapping[str, Any] = field(default_factory=dict)
    origin: str = "builtin"  # builtin | a file path
    enabled: bool = True

    @property
    def table(self) -> Source:
        return SOURCES[self.source]

    def with_settings(self, settings: Mapping[str, Any]) -> Rule:
        """A copy with parameters overridden (``RulesConfig.settings[rule_id]``)."""
        errors: list[str] = []
        params = dict(self.params)
        for key, value in settings.items():
            if key == "enabled":
                if not isinstance(value, bool):
                    errors.append(f"rules.settings.{self.id}.enabled: must be true or false")
                continue
            if key == "severity":
                if value not in SEVERITIES:
                    errors.append(f"rules.settings.{self.id}.severity: must be one of "
                                  + ", ".join(SEVERITIES))
                continue
            if key not in params:
                errors.append(f"rules.settings.{self.id}.{key}: the rule has no such parameter "
                              f"(it has: {', '.join(sorted(params)) or 'none'})")
                continue
            _check_param_value(params[key], value, f"rules.settings.{self.id}.{key}", errors)
            params[key] = value
        if errors:
            raise ConfigError(errors)
        enabled = settings.get("enabled", self.enabled)
        severity = settings.get("severity", self.severity)
        new = Rule(self.id, self.title, self.description, severity, self.source,
                   self.selections, self.condition, self.condition_text, self.correlation,
                   self.summary, params, self.origin, bool(enabled))
        from ._parse import check_params

        check_params(new, errors, f"rules.settings.{self.id}")
        if errors:
            raise ConfigError(errors)
        return new


def _check_param_value(default: Any, value: Any, path: str, errors: list[str]) -> None:
    """A setting must have the type of the parameter's default."""
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, str):
        ok = isinstance(value, str)
    elif isinstance(default, list):
        ok = isinstance(value, list)
    elif isinstance(default, dict):
        ok = isinstance(value, dict)
    else:
        ok = False
    if not ok:
        errors.append(f"{path}: must be of the same type as the default "
                      f"({type(default).__name__})")
