"""Just enough SQL reading to audit database client spans: the verb and the tables.

This is not a parser. It strips comments and string literals, then takes the identifiers
after ``FROM``, ``JOIN``, ``INTO``, ``UPDATE``, ``TABLE`` and ``COPY``; schema prefixes and
quotes are dropped and names are lower-cased. Good enough to decide whether a statement
touches a declared PHI table, which is all it is used for.
"""

from __future__ import annotations

import functools
import re

from phiaudit.instrumentation._attributes import Action

_COMMENTS = re.compile(r"--[^\n]*|/\*.*?\*/", re.S)
_LITERALS = re.compile(r"'(?:[^']|'')*'")
_TABLES = re.compile(
    r"\b(?:from|join|into|update|table|copy)\s+((?:[`\"\[]?[\w$]+[`\"\]]?\.)*[`\"\[]?[\w$]+[`\"\]]?)",
    re.I,
)
_VERB_ACTIONS = {
    "select": Action.READ,
    "with": Action.READ,
    "insert": Action.CREATE,
    "replace": Action.CREATE,
    "upsert": Action.UPDATE,
    "merge": Action.UPDATE,
    "update": Action.UPDATE,
    "delete": Action.DELETE,
    "truncate": Action.DELETE,
}
#: span names (first word) that announce a SQL statement before its text is known
SQL_VERBS = frozenset({*(_VERB_ACTIONS), "copy"})


def _clean(statement: str) -> str:
    return _LITERALS.sub("''", _COMMENTS.sub(" ", statement))


def statement_tables(statement: str) -> list[str]:
    """Lower-cased table names (without schema) referenced by ``statement``."""
    return list(_statement_tables(statement))


# Applications send the same (parameterized) statements again and again, and a span is
# classified several times (sampler, start, end): remember the last few hundred.
@functools.lru_cache(maxsize=512)
def _statement_tables(statement: str) -> tuple[str, ...]:
    out: list[str] = []
    for match in _TABLES.finditer(_clean(statement)):
        name = match.group(1).rsplit(".", 1)[-1].strip('`"[]').lower()
        if name and name not in out and name != "select":
            out.append(name)
    return tuple(out)


@functools.lru_cache(maxsize=512)
def statement_action(statement: str) -> Action | None:
    """The audit action of a statement, by its verb (``COPY ... TO`` is an export)."""
    words = _clean(statement).split(None, 1)
    if not words:
        return None
    verb = words[0].lower()
    if verb == "copy":
        rest = words[1].lower() if len(words) > 1 else ""
        return Action.EXPORT if re.search(r"\bto\b", rest) else Action.CREATE
    return _VERB_ACTIONS.get(verb)
