"""Compilation of a rule to one ClickHouse SELECT over a range of windows.

Windows are ``[end - timespan, end)`` with ``end`` on a grid of ``step`` (multiples of the step
since the epoch); one query evaluates every window ending in ``(window_from, window_to]`` and
reads the source only once, from ``window_from - timespan`` to ``window_to``:

* counting correlations (``event_count``, ``value_count``, ``absent``, ``lookup``) over one or
  two window ends (a scheduled run) count each window directly (every event is in at most
  that many); over longer ranges (backfills, catching up) they turn the
  events into +/- deltas per group at the windows where they enter and leave, and take running
  sums at the windows where a threshold can first be crossed; only the earliest
  non-overlapping crossing windows get their evidence (see ``_counting_sql``): the cost grows
  with the events, not with events times windows;
* ``temporal`` / ``temporal_ordered`` spread the (few) matching events themselves over their
  windows and test the sequence with ``countIf`` / ``sequenceMatch``;
* ``none`` gives one row per matching event, in the grid step that contains it.

Every row of the result is one candidate alert: ``window_start``, ``window_end`` (UTC
microseconds), ``g0..gN`` (the group-by values; ``none`` adds the event id), ``value``,
``evidence`` (at most 100 event ids), ``evidence_count``, ``trace_ids``.

Identifiers in the SQL are column and table names of ``phiaudit.storage``'s schema, checked
by the model; every value is a typed query parameter (``{p3:String}``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ._model import (
    COUNTING_TYPES,
    LOOKUP_TABLES,
    SCHEDULE_SELECTION,
    SOURCES,
    FieldMatch,
    Param,
    Rule,
    Source,
    column_kind,
    parse_duration,
)
from ._schedule import schedule_sql

__all__ = ["Compiled", "compile_rule", "effective_grid", "rule_hash", "two_stage"]

_OPS = {"gt": ">", "gte": ">=", "lt": "<", "lte": "<=", "eq": "="}
EVIDENCE_LIMIT = 100
#: at most this many alerts per rule and query (a runaway rule is reported, not stored whole)
MAX_ROWS = 100_000
#: ranges of at most this many window ends (scheduled runs) count each window directly
DIRECT_WINDOWS = 2
#: ``uniqUpTo(N)`` counts exactly up to N (at most 100) and holds at most N values a group
UNIQ_UP_TO_MAX = 100


@dataclass(frozen=True)
class Compiled:
    """A rule's query over one range of windows, and what its result columns mean."""

    rule_id: str
    sql: str
    params: dict[str, Any]
    group_by: tuple[str, ...]
    step_us: int
    span_us: int
    window_from_us: int
    window_to_us: int
    hash: str = field(default="")

    def explain(self) -> str:
        shown = "\n".join(f"  {k} = {v!r}" for k, v in self.params.items())
        return f"{self.sql}\n-- parameters:\n{shown}\n"


class _Binder:
    def __init__(self) -> None:
        self.params: dict[str, Any] = {}

    def __call__(self, value: Any, ch_type: str) -> str:
        name = f"p{len(self.params)}"
        self.params[name] = value
        return f"{{{name}:{ch_type}}}"


def effective_grid(rule: Rule, step_s: int) -> tuple[int, int]:
    """(step, timespan) in seconds: the rule's own step or the engine's; a timespan shorter
    than the step becomes the step (finer grid); otherwise it is rounded up to a multiple."""
    c = rule.correlation
    step = c.step_s or step_s
    span = c.timespan_s
    if c.type == "none" or span == 0:
        return step, step
    if span < step:
        return span, span
    return step, -(-span // step) * step


def rule_hash(rule: Rule) -> str:
    """SHA-256 of what the rule evaluates (definition and parameter values)."""
    body = json.dumps({
        "source": rule.source, "condition": rule.condition_text,
        "selections": repr(sorted(rule.selections.items())),
        "correlation": repr(rule.correlation), "params": rule.params,
    }, sort_keys=True, default=str)
    return hashlib.sha256(body.encode()).hexdigest()


def two_stage(rule: Rule, window_from_us: int, window_to_us: int, step_s: int = 60) -> bool:
    """Whether windows ending in ``(window_from_us, window_to_us]`` are evaluated in two
    stages: a grouped counting rule over one or two window ends (a scheduled run).

    Stage ``check`` finds the (group, window) pairs that cross the threshold and returns their
    values only, no evidence; a distinct count with a threshold of at most 100 is counted with
    ``uniqUpTo(threshold)``, exact wherever the comparison needs it, so a group holds at most
    threshold + 1 values whatever the number of events. Stage two (``only``: the groups that
    fired and were not alerted already) is the whole query over those groups alone. A window
    of an hour re-read every minute then costs memory in proportion to its groups, not to its
    events, and groups already alerted on cost no evidence."""
    if rule.correlation.type not in COUNTING_TYPES or not rule.correlation.group_by:
        return False
    step, _span = effective_grid(rule, step_s)
    step_us = step * 1_000_000
    return window_to_us // step_us - (window_from_us // step_us + 1) < DIRECT_WINDOWS


def _resolve(rule: Rule, v: Any) -> Any:
    return rule.params[v.name] if isinstance(v, Param) else v


def _values(rule: Rule, m: FieldMatch) -> list[Any]:
    if isinstance(m.values, Param):
        raw = rule.params[m.values.name]
        return list(raw) if isinstance(raw, list) else [raw]
    out: list[Any] = []
    for v in m.values:
        r = _resolve(rule, v)
        out.extend(r if isinstance(r, list) else [r])
    return out


def _match_sql(rule: Rule, src: Source, m: FieldMatch, bind: _Binder) -> str:
    col = m.field
    ch_type = src.columns[col]
    kind = column_kind(ch_type)
    values = _values(rule, m)
    every = "all" in m.modifiers
    mod = next((x for x in m.modifiers if x != "all"), "")
    if not values:
        return "1" if every else "0"
    scalar = {"number": "UInt64", "bool": "Bool"}.get(kind, "String")
    if "UUID" in ch_type:
        scalar = "UUID"
    joiner = " AND " if every else " OR "
    if kind == "array":
        if len(values) == 1:
            return f"has({col}, {bind(values[0], 'String')})"
        fn = "hasAll" if every else "hasAny"
        return f"{fn}({col}, {bind(values, 'Array(String)')})"
    if mod in _OPS:
        parts = [f"{col} {_OPS[mod]} {bind(v, scalar)}" for v in values]
    elif mod == "contains":
        parts = [f"position({col}, {bind(v, 'String')}) > 0" for v in values]
    elif mod == "startswith":
        parts = [f"startsWith({col}, {bind(v, 'String')})" for v in values]
    elif mod == "endswith":
        parts = [f"endsWith({col}, {bind(v, 'String')})" for v in values]
    elif mod == "re":
        parts = [f"match({col}, {bind(v, 'String')})" for v in values]
    elif len(values) == 1 or every:
        parts = [f"{col} = {bind(v, scalar)}" for v in values]
    else:
        return f"{col} IN {bind(values, f'Array({scalar})')}"
    return "(" + joiner.join(parts) + ")" if len(parts) > 1 else parts[0]


def _selection_sql(rule: Rule, name: str, bind: _Binder, history: Any) -> str:
    if name == SCHEDULE_SELECTION:
        return schedule_sql(rule.params, rule.table.time_column, bind, history)
    sel = rule.selections[name]
    alts = []
    for alt in sel.alternatives:
        parts = [_match_sql(rule, rule.table, m, bind) for m in alt]
        alts.append("(" + " AND ".join(parts) + ")" if parts else "1")
    return "(" + " OR ".join(alts) + ")" if alts else "0"


def _condition_sql(rule: Rule, tree: Any, bind: _Binder, history: Any) -> str:
    op = tree[0]
    if op == "sel":
        return _selection_sql(rule, tree[1], bind, history)
    if op == "not":
        return f"(NOT {_condition_sql(rule, tree[1], bind, history)})"
    if op in ("and", "or"):
        left = _condition_sql(rule, tree[1], bind, history)
        right = _condition_sql(rule, tree[2], bind, history)
        return f"({left} {op.upper()} {right})"
    return "1"


def _micro(bind_name: str) -> str:
    return f"fromUnixTimestamp64Micro({bind_name}, 'UTC')"


def compile_rule(rule: Rule, window_from_us: int, window_to_us: int, step_s: int = 60,
                 materialize: bool = True, shard: tuple[int, int] = (0, 1), *,
                 stage: str = "all", only: Sequence[int] | None = None) -> Compiled:
    """One SELECT returning the candidate alerts of every window of ``rule`` that ends in
    ``(window_from_us, window_to_us]`` on the step grid. ``materialize``: the filtered events
    are read once (``WITH ... AS MATERIALIZED``, ClickHouse 26.x; the engine checks the
    server has it), else once per use.

    ``shard=(i, n)``: only the groups (``group-by`` values) whose hash is ``i`` modulo ``n``.
    Every correlation counts within a group, so the ``n`` shards' candidates together are
    exactly the whole query's, each shard holding about 1/n of its memory (the rule engine
    splits a query that needs more than it may use). A rule without ``group-by`` is one
    shard.

    ``stage="check"`` (where ``two_stage`` holds): the candidate (window, group) rows with
    their values and ``gh``, the hash of the group's values, and nothing else. ``only``: the
    groups whose hash (``gh``) is in it, alone."""
    shard_i, shards = shard
    if not (0 <= shard_i < shards) or (shards > 1 and not rule.correlation.group_by):
        raise ValueError("shard: (i, n) with 0 <= i < n, and n = 1 for a rule without group-by")
    if stage not in ("all", "check"):
        raise ValueError("stage: all or check")
    if stage == "check" and not two_stage(rule, window_from_us, window_to_us, step_s):
        raise ValueError("stage: check is for a grouped counting rule over one or two windows")
    if only is not None and not rule.correlation.group_by:
        raise ValueError("only: a rule without group-by has one group")
    step, span = effective_grid(rule, step_s)
    step_us, span_us = step * 1_000_000, span * 1_000_000
    k_lo = window_from_us // step_us + 1
    k_hi = window_to_us // step_us
    lo_us = k_lo * step_us - span_us
    hi_us = k_hi * step_us
    bind = _Binder()
    src = rule.table
    c = rule.correlation
    t = src.time_column
    p_lo, p_hi = bind(lo_us, "Int64"), bind(hi_us, "Int64")
    p_step, p_klo, p_khi = bind(step_us, "Int64"), bind(k_lo, "Int64"), bind(k_hi, "Int64")
    nsteps = span_us // step_us
    time_filter = f"{t} >= {_micro(p_lo)} AND {t} < {_micro(p_hi)}"

    def history(tz: str) -> str:
        days = int(rule.params.get("history_days", 14))
        k = int(rule.params.get("history_min_events", 3))
        p_hlo = bind(lo_us - days * 86_400_000_000, "Int64")
        return (f"SELECT actor_id, toHour({t}, {bind(tz, 'String')}) FROM {src.table} "
                f"WHERE {t} >= {_micro(p_hlo)} AND {t} < {_micro(p_lo)} "
                f"AND actor_id IN (SELECT actor_id FROM {src.table} WHERE {time_filter}) "
                f"GROUP BY 1, 2 HAVING count() >= {bind(k, 'UInt64')}")

    detection = _condition_sql(rule, rule.condition, bind, history)
    group = list(c.group_by)
    gsel = [f"{col} AS g{i}" for i, col in enumerate(group)]
    gnames = [f"g{i}" for i in range(len(group))]
    trace = src.trace_column
    trace_col = f"{trace} AS tr" if trace else "'' AS tr"
    needed = [f"{t} AS t", f"{src.id_column} AS id", trace_col, *gsel]
    if c.field:
        needed.append(f"{c.field} AS f")
    group_hash = f"cityHash64({', '.join(group)})"
    groups_filter = ""  # this shard's groups, and only those asked for
    if shards > 1:
        groups_filter = (f" AND {group_hash} % {bind(shards, 'UInt64')} "
                         f"= {bind(shard_i, 'UInt64')}")
    if only is not None:
        groups_filter += f" AND {group_hash} IN {bind(list(only), 'Array(UInt64)')}"
    base = _Base(f"SELECT {', '.join(needed)}{_EXTRA} FROM {src.table} "
                 f"WHERE {time_filter}{groups_filter} AND {detection}")

    if c.type == "none":
        value = "toUInt64(f)" if c.field else "toUInt64(1)"
        sql = (
            f"SELECT intDiv(toUnixTimestamp64Micro(t), {p_step}) * {p_step} AS window_start, "
            f"window_start + {p_step} AS window_end, "
            + "".join(f"{g}, " for g in gnames)
            + f"toString(id) AS event, {value} AS value, [id] AS evidence, "
            "toUInt64(1) AS evidence_count, arrayFilter(x -> x != '', [tr]) AS trace_ids "
            f"FROM ({base.format(extra='')}) ORDER BY t, id LIMIT {MAX_ROWS}")
        return _done(rule, sql, bind, (*group, "event_id"), step_us, span_us,
                     window_from_us, window_to_us)

    if c.type in ("temporal", "temporal_ordered"):
        flags = []
        for i, st in enumerate(c.steps):
            flags.append(f"{_selection_sql(rule, st.selection, bind, history)} AS s{i}")
        inner = base.format(extra=", " + ", ".join(flags))
        if c.type == "temporal":
            having = " AND ".join(
                f"countIf(s{i}) >= {bind(int(_resolve(rule, st.min)), 'UInt64')}"
                for i, st in enumerate(c.steps))
        else:
            pattern = ".*".join(f"(?{i + 1})" for i, st in enumerate(c.steps)
                                for _ in range(int(_resolve(rule, st.min))))
            conds = ", ".join(f"s{i} = 1" for i in range(len(c.steps)))
            having = (f"sequenceMatch({_pattern_literal(pattern)})"
                      f"(toUInt64(toUnixTimestamp64Micro(t)), {conds})")
        sql = (
            f"SELECT k * {p_step} - {bind(span_us, 'Int64')} AS window_start, "
            f"k * {p_step} AS window_end, "
            + "".join(f"{g}, " for g in gnames)
            + "count() AS value, "
            f"groupArray({EVIDENCE_LIMIT})(id) AS evidence, count() AS evidence_count, "
            f"groupUniqArrayIf({EVIDENCE_LIMIT})(tr, tr != '') AS trace_ids "
            f"FROM ({inner}) "
            f"ARRAY JOIN range(greatest(intDiv(toUnixTimestamp64Micro(t), {p_step}) + 1, "
            f"{p_klo}), least(intDiv(toUnixTimestamp64Micro(t), {p_step}) + "
            f"{bind(nsteps, 'Int64')}, {p_khi}) + 1) AS k "
            f"GROUP BY {', '.join([*gnames, 'k'])} HAVING {having} "
            f"ORDER BY window_end{''.join(', ' + g for g in gnames)}")
        return _done(rule, sql, bind, tuple(group), step_us, span_us, window_from_us,
                     window_to_us)

    # counting correlations: event_count, value_count, absent, lookup
    filtered = base.format(extra="")
    if c.type == "absent":
        filtered = _absent_sql(rule, base, bind, lo_us, hi_us)
    elif c.type == "lookup":
        filtered = _lookup_sql(rule, base, p_lo, p_hi)
    threshold = int(_resolve(rule, c.threshold))
    thr = bind(threshold, "Int64")
    if stage == "check" or k_hi - k_lo < DIRECT_WINDOWS:
        # a scheduled run: one or two window ends; each event falls in at most that many
        if stage == "all":
            value = "uniqExact(f)" if c.field else "count()"
            cols = (f"groupArray({EVIDENCE_LIMIT})(id) AS evidence, count() AS evidence_count, "
                    f"groupUniqArrayIf({EVIDENCE_LIMIT})(tr, tr != '') AS trace_ids")
        else:  # the values alone, and the group's hash for ``only``
            value = "count()" if not c.field else (
                # exact up to the threshold, threshold + 1 above it: every comparison with
                # the threshold comes out as with the exact count
                f"uniqUpTo({threshold})(f)" if 0 <= threshold <= UNIQ_UP_TO_MAX
                else "uniqExact(f)")
            cols = f"cityHash64({', '.join(gnames)}) AS gh"
        sql = (
            f"SELECT k * {p_step} - {bind(span_us, 'Int64')} AS window_start, "
            f"k * {p_step} AS window_end, "
            + "".join(f"{g}, " for g in gnames)
            + f"toUInt64({value}) AS value, {cols} "
            f"FROM ({filtered}) "
            f"ARRAY JOIN range(greatest(intDiv(toUnixTimestamp64Micro(t), {p_step}) + 1, "
            f"{p_klo}), least(intDiv(toUnixTimestamp64Micro(t), {p_step}) + "
            f"{bind(nsteps, 'Int64')}, {p_khi}) + 1) AS k "
            f"GROUP BY {', '.join([*gnames, 'k'])} HAVING value {_OPS[c.op]} {thr} "
            f"ORDER BY window_end{''.join(', ' + g for g in gnames)}")
        return _done(rule, sql, bind, tuple(group), step_us, span_us, window_from_us,
                     window_to_us)
    sql = _counting_sql(filtered, gnames, step_us, span_us, k_lo, k_hi, bool(c.field),
                        _OPS[c.op], thr, materialize)
    return _done(rule, sql, bind, tuple(group), step_us, span_us, window_from_us, window_to_us)


def _counting_sql(filtered: str, gnames: list[str], step_us: int, span_us: int, k_lo: int,
                  k_hi: int, distinct: bool, op: str, thr: str, materialize: bool) -> str:
    """Counts (or distinct values) per group over every window, in a few passes:

    1. ``bk``: events per (group, bucket); ``dl``: +count at the first window that contains
       a bucket, -count after the last (distinct values: per (group, value), the merged runs
       of windows that contain it);
    2. ``cand``: the windows that may cross the threshold first: those ending right after a
       non-empty bucket and those starting at one (a count only grows when an event enters);
       their values are running sums of the deltas (one window function, no re-scan);
    3. ``kept``: per group, the earliest crossing window, then the earliest one after it ends,
       ... (``arrayFold``): non-overlapping, so each event falls in at most one of them;
    4. the evidence of those windows only.

    Integers are formatted here from ints computed by the compiler; values are parameters."""
    n = int(span_us // step_us)
    step, span, klo, khi = int(step_us), int(span_us), int(k_lo), int(k_hi)
    g = ", ".join(gnames) if gnames else "gz"
    extra_gz = "" if gnames else ", toUInt8(0) AS gz"
    part = f"PARTITION BY {g} " if g else ""
    if distinct:
        deltas = (
            f"pf AS (SELECT {g}, arraySort(groupUniqArray(b)) AS bs FROM ev GROUP BY {g}, f), "
            f"dl AS (SELECT {g}, pd.1 AS pos, sum(pd.2) AS d FROM (SELECT {g}, arrayJoin("
            f"arrayConcat(arrayMap(x -> (x + 1, toInt64(1)), arrayFilter((x, i) -> i = 1 OR "
            f"x - bs[i - 1] > {n}, bs, arrayEnumerate(bs))), arrayMap(x -> (x + {n + 1}, "
            f"toInt64(-1)), arrayFilter((x, i) -> i = length(bs) OR bs[i + 1] - x > {n}, bs, "
            f"arrayEnumerate(bs))))) AS pd FROM pf) GROUP BY {g}, pos)")
    else:
        deltas = (
            f"dl AS (SELECT {g}, pd.1 AS pos, sum(pd.2) AS d FROM (SELECT {g}, arrayJoin("
            f"[(b + 1, toInt64(c)), (b + {n + 1}, -toInt64(c))]) AS pd FROM bk) "
            f"GROUP BY {g}, pos)")
    return (
        "WITH "
        f"ev AS {'MATERIALIZED ' if materialize else ''}"
        f"(SELECT *, intDiv(toUnixTimestamp64Micro(t), {step}) AS b{extra_gz} "
        f"FROM ({filtered})), "
        f"bk AS (SELECT {g}, b, count() AS c FROM ev GROUP BY {g}, b), "
        f"{deltas}, "
        f"cand AS (SELECT DISTINCT {g}, k FROM bk ARRAY JOIN [b + 1, b + {n}] AS k "
        f"WHERE k >= {klo} AND k <= {khi}), "
        f"vals AS (SELECT {g}, pos AS k, is_cand, sum(d) OVER ({part}ORDER BY pos, is_cand "
        "ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS v FROM ("
        f"SELECT {g}, pos, d, 0 AS is_cand FROM dl UNION ALL "
        f"SELECT {g}, k AS pos, toInt64(0) AS d, 1 AS is_cand FROM cand)), "
        f"fired AS (SELECT {g}, k, toUInt64(v) AS value FROM vals "
        f"WHERE is_cand = 1 AND v {op} {thr}), "
        f"kept AS (SELECT {g}, arrayFold((acc, x) -> if(empty(acc) OR x >= acc[-1] + {n}, "
        f"arrayPushBack(acc, x), acc), arraySort(groupArray(k)), CAST([], 'Array(Int64)')) "
        f"AS ks FROM fired GROUP BY {g}), "
        f"evk AS (SELECT {g}, arrayFirst(x -> x - {n} <= ev.b AND ev.b < x, kept.ks) AS k, "
        f"ev.id AS id, ev.tr AS tr FROM ev INNER JOIN kept USING ({g}) WHERE k != 0), "
        f"agg AS (SELECT {g}, k, groupArray({EVIDENCE_LIMIT})(id) AS evidence, "
        "count() AS evidence_count, "
        f"groupUniqArrayIf({EVIDENCE_LIMIT})(tr, tr != '') AS trace_ids FROM evk "
        f"GROUP BY {g}, k) "
        f"SELECT k * {step} - {span} AS window_start, k * {step} AS window_end, "
        + "".join(f"{x}, " for x in gnames)
        + "value, evidence, evidence_count, trace_ids "
        f"FROM fired INNER JOIN agg USING ({g}, k) "
        f"ORDER BY window_end{''.join(', ' + x for x in gnames)}"
        + (" SETTINGS enable_materialized_cte = 1" if materialize else ""))


_EXTRA = "/*extra columns*/"


class _Base:
    """The filtered source rows; ``format(extra=...)`` adds columns (never via str.format: the
    text holds ``{pN:Type}`` parameter placeholders)."""

    def __init__(self, sql: str) -> None:
        self.sql = sql

    def format(self, extra: str) -> str:
        return self.sql.replace(_EXTRA, extra, 1)


def _pattern_literal(pattern: str) -> str:
    """A sequenceMatch pattern as a SQL literal: built here from step numbers only."""
    if not pattern or any(ch not in "(?).*0123456789" for ch in pattern):
        raise ValueError("bad sequence pattern")
    return "'" + pattern + "'"


def _tuple(cols: str, n: int) -> str:
    return f"({cols})" if n > 1 else cols


def _absent_sql(rule: Rule, base: _Base, bind: _Binder, lo_us: int, hi_us: int) -> str:
    """Events with no row of the other source sharing the match key within +/- within."""
    c = rule.correlation
    other = SOURCES[c.other]
    within = _resolve(rule, c.within_s)
    if isinstance(within, str):
        within = parse_duration(within, "within", [])
    within_us = int(within) * 1_000_000
    keys = [f"m{i}" for i in range(len(c.match))]
    extra = "".join(f", {a} AS {k}" for (a, _b), k in zip(c.match, keys, strict=True))
    ev = base.format(extra=extra)
    ot = other.time_column
    p_olo, p_ohi = bind(lo_us - within_us, "Int64"), bind(hi_us + within_us, "Int64")
    p_within = bind(within_us, "Int64")
    other_keys = ", ".join(f"{b} AS o{i}" for i, (_a, b) in enumerate(c.match))
    nonempty = " AND ".join(f"{b} != ''" for _a, b in c.match)
    in_keys = ", ".join(b for _a, b in c.match)
    ev_keys = ", ".join(keys)
    other_sql = (
        f"SELECT {other_keys}, toUnixTimestamp64Micro(min({ot})) AS o_min, "
        f"toUnixTimestamp64Micro(max({ot})) AS o_max, count() AS o_n FROM {other.table} "
        f"WHERE {ot} >= {_micro(p_olo)} AND {ot} < {_micro(p_ohi)} AND {nonempty} "
        f"AND {_tuple(in_keys, len(c.match))} IN (SELECT {ev_keys} FROM ({ev})) "
        f"GROUP BY {', '.join(f'o{i}' for i in range(len(c.match)))}")
    on = " AND ".join(f"e.m{i} = o.o{i}" for i in range(len(c.match)))
    empty_key = " OR ".join(f"e.m{i} = ''" for i in range(len(c.match)))
    present = (f"(o.o_n > 0 AND toUnixTimestamp64Micro(e.t) >= o.o_min - {p_within} "
               f"AND toUnixTimestamp64Micro(e.t) <= o.o_max + {p_within})")
    absent = f"NOT {present}"
    if c.empty_is_absent:
        absent = f"(({empty_key}) OR {absent})"
    else:
        absent = f"(NOT ({empty_key}) AND {absent})"
    cols = ["e.t AS t", "e.id AS id", "e.tr AS tr"]
    cols += [f"e.g{i} AS g{i}" for i in range(len(c.group_by))]
    if c.field:
        cols.append("e.f AS f")
    return (f"SELECT {', '.join(cols)} FROM ({ev}) AS e LEFT ANY JOIN ({other_sql}) AS o "
            f"ON {on} WHERE {absent}")


def _lookup_sql(rule: Rule, base: _Base, p_lo: str, p_hi: str) -> str:
    """Events with no row of the reference table on the match keys whose period covers them.
    With a period, the reference rows are those whose period overlaps the events read (cheaper
    than matching the events' keys: a care table is much smaller than a day of events)."""
    c = rule.correlation
    cols_ok: Mapping[str, str] = LOOKUP_TABLES[c.table]
    assert all(b in cols_ok for _a, b in c.match)
    keys = [f"m{i}" for i in range(len(c.match))]
    extra = "".join(f", {a} AS {k}" for (a, _b), k in zip(c.match, keys, strict=True))
    ev = base.format(extra=extra)
    start, end = c.period
    ref_keys = ", ".join(f"{b} AS r{i}" for i, (_a, b) in enumerate(c.match))
    in_keys = ", ".join(b for _a, b in c.match)
    periods = f"groupArray(({start}, {end}))" if start else "[]"
    if start:
        where = f"{start} < {_micro(p_hi)} AND {end} > {_micro(p_lo)}"
    else:
        where = (f"{_tuple(in_keys, len(c.match))} IN (SELECT {', '.join(keys)} "
                 f"FROM ({ev}))")
    ref_sql = (f"SELECT {ref_keys}, {periods} AS periods, count() AS r_n FROM {c.table} "
               f"WHERE {where} GROUP BY {', '.join(f'r{i}' for i in range(len(c.match)))}")
    on = " AND ".join(f"e.m{i} = r.r{i}" for i in range(len(c.match)))
    missing = ("NOT arrayExists(p -> p.1 <= e.t AND e.t < p.2, r.periods)" if start
               else "r.r_n = 0")
    cols = ["e.t AS t", "e.id AS id", "e.tr AS tr"]
    cols += [f"e.g{i} AS g{i}" for i in range(len(c.group_by))]
    if c.field:
        cols.append("e.f AS f")
    return (f"SELECT {', '.join(cols)} FROM ({ev}) AS e LEFT ANY JOIN ({ref_sql}) AS r "
            f"ON {on} WHERE {missing}")


def _done(rule: Rule, sql: str, bind: _Binder, group: tuple[str, ...], step_us: int,
          span_us: int, window_from_us: int, window_to_us: int) -> Compiled:
    return Compiled(rule.id, sql, bind.params, group, step_us, span_us, window_from_us,
                    window_to_us, rule_hash(rule))
