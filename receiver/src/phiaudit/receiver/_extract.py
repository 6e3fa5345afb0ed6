"""OTLP -> audit events and stripped traces.

A span, a span event named ``phi.access``, or a log record whose ``phi.audit.event`` is true
is an audit event (CONTRACT.md section 1). It becomes one ``AuditEvent`` per patient touched.
Everything of an audit span that the contract does not map (other attributes, the span name,
a log body) is kept in ``extra``, which is stored encrypted: nothing is lost.

A log record that is not an audit event but an infrastructure record (``phi.infra.kind``, or
a recognised pgAudit / CloudTrail / VPC flow body) becomes ``InfraEvent``s (see ``_infra``);
a database client span (``db.system.name`` or ``db.system``) yields one as well, besides its
trace row. Other log records are ignored.

Any other span goes to ``otel_traces`` in the Collector ClickHouse exporter's schema, without
its ``phi.*`` attributes, without ``phi.access`` events and without the configured sensitive
attributes.

The walk is table-driven and reads each attribute once: the first question for every span is
whether it is an audit span at all.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import re
import time
import uuid
from collections.abc import Iterable, Sequence, Set
from dataclasses import dataclass, field
from typing import Any

from phiaudit.storage import ACTIONS, AuditEvent, InfraEvent, extra_json

from ._infra import InfraConfig, RecordContext, db_span_event, parse_record, sniff_kind

__all__ = ["ExtractStats", "Extracted", "Extractor"]

_MIN_TIME_US = 946_684_800_000_000  # 2000-01-01T00:00:00Z
_FUTURE_SLACK_US = 24 * 3600 * 1_000_000
_SUCCESS = {"success", "ok", "succeeded", "allowed", "true"}
_FAILURE = {"failure", "fail", "failed", "error", "denied", "false"}
_KINDS = ["Unspecified", "Internal", "Server", "Client", "Producer", "Consumer"]
_STATUS = ["Unset", "Ok", "Error"]
_MAX_PATIENTS = 10_000  # one span may fan out to at most this many rows; the rest is counted
#: the bytes of ``extra`` JSON a span's rows may carry in all: past it, only the first row
#: carries it and the others refer to that row (``phi.extra.in_event``); else a span listing
#: many patients with a large attribute (or the overflow list) was copied into every row
_MAX_SPAN_EXTRA_BYTES = 1 << 20
_MAX_NS = (1 << 63) - 1  # DateTime64(9) is a signed 64-bit count of ns: clamp, never reject



@dataclass
class ExtractStats:
    spans: int = 0
    audit_events: int = 0
    audit_rows: int = 0
    trace_rows: int = 0
    log_records: int = 0
    logs_ignored: int = 0
    bad_attribute_types: int = 0
    absurd_timestamps: int = 0
    patients_truncated: int = 0
    extra_shared: int = 0  # spans whose extra only their first row carries (too large)
    infra_records_pgaudit: int = 0
    infra_records_cloudtrail: int = 0
    infra_records_vpcflow: int = 0
    infra_records_db_span: int = 0
    infra_records_unknown: int = 0
    infra_unparsed: int = 0
    infra_flow_headers: int = 0

    def add(self, other: ExtractStats) -> None:
        for k, v in other.__dict__.items():
            setattr(self, k, getattr(self, k) + v)


@dataclass
class Extracted:
    audit: list[AuditEvent] = field(default_factory=list)
    traces: list[list[Any]] = field(default_factory=list)
    infra: list[InfraEvent] = field(default_factory=list)
    stats: ExtractStats = field(default_factory=ExtractStats)
    #: at most this many audit rows (None: no limit); past it ``TooManyRows`` is raised
    max_rows: int | None = None


class TooManyRows(Exception):
    """The request fans out to more audit rows (one per patient) than allowed."""


def _value(av: Any) -> Any:
    kind = av.WhichOneof("value")
    if kind == "string_value":
        return av.string_value
    if kind == "bool_value":
        return av.bool_value
    if kind == "int_value":
        return av.int_value
    if kind == "double_value":
        return av.double_value
    if kind == "array_value":
        return [_value(v) for v in av.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in av.kvlist_value.values}
    if kind == "bytes_value":
        return base64.b64encode(av.bytes_value).decode()
    return None


_SCALARS = frozenset({"string_value", "bool_value", "int_value", "double_value"})


def _attrs(kvs: Iterable[Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in kvs:
        v = kv.value
        which = v.WhichOneof("value")
        out[kv.key] = getattr(v, which) if which in _SCALARS else _value(v)
    return out


def _s(v: Any) -> str:
    """Text of an attribute value; the common case (already a str) costs one check."""
    return v if v.__class__ is str else _text(v)


def _text(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return str(v)
    return json.dumps(v, separators=(",", ":"), default=str)


#: a path segment that carries an identifier: it has a digit and is either all digits or at
#: least 4 characters long (so that `v2` or `s3` stay, and `12345`, `p-001`, a UUID go)
_ID_SEGMENT = re.compile(r"(?<=/)(?=[^/?#\s]*\d)(?:\d+|[^/?#\s]{4,})(?=$|[/?#\s])")


@functools.lru_cache(maxsize=4096)
def scrub_span_name(name: str) -> str:
    """The span name as stored in ``otel_traces`` (in clear): without a query string and with
    identifier-like path segments replaced by ``{id}``. Instrumentations name spans after route
    templates (``GET /Patient/{id}``), but a hand-made span named after a raw path
    (``GET /Patient/p-123?name=...``) would otherwise put PHI in clear. Audit spans keep their
    real name, encrypted, in ``extra``."""
    if "/" not in name and "?" not in name:
        return name
    name = name.split("?", 1)[0].split("#", 1)[0]
    return _ID_SEGMENT.sub("{id}", name)


def _is_true(v: Any) -> bool:
    return v is True or (isinstance(v, str) and v.lower() == "true")


def _is_audit(kvs: Sequence[Any]) -> bool:
    for kv in kvs:
        if kv.key == "phi.audit.event":
            return _is_true(_value(kv.value))
    return False


def _hex(b: bytes) -> str:
    return b.hex() if b else ""


def _infra_kind(kvs: Sequence[Any]) -> str | None:
    for kv in kvs:
        if kv.key == "phi.infra.kind":
            return _text(_value(kv.value)).strip().lower()
    return None


def _count_infra(st: ExtractStats, events: list[InfraEvent]) -> None:
    for ev in events:
        name = f"infra_records_{ev.source_kind}"
        setattr(st, name, getattr(st, name, 0) + 1)
        if ev.parse_status != "ok":
            st.infra_unparsed += 1


class Extractor:
    """Stateless apart from its configuration; one per service."""

    def __init__(self, sensitive_attributes: Sequence[str] = (),
                 infra: InfraConfig | None = None) -> None:
        self.infra = infra if infra is not None else InfraConfig()
        exact = {a for a in sensitive_attributes if not a.endswith("*")}
        prefixes = tuple(a[:-1] for a in sensitive_attributes if a.endswith("*"))
        self._drop_exact = frozenset(exact)
        self._drop_prefixes = ("phi.", *prefixes)

    # -- helpers -------------------------------------------------------------------------
    def _keep(self, key: str) -> bool:
        return key not in self._drop_exact and not key.startswith(self._drop_prefixes)

    def _clean_map(self, attrs: dict[str, Any]) -> dict[str, str]:
        return {k: _text(v) for k, v in attrs.items() if self._keep(k)}

    # -- traces --------------------------------------------------------------------------
    def traces(self, request: Any, sender: str = "", *, skip: Set[int] = frozenset(),
               now_us: int | None = None, max_rows: int | None = None) -> Extracted:
        """``skip``: ordinals (1-based, in request order) of spans already turned into audit
        rows by the compiled extractor; they are counted in ``spans`` and nothing else.
        ``max_rows``: raise ``TooManyRows`` rather than make more audit rows than this."""
        out = Extracted(max_rows=max_rows)
        st = out.stats
        if now_us is None:
            now_us = time.time_ns() // 1000
        ordinal = 0
        for rs in request.resource_spans:
            res = _attrs(rs.resource.attributes)
            service = _text(res.get("service.name", ""))
            host = _text(res.get("host.name", ""))
            device = _text(res.get("device.id", ""))
            res_map: dict[str, str] | None = None
            for ss in rs.scope_spans:
                scope = ss.scope
                for span in ss.spans:
                    st.spans += 1
                    ordinal += 1
                    if skip and ordinal in skip:
                        continue
                    attrs = _attrs(span.attributes)
                    if ("db.system.name" in attrs or "db.system" in attrs) and \
                            self.infra.enabled:
                        self._db_span(out, span, attrs, service, sender, now_us)
                    audit_span = _is_true(attrs.get("phi.audit.event"))
                    access_events = ([e for e in span.events if e.name == "phi.access"]
                                     if span.events else [])
                    if audit_span or access_events:
                        ctx = (service, host, device, sender, now_us)
                        for i, ev in enumerate(access_events, 1):
                            merged = dict(attrs)
                            merged.update(_attrs(ev.attributes))
                            self._audit_from(out, merged, span, ev, i, ctx)
                        if audit_span:
                            self._audit_from(out, attrs, span, None, 0, ctx)
                            continue
                    if res_map is None:
                        res_map = self._clean_map(res)
                    out.traces.append(self._trace_row(span, attrs, res_map, service, scope))
                    st.trace_rows += 1
        return out

    def _trace_row(self, span: Any, span_attrs: dict[str, Any], res_map: dict[str, str],
                   service: str, scope: Any) -> list[Any]:
        attrs = self._clean_map(span_attrs)
        events = [e for e in span.events if e.name != "phi.access"]
        start = span.start_time_unix_nano
        end = span.end_time_unix_nano
        kind = span.kind if 0 <= span.kind < len(_KINDS) else 0
        code = span.status.code if 0 <= span.status.code < len(_STATUS) else 0
        return [
            min(start, _MAX_NS), _hex(span.trace_id), _hex(span.span_id),
            _hex(span.parent_span_id),
            span.trace_state, scrub_span_name(span.name), _KINDS[kind], service, res_map,
            scope.name,
            scope.version, attrs, max(0, end - start), _STATUS[code], span.status.message,
            [min(e.time_unix_nano, _MAX_NS) for e in events], [e.name for e in events],
            [self._clean_map(_attrs(e.attributes)) for e in events],
            [_hex(link.trace_id) for link in span.links],
            [_hex(link.span_id) for link in span.links],
            [link.trace_state for link in span.links],
            [self._clean_map(_attrs(link.attributes)) for link in span.links],
        ]

    def _db_span(self, out: Extracted, span: Any, attrs: dict[str, Any], service: str,
                 sender: str, now_us: int) -> None:
        kind = span.kind if 0 <= span.kind < len(_KINDS) else 0
        ev, absurd = db_span_event(
            attrs, name=span.name, kind=_KINDS[kind], status_code=span.status.code,
            start_ns=span.start_time_unix_nano, end_ns=span.end_time_unix_nano,
            trace_id=_hex(span.trace_id), span_id=_hex(span.span_id), service=service,
            sender=sender, now_us=now_us, config=self.infra)
        out.stats.absurd_timestamps += absurd
        out.stats.infra_records_db_span += 1
        out.infra.append(ev)

    def _infra_log(self, out: Extracted, rec: Any, res: dict[str, Any], res_kind: str,
                   res_digest: bytes, sender: str, now_us: int) -> bool:
        """An infrastructure log record -> infra events; False when it is none."""
        kind = _infra_kind(rec.attributes) or res_kind
        body = _value(rec.body) if rec.HasField("body") else None
        if not kind:
            kind = sniff_kind(body)
            if not kind:
                return False
        seed = b"infra|" + hashlib.sha256(
            res_digest + b"%d|" % rec.time_unix_nano
            + rec.body.SerializeToString(deterministic=True)
            + b"".join(kv.SerializeToString(deterministic=True) for kv in rec.attributes)
            + rec.trace_id + rec.span_id).digest()
        ctx = RecordContext(_attrs(rec.attributes), res, rec.time_unix_nano // 1000, now_us,
                            sender, _hex(rec.trace_id), _hex(rec.span_id), seed)
        result = parse_record(kind, body, ctx, self.infra.catalog)
        st = out.stats
        st.absurd_timestamps += result.absurd_times
        st.infra_flow_headers += result.skipped
        _count_infra(st, result.events)
        out.infra.extend(result.events)
        return True

    def _span_outcome(self, span: Any, attrs: dict[str, Any]) -> tuple[str, str]:
        if span.status.code == 2:
            return "failure", "status"
        status = attrs.get("http.response.status_code", attrs.get("http.status_code"))
        try:
            if status is not None and int(status) >= 400:
                return "failure", "http"
        except (TypeError, ValueError, OverflowError):
            pass
        if any(e.name == "exception" for e in span.events):
            return "failure", "exception"
        return "success", "default"

    def _audit_from(self, out: Extracted, attrs: dict[str, Any], span: Any, event: Any,
                    index: int, ctx: tuple[str, str, str, str, int]) -> None:
        service, host, device, sender, now_us = ctx
        if event is None:
            t_ns, source = span.start_time_unix_nano, "span"
        else:
            t_ns, source = event.time_unix_nano or span.start_time_unix_nano, "span_event"
        explicit = attrs.get("phi.audit.outcome")
        if event is not None and "phi.audit.outcome" not in _attrs(event.attributes):
            explicit = None
        outcome, reason = self._explicit_outcome(explicit)
        if not outcome:
            outcome, reason = self._span_outcome(span, attrs)
        extra: dict[str, Any] = {"span.name": span.name}
        if event is not None:
            extra["event.index"] = index
        seed = b"span|%b%b|%d|" % (span.trace_id, span.span_id, index)
        self._emit(out, attrs, t_ns, source, outcome, reason, service, host, device, sender,
                   now_us, _hex(span.trace_id), _hex(span.span_id), extra, seed)

    @staticmethod
    def _explicit_outcome(value: Any) -> tuple[str, str]:
        if value is None:
            return "", ""
        v = _text(value).strip().lower()
        if v in _SUCCESS:
            return "success", "explicit"
        if v in _FAILURE:
            return "failure", "explicit"
        return "", ""

    # -- logs ----------------------------------------------------------------------------
    def logs(self, request: Any, sender: str = "", *, max_rows: int | None = None) -> Extracted:
        out = Extracted(max_rows=max_rows)
        st = out.stats
        now_us = time.time_ns() // 1000
        for rl in request.resource_logs:
            res = _attrs(rl.resource.attributes)
            service = _text(res.get("service.name", ""))
            host = _text(res.get("host.name", ""))
            device = _text(res.get("device.id", ""))
            res_kind = _text(res.get("phi.infra.kind", "")).strip().lower()
            res_digest = b""
            for sl in rl.scope_logs:
                for rec in sl.log_records:
                    st.log_records += 1
                    if not _is_audit(rec.attributes):
                        if self.infra.enabled:
                            if not res_digest:
                                res_digest = hashlib.sha256(
                                    rl.resource.SerializeToString(deterministic=True)).digest()
                            if self._infra_log(out, rec, res, res_kind, res_digest, sender,
                                               now_us):
                                continue
                        st.logs_ignored += 1
                        continue
                    attrs = _attrs(rec.attributes)
                    outcome, reason = self._explicit_outcome(attrs.get("phi.audit.outcome"))
                    if not outcome:
                        failed = rec.severity_number >= 17
                        outcome, reason = ("failure", "severity") if failed else (
                            "success", "default")
                    t_ns = rec.time_unix_nano or rec.observed_time_unix_nano
                    extra: dict[str, Any] = {}
                    if rec.HasField("body"):
                        extra["log.body"] = _value(rec.body)
                    seed = b"log|" + hashlib.sha256(
                        rec.SerializeToString(deterministic=True)).digest() + b"|"
                    self._emit(out, attrs, t_ns, "log", outcome, reason, service, host,
                               device, sender, now_us, _hex(rec.trace_id), _hex(rec.span_id),
                               extra, seed)
        return out

    # -- the event itself ----------------------------------------------------------------
    def _emit(self, out: Extracted, attrs: dict[str, Any], t_ns: int, source: str,
              outcome: str, reason: str, service: str, host: str, device: str, sender: str,
              now_us: int, trace_id: str, span_id: str, extra: dict[str, Any],
              seed: bytes) -> None:
        """One audit event (one row per patient). Consumes ``attrs``: the mapped attributes
        are taken out, whatever remains is kept (encrypted) in ``extra``."""
        st = out.stats
        st.audit_events += 1
        pop = attrs.pop
        time_source = "span"
        t_us = t_ns // 1000
        if t_us < _MIN_TIME_US or t_us > now_us + _FUTURE_SLACK_US:
            st.absurd_timestamps += 1
            extra["reported_time_unix_nano"] = t_ns
            t_us, time_source = now_us, "receiver"
        pop("phi.audit.event", None)
        pop("phi.audit.outcome", None)
        action = _s(pop("phi.audit.action", ""))
        if action not in ACTIONS:
            action = action.strip().lower()
            if action not in ACTIONS:
                if action:
                    extra["phi.audit.action"] = action
                action = "other" if action else "unknown"
        count_raw = pop("phi.record.count", 0)
        if count_raw.__class__ is int and 0 <= count_raw < 1 << 64:
            record_count = count_raw
        else:
            try:
                record_count = max(0, int(count_raw))
                if record_count >= 1 << 64:  # UInt64: a larger value would wedge the writer
                    raise ValueError
            except (TypeError, ValueError, OverflowError):
                st.bad_attribute_types += 1
                extra["phi.record.count"] = count_raw
                record_count = 0
        roles_raw = pop("user.roles", None)
        legacy_role = pop("enduser.role", None)
        if roles_raw is None:
            roles_raw = legacy_role
        if roles_raw.__class__ is list:
            roles = [_s(r) for r in roles_raw]
        elif roles_raw:
            roles = [r.strip() for r in _s(roles_raw).split(",") if r.strip()]
        else:
            roles = []
        status_raw = pop("http.response.status_code", None)
        legacy_status = pop("http.status_code", None)
        if status_raw is None:
            status_raw = legacy_status
        if status_raw is None:
            http_status = 0
        elif status_raw.__class__ is int and 0 <= status_raw < 1000:
            http_status = status_raw
        else:
            try:
                http_status = int(status_raw)
                if not 0 <= http_status < 1000:
                    http_status = 0
            except (TypeError, ValueError, OverflowError):
                st.bad_attribute_types += 1
                http_status = 0
        actor_raw = pop("enduser.id", None)
        user_id = pop("user.id", None)
        actor = _s(actor_raw if actor_raw is not None else (user_id or ""))
        # an actor with an id is a user unless stated; without an id nobody can say which
        actor_type = _s(pop("phi.actor.type", "")) or ("user" if actor else "")
        client = pop("client.address", None)
        peer = pop("net.peer.ip", None)
        client_ip = pop("http.client_ip", None)
        client_address = _s(client if client is not None else (peer or client_ip or ""))
        agent = pop("user_agent.original", None)
        legacy_agent = pop("http.user_agent", None)
        user_agent = _s(agent if agent is not None else (legacy_agent or ""))
        method = pop("http.request.method", None)
        legacy_method = pop("http.method", None)
        http_method = _s(method if method is not None else (legacy_method or ""))
        http_route = _s(pop("http.route", ""))
        resource_type = _s(pop("phi.resource.type", ""))
        resource_id = _s(pop("phi.resource.id", ""))
        query = _s(pop("phi.query", ""))
        purpose = _s(pop("phi.purpose", ""))
        recipient = _s(pop("phi.disclosure.recipient", ""))
        device_id = _s(pop("phi.device.id", "")) or device
        patients_raw = pop("phi.patient.id", None)
        if attrs:
            extra.update(attrs)
        if patients_raw.__class__ is list:
            patients = [_s(p) for p in patients_raw if p not in ("", None)]
        elif patients_raw is None or patients_raw == "":
            patients = []
        else:
            patients = [_s(patients_raw)]
        if len(patients) > _MAX_PATIENTS:
            st.patients_truncated += len(patients) - _MAX_PATIENTS
            extra["phi.patient.id.overflow"] = patients[_MAX_PATIENTS:]
            patients = patients[:_MAX_PATIENTS]
        n = len(patients) or 1
        if out.max_rows is not None and st.audit_rows + n > out.max_rows:
            raise TooManyRows
        sha = hashlib.sha256
        append = out.audit.append
        others = extra
        if n > 1 and n * len(extra_json(extra).encode()) > _MAX_SPAN_EXTRA_BYTES:
            first = uuid.UUID(bytes=sha(seed + b"0").digest()[:16])
            others = {"phi.extra.in_event": str(first)}
            st.extra_shared += 1
        for i, patient in enumerate(patients or [""]):
            # deterministic: a re-sent event keeps its id, and is stored once
            event_id = uuid.UUID(bytes=sha(seed + b"%d" % i).digest()[:16])
            append(AuditEvent(
                event_id, t_us, now_us, action, outcome, time_source, source, reason, actor,
                actor_type, roles, service, host, resource_type, resource_id, patient,
                record_count, query, purpose, recipient, client_address, user_agent, device_id,
                http_method, http_route, http_status, trace_id, span_id, sender,
                extra if i == 0 else others,
            ))
        st.audit_rows += len(patients) or 1
