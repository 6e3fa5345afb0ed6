"""The audit record model, and its encoding into stored (encrypted) rows.

``AuditEvent`` is the clear-text form of one audit event for one patient, as the receiver
extracts it. ``RecordEncoder`` turns it into a row of ``audit_events``: PHI fields encrypted
(AES-256-GCM, bound to the event id and column), blind indexes beside them, the chain columns
left for the writer to fill.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from hashlib import sha256
from typing import Any

from ._chain import canonical_encoder
from ._crypto import BlindIndex, FieldCipher, KeyRing
from ._schema import ACCESS_LOG_COLUMNS, ALERT_COLUMNS, AUDIT_COLUMNS, INFRA_COLUMNS

_json = json.JSONEncoder(separators=(",", ":"), default=str, ensure_ascii=False).encode


def extra_json(extra: Mapping[str, Any]) -> str:
    """The stored form of an event's ``extra`` attributes (before encryption)."""
    return _json(extra)

__all__ = ["ACTIONS", "AccessRecord", "Alert", "AuditEvent", "InfraEvent", "RecordEncoder",
           "extra_json"]

#: The actions of the attribute contract (CONTRACT.md section 1).
ACTIONS = frozenset({
    "read", "search", "create", "update", "delete", "disclose", "export", "print", "login",
    "logout", "break_glass",
})


@dataclass(slots=True)
class AuditEvent:
    """One audit event about one patient (or none), in clear. Times are UTC microseconds."""

    event_id: uuid.UUID
    event_time_us: int
    received_time_us: int
    action: str
    outcome: str
    time_source: str = "span"
    source: str = "span"
    outcome_reason: str = ""
    actor_id: str = ""
    actor_type: str = ""
    actor_roles: list[str] = field(default_factory=list)
    service_name: str = ""
    host_name: str = ""
    resource_type: str = ""
    resource_id: str = ""
    patient_id: str = ""
    record_count: int = 0
    query: str = ""
    purpose: str = ""
    recipient: str = ""
    client_address: str = ""
    user_agent: str = ""
    device_id: str = ""
    http_method: str = ""
    http_route: str = ""
    http_status: int = 0
    trace_id: str = ""
    span_id: str = ""
    sender: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:  # never print PHI
        return (f"AuditEvent(event_id={self.event_id}, action={self.action!r}, "
                f"outcome={self.outcome!r}, phi=[REDACTED])")


@dataclass(slots=True)
class AccessRecord:
    """One read (or refused read) of the audit trail."""

    principal: str
    role: str
    interface: str
    statement: str
    decrypt: bool
    rows_returned: int
    outcome: str
    reason: str = ""


@dataclass(slots=True)
class InfraEvent:
    """One normalized infrastructure record, in clear. Times are UTC microseconds.

    ``object`` (a table, a bucket/key, an address:port), ``client_address`` and ``raw`` (the
    record as received) are stored encrypted; ``phi_object`` names the PHI catalog entry that
    matched (configuration, never data)."""

    event_id: uuid.UUID
    event_time_us: int
    received_time_us: int
    source_kind: str
    parse_status: str = "ok"
    source: str = ""
    actor_id: str = ""
    client_address: str = ""
    operation: str = ""
    object_type: str = ""
    object: str = ""
    phi_touch: bool = False
    phi_object: str = ""
    outcome: str = "unknown"
    record_count: int = 0
    trace_id: str = ""
    span_id: str = ""
    sender: str = ""
    raw: str = ""

    def __repr__(self) -> str:  # never print PHI
        return (f"InfraEvent(event_id={self.event_id}, kind={self.source_kind!r}, "
                f"operation={self.operation!r}, phi_touch={self.phi_touch}, phi=[REDACTED])")


@dataclass(slots=True)
class Alert:
    """One alert raised by a rule. ``summary`` and ``group_key`` never carry PHI in clear
    (rules group by ids and blind indexes)."""

    alert_id: uuid.UUID
    time_us: int
    rule_id: str
    severity: str
    window_start_us: int
    window_end_us: int
    group_key: str
    summary: str
    value: int = 0
    evidence: list[uuid.UUID] = field(default_factory=list)
    evidence_count: int = 0
    trace_ids: list[str] = field(default_factory=list)
    mode: str = "scheduled"


class RecordEncoder:
    """Encrypts and indexes records into rows in table column order."""

    def __init__(self, cipher: FieldCipher, index: BlindIndex) -> None:
        self.cipher = cipher
        self.index = index
        self._audit_leaf = canonical_encoder(AUDIT_COLUMNS)
        self._access_leaf = canonical_encoder(ACCESS_LOG_COLUMNS)
        self._infra_leaf = canonical_encoder(INFRA_COLUMNS)
        self._alert_leaf = canonical_encoder(ALERT_COLUMNS)

    @classmethod
    def for_ring(cls, ring: KeyRing) -> RecordEncoder:
        """The encoder of a key ring's active data and index keys."""
        return cls(FieldCipher(ring), BlindIndex(ring))

    def audit_row(self, ev: AuditEvent) -> list[Any]:
        enc = self.cipher.encrypt
        eid = ev.event_id.bytes

        def e(column: str, value: str) -> bytes:
            return enc(column, eid, value) if value else b""

        resource_key = f"{ev.resource_type}/{ev.resource_id}" if ev.resource_id else ""
        extra = _json(ev.extra) if ev.extra else ""
        row = [
            ev.event_id,
            ev.event_time_us,
            ev.received_time_us,
            ev.time_source,
            ev.source,
            ev.action,
            ev.outcome,
            ev.outcome_reason,
            ev.actor_id,
            ev.actor_type,
            ev.actor_roles,
            ev.service_name,
            ev.host_name,
            ev.resource_type,
            e("resource_id", ev.resource_id),
            self.index("resource", resource_key),
            e("patient_id", ev.patient_id),
            self.index("patient", ev.patient_id),
            ev.record_count,
            e("query", ev.query),
            ev.purpose,
            e("recipient", ev.recipient),
            e("client_address", ev.client_address),
            self.index("client", ev.client_address),
            ev.user_agent,
            e("device_id", ev.device_id),
            ev.http_method,
            ev.http_route,
            ev.http_status,
            ev.trace_id,
            ev.span_id,
            ev.sender,
            e("extra", extra),
            self.cipher.key_id,
            "", 0, b"", b"",  # writer_id, seq, prev_hash: filled by the writer
        ]
        row[-1] = sha256(self._audit_leaf(row)).digest()  # the leaf; the writer links it
        return row

    def access_row(self, rec: AccessRecord, now_us: int) -> list[Any]:

        event_id = uuid.uuid4()
        row = [
            event_id,
            now_us,
            rec.principal,
            rec.role,
            rec.interface,
            self.cipher.encrypt("statement", event_id.bytes, rec.statement),
            self.index("statement", rec.statement),
            rec.decrypt,
            rec.rows_returned,
            rec.outcome,
            rec.reason,
            self.cipher.key_id,
            "", 0, b"", b"",
        ]
        row[-1] = sha256(self._access_leaf(row)).digest()
        return row

    def infra_row(self, ev: InfraEvent) -> list[Any]:
        enc = self.cipher.encrypt
        eid = ev.event_id.bytes
        row = [
            ev.event_id,
            ev.event_time_us,
            ev.received_time_us,
            ev.source_kind,
            ev.parse_status,
            ev.source,
            ev.actor_id,
            enc("client_address", eid, ev.client_address) if ev.client_address else b"",
            self.index("client", ev.client_address),
            ev.operation,
            ev.object_type,
            enc("object", eid, ev.object) if ev.object else b"",
            self.index("object", ev.object),
            ev.phi_touch,
            ev.phi_object,
            ev.outcome,
            ev.record_count,
            ev.trace_id,
            ev.span_id,
            ev.sender,
            enc("raw", eid, ev.raw) if ev.raw else b"",
            self.cipher.key_id,
            "", 0, b"", b"",
        ]
        row[-1] = sha256(self._infra_leaf(row)).digest()
        return row

    def alert_row(self, alert: Alert) -> list[Any]:
        row = [
            alert.alert_id,
            alert.time_us,
            alert.rule_id,
            alert.severity,
            alert.window_start_us,
            alert.window_end_us,
            alert.group_key,
            alert.summary,
            alert.value,
            list(alert.evidence),
            alert.evidence_count,
            list(alert.trace_ids),
            alert.mode,
            "", 0, b"", b"",
        ]
        row[-1] = sha256(self._alert_leaf(row)).digest()
        return row
