"""Parsing and validating rule documents (YAML) into ``Rule``s.

Every problem is collected with the rule id and its key path (``rule bulk-access.detection.
access.patient_id: patient_id is encrypted ...``) and raised at once as a ``ConfigError``.
Identifiers (fields, modifiers, group-by, tables) are checked against the schema's column
lists; the condition is parsed into a tree of selection names; values stay values.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from phiaudit.storage import ConfigError

from ._model import (
    CORRELATION_TYPES,
    COUNTING_TYPES,
    LOOKUP_TABLES,
    MODIFIERS,
    OPERATORS,
    SCHEDULE_SELECTION,
    SEVERITIES,
    SOURCES,
    Correlation,
    FieldMatch,
    Param,
    Rule,
    Selection,
    Source,
    Step,
    Value,
    column_kind,
    parse_duration,
)

__all__ = ["check_params", "load_rule_file", "parse_rule", "summary_fields"]

_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_TOKEN = re.compile(r"\s*(\(|\)|[A-Za-z_][A-Za-z0-9_]*\*?|1(?![0-9A-Za-z_]))")


_RULE_KEYS = {"id", "title", "description", "severity", "source", "detection", "correlation",
              "summary", "params", "enabled", "tags", "author", "references", "status",
              "falsepositives", "level"}
_CORR_KEYS = {"type", "group-by", "timespan", "step", "condition", "field", "steps", "rules",
              "absent", "lookup"}


def load_rule_file(path: Path) -> list[Rule]:
    """The rules of one YAML file (one document per rule, ``---`` separated)."""
    import yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"rules: cannot read rule file {Path(path).name}: "
                          f"{exc.strerror or type(exc).__name__}") from exc
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{Path(path).name}{where}: not valid YAML") from exc
    rules: list[Rule] = []
    errors: list[str] = []
    for i, doc in enumerate(docs):
        try:
            rules.append(parse_rule(doc, origin=str(path), where=f"{Path(path).name}[{i}]"))
        except ConfigError as exc:
            errors.extend(exc.errors)
    if errors:
        raise ConfigError(errors)
    return rules


def parse_rule(doc: Any, origin: str = "builtin", where: str = "rule") -> Rule:
    """Validate one rule document; ``ConfigError`` lists every problem with its key path."""
    errors: list[str] = []
    if not isinstance(doc, dict):
        raise ConfigError(f"{where}: a rule must be a mapping")
    rid = doc.get("id")
    if not isinstance(rid, str) or not _ID.match(rid):
        errors.append(f"{where}.id: required; lower-case letters, digits, '-' and '_' "
                      "(at most 63)")
        rid = where
    p = f"rule {rid}"
    for key in doc:
        if key not in _RULE_KEYS:
            errors.append(f"{p}: unknown key {_show(key)}")
    title = doc.get("title", rid)
    if not isinstance(title, str) or not title or len(title) > 200:
        errors.append(f"{p}.title: a string of at most 200 characters")
        title = str(rid)
    description = doc.get("description", "")
    if not isinstance(description, str):
        errors.append(f"{p}.description: must be a string")
        description = ""
    severity = doc.get("severity", doc.get("level", "medium"))
    if severity not in SEVERITIES:
        errors.append(f"{p}.severity: must be one of {', '.join(SEVERITIES)}")
        severity = "medium"
    source = doc.get("source")
    if source not in SOURCES:
        errors.append(f"{p}.source: must be one of {', '.join(SOURCES)}")
        source = "audit_events"
    src = SOURCES[source]
    enabled = doc.get("enabled", True)
    if not isinstance(enabled, bool):
        errors.append(f"{p}.enabled: must be true or false")
        enabled = True
    params = _parse_params(doc.get("params", {}), f"{p}.params", errors)
    selections, cond, cond_text = _parse_detection(doc.get("detection"), src, params,
                                                   f"{p}.detection", errors)
    corr = _parse_correlation(doc.get("correlation", {"type": "none"}), src, selections,
                              params, f"{p}.correlation", errors)
    summary = doc.get("summary", "")
    if not isinstance(summary, str) or not summary or len(summary) > 500:
        errors.append(f"{p}.summary: required, a string of at most 500 characters")
        summary = str(title)
    else:
        _check_summary(summary, corr, src, params, f"{p}.summary", errors)
    if errors:
        raise ConfigError(errors)
    rule = Rule(str(rid), str(title), description, str(severity), str(source), selections,
                cond, cond_text, corr, summary, params, origin, enabled)
    check_params(rule, errors, p)
    if errors:
        raise ConfigError(errors)
    return rule


def _show(key: Any) -> str:
    """A key for an error message: short, printable, never a long value."""
    text = str(key)
    if len(text) > 40 or not text.isprintable():
        return "(a key that is not a plain name)"
    return repr(text)


def _parse_params(raw: Any, path: str, errors: list[str]) -> dict[str, Any]:
    if not isinstance(raw, dict):
        errors.append(f"{path}: must be a mapping of parameter names to default values")
        return {}
    out: dict[str, Any] = {}
    for name, value in raw.items():
        if not isinstance(name, str) or not _NAME.match(name):
            errors.append(f"{path}: parameter names are letters, digits and '_' "
                          f"(got {_show(name)})")
            continue
        if value is None or not isinstance(value, (bool, int, str, list, dict)):
            errors.append(f"{path}.{name}: a default value (number, string, list or mapping) "
                          "is required")
            continue
        out[name] = value
    return out


def _value(raw: Any, params: Mapping[str, Any], path: str, errors: list[str]) -> Value | None:
    if isinstance(raw, str) and raw.startswith("$"):
        if raw.startswith("$$"):
            return raw[1:]
        name = raw[1:]
        if name not in params:
            errors.append(f"{path}: unknown parameter {_show(raw)} (declare it under params)")
            return None
        return Param(name)
    if isinstance(raw, (bool, int, str)):
        return raw
    errors.append(f"{path}: values must be strings, integers or booleans")
    return None


def _parse_detection(
    raw: Any, src: Source, params: Mapping[str, Any], path: str, errors: list[str],
) -> tuple[dict[str, Selection], Any, str]:
    if not isinstance(raw, dict) or "condition" not in raw:
        errors.append(f"{path}: required: named selections and a condition")
        return {}, ("true",), ""
    selections: dict[str, Selection] = {}
    for name, body in raw.items():
        if name == "condition":
            continue
        sp = f"{path}.{name}"
        if not isinstance(name, str) or not _NAME.match(name) or name in (
                "and", "or", "not", SCHEDULE_SELECTION):
            errors.append(f"{path}: selection names are letters, digits and '_' and not a "
                          f"keyword (got {_show(name)})")
            continue
        alts = body if isinstance(body, list) else [body]
        if not alts:
            errors.append(f"{sp}: must not be empty")
            continue
        alternatives: list[tuple[FieldMatch, ...]] = []
        for i, alt in enumerate(alts):
            ap = f"{sp}[{i}]" if isinstance(body, list) else sp
            if not isinstance(alt, dict) or not alt:
                errors.append(f"{ap}: a mapping of field: value (or a list of such mappings)")
                continue
            alternatives.append(tuple(
                m for k, v in alt.items()
                if (m := _parse_match(k, v, src, params, ap, errors)) is not None))
        selections[name] = Selection(name, tuple(alternatives))
    text = raw["condition"]
    if not isinstance(text, str) or not text.strip() or len(text) > 1000:
        errors.append(f"{path}.condition: a string over selection names with and, or, not "
                      "and parentheses")
        return selections, ("true",), ""
    names = set(selections)
    if "schedule" in params:
        names.add(SCHEDULE_SELECTION)
    tree = _parse_condition(text, names, f"{path}.condition", errors)
    return selections, tree, text


def _parse_match(
    key: Any, raw: Any, src: Source, params: Mapping[str, Any], path: str, errors: list[str],
) -> FieldMatch | None:
    if not isinstance(key, str):
        errors.append(f"{path}: field names must be strings")
        return None
    col, *mods = key.split("|")
    kp = f"{path}.{key}" if len(key) <= 60 and key.isprintable() else f"{path}.(a field)"
    if col in src.encrypted:
        errors.append(f"{kp}: {col} is encrypted and cannot be matched; use its blind index "
                      "column (*_bidx)")
        return None
    if col not in src.columns or col in ("writer_id", "seq", "prev_hash", "hash", "key_id"):
        errors.append(f"{kp}: {src.table} has no column rules may use named {_show(col)}")
        return None
    kind = column_kind(src.columns[col])
    for m in mods:
        if m not in MODIFIERS:
            errors.append(f"{kp}: unknown modifier {_show(m)} (known: {', '.join(MODIFIERS)})")
            return None
    cmp = [m for m in mods if m != "all"]
    if len(cmp) > 1:
        errors.append(f"{kp}: at most one comparison modifier")
        return None
    if cmp and cmp[0] in ("gt", "gte", "lt", "lte") and kind != "number":
        errors.append(f"{kp}: |{cmp[0]} needs a numeric column")
        return None
    if cmp and cmp[0] in ("contains", "startswith", "endswith", "re") and kind != "string":
        errors.append(f"{kp}: |{cmp[0]} needs a string column")
        return None
    if kind == "time":
        errors.append(f"{kp}: time columns cannot be matched (windows do that)")
        return None
    values: tuple[Value, ...] | Param
    if isinstance(raw, str) and raw.startswith("$") and not raw.startswith("$$"):
        v = _value(raw, params, kp, errors)
        if v is None:
            return None
        values = v if isinstance(v, Param) else (v,)
    else:
        items = raw if isinstance(raw, list) else [raw]
        if not items:
            errors.append(f"{kp}: at least one value")
            return None
        if len(items) > 1000:
            errors.append(f"{kp}: at most 1000 values")
            return None
        out: list[Value] = []
        for item in items:
            v = _value(item, params, kp, errors)
            if v is None:
                return None
            out.append(v)
        values = tuple(out)
    match = FieldMatch(col, tuple(mods), values)
    if not isinstance(values, Param):
        _check_values(match, kind, list(values), kp, errors)
    return match


def _check_values(match: FieldMatch, kind: str, values: list[Any], path: str,
                  errors: list[str]) -> None:
    """Literal (or parameter) values against the column kind and the modifier."""
    mod = next((m for m in match.modifiers if m != "all"), "")
    for v in values:
        if isinstance(v, Param):
            continue
        if kind == "number" and (isinstance(v, bool) or not isinstance(v, int)):
            errors.append(f"{path}: {match.field} is numeric: integer values only")
            return
        if kind == "number" and not 0 <= v < 2**63:
            errors.append(f"{path}: integer out of range")
            return
        if kind == "bool" and not isinstance(v, bool):
            errors.append(f"{path}: {match.field} is true or false")
            return
        if kind in ("string", "array") and not isinstance(v, str):
            errors.append(f"{path}: {match.field} holds text: quote the value")
            return
        if isinstance(v, str) and len(v) > 4096:
            errors.append(f"{path}: a value longer than 4096 characters")
            return
        if mod == "re":
            try:
                re.compile(str(v))
            except re.error:
                errors.append(f"{path}: not a valid regular expression")
                return


_Tree = tuple[Any, ...]


def _parse_condition(text: str, names: set[str], path: str, errors: list[str]) -> _Tree:
    """``a and not (b or c)`` -> ('and', ('sel', 'a'), ('not', ...)); precedence not > and > or.
    Sigma's ``1 of x*`` / ``all of x*`` / ``them`` are accepted too."""
    tokens: list[str] = []
    pos = 0
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            if text[pos:].strip() == "":
                break
            errors.append(f"{path}: unexpected character at position {pos + 1}")
            return ("true",)
        tokens.append(m.group(1))
        pos = m.end()
    i = 0

    def peek() -> str | None:
        return tokens[i] if i < len(tokens) else None

    def take() -> str:
        nonlocal i
        tok = tokens[i]
        i += 1
        return tok

    def parse_or() -> _Tree:
        left = parse_and()
        while peek() == "or":
            take()
            left = ("or", left, parse_and())
        return left

    def parse_and() -> _Tree:
        left = parse_not()
        while peek() == "and":
            take()
            left = ("and", left, parse_not())
        return left

    def parse_not() -> _Tree:
        if peek() == "not":
            take()
            return ("not", parse_not())
        return parse_atom()

    def parse_atom() -> _Tree:
        tok = peek()
        if tok is None:
            raise ValueError("the condition ends too early")
        if tok == "(":
            take()
            inner = parse_or()
            if peek() != ")":
                raise ValueError("a parenthesis is not closed")
            take()
            return inner
        if tok in ("1", "all") and i + 2 < len(tokens) + 1 and i + 1 < len(tokens) \
                and tokens[i + 1] == "of":
            quant = take()
            take()
            if peek() is None:
                raise ValueError("'of' needs a selection pattern or 'them'")
            pat = take()
            if pat == "them":
                chosen = sorted(n for n in names if n != SCHEDULE_SELECTION)
            else:
                prefix = pat.rstrip("*")
                chosen = sorted(n for n in names if (n.startswith(prefix) if pat.endswith("*")
                                                     else n == pat))
            if not chosen:
                raise ValueError(f"no selection matches {_show(pat)}")
            node: _Tree = ("sel", chosen[0])
            for n in chosen[1:]:
                node = ("or" if quant == "1" else "and", node, ("sel", n))
            return node
        if tok in ("and", "or", ")", "of"):
            raise ValueError(f"unexpected {_show(tok)}")
        take()
        if tok not in names:
            raise ValueError(f"unknown selection {_show(tok)}")
        return ("sel", tok)

    try:
        tree = parse_or()
        if i != len(tokens):
            raise ValueError(f"unexpected {_show(tokens[i])}")
    except ValueError as exc:
        errors.append(f"{path}: {exc}")
        return ("true",)
    return tree


def _int_or_param(raw: Any, params: Mapping[str, Any], path: str, errors: list[str],
                  minimum: int = 0) -> int | Param:
    v = _value(raw, params, path, errors) if raw is not None else None
    if isinstance(v, Param):
        return v
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum or v >= 2**63:
        if raw is not None and v is not None:
            errors.append(f"{path}: an integer >= {minimum} (or a $parameter)")
        elif raw is None:
            errors.append(f"{path}: required")
        return minimum
    return v


def _parse_correlation(
    raw: Any, src: Source, selections: Mapping[str, Selection], params: Mapping[str, Any],
    path: str, errors: list[str],
) -> Correlation:
    if not isinstance(raw, dict):
        errors.append(f"{path}: must be a mapping")
        return Correlation()
    for key in raw:
        if key not in _CORR_KEYS:
            errors.append(f"{path}: unknown key {_show(key)}")
    ctype = raw.get("type", "none")
    if ctype not in CORRELATION_TYPES:
        errors.append(f"{path}.type: must be one of {', '.join(CORRELATION_TYPES)}")
        return Correlation()
    gb = raw.get("group-by", [])
    if isinstance(gb, str):
        gb = [gb]
    group_by: list[str] = []
    if not isinstance(gb, list):
        errors.append(f"{path}.group-by: a list of column names")
        gb = []
    for col in gb:
        _check_column(col, src, f"{path}.group-by", errors, grouping=True)
        if isinstance(col, str):
            group_by.append(col)
    if len(set(group_by)) != len(group_by):
        errors.append(f"{path}.group-by: a column is named twice")
    timespan = 0
    step = 0
    if ctype != "none":
        if "timespan" not in raw:
            errors.append(f"{path}.timespan: required for {ctype}")
        else:
            timespan = parse_duration(raw["timespan"], f"{path}.timespan", errors)
        if "step" in raw:
            step = parse_duration(raw["step"], f"{path}.step", errors)
            if step and timespan and timespan % step:
                errors.append(f"{path}.step: the timespan must be a multiple of the step")
    elif "timespan" in raw:
        errors.append(f"{path}.timespan: a rule of type none has no window")
    op, threshold = "gte", 1
    cond = raw.get("condition")
    thr: int | Param = 1
    if ctype in COUNTING_TYPES:
        if cond is None:
            cond = {"gte": 1}
        if not isinstance(cond, dict) or len([k for k in cond if k in OPERATORS]) != 1:
            errors.append(f"{path}.condition: one of {', '.join(OPERATORS)} with a number, "
                          "e.g. {gt: 50}")
        else:
            for key in cond:
                if key not in OPERATORS and key != "field":
                    errors.append(f"{path}.condition: unknown key {_show(key)}")
            op = next(k for k in cond if k in OPERATORS)
            thr = _int_or_param(cond[op], params, f"{path}.condition.{op}", errors)
    elif cond is not None:
        errors.append(f"{path}.condition: not used by {ctype}")
    del threshold
    vfield = raw.get("field", (cond or {}).get("field", "") if isinstance(cond, dict) else "")
    if ctype == "value_count":
        if not vfield:
            errors.append(f"{path}.field: value_count needs the field whose distinct values "
                          "are counted")
        else:
            _check_column(vfield, src, f"{path}.field", errors, grouping=True)
    elif vfield and ctype in ("absent", "lookup"):
        _check_column(vfield, src, f"{path}.field", errors, grouping=True)
    elif vfield and ctype == "none":
        if _check_column(vfield, src, f"{path}.field", errors) and column_kind(
                src.columns[vfield]) != "number":
            errors.append(f"{path}.field: the value of a rule of type none is a numeric column")
    elif vfield:
        errors.append(f"{path}.field: {ctype} counts events, not a field")
    steps: list[Step] = []
    if ctype in ("temporal", "temporal_ordered"):
        raw_steps = raw.get("steps", raw.get("rules"))
        if not isinstance(raw_steps, list) or len(raw_steps) < 2 or len(raw_steps) > 10:
            errors.append(f"{path}.steps: a list of 2 to 10 selections")
            raw_steps = []
        for i, st in enumerate(raw_steps):
            sp = f"{path}.steps[{i}]"
            if isinstance(st, str):
                st = {"selection": st}
            if not isinstance(st, dict) or not isinstance(st.get("selection"), str):
                errors.append(f"{sp}: a selection name, or {{selection: name, min: n}}")
                continue
            if st["selection"] not in selections:
                errors.append(f"{sp}.selection: unknown selection {_show(st['selection'])}")
            for key in st:
                if key not in ("selection", "min"):
                    errors.append(f"{sp}: unknown key {_show(key)}")
            mn = _int_or_param(st.get("min", 1), params, f"{sp}.min", errors, minimum=1)
            if isinstance(mn, int) and mn > 50:
                errors.append(f"{sp}.min: at most 50")
            steps.append(Step(st["selection"], mn))
    elif "steps" in raw or "rules" in raw:
        errors.append(f"{path}.steps: only temporal correlations have steps")
    corr = Correlation(ctype, tuple(group_by), timespan, step, op, thr, str(vfield or ""),
                       tuple(steps))
    if ctype == "absent":
        corr = _parse_absent(raw.get("absent"), src, corr, params, f"{path}.absent", errors)
    elif "absent" in raw:
        errors.append(f"{path}.absent: only for type absent")
    if ctype == "lookup":
        corr = _parse_lookup(raw.get("lookup"), src, corr, f"{path}.lookup", errors)
    elif "lookup" in raw:
        errors.append(f"{path}.lookup: only for type lookup")
    return corr


def _check_column(col: Any, src: Source | Mapping[str, str], path: str, errors: list[str],
                  grouping: bool = False) -> bool:
    columns = src.columns if isinstance(src, Source) else src
    encrypted = src.encrypted if isinstance(src, Source) else frozenset()
    if not isinstance(col, str):
        errors.append(f"{path}: column names are strings")
        return False
    if col in encrypted:
        errors.append(f"{path}: {col} is encrypted; use its blind index column (*_bidx)")
        return False
    if col not in columns or col in ("writer_id", "seq", "prev_hash", "hash", "key_id"):
        errors.append(f"{path}: no column rules may use named {_show(col)}")
        return False
    if grouping and column_kind(columns[col]) in ("time",):
        errors.append(f"{path}: {col} is a time column")
        return False
    return True


def _parse_absent(raw: Any, src: Source, corr: Correlation, params: Mapping[str, Any],
                  path: str, errors: list[str]) -> Correlation:
    if not isinstance(raw, dict):
        errors.append(f"{path}: required: {{source: audit_events, match: {{trace_id: trace_id}}, "
                      "within: 2m}")
        return corr
    for key in raw:
        if key not in ("source", "match", "within", "empty"):
            errors.append(f"{path}: unknown key {_show(key)}")
    other = raw.get("source")
    if other not in SOURCES:
        errors.append(f"{path}.source: must be one of {', '.join(SOURCES)}")
        return corr
    osrc = SOURCES[other]
    match = raw.get("match")
    pairs: list[tuple[str, str]] = []
    if not isinstance(match, dict) or not match:
        errors.append(f"{path}.match: a mapping of this source's column: the other's column")
    else:
        for a, b in match.items():
            ok = _check_column(a, src, f"{path}.match", errors)
            ok = _check_column(b, osrc, f"{path}.match", errors) and ok
            if ok and column_kind(src.columns[a]) != column_kind(osrc.columns[b]):
                errors.append(f"{path}.match: {a} and {b} are not of the same kind")
            elif ok:
                pairs.append((a, b))
    within_raw = raw.get("within", "0s")
    within: int | Param
    if isinstance(within_raw, str) and within_raw.startswith("$"):
        v = _value(within_raw, params, f"{path}.within", errors)
        within = v if isinstance(v, Param) else 0
    elif within_raw == "0s":
        within = 0
    else:
        within = parse_duration(within_raw, f"{path}.within", errors)
    empty = raw.get("empty", True)
    if not isinstance(empty, bool):
        errors.append(f"{path}.empty: true (an empty key counts as absent) or false")
        empty = True
    return Correlation(**{**corr.__dict__, "other": other, "match": tuple(pairs),
                          "within_s": within, "empty_is_absent": empty})


def _parse_lookup(raw: Any, src: Source, corr: Correlation, path: str,
                  errors: list[str]) -> Correlation:
    if not isinstance(raw, dict):
        errors.append(f"{path}: required: {{table: care_relationships, match: {{actor_id: "
                      "actor_id, patient_bidx: patient_bidx}, period: [start, end]}")
        return corr
    for key in raw:
        if key not in ("table", "match", "period"):
            errors.append(f"{path}: unknown key {_show(key)}")
    table = raw.get("table")
    if table not in LOOKUP_TABLES:
        errors.append(f"{path}.table: must be one of {', '.join(LOOKUP_TABLES)}")
        return corr
    cols = LOOKUP_TABLES[table]
    pairs: list[tuple[str, str]] = []
    match = raw.get("match")
    if not isinstance(match, dict) or not match:
        errors.append(f"{path}.match: a mapping of this source's column: the table's column")
    else:
        for a, b in match.items():
            ok = _check_column(a, src, f"{path}.match", errors)
            ok = _check_column(b, cols, f"{path}.match", errors) and ok
            if ok:
                pairs.append((a, b))
    period = raw.get("period")
    per = ("", "")
    if period is not None:
        if (not isinstance(period, list) or len(period) != 2
                or not all(isinstance(c, str) and c in cols
                           and column_kind(cols[c]) == "time" for c in period)):
            errors.append(f"{path}.period: [start column, end column] of the table")
        else:
            per = (period[0], period[1])
    return Correlation(**{**corr.__dict__, "table": table, "match": tuple(pairs),
                          "period": per})


_SUMMARY_FIELDS = ("value", "evidence_count", "window_start", "window_end", "timespan",
                   "rule_id", "title", "severity")


def summary_fields(summary: str) -> list[str]:
    """The ``{name}`` placeholders of a summary template (plain names only)."""
    out = []
    for _lit, name, spec, conv in string.Formatter().parse(summary):
        if name is None:
            continue
        if spec or conv or not re.match(r"^[A-Za-z_][A-Za-z0-9_.]*$", name):
            raise ValueError("placeholders are plain {name}s, without format or conversion")
        out.append(name)
    return out


def _check_summary(summary: str, corr: Correlation, src: Source, params: Mapping[str, Any],
                   path: str, errors: list[str]) -> None:
    try:
        names = summary_fields(summary)
    except ValueError as exc:
        errors.append(f"{path}: {exc}")
        return
    for name in names:
        if name in src.encrypted:
            errors.append(f"{path}: {{{name}}} is an encrypted (PHI) column and may not appear "
                          "in a summary")
        elif name.startswith("params."):
            if name[7:] not in params:
                errors.append(f"{path}: unknown parameter {{{name}}}")
        elif name not in corr.group_by and name not in _SUMMARY_FIELDS:
            errors.append(f"{path}: {{{name}}} is neither a group-by column nor one of "
                          + ", ".join(_SUMMARY_FIELDS) + " or params.NAME")
        elif name in ("patient_bidx", "client_bidx", "object_bidx", "resource_bidx",
                      "statement_bidx"):
            errors.append(f"{path}: {{{name}}} identifies a patient, a client or an object; "
                          "leave it in the group key, out of the summary")


def check_params(rule: Rule, errors: list[str], path: str) -> None:
    """Parameter values against their uses (thresholds integers, list values of the column's
    kind, schedules well formed)."""
    from ._schedule import check_schedule

    src = rule.table
    c = rule.correlation
    for label, v in (("condition", c.threshold), ("absent.within", c.within_s)):
        if isinstance(v, Param):
            val = rule.params[v.name]
            if label == "absent.within":
                if not isinstance(val, str):
                    errors.append(f"{path}.params.{v.name}: a duration like 2m")
                else:
                    parse_duration(val, f"{path}.params.{v.name}", errors)
            elif isinstance(val, bool) or not isinstance(val, int) or not 0 <= val < 2**63:
                errors.append(f"{path}.params.{v.name}: a non-negative integer")
    for st in c.steps:
        if isinstance(st.min, Param):
            val = rule.params[st.min.name]
            if isinstance(val, bool) or not isinstance(val, int) or not 1 <= val <= 50:
                errors.append(f"{path}.params.{st.min.name}: an integer from 1 to 50")
    for sel in rule.selections.values():
        for alt in sel.alternatives:
            for m in alt:
                kind = column_kind(src.columns[m.field])
                vals: list[Any] = []
                if isinstance(m.values, Param):
                    val = rule.params[m.values.name]
                    vals = val if isinstance(val, list) else [val]
                else:
                    vals = [rule.params[v.name] if isinstance(v, Param) else v
                            for v in m.values]
                    flat: list[Any] = []
                    for v in vals:
                        flat.extend(v if isinstance(v, list) else [v])
                    vals = flat
                if any(isinstance(v, (dict, list)) for v in vals):
                    errors.append(f"{path}.detection.{sel.name}.{m.field}: parameter values "
                                  "must be scalars or a list of scalars")
                    continue
                _check_values(m, kind, vals, f"{path}.detection.{sel.name}.{m.field}", errors)
    if "schedule" in rule.params:
        check_schedule(rule.params, f"{path}.params", errors)
