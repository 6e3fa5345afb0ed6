"""Infrastructure records -> ``InfraEvent``: pgAudit lines, CloudTrail records, VPC flow logs
(version 2) and database client spans, as an OpenTelemetry Collector sends them.

A log record is an infrastructure record when its attribute (record or resource)
``phi.infra.kind`` says so (``pgaudit``, ``cloudtrail``, ``vpcflow``), or, without it, when its
body is recognised. Each record becomes one normalized event (a CloudTrail ``{"Records": [...]}``
file, or a body of several flow lines, one per record inside). A record that cannot be parsed
is kept whole (``parse_status='unparsed'``, the raw record encrypted) and counted: never
dropped.

``phi_touch`` comes from the configured PHI catalog (``infra.phi_catalog``: tables and
schemas, buckets and prefixes, database endpoints). Records that touch no PHI are rolled up
per minute (``infra_rollups``) unless ``rollup: false``; ``sample_rate`` of them (chosen by
event id, so deterministically) are kept whole as well. PHI-touching and unparsed records are
always kept whole, and so are sign-ins and refused cloud API calls (``always_whole``): the
failed-authentication rules count them one by one in ``infra_events``.

Nothing here ever puts a field value in an exception message or a log line.
"""

from __future__ import annotations

import csv
import fnmatch
import functools
import hashlib
import io
import ipaddress
import json
import re
import socket
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from phiaudit.storage import ConfigError, InfraEvent

__all__ = [
    "KINDS",
    "InfraConfig",
    "PhiCatalog",
    "RollupResult",
    "always_whole",
    "db_span_event",
    "parse_cloudtrail",
    "parse_pgaudit",
    "parse_record",
    "parse_vpcflow",
    "roll_up",
    "sniff_kind",
    "sql_tables",
    "sql_verb",
]

#: the values of ``phi.infra.kind`` (and of ``source_kind`` besides ``db_span``/``unknown``)
KINDS = ("pgaudit", "cloudtrail", "vpcflow")

MIN_TIME_US = 946_684_800_000_000  # 2000-01-01T00:00:00Z
FUTURE_SLACK_US = 24 * 3600 * 1_000_000
_MINUTE_US = 60_000_000
_MAX_U64 = (1 << 64) - 1


# -- configuration ------------------------------------------------------------------------

@dataclass(frozen=True)
class _Endpoint:
    entry: str
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None
    host: str            # lower-case host name when not an address
    port: int | None     # None: any port


@dataclass(frozen=True)
class PhiCatalog:
    """What holds PHI. Every ``match_*`` returns the catalog entry that matched, or ''."""

    tables: tuple[str, ...] = ()
    buckets: tuple[str, ...] = ()
    endpoints: tuple[str, ...] = ()
    _endpoints: tuple[_Endpoint, ...] = field(default=(), repr=False, compare=False)
    #: matches already made (addresses and tables repeat): bounded, cleared when full
    _cache: dict[tuple[Any, ...], str] = field(default_factory=dict, repr=False, compare=False)

    @staticmethod
    def _norm_table(name: str) -> tuple[str, str]:
        """(schema, table) lower-case without quotes; schema '' when not qualified. A
        database-qualified name (db.schema.table) keeps its last two parts."""
        parts = [p.strip().strip('"').lower() for p in name.strip().split(".") if p.strip()]
        if not parts:
            return "", ""
        if len(parts) == 1:
            return "", parts[0]
        return parts[-2], parts[-1]

    def match_table(self, name: str) -> str:
        return _cached(self._cache, ("t", name), self._match_table, name)

    def _match_table(self, name: str) -> str:
        schema, table = self._norm_table(name)
        if not table:
            return ""
        for entry in self.tables:
            e_schema, e_table = self._norm_table(entry)
            if not fnmatch.fnmatchcase(table, e_table):
                continue
            # bare entry: any schema. An unqualified object's schema is unknown (search_path):
            # it matches a qualified entry that names its table (PHI errs on the safe side),
            # but not a whole-schema entry (``clinical.*``), which would match every table.
            if not e_schema or (schema and fnmatch.fnmatchcase(schema, e_schema)) or \
                    (not schema and e_table != "*"):
                return entry
        return ""

    def match_bucket(self, bucket: str, key: str = "", *, listing: bool = False) -> str:
        """``bucket`` entries match the whole bucket; ``bucket/prefix`` entries the keys under
        the prefix, and a listing whose prefix could reveal such keys."""
        if not bucket or not self.buckets:
            return ""
        for entry in self.buckets:
            e_bucket, _, e_prefix = entry.partition("/")
            if not fnmatch.fnmatchcase(bucket, e_bucket):
                continue
            if not e_prefix or key.startswith(e_prefix) or (listing and e_prefix.startswith(key)):
                return entry
        return ""

    def match_endpoint(self, host: str, port: int | None) -> str:
        if not host or not self._endpoints:
            return ""
        return _cached(self._cache, ("e", host, port), self._match_endpoint, host, port)

    def _match_endpoint(self, host: str, port: int | None) -> str:
        h = host.strip().strip("[]").lower()
        try:
            addr: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(h)
        except ValueError:
            addr = None
        for ep in self._endpoints:
            if ep.port is not None and ep.port != port:
                continue
            if ep.network is not None:
                if addr is not None and addr.version == ep.network.version and \
                        addr in ep.network:
                    return ep.entry
            elif ep.host == h:
                return ep.entry
        return ""

    @property
    def empty(self) -> bool:
        return not (self.tables or self.buckets or self.endpoints)


_CACHE_MAX = 100_000


def _cached(cache: dict[tuple[Any, ...], str], key: tuple[Any, ...], fn: Any, *args: Any
            ) -> str:
    hit = cache.get(key)
    if hit is None:
        hit = fn(*args)
        if len(cache) >= _CACHE_MAX:
            cache.clear()
        cache[key] = hit
    return hit


def _is_ip(text: str) -> bool:
    """A valid IPv4 or IPv6 address (C speed: flow logs have two per line)."""
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in text else socket.AF_INET, text)
        return True
    except OSError:
        return False


def _parse_endpoint(entry: str) -> _Endpoint:
    """``CIDR|address|host[:port]``, IPv6 in brackets when a port follows; raises ValueError."""
    text = entry.strip()
    port: int | None = None
    host = text
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise ValueError("unclosed [")
        host, rest = text[1:close], text[close + 1:]
        if rest:
            if not rest.startswith(":"):
                raise ValueError("expected :PORT after ]")
            port = _port(rest[1:])
    elif text.count(":") == 1:
        host, p = text.split(":")
        port = _port(p)
    if not host:
        raise ValueError("no host")
    try:
        net = ipaddress.ip_network(host, strict=False)
        return _Endpoint(entry, net, "", port)
    except ValueError:
        pass
    if "/" in host or ":" in host:
        raise ValueError("not an address, network or host name")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", host):
        raise ValueError("not a host name")
    return _Endpoint(entry, None, host.lower(), port)


def _port(text: str) -> int | None:
    if text == "*":
        return None
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError("the port must be 1 to 65535 or *")
    return int(text)


@dataclass(frozen=True)
class InfraConfig:
    """The service config's ``infra:`` section."""

    catalog: PhiCatalog = field(default_factory=PhiCatalog)
    enabled: bool = True
    rollup: bool = True
    sample_rate: float = 0.0

    @classmethod
    def from_mapping(cls, mapping: Any) -> InfraConfig:
        """Validate ``infra:``; a ConfigError lists every problem with its key path."""
        if mapping is None:
            mapping = {}
        if not isinstance(mapping, Mapping):
            raise ConfigError("infra: must be a mapping")
        errors: list[str] = []
        known = {"phi_catalog", "rollup", "sample_rate", "enabled"}
        errors += [f"infra.{k}: unknown key" for k in sorted(map(str, mapping)) if k not in known]
        enabled = mapping.get("enabled", True)
        if not isinstance(enabled, bool):
            errors.append("infra.enabled: true or false")
            enabled = True
        rollup = mapping.get("rollup", True)
        if not isinstance(rollup, bool):
            errors.append("infra.rollup: true or false")
            rollup = True
        rate = mapping.get("sample_rate", 0.0)
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 <= rate <= 1:
            errors.append("infra.sample_rate: a number from 0 to 1")
            rate = 0.0
        lists: dict[str, tuple[str, ...]] = {"tables": (), "buckets": (), "endpoints": ()}
        endpoints: list[_Endpoint] = []
        cat = mapping.get("phi_catalog", {})
        if cat is None:
            cat = {}
        if not isinstance(cat, Mapping):
            errors.append("infra.phi_catalog: must be a mapping (tables, buckets, endpoints)")
            cat = {}
        errors += [f"infra.phi_catalog.{k}: unknown key (tables, buckets, endpoints)"
                   for k in sorted(map(str, cat)) if k not in lists]
        for key in lists:
            value = cat.get(key, [])
            if value is None:
                value = []
            path = f"infra.phi_catalog.{key}"
            if not isinstance(value, list):
                errors.append(f"{path}: must be a list of strings")
                continue
            good: list[str] = []
            for i, item in enumerate(value):
                if not isinstance(item, str) or not item.strip():
                    errors.append(f"{path}[{i}]: must be a non-empty string")
                    continue
                item = item.strip()
                if key == "tables":
                    if item.count(".") > 1 or item.startswith(".") or item.endswith("."):
                        errors.append(f"{path}[{i}]: expected TABLE or SCHEMA.TABLE (globs "
                                      "allowed)")
                        continue
                elif key == "buckets":
                    if item.startswith("/") or " " in item:
                        errors.append(f"{path}[{i}]: expected BUCKET or BUCKET/PREFIX")
                        continue
                else:
                    try:
                        endpoints.append(_parse_endpoint(item))
                    except ValueError as exc:
                        errors.append(f"{path}[{i}]: expected CIDR, address or host, with "
                                      f"optional :PORT ({exc})")
                        continue
                good.append(item)
            lists[key] = tuple(good)
        if errors:
            raise ConfigError(errors)
        catalog = PhiCatalog(lists["tables"], lists["buckets"], lists["endpoints"],
                             tuple(endpoints))
        return cls(catalog, enabled, rollup, float(rate))

    def sampled(self, event_id: uuid.UUID) -> bool:
        """Deterministic: the same record is sampled (or not) wherever it is processed."""
        if self.sample_rate <= 0:
            return False
        if self.sample_rate >= 1:
            return True
        # the first 48 bits: uniform in our ids (SHA-256) and in random or name-based UUIDs
        return int.from_bytes(event_id.bytes[:6], "big") < self.sample_rate * 2**48


# -- SQL helpers ----------------------------------------------------------------------------

_TRACEPARENT = re.compile(
    r"traceparent\s*=\s*'?(?:%27)?([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})",
    re.IGNORECASE)
_COMMENTS = re.compile(r"/\*.*?\*/|--[^\n]*", re.DOTALL)
_STRINGS = re.compile(r"'(?:[^']|'')*'")
_IDENT = r'(?:"(?:[^"]|"")+"|[A-Za-z_][\w$]*)'
_TABLE_REF = re.compile(
    r"\b(?:FROM|JOIN|INTO|UPDATE|TABLE|TRUNCATE|COPY|ONLY)\s+(" + _IDENT + r"(?:\s*\.\s*"
    + _IDENT + r"){0,2})", re.IGNORECASE)
_NOT_TABLES = frozenset({"select", "only", "lateral", "unnest", "table", "values", "the",
                         "generate_series", "if", "not", "exists"})
_CTE = re.compile(r"(?:\bWITH(?:\s+RECURSIVE)?|,)\s*(" + _IDENT + r")\s+AS\s*(?:NOT\s+)?"
                  r"(?:MATERIALIZED\s*)?\(", re.IGNORECASE)
_VERBS = ("SELECT", "INSERT", "UPDATE", "DELETE", "MERGE")


def traceparent_ids(text: str) -> tuple[str, str]:
    """(trace id, span id) of a sqlcommenter ``traceparent`` in a statement, or ('', '')."""
    if not text or "traceparent" not in text:
        return "", ""
    m = _TRACEPARENT.search(text)
    if m is None or m.group(2) == "0" * 32:
        return "", ""
    return m.group(2).lower(), m.group(3).lower()


def _strip_sql(text: str) -> str:
    return _STRINGS.sub("''", _COMMENTS.sub(" ", text))


def sql_tables(statement: str) -> list[str]:
    """The table names a statement refers to (FROM/JOIN/INTO/UPDATE/...), in order, once."""
    return list(_sql_shape(statement)[0])


def sql_verb(statement: str) -> str:
    """The statement's verb (SELECT, INSERT, ...); for WITH, the first DML verb after it."""
    return _sql_shape(statement)[1]


@functools.lru_cache(maxsize=4096)
def _sql_shape(statement: str) -> tuple[tuple[str, ...], str]:
    """(tables, verb) of a statement, parsed once: applications send the same parameterised
    statements over and over, and database spans are on the receiver's per-span path."""
    text = _strip_sql(statement)
    return _tables_of(text), _verb_of(text.strip())


def _tables_of(text: str) -> tuple[str, ...]:
    out: list[str] = []
    ctes = {c.strip('"').lower() for c in _CTE.findall(text)}
    for m in _TABLE_REF.finditer(text):
        name = re.sub(r"\s+", "", m.group(1))
        if name.lower() in _NOT_TABLES or name.strip('"').lower() in ctes:
            continue
        name = ".".join(p.strip('"') for p in name.split("."))
        if name not in out:
            out.append(name)
    return tuple(out)


def _verb_of(text: str) -> str:
    m = re.match(r"[A-Za-z]+", text)
    if m is None:
        return ""
    verb = m.group(0).upper()
    if verb == "WITH":
        depth = 0
        for tok in re.finditer(r"[()]|[A-Za-z]+", text[4:]):
            t = tok.group(0)
            if t == "(":
                depth += 1
            elif t == ")":
                depth -= 1
            elif depth == 0 and t.upper() in _VERBS:
                return t.upper()
    return verb


# -- times -----------------------------------------------------------------------------------

def pick_time(candidates: Iterable[int | None], now_us: int) -> tuple[int, bool]:
    """The first plausible time (UTC us) of ``candidates``, else ``now_us``; and whether a
    given time was absurd (before 2000 or more than a day ahead), like audit events."""
    absurd = False
    for t in candidates:
        if not t:
            continue
        if MIN_TIME_US <= t <= now_us + FUTURE_SLACK_US:
            return t, absurd
        absurd = True
    return now_us, absurd


_TZ_NAMES = {"UTC": 0, "GMT": 0, "Z": 0, "UCT": 0}


def _parse_pg_time(ts: str, tz: str) -> int | None:
    try:
        dt = datetime.fromisoformat(ts.replace(" ", "T"))
    except ValueError:
        return None
    if dt.tzinfo is None:
        tzu = tz.upper()
        if tzu in _TZ_NAMES or not tz:
            offset = 0 if tzu in _TZ_NAMES else None
        else:
            m = re.fullmatch(r"([+-])(\d{2}):?(\d{2})?", tz)
            if m is None:
                return None  # a named zone other than UTC: unknown offset
            sign = -1 if m.group(1) == "-" else 1
            offset = sign * (int(m.group(2)) * 60 + int(m.group(3) or 0))
        if offset is None:
            return None
        dt = dt.replace(tzinfo=timezone(timedelta(minutes=offset)))
    return int(dt.timestamp() * 1_000_000)


def _parse_iso(text: Any) -> int | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1_000_000)


# -- records ---------------------------------------------------------------------------------

@dataclass
class RecordContext:
    """What the log record around an infrastructure body says."""

    attrs: dict[str, Any]
    res: dict[str, Any]
    time_us: int           # the log record's own time (0 when unset)
    now_us: int
    sender: str = ""
    trace_id: str = ""     # the log record's trace id (e.g. set by a Collector parser)
    span_id: str = ""
    seed: bytes = b""      # identifies the record: event ids derive from it

    def attr(self, *names: str) -> str:
        for n in names:
            for m in (self.attrs, self.res):
                v = m.get(n)
                if v is not None and v != "":
                    return v if isinstance(v, str) else str(v)
        return ""

    @property
    def source(self) -> str:
        return self.attr("service.name", "host.name")


@dataclass
class ParseResult:
    events: list[InfraEvent] = field(default_factory=list)
    absurd_times: int = 0
    skipped: int = 0       # VPC flow header lines: not records


def _event_id(seed: bytes, index: int = 0) -> uuid.UUID:
    return uuid.UUID(bytes=hashlib.sha256(seed + b"|%d" % index).digest()[:16])


def _unparsed(kind: str, raw: str, ctx: RecordContext, index: int = 0) -> InfraEvent:
    t, _ = pick_time([ctx.time_us], ctx.now_us)
    return InfraEvent(_event_id(ctx.seed, index), t, ctx.now_us, kind, parse_status="unparsed",
                      source=ctx.source, sender=ctx.sender, trace_id=ctx.trace_id,
                      span_id=ctx.span_id, raw=raw)


def _catalog_table(catalog: PhiCatalog, names: list[str]) -> tuple[str, str]:
    """(object, matching entry): the first PHI table of ``names``, else the first name."""
    for n in names:
        entry = catalog.match_table(n)
        if entry:
            return n, entry
    return (names[0] if names else ""), ""


# pgAudit ---------------------------------------------------------------------------------

_AUDIT = re.compile(r"(?:^|\s)AUDIT: (SESSION|OBJECT),")
_PREFIX_TIME = re.compile(
    r"^\s*(\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?)"
    r"(?:\s*([A-Z]{1,5}|[+-]\d{2}(?::?\d{2})?)(?![\w@]))?")
_PREFIX_USER_AT_DB = re.compile(r"(?:^|(?<=[\s\]]))([^\s@\[\]:,=]*)@([^\s\[\]:,]*)")
_PREFIX_KV = re.compile(r"\b(user|db|client|host|remote)=([^,\s]*)")
_PREFIX_LEVEL = re.compile(r"(?:LOG|INFO|NOTICE|WARNING|DEBUG\d?):\s*$")


def parse_pgaudit(body: str, ctx: RecordContext, catalog: PhiCatalog) -> ParseResult:
    """One pgAudit line: ``[prefix]AUDIT: TYPE,stmt,substmt,CLASS,COMMAND,OBJTYPE,OBJNAME,
    STATEMENT,PARAMETER[,ROWS]`` (CSV quoting); the prefix (log_line_prefix) or the record's
    attributes give time, user, database and client."""
    out = ParseResult()
    m = _AUDIT.search(body)
    if m is None:
        out.events.append(_unparsed("pgaudit", body, ctx))
        return out
    prefix, audit = body[:m.start(1) - len("AUDIT: ")], body[m.start(1):]
    try:
        fields = next(csv.reader(io.StringIO(audit, newline=""), strict=True))
    except (csv.Error, StopIteration):
        fields = []
    if len(fields) < 8 or not fields[1].isdigit():
        out.events.append(_unparsed("pgaudit", body, ctx))
        return out
    _type, _stmt_id, _sub_id, _cls, command, obj_type, obj_name, statement = fields[:8]
    rest = fields[8:]
    rows = 0
    for extra in rest[1:]:  # pgaudit.log_rows adds a row count after the parameters
        if extra.isdigit():
            rows = min(int(extra), _MAX_U64)
    if statement in ("<not logged>", "<previously logged>", "<none>"):
        statement = ""
    # the prefix: time, user@db or user=,db=, client
    user = ctx.attr("db.user", "user.name", "db_user", "postgresql.user", "user")
    db = ctx.attr("db.namespace", "db.name", "db_name", "postgresql.database")
    client = ctx.attr("client.address", "network.peer.address", "client_addr")
    t_prefix: int | None = None
    tm = _PREFIX_TIME.match(prefix)
    if tm is not None:
        t_prefix = _parse_pg_time(tm.group(1), tm.group(2) or "")
    head = _PREFIX_LEVEL.sub("", prefix).rstrip()
    found = _PREFIX_USER_AT_DB.findall(head) if "@" in head else []
    if found:
        user, db = found[-1][0] or user, found[-1][1] or db
    for k, v in _PREFIX_KV.findall(prefix):
        if k == "user" and v:
            user = v
        elif k == "db" and v:
            db = v
        elif k in ("client", "host", "remote") and v:
            client = v.split("(")[0]
    if client in ("[local]", "[unknown]"):
        client = ""
    t, absurd = pick_time([t_prefix, ctx.time_us], ctx.now_us)
    out.absurd_times += absurd
    trace_id, span_id = traceparent_ids(statement)
    if not trace_id:
        trace_id, span_id = ctx.trace_id, ctx.span_id
    names = [obj_name] if obj_name else sql_tables(statement)
    obj, entry = _catalog_table(catalog, names)
    out.events.append(InfraEvent(
        _event_id(ctx.seed), t, ctx.now_us, "pgaudit", source=ctx.source or db,
        actor_id=user, client_address=client, operation=command or sql_verb(statement),
        object_type="table" if obj else "", object=obj, phi_touch=bool(entry),
        phi_object=entry, outcome="unknown", record_count=rows, trace_id=trace_id,
        span_id=span_id, sender=ctx.sender, raw=body))
    _ = obj_type  # TABLE, VIEW, FUNCTION...: the object is matched by name whatever its type
    return out


# CloudTrail --------------------------------------------------------------------------------

_S3_LIST = frozenset({"ListObjects", "ListObjectsV2", "ListObjectVersions",
                      "ListMultipartUploads", "ListBucket"})


def _cloudtrail_one(rec: Any, raw: str, ctx: RecordContext, catalog: PhiCatalog,
                    index: int, out: ParseResult) -> None:
    if not isinstance(rec, dict) or not isinstance(rec.get("eventName"), str) or \
            not isinstance(rec.get("eventSource"), str):
        out.events.append(_unparsed("cloudtrail", raw, ctx, index))
        return
    name, source = rec["eventName"], rec["eventSource"]
    ident = _dict(rec.get("userIdentity"))
    actor = _str(ident.get("arn")) or _str(ident.get("userName")) or \
        _str(ident.get("principalId")) or \
        _str(_dict(rec.get("additionalEventData")).get("UserName"))  # some failed sign-ins
    req = _dict(rec.get("requestParameters"))
    resp = _dict(rec.get("responseElements"))
    outcome = "success"
    if rec.get("errorCode"):
        outcome = "failure"
    if name == "ConsoleLogin":
        result = str(resp.get("ConsoleLogin", "")).lower()
        outcome = "failure" if result == "failure" or rec.get("errorMessage") else (
            "success" if result == "success" else outcome)
    obj, obj_type, entry, count = "", "", "", 0
    if source == "s3.amazonaws.com":
        bucket = _str(req.get("bucketName"))
        key = _str(req.get("key"))
        listing = name in _S3_LIST
        if listing and not key:
            key = _str(req.get("prefix"))
        if not bucket:
            resources = rec.get("resources")
            for r in resources if isinstance(resources, list) else []:
                arn = _str(_dict(r).get("ARN"))
                if arn.startswith("arn:aws:s3:::"):
                    bucket, _, key = arn[len("arn:aws:s3:::"):].partition("/")
                    break
        if bucket:
            obj, obj_type = f"{bucket}/{key}", "object"
            entry = catalog.match_bucket(bucket, key, listing=listing)
            count = 1
    elif name == "ConsoleLogin" or source == "signin.amazonaws.com":
        obj, obj_type = source, "login"
    else:
        obj, obj_type = source, "endpoint"
    client = _str(rec.get("sourceIPAddress"))
    t, absurd = pick_time([_parse_iso(rec.get("eventTime")), ctx.time_us], ctx.now_us)
    out.absurd_times += absurd
    ev_id = rec.get("eventID")
    eid = (_event_id(b"cloudtrail|" + ev_id.encode()) if isinstance(ev_id, str) and ev_id
           else _event_id(ctx.seed, index))
    out.events.append(InfraEvent(
        eid, t, ctx.now_us, "cloudtrail", source=ctx.source or source, actor_id=actor,
        client_address=client, operation=name, object_type=obj_type, object=obj,
        phi_touch=bool(entry), phi_object=entry, outcome=outcome, record_count=count,
        trace_id=ctx.trace_id, span_id=ctx.span_id, sender=ctx.sender, raw=raw))


def parse_cloudtrail(body: Any, ctx: RecordContext, catalog: PhiCatalog) -> ParseResult:
    """One CloudTrail record (JSON text or a map body), or a ``{"Records": [...]}`` file."""
    out = ParseResult()
    raw = body if isinstance(body, str) else _dumps(body)
    doc = body
    if isinstance(body, str):
        try:
            doc = json.loads(body)
        except ValueError:
            out.events.append(_unparsed("cloudtrail", raw, ctx))
            return out
    if isinstance(doc, dict) and isinstance(doc.get("Records"), list):
        for i, rec in enumerate(doc["Records"]):
            _cloudtrail_one(rec, _dumps(rec), ctx, catalog, i, out)
        return out
    _cloudtrail_one(doc, raw, ctx, catalog, 0, out)
    return out


def _dict(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _str(v: Any) -> str:
    return v if isinstance(v, str) else ""


def _dumps(v: Any) -> str:
    return json.dumps(v, separators=(",", ":"), ensure_ascii=False, default=str)


# VPC flow logs (version 2) ---------------------------------------------------------------

_EPHEMERAL = 32768  # the usual start of ephemeral (client) ports
_FLOW_HEADER = "version account-id interface-id srcaddr dstaddr srcport dstport protocol " \
               "packets bytes start end action log-status"


def _flow_one(line: str, ctx: RecordContext, catalog: PhiCatalog, index: int,
              out: ParseResult) -> None:
    f = line.split()
    if len(f) != 14 or f[0] != "2" or f[13] not in ("OK", "NODATA", "SKIPDATA") or \
            not f[10].isdigit() or not f[11].isdigit():
        out.events.append(_unparsed("vpcflow", line, ctx, index))
        return
    (_v, account, eni, src, dst, sport, dport, _proto, packets, _bytes, start, _end, action,
     status) = f
    t, absurd = pick_time([int(start) * 1_000_000, ctx.time_us], ctx.now_us)
    out.absurd_times += absurd
    eid = _event_id(ctx.seed, index)
    source = ctx.source or eni
    if status != "OK":  # NODATA / SKIPDATA: no addresses, nothing touched
        out.events.append(InfraEvent(
            eid, t, ctx.now_us, "vpcflow", source=source, operation=status, outcome="unknown",
            sender=ctx.sender, trace_id=ctx.trace_id, span_id=ctx.span_id, raw=line))
        return
    try:
        if not (_is_ip(src) and _is_ip(dst)):
            raise ValueError
        sp, dp = int(sport), int(dport)
        n_packets = min(int(packets), _MAX_U64)
    except ValueError:
        out.events.append(_unparsed("vpcflow", line, ctx, index))
        return
    # the object is the server's end: the destination, unless the source is a PHI endpoint
    # or the flow is a reply (from a service port to an ephemeral one)
    obj, client, entry = f"{dst}:{dp}", src, catalog.match_endpoint(dst, dp)
    if not entry:
        src_entry = catalog.match_endpoint(src, sp)
        if src_entry or (dp >= _EPHEMERAL > sp):
            obj, client, entry = f"{src}:{sp}", dst, src_entry
    out.events.append(InfraEvent(
        eid, t, ctx.now_us, "vpcflow", client_address=client, operation=action,
        object_type="endpoint", object=obj, phi_touch=bool(entry), phi_object=entry,
        outcome={"ACCEPT": "success", "REJECT": "failure"}.get(action, "unknown"),
        record_count=n_packets, source=source, sender=ctx.sender, trace_id=ctx.trace_id,
        span_id=ctx.span_id, raw=line))
    _ = account


def parse_vpcflow(body: str, ctx: RecordContext, catalog: PhiCatalog) -> ParseResult:
    """VPC flow log version 2 lines (one or several in a body); the header line is skipped."""
    out = ParseResult()
    lines = [ln for ln in body.splitlines() if ln.strip()] or [body]
    for i, line in enumerate(lines):
        if " ".join(line.split()) == _FLOW_HEADER:
            out.skipped += 1
            continue
        _flow_one(line.strip(), ctx, catalog, i, out)
    return out


# dispatch ----------------------------------------------------------------------------------

def sniff_kind(body: Any) -> str:
    """The kind of an unlabelled body, or '' when it is not an infrastructure record. Cheap:
    it runs on every log record that is not an audit event."""
    if isinstance(body, dict):
        if "Records" in body or ("eventVersion" in body and "eventSource" in body):
            return "cloudtrail"
        return ""
    if not isinstance(body, str) or not body:
        return ""
    if "AUDIT: " in body and _AUDIT.search(body):
        return "pgaudit"
    head = body.lstrip()[:1]
    if head == "{":
        if ('"eventVersion"' in body and '"eventSource"' in body) or '"Records"' in body:
            return "cloudtrail"
        return ""
    if head == "2" or head == "v":
        first = body.strip().splitlines()[0].split()
        if len(first) == 14 and (first[0] == "2" or " ".join(first) == _FLOW_HEADER):
            return "vpcflow"
    return ""


def parse_record(kind: str, body: Any, ctx: RecordContext, catalog: PhiCatalog) -> ParseResult:
    """Parse one log record body of a known (or labelled) kind. Never raises on bad input."""
    if kind == "cloudtrail":
        return parse_cloudtrail(body, ctx, catalog)
    if not isinstance(body, str):
        raw = "" if body is None else _dumps(body)
        k = kind if kind in KINDS else "unknown"
        return ParseResult([_unparsed(k, raw, ctx)])
    if kind == "pgaudit":
        return parse_pgaudit(body, ctx, catalog)
    if kind == "vpcflow":
        return parse_vpcflow(body, ctx, catalog)
    return ParseResult([_unparsed("unknown", body, ctx)])


# database client spans -------------------------------------------------------------------

def db_span_event(attrs: dict[str, Any], *, name: str, kind: str, status_code: int,
                  start_ns: int, end_ns: int, trace_id: str, span_id: str, service: str,
                  sender: str, now_us: int, config: InfraConfig) -> tuple[InfraEvent, bool]:
    """The infra event of a database client span; and whether its time was absurd.

    Its raw record (the span as JSON) is built only when the event will be kept whole: a
    span that touches no PHI is usually rolled up, and this runs for every database span."""
    catalog = config.catalog
    def s(*keys: str) -> str:
        for k in keys:
            v = attrs.get(k)
            if v is not None and v != "":
                return v if isinstance(v, str) else str(v)
        return ""

    statement = s("db.query.text", "db.statement")
    collection = s("db.collection.name", "db.sql.table", "db.mongodb.collection")
    names = [collection] if collection else sql_tables(statement)
    obj, entry = _catalog_table(catalog, names)
    obj_type = "table" if obj else ""
    host = s("server.address", "net.peer.name", "network.peer.address", "net.peer.ip")
    port_text = s("server.port", "net.peer.port", "network.peer.port")
    port = int(port_text) if port_text.isdigit() else None
    ep_entry = catalog.match_endpoint(host, port)
    if not obj and host:
        obj, obj_type = (f"{host}:{port}" if port is not None else host), "endpoint"
    entry = entry or ep_entry
    operation = s("db.operation.name", "db.operation").upper() or sql_verb(statement)
    rows_text = s("db.response.returned_rows")
    rows = min(int(rows_text), _MAX_U64) if rows_text.isdigit() else 0
    t, absurd = pick_time([start_ns // 1000], now_us)
    eid = uuid.UUID(bytes=hashlib.sha256(
        b"db_span|" + trace_id.encode() + b"|" + span_id.encode()).digest()[:16])
    whole = bool(entry) or not config.rollup or config.sampled(eid)
    raw = _dumps({"span.name": name, "span.kind": kind, "status": status_code,
                  "start_time_unix_nano": start_ns, "end_time_unix_nano": end_ns,
                  "service.name": service, "attributes": attrs}) if whole else ""
    ev = InfraEvent(
        eid, t, now_us, "db_span", source=service, actor_id=s("db.user") or service,
        operation=operation, object_type=obj_type, object=obj, phi_touch=bool(entry),
        phi_object=entry, outcome="failure" if status_code == 2 else "success",
        record_count=rows, trace_id=trace_id, span_id=span_id, sender=sender, raw=raw)
    return ev, absurd


# noise control -----------------------------------------------------------------------------

@dataclass
class RollupResult:
    whole: list[InfraEvent]          # to infra_events
    rollups: list[list[Any]]         # infra_rollups rows, in ROLLUP_COLUMNS order
    rolled_up: int = 0               # records counted in rollups
    sampled: int = 0                 # of them, kept whole as well


def always_whole(ev: InfraEvent) -> bool:
    """Records never rolled up: PHI-touching, unparsed, and the security records the rules
    count one by one: sign-ins (any outcome) and refused cloud API calls."""
    return (ev.phi_touch or ev.parse_status != "ok" or ev.object_type == "login"
            or (ev.source_kind == "cloudtrail" and ev.outcome == "failure"))


def roll_up(events: list[InfraEvent], config: InfraConfig) -> RollupResult:
    """PHI-touching, unparsed and authentication records: whole. The others: per-minute
    rollup rows (and a deterministic sample kept whole), or whole when ``rollup`` is off."""
    if not config.rollup:
        return RollupResult(list(events), [])
    whole: list[InfraEvent] = []
    groups: dict[tuple[int, str, str, str, str, str], list[int]] = {}
    sampled = rolled = 0
    for ev in events:
        if always_whole(ev):
            whole.append(ev)
            continue
        keep = config.sampled(ev.event_id)
        if keep:
            whole.append(ev)
            sampled += 1
        rolled += 1
        minute = ev.event_time_us - ev.event_time_us % _MINUTE_US
        key = (minute, ev.source_kind, ev.actor_id, ev.object, ev.operation, ev.outcome)
        g = groups.get(key)
        if g is None:
            g = groups[key] = [0, 0, 0]
        g[0] += 1
        g[1] += keep
        g[2] += len(ev.raw.encode())
    rows = [[k[0], k[1], k[2], k[3], k[4], k[5], g[0], g[1], g[2]] for k, g in groups.items()]
    return RollupResult(whole, rows, rolled, sampled)
