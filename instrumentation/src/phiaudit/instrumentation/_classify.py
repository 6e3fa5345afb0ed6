"""Deciding which spans are PHI audit events, from the attributes OpenTelemetry already sets.

A span is classified from its standard attributes, in this order:

1. already tagged (``phi.audit.event`` true, e.g. by :func:`access`): kept as is;
2. an HTTP span (``http.request.method``) on a configured auth route: ``login``/``logout``;
3. an HTTP span under a FHIR base path: see :mod:`._fhir`;
4. an HTTP span whose ``http.route`` (or URL path) matches a :class:`RouteRule`;
5. a database client span whose ``db.collection.name`` or statement names a PHI table.

Inferred attributes never overwrite what the application set itself. Once the span has
ended, the HTTP status adds the outcome (>= 400, e.g. 401/403 on a PHI route, is a failed
access). For a PHI span, a query string in ``url.query``/``http.target``/``url.full``/
``http.url`` is moved into ``phi.query`` (which the receiver encrypts) and replaced by
``REDACTED`` in the standard attribute.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from opentelemetry.trace import SpanKind
from opentelemetry.util.types import AttributeValue

from phiaudit.instrumentation._attributes import (
    DB_COLLECTION,
    DB_QUERY_TEXT,
    DB_SQL_TABLE,
    DB_STATEMENT,
    DB_SYSTEM,
    DB_SYSTEM_NAME,
    HTTP_METHOD,
    HTTP_METHOD_OLD,
    HTTP_ROUTE,
    HTTP_STATUS,
    HTTP_STATUS_OLD,
    HTTP_TARGET,
    HTTP_URL,
    PHI_AUDIT_ACTION,
    PHI_AUDIT_EVENT,
    PHI_AUDIT_OUTCOME,
    PHI_PATIENT_ID,
    PHI_PURPOSE,
    PHI_QUERY,
    PHI_RESOURCE_ID,
    PHI_RESOURCE_TYPE,
    REDACTED,
    URL_FULL,
    URL_PATH,
    URL_QUERY,
    Action,
    Outcome,
)
from phiaudit.instrumentation._config import ClassificationConfig, RouteRule
from phiaudit.instrumentation._fhir import classify_fhir
from phiaudit.instrumentation._sql import SQL_VERBS, statement_action, statement_tables

Attrs = Mapping[str, AttributeValue]
Tags = dict[str, AttributeValue]

_PARAM = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>|\{([^{}:]+)(?::[^{}]*)?\}")
_METHOD_ACTIONS = {
    "POST": Action.CREATE,
    "PUT": Action.UPDATE,
    "PATCH": Action.UPDATE,
    "DELETE": Action.DELETE,
}


def normalize_template(template: str) -> str:
    """``/p/<int:pid>`` and ``/p/{pid:path}`` -> ``/p/{pid}``; trailing slash dropped."""
    if "<" not in template and "{" not in template:  # a plain path: nothing to rewrite
        return template.rstrip("/") or "/"
    out = _PARAM.sub(lambda m: "{" + (m.group(1) or m.group(2)) + "}", template)
    return out.rstrip("/") or "/"


#: route templates are few (paths are not: those are never cached)
_normalized_route = functools.lru_cache(maxsize=1024)(normalize_template)


@dataclass(frozen=True)
class _CompiledRoute:
    rule: RouteRule
    normalized: str
    pattern: re.Pattern[str]
    has_params: bool


def _compile(rule: RouteRule) -> _CompiledRoute:
    normalized = normalize_template(rule.template)
    parts = re.split(r"(\{[^{}]+\})", normalized)
    regex = "".join(
        f"(?P<{p[1:-1]}>[^/]+)" if p.startswith("{") and p[1:-1].isidentifier() else re.escape(p)
        for p in parts
    )
    return _CompiledRoute(rule, normalized, re.compile(regex + "/?"), "{" in normalized)


def plain(attrs: Attrs | None) -> Attrs:
    """``attrs`` as a plain ``dict`` when it is the SDK's ``BoundedAttributes`` (its
    ``get`` goes through ``Mapping.get``, which raises and catches ``KeyError`` for every
    missing key, and the classifier looks up many keys a span does not have). Read only."""
    if attrs is None:
        return {}
    inner = getattr(attrs, "_dict", None)
    return inner if type(inner) is dict else attrs


def span_attributes(span: object) -> Attrs:
    """A span's attributes, read only, without the ``MappingProxyType`` around the SDK's
    ``BoundedAttributes`` that ``ReadableSpan.attributes`` builds on every access."""
    inner = getattr(getattr(span, "_attributes", None), "_dict", None)
    if type(inner) is dict:
        return inner
    attrs: Attrs | None = getattr(span, "attributes", None)
    return plain(attrs)


def _str(attrs: Attrs, *keys: str) -> str | None:
    get = attrs.get
    for key in keys:
        value = get(key)
        if value and isinstance(value, str):
            return value
    return None


def _int(attrs: Attrs, *keys: str) -> int | None:
    for key in keys:
        value = attrs.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.isdigit():
            return int(value)
    return None


def http_path_query(attrs: Attrs) -> tuple[str | None, str | None]:
    """The request path and query string, from whichever HTTP semconv generation is set."""
    path = _str(attrs, URL_PATH)
    query = _str(attrs, URL_QUERY)
    target = _str(attrs, HTTP_TARGET)
    if target is not None:
        t_path, _, t_query = target.partition("?")
        path = path or t_path
        query = query or t_query or None
    full = _str(attrs, URL_FULL, HTTP_URL)
    if full is not None and (path is None or query is None):
        parts = urlsplit(full)
        path = path or parts.path
        query = query or parts.query or None
    return path, query


class Classifier:
    """Turns span attributes into ``phi.*`` tags, per a :class:`ClassificationConfig`."""

    def __init__(self, config: ClassificationConfig | None = None) -> None:
        self.config = config or ClassificationConfig()
        self._routes = [_compile(r) for r in self.config.routes]
        self._auth = {normalize_template(k): v for k, v in self.config.auth_routes.items()}
        self._tables = {k.lower(): v for k, v in self.config.phi_tables.items()}
        self._fhir_bases = tuple(b.rstrip("/") for b in self.config.fhir_base_paths)

    # -- the decision -----------------------------------------------------------------
    def classify(
        self, name: str, kind: SpanKind | None, attrs: Attrs | None, *, ended: bool = False
    ) -> Tags | None:
        """Tags to add to a span (missing keys only), or None when it is not PHI."""
        if not attrs:  # e.g. a database span at start: no statement, no table yet
            return None
        if attrs.get(PHI_AUDIT_EVENT) is True:
            tags: Tags | None = {}
        elif (method := _str(attrs, HTTP_METHOD, HTTP_METHOD_OLD)) is not None:
            tags = self._http(attrs, method)
        elif self._tables and (
            _str(attrs, DB_SYSTEM_NAME, DB_SYSTEM) is not None or self.is_db_candidate(name, kind)
        ):
            tags = self._db(name, attrs)
        else:
            tags = None
        if tags is None:
            return None
        if ended and PHI_AUDIT_OUTCOME not in attrs:
            status = _int(attrs, HTTP_STATUS, HTTP_STATUS_OLD)
            if status is not None:
                failed = status >= 400
                tags[PHI_AUDIT_OUTCOME] = (Outcome.FAILURE if failed else Outcome.SUCCESS).value
        return {k: v for k, v in tags.items() if k not in attrs or k == PHI_AUDIT_EVENT}

    def is_db_candidate(self, name: str, kind: SpanKind | None) -> bool:
        """A client span named like a SQL verb: it may touch a PHI table once its statement
        is set (database instrumentations set it after the span starts)."""
        if not self._tables or kind is not SpanKind.CLIENT:
            return False
        first = name.split(None, 1)[0].lower() if name.strip() else ""
        return first in SQL_VERBS

    # -- HTTP ----------------------------------------------------------------------------
    def _http(self, attrs: Attrs, method: str) -> Tags | None:
        method = method.upper()
        route = _str(attrs, HTTP_ROUTE)
        path, query = http_path_query(attrs)
        norm_route = _normalized_route(route) if route else None
        norm_path = normalize_template(path) if path else None
        for key in (norm_route, norm_path):
            if key is not None and key in self._auth:
                return {PHI_AUDIT_EVENT: True, PHI_AUDIT_ACTION: self._auth[key].value}
        if path is not None:
            for base in self._fhir_bases:
                if path == base or path.startswith(base + "/"):
                    tags = classify_fhir(
                        method, path[len(base) :], query, self.config.fhir_non_phi_types
                    )
                    if tags is not None:
                        return tags
        for compiled in self._routes:
            params: dict[str, str] | None = None
            if norm_route is not None and norm_route == compiled.normalized:
                m = compiled.pattern.fullmatch(path or "")
                params = m.groupdict() if m else {}
            elif path is not None:
                m = compiled.pattern.fullmatch(path)
                params = m.groupdict() if m else None
            if params is None:
                continue
            return self._route_tags(compiled, method, params, query)
        return None

    @staticmethod
    def _route_tags(
        compiled: _CompiledRoute, method: str, params: dict[str, str], query: str | None
    ) -> Tags | None:
        rule = compiled.rule
        action = rule.actions.get(method)
        if action is None:
            if method in ("GET", "HEAD"):
                action = Action.READ if compiled.has_params else Action.SEARCH
            else:
                action = _METHOD_ACTIONS.get(method)
        if action is None:
            return None
        tags: Tags = {
            PHI_AUDIT_EVENT: True,
            PHI_AUDIT_ACTION: action.value,
            PHI_RESOURCE_TYPE: rule.resource_type,
        }
        if rule.patient_param and params.get(rule.patient_param):
            tags[PHI_PATIENT_ID] = params[rule.patient_param]
        if rule.id_param and params.get(rule.id_param):
            tags[PHI_RESOURCE_ID] = params[rule.id_param]
        if rule.purpose:
            tags[PHI_PURPOSE] = rule.purpose
        if query:
            tags[PHI_QUERY] = query
        return tags

    # -- databases -----------------------------------------------------------------------
    def _db(self, name: str, attrs: Attrs) -> Tags | None:
        statement = _str(attrs, DB_QUERY_TEXT, DB_STATEMENT) or ""
        declared = (_str(attrs, DB_COLLECTION), _str(attrs, DB_SQL_TABLE))
        tables = [t.rsplit(".", 1)[-1].lower() for t in declared if t]
        if statement:
            tables.extend(statement_tables(statement))
        phi = [t for t in tables if t in self._tables]
        if not phi:
            return None
        action = statement_action(statement) if statement else None
        if action is None:
            action = statement_action(name) or Action.READ
        tags: Tags = {
            PHI_AUDIT_EVENT: True,
            PHI_AUDIT_ACTION: action.value,
            PHI_RESOURCE_TYPE: self._tables[phi[0]],
        }
        if statement:
            tags[PHI_QUERY] = statement
        return tags


def query_redactions(attrs: Attrs) -> Tags:
    """Replacement values for standard attributes that carry a query string in clear."""
    out: Tags = {}
    if _str(attrs, URL_QUERY):
        out[URL_QUERY] = REDACTED
    target = _str(attrs, HTTP_TARGET)
    if target and "?" in target and not target.endswith("?" + REDACTED):
        out[HTTP_TARGET] = target.split("?", 1)[0] + "?" + REDACTED
    for key in (URL_FULL, HTTP_URL):
        full = _str(attrs, key)
        if full:
            parts = urlsplit(full)
            if parts.query and parts.query != REDACTED:
                out[key] = urlunsplit(parts._replace(query=REDACTED))
    return out
