"""OTLP -> audit events and stripped traces.

A span, a span event named ``phi.access``, or a log record whose ``phi.audit.event`` is true
is an audit event (CONTRACT.md section 1). It becomes one ``AuditEvent`` per patient touched.
Everything of an audit span that the contract does not map (other attributes, the span name,
a log body) is kept in ``extra``, which is stored encrypted: nothing is lost.

Any other span goes to ``otel_traces`` in the Collector ClickHouse exporter's schema, without
its ``phi.*`` attributes, without ``phi.access`` events and without the configured sensitive
attributes.

The walk is table-driven and reads each attribute once: the first question for every span is
whether it is an audit span at all.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from phiaudit.storage import ACTIONS, AuditEvent

__all__ = ["ExtractStats", "Extracted", "Extractor"]

_MIN_TIME_US = 946_684_800_000_000  # 2000-01-01T00:00:00Z
_FUTURE_SLACK_US = 24 * 3600 * 1_000_000
_SUCCESS = {"success", "ok", "succeeded", "allowed", "true"}
_FAILURE = {"failure", "fail", "failed", "error", "denied", "false"}
_KINDS = ["Unspecified", "Internal", "Server", "Client", "Producer", "Consumer"]
_STATUS = ["Unset", "Ok", "Error"]
_MAX_PATIENTS = 10_000  # one span may fan out to at most this many rows; the rest is counted
_MAX_NS = (1 << 63) - 1  # DateTime64(9) is a signed 64-bit count of ns: clamp, never reject

# Attributes the contract maps to columns. Everything else of an audit span goes to `extra`.
_MAPPED = frozenset({
    "phi.audit.event", "phi.audit.action", "phi.audit.outcome", "phi.resource.type",
    "phi.resource.id", "phi.patient.id", "phi.record.count", "phi.query", "phi.purpose",
    "phi.disclosure.recipient", "phi.actor.type", "phi.device.id", "enduser.id", "user.id",
    "user.roles", "enduser.role", "client.address", "user_agent.original", "http.user_agent",
    "http.request.method", "http.method", "http.route", "http.response.status_code",
    "http.status_code", "net.peer.ip", "http.client_ip",
})


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

    def add(self, other: ExtractStats) -> None:
        for k, v in other.__dict__.items():
            setattr(self, k, getattr(self, k) + v)


@dataclass
class Extracted:
    audit: list[AuditEvent] = field(default_factory=list)
    traces: list[list[Any]] = field(default_factory=list)
    stats: ExtractStats = field(default_factory=ExtractStats)


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


def _attrs(kvs: Iterable[Any]) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in kvs}


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


def _is_true(v: Any) -> bool:
    return v is True or (isinstance(v, str) and v.lower() == "true")


def _is_audit(kvs: Sequence[Any]) -> bool:
    for kv in kvs:
        if kv.key == "phi.audit.event":
            return _is_true(_value(kv.value))
    return False


def _hex(b: bytes) -> str:
    return b.hex() if b else ""


class Extractor:
    """Stateless apart from its configuration; one per service."""

    def __init__(self, sensitive_attributes: Sequence[str] = ()) -> None:
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
    def traces(self, request: Any, sender: str = "") -> Extracted:
        out = Extracted()
        st = out.stats
        now_us = time.time_ns() // 1000
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
                    audit_span = _is_audit(span.attributes)
                    access_events = [e for e in span.events if e.name == "phi.access"]
                    if audit_span or access_events:
                        attrs = _attrs(span.attributes)
                        ctx = (service, host, device, sender, now_us)
                        if audit_span:
                            self._audit_from(out, attrs, span, None, 0, ctx)
                        for i, ev in enumerate(access_events, 1):
                            merged = dict(attrs)
                            merged.update(_attrs(ev.attributes))
                            self._audit_from(out, merged, span, ev, i, ctx)
                        if audit_span:
                            continue
                    if res_map is None:
                        res_map = self._clean_map(res)
                    out.traces.append(self._trace_row(span, res_map, service, scope))
                    st.trace_rows += 1
        return out

    def _trace_row(self, span: Any, res_map: dict[str, str], service: str,
                   scope: Any) -> list[Any]:
        attrs = self._clean_map(_attrs(span.attributes))
        events = [e for e in span.events if e.name != "phi.access"]
        start = span.start_time_unix_nano
        end = span.end_time_unix_nano
        kind = span.kind if 0 <= span.kind < len(_KINDS) else 0
        code = span.status.code if 0 <= span.status.code < len(_STATUS) else 0
        return [
            min(start, _MAX_NS), _hex(span.trace_id), _hex(span.span_id),
            _hex(span.parent_span_id),
            span.trace_state, span.name, _KINDS[kind], service, res_map, scope.name,
            scope.version, attrs, max(0, end - start), _STATUS[code], span.status.message,
            [min(e.time_unix_nano, _MAX_NS) for e in events], [e.name for e in events],
            [self._clean_map(_attrs(e.attributes)) for e in events],
            [_hex(link.trace_id) for link in span.links],
            [_hex(link.span_id) for link in span.links],
            [link.trace_state for link in span.links],
            [self._clean_map(_attrs(link.attributes)) for link in span.links],
        ]

    def _span_outcome(self, span: Any, attrs: dict[str, Any]) -> tuple[str, str]:
        if span.status.code == 2:
            return "failure", "status"
        status = attrs.get("http.response.status_code", attrs.get("http.status_code"))
        try:
            if status is not None and int(status) >= 400:
                return "failure", "http"
        except (TypeError, ValueError):
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
        extra = {"span.name": span.name} if event is None else {"span.name": span.name,
                                                                "event.index": index}
        seed = b"span|" + span.trace_id + span.span_id + str(index).encode()
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
    def logs(self, request: Any, sender: str = "") -> Extracted:
        out = Extracted()
        st = out.stats
        now_us = time.time_ns() // 1000
        for rl in request.resource_logs:
            res = _attrs(rl.resource.attributes)
            service = _text(res.get("service.name", ""))
            host = _text(res.get("host.name", ""))
            device = _text(res.get("device.id", ""))
            for sl in rl.scope_logs:
                for rec in sl.log_records:
                    st.log_records += 1
                    if not _is_audit(rec.attributes):
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
                    seed = (b"log|" + rec.trace_id + rec.span_id + str(t_ns).encode() +
                            rec.SerializeToString(deterministic=True))
                    self._emit(out, attrs, t_ns, "log", outcome, reason, service, host,
                               device, sender, now_us, _hex(rec.trace_id), _hex(rec.span_id),
                               extra, seed)
        return out

    # -- the event itself ----------------------------------------------------------------
    def _emit(self, out: Extracted, attrs: dict[str, Any], t_ns: int, source: str,
              outcome: str, reason: str, service: str, host: str, device: str, sender: str,
              now_us: int, trace_id: str, span_id: str, extra: dict[str, Any],
              seed: bytes) -> None:
        st = out.stats
        st.audit_events += 1
        get = attrs.get
        time_source = "span"
        t_us = t_ns // 1000
        if t_us < _MIN_TIME_US or t_us > now_us + _FUTURE_SLACK_US:
            st.absurd_timestamps += 1
            extra["reported_time_unix_nano"] = t_ns
            t_us, time_source = now_us, "receiver"
        action = _text(get("phi.audit.action", "")).strip().lower()
        if action not in ACTIONS:
            if action:
                extra["phi.audit.action"] = action
            action = "other" if action else "unknown"
        count_raw = get("phi.record.count", 0)
        try:
            record_count = max(0, int(count_raw))
            if record_count >= 1 << 64:  # UInt64: a larger value would wedge the writer
                raise ValueError
        except (TypeError, ValueError, OverflowError):
            st.bad_attribute_types += 1
            extra["phi.record.count"] = count_raw
            record_count = 0
        roles_raw = get("user.roles", get("enduser.role"))
        if isinstance(roles_raw, list):
            roles = [_text(r) for r in roles_raw]
        elif roles_raw:
            roles = [r.strip() for r in _text(roles_raw).split(",") if r.strip()]
        else:
            roles = []
        status_raw = get("http.response.status_code", get("http.status_code", 0))
        try:
            http_status = int(status_raw) if 0 <= int(status_raw) < 1000 else 0
        except (TypeError, ValueError, OverflowError):
            st.bad_attribute_types += 1
            http_status = 0
        actor = _text(get("enduser.id", get("user.id", "")))
        actor_type = _text(get("phi.actor.type", "")) or ("user" if actor else "system")
        for key, value in attrs.items():
            if key not in _MAPPED:
                extra[key] = value
        patients_raw = get("phi.patient.id")
        if isinstance(patients_raw, list):
            patients = [_text(p) for p in patients_raw if _text(p)]
        elif patients_raw is None or patients_raw == "":
            patients = []
        else:
            patients = [_text(patients_raw)]
        if len(patients) > _MAX_PATIENTS:
            st.patients_truncated += len(patients) - _MAX_PATIENTS
            extra["phi.patient.id.overflow"] = patients[_MAX_PATIENTS:]
            patients = patients[:_MAX_PATIENTS]
        base_seed = hashlib.sha256(seed).digest()
        for i, patient in enumerate(patients or [""]):
            # deterministic: a re-sent event keeps its id (duplicates are visible as such)
            event_id = uuid.UUID(bytes=hashlib.sha256(base_seed + str(i).encode()).digest()[:16])
            out.audit.append(AuditEvent(
                event_id=event_id,
                event_time_us=t_us,
                received_time_us=now_us,
                action=action,
                outcome=outcome,
                time_source=time_source,
                source=source,
                outcome_reason=reason,
                actor_id=actor,
                actor_type=actor_type,
                actor_roles=roles,
                service_name=service,
                host_name=host,
                resource_type=_text(get("phi.resource.type", "")),
                resource_id=_text(get("phi.resource.id", "")),
                patient_id=patient,
                record_count=record_count,
                query=_text(get("phi.query", "")),
                purpose=_text(get("phi.purpose", "")),
                recipient=_text(get("phi.disclosure.recipient", "")),
                client_address=_text(get("client.address", get("net.peer.ip",
                                                                get("http.client_ip", "")))),
                user_agent=_text(get("user_agent.original", get("http.user_agent", ""))),
                device_id=_text(get("phi.device.id", "")) or device,
                http_method=_text(get("http.request.method", get("http.method", ""))),
                http_route=_text(get("http.route", "")),
                http_status=http_status,
                trace_id=trace_id,
                span_id=span_id,
                sender=sender,
                extra=extra,
            ))
            st.audit_rows += 1
