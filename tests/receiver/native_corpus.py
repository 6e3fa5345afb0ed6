"""Helpers of ``tests/receiver/test_native.py`` (and of ``native_fuzz.py``): a seeded generator
of OTLP trace requests in the shapes the audit mapping reads, and the field-by-field comparison
of the compiled extractor (``_native.c``) with the Python reference (``_extract`` +
``RecordEncoder``).

Every value is synthetic (no real PHI). Requests are assembled on the wire here (each span,
scope and resource serialised by the real ``opentelemetry.proto`` classes, then framed), so that
a span can also carry wire-level oddities the classes cannot express: a singular field twice,
unknown fields, fields out of order.
"""

from __future__ import annotations

import hashlib
import random
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from phiaudit.receiver._extract import Extracted, Extractor
from phiaudit.receiver._fast import NativeTraces
from phiaudit.storage import (
    AUDIT_COLUMNS,
    INFRA_COLUMNS,
    BlindIndex,
    ColumnKeys,
    FieldCipher,
    KeyRing,
    RecordEncoder,
    canonical_encoder,
)

NOW_US = 1_767_225_600_000_000  # the receiver's clock in these tests: 2026-01-01T00:00:00Z
SENDER = "sender-ü.example"
MIN_TIME_US = 946_684_800_000_000  # _extract._MIN_TIME_US
SLACK_US = 24 * 3600 * 1_000_000  # _extract._FUTURE_SLACK_US

NAMES = [c.name for c in AUDIT_COLUMNS]
ENCRYPTED = [c.name for c in AUDIT_COLUMNS if c.kind == "encrypted"]
BLIND = ["resource_bidx", "patient_bidx", "client_bidx"]
CHAIN = ["writer_id", "seq", "prev_hash", "hash"]
TIMES = [c.name for c in AUDIT_COLUMNS if c.type.startswith("DateTime64")]
LEAF = canonical_encoder(AUDIT_COLUMNS)
ACTIONS = ["read", "search", "create", "update", "delete", "disclose", "export", "print",
           "login", "logout", "break_glass"]


# ------------------------------------------------------------------------------------------
# values and the wire


class Empty:
    """An AnyValue with no member set."""

    def __repr__(self) -> str:
        return "Empty()"


EMPTY = Empty()


def any_value(v: Any) -> common_pb2.AnyValue:
    if isinstance(v, Empty):
        return common_pb2.AnyValue()
    if isinstance(v, bool):
        return common_pb2.AnyValue(bool_value=v)
    if isinstance(v, int):
        return common_pb2.AnyValue(int_value=v)
    if isinstance(v, float):
        return common_pb2.AnyValue(double_value=v)
    if isinstance(v, str):
        return common_pb2.AnyValue(string_value=v)
    if isinstance(v, bytes):
        return common_pb2.AnyValue(bytes_value=v)
    if isinstance(v, list):
        return common_pb2.AnyValue(array_value=common_pb2.ArrayValue(
            values=[any_value(x) for x in v]))
    if isinstance(v, dict):
        return common_pb2.AnyValue(kvlist_value=common_pb2.KeyValueList(
            values=[common_pb2.KeyValue(key=k, value=any_value(x)) for k, x in v.items()]))
    raise TypeError(type(v))


def kv(key: str, v: Any) -> common_pb2.KeyValue:
    return common_pb2.KeyValue(key=key, value=any_value(v))


def varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def read_varint(b: bytes, i: int) -> tuple[int, int] | None:
    """The varint at ``b[i:]`` and the index after it, leniently (up to 70 bits), or None
    when it runs past the end: for the fuzzers' structure-aware mutation."""
    v, shift = 0, 0
    while i < len(b) and shift < 70:
        c = b[i]
        i += 1
        v |= (c & 0x7F) << shift
        if not c & 0x80:
            return v, i
        shift += 7
    return None


def protobuf_accepts(raw: bytes) -> bool:
    """protobuf's (upb's) verdict on ``raw`` as an ExportTraceServiceRequest: the oracle the
    compiled walker and validator are compared with."""
    try:
        trace_service_pb2.ExportTraceServiceRequest.FromString(raw)
    except (DecodeError, RuntimeError, ValueError):
        return False
    return True


def tag(fieldno: int, wt: int) -> bytes:
    return varint(fieldno << 3 | wt)


def ld(fieldno: int, payload: bytes) -> bytes:
    return tag(fieldno, 2) + varint(len(payload)) + payload


def fixed64(fieldno: int, v: int) -> bytes:
    return tag(fieldno, 1) + (v & ((1 << 64) - 1)).to_bytes(8, "little")


# ------------------------------------------------------------------------------------------
# the generator

#: pieces of text: JSON specials, control characters, non-ASCII (all valid UTF-8)
SPECIALS = ['"', "\\", "\n", "\r", "\t", "\b", "\f", "\x00", "\x01", "\x1f", "\x7f", "é", "ß",
            "漢字", "😀", "\u2028", "\u0085", "\xa0", "/", "<", "&", "'", "{}", "[1]", "\\u0041",
            "%s", ",", " "]


def text(rng: random.Random, base: str, odd: float = 0.25) -> str:
    """``base``, sometimes with special characters spliced in."""
    if rng.random() >= odd:
        return base
    out = list(base)
    for _ in range(rng.randint(1, 4)):
        out.insert(rng.randint(0, len(out)), rng.choice(SPECIALS))
    return "".join(out)


@dataclass
class Draft:
    """A span being generated: attributes as (key, value) in wire order."""

    attrs: list[tuple[str, Any]]
    name: str
    start_ns: int
    trace_id: bytes
    span_id: bytes
    status_code: int = 0
    events: list[trace_pb2.Span.Event] = field(default_factory=list)
    suffix: bytes = b""  # raw fields appended to the span's wire bytes
    shapes: list[str] = field(default_factory=list)  # what was done to it
    python_only: bool = False  # a shape the compiled extractor must leave to Python

    def keys(self) -> list[str]:
        return [k for k, _ in self.attrs]

    def set(self, key: str, value: Any) -> None:
        for i, (k, _) in enumerate(self.attrs):
            if k == key:
                self.attrs[i] = (key, value)
                return
        self.attrs.append((key, value))

    def drop(self, key: str) -> Any:
        for i, (k, v) in enumerate(self.attrs):
            if k == key:
                del self.attrs[i]
                return v
        return None

    def get(self, key: str, default: Any = None) -> Any:
        for k, v in self.attrs:
            if k == key:
                return v
        return default

    def message(self) -> trace_pb2.Span:
        return trace_pb2.Span(
            trace_id=self.trace_id, span_id=self.span_id, name=self.name,
            kind=trace_pb2.Span.SPAN_KIND_SERVER, start_time_unix_nano=self.start_ns,
            end_time_unix_nano=min(self.start_ns + 2_000_000, (1 << 64) - 1),
            attributes=[kv(k, v) for k, v in self.attrs], events=self.events,
            status=trace_pb2.Status(code=self.status_code))  # type: ignore[arg-type]

    def wire(self) -> bytes:
        return bytes(self.message().SerializeToString()) + self.suffix


def _ip(rng: random.Random) -> str:
    if rng.random() < 0.2:
        return f"2001:db8::{rng.randint(1, 0xFFFF):x}"
    return f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"


def _patient(rng: random.Random) -> str:
    return text(rng, f"pat-{rng.randint(0, 99999):05d}", 0.1)


def plain_draft(rng: random.Random, trace_id: bytes, span_id: bytes) -> Draft:
    """An audit span as an application sends it: ~20 attributes, contract names."""
    rtype = rng.choice(["Patient", "Observation", "Encounter", "MedicationRequest"])
    action = rng.choice(ACTIONS)
    attrs: list[tuple[str, Any]] = [
        ("phi.audit.event", True),
        ("phi.audit.action", action),
        ("phi.resource.type", rtype),
        ("phi.resource.id", text(rng, f"{rtype[:3].lower()}-{rng.randint(1, 10**6)}", 0.1)),
        ("enduser.id", text(rng, f"dr.synthetic-{rng.randint(1, 500)}", 0.1)),
        ("user.roles", rng.choice([["clinician"], ["clinician", "nurse"], "clinician, admin",
                                   "nurse", ["rôle-ü", ""], []])),
        ("client.address", _ip(rng)),
        ("user_agent.original", text(rng, "Mozilla/5.0 (X11; Linux) synthetic/1.0", 0.1)),
        ("http.request.method", rng.choice(["GET", "POST", "PUT", "DELETE"])),
        ("http.route", rng.choice(["/fhir/Patient/{id}", "/fhir/Observation", "/api/v2/export"])),
        ("http.response.status_code", rng.choice([200, 200, 200, 201, 204, 403, 404, 500])),
        ("phi.purpose", rng.choice(["treatment", "payment", "operations", "research"])),
        ("phi.record.count", rng.randint(0, 60)),
        ("server.address", "ehr.synthetic.example"),
        ("url.scheme", "https"),
        ("network.protocol.version", "1.1"),
        ("app.tenant", text(rng, f"clinic-{rng.randint(1, 9)}")),
        ("thread.id", rng.randint(1, 1 << 40)),
        ("app.cache.hit", rng.random() < 0.5),
        ("code.function", text(rng, "views.patient_detail")),
    ]
    if rng.random() < 0.5:
        query = f"family=Synthetic{rng.randint(1, 99)}&birthdate=1970"
        attrs.append(("phi.query", text(rng, query)))
    if rng.random() < 0.3:
        attrs.append(("phi.actor.type", rng.choice(["user", "service", "device"])))
    if rng.random() < 0.2:
        attrs.append(("phi.disclosure.recipient", text(rng, "payer-synthetic-7")))
    if rng.random() < 0.2:
        attrs.append(("phi.device.id", text(rng, f"dev-{rng.randint(1, 99)}")))
    if rng.random() < 0.3:
        attrs.append(("phi.audit.outcome", rng.choice(["success", "failure", "denied", "ok"])))
    n = rng.random()
    if n < 0.55:
        attrs.append(("phi.patient.id", _patient(rng)))
    elif n < 0.85:
        attrs.append(("phi.patient.id", [_patient(rng) for _ in range(rng.randint(1, 6))]))
    # attributes in the order an SDK would send them: mostly as set, sometimes shuffled
    if rng.random() < 0.3:
        rng.shuffle(attrs)
    d = Draft(attrs, text(rng, f"GET /fhir/{rtype}/{{id}}", 0.15),
              (NOW_US - rng.randint(0, 3600 * 10**6)) * 1000 + rng.randint(0, 999),
              trace_id, span_id)
    if rng.random() < 0.1:
        d.status_code = rng.choice([1, 2])
    if rng.random() < 0.1:
        d.events.append(_event(rng, "exception", {"exception.type": "ValueError"}))
    if rng.random() < 0.1:
        d.events.append(_event(rng, "cache.miss", {"key": text(rng, "k")}))
    return d


def _event(rng: random.Random, name: str, attrs: dict[str, Any]) -> trace_pb2.Span.Event:
    return trace_pb2.Span.Event(time_unix_nano=NOW_US * 1000 - rng.randint(0, 10**12),
                                name=name, attributes=[kv(k, v) for k, v in attrs.items()])


Shape = Callable[[random.Random, Draft], None]

# -- shapes the compiled extractor is expected to map itself ----------------------------------


def _legacy_only(rng: random.Random, d: Draft) -> None:
    pairs = [("enduser.id", "user.id"), ("user.roles", "enduser.role"),
             ("client.address", rng.choice(["net.peer.ip", "http.client_ip"])),
             ("user_agent.original", "http.user_agent"), ("http.request.method", "http.method"),
             ("http.response.status_code", "http.status_code")]
    for new, old in pairs:
        v = d.drop(new)
        if v is not None:
            d.set(old, v)


def _new_and_legacy(rng: random.Random, d: Draft) -> None:
    d.set("user.id", rng.choice(["legacy-user", "", 0, False, 77, True]))
    d.set("enduser.role", rng.choice(["legacy-role", ["x", "y"], ""]))
    d.set("net.peer.ip", rng.choice([_ip(rng), ""]))
    d.set("http.client_ip", _ip(rng))
    d.set("http.user_agent", "legacy-agent/0.1")
    d.set("http.method", "PATCH")
    d.set("http.status_code", rng.choice([500, 200, 404]))


def _legacy_fallbacks(rng: random.Random, d: Draft) -> None:
    """No new names; legacy values that are falsy fall through to the next one."""
    for k in ("enduser.id", "client.address", "user_agent.original", "http.request.method"):
        d.drop(k)
    d.set("user.id", rng.choice(["", 0, False, "u-1", 12, True]))
    d.set("net.peer.ip", rng.choice(["", 0, False, "10.0.0.1"]))
    d.set("http.client_ip", rng.choice(["", "10.9.9.9", 5, True]))
    d.set("http.user_agent", rng.choice(["", "ua", 0]))
    d.set("http.method", rng.choice(["", "GET", False]))


def _patients_odd(rng: random.Random, d: Draft) -> None:
    d.set("phi.patient.id", rng.choice([
        "", [], ["", "pat-1", ""], ["", ""], ["pat-ü", "患者-2", "pat-\"3\"\\"],
        [f"pat-{i}" for i in range(rng.randint(20, 300))], "pat-with,comma", " ", "\x00"]))


def _no_patient(rng: random.Random, d: Draft) -> None:
    d.drop("phi.patient.id")


def _roles_odd(rng: random.Random, d: Draft) -> None:
    d.set("user.roles", rng.choice([
        ["", "a", ""], " a , b ,,c ", ",,", "", "  ", "single", ["médecin", "医生"],
        [f"r{i}" for i in range(200)], "a,b" * 30, ["a,b", " c "]]))


def _outcome_ok(rng: random.Random, d: Draft) -> None:
    d.set("phi.audit.outcome", rng.choice(["SUCCESS", "Failed", True, False, "ALLOWED",
                                           "Error", "true", "FALSE", "succeeded"]))


def _action_ok(rng: random.Random, d: Draft) -> None:
    if rng.random() < 0.5:
        d.set("phi.audit.action", "")
    else:
        d.drop("phi.audit.action")


def _count_ok(rng: random.Random, d: Draft) -> None:
    d.set("phi.record.count", rng.choice([0, (1 << 63) - 1, 1, 10**12]))


def _status_ok(rng: random.Random, d: Draft) -> None:
    d.set("http.response.status_code", rng.choice([404, 0, 999, 400, 399, 100]))


def _span_failure(rng: random.Random, d: Draft) -> None:
    d.drop("phi.audit.outcome")
    c = rng.random()
    if c < 0.4:
        d.status_code = 2
    elif c < 0.7:
        d.events.append(_event(rng, "exception", {"exception.message": text(rng, "boom", 0.5)}))
    else:
        d.set("http.response.status_code", rng.choice([400, 500, 503]))


def _specials_everywhere(rng: random.Random, d: Draft) -> None:
    d.name = text(rng, d.name, 1.0)
    for i, (k, v) in enumerate(d.attrs):
        if isinstance(v, str) and k not in ("phi.audit.action", "phi.audit.outcome",
                                             "phi.audit.event", "user.roles", "enduser.role"):
            d.attrs[i] = (k, text(rng, v, 0.8))
    for _ in range(rng.randint(1, 4)):
        d.set(text(rng, f"app.k{rng.randint(0, 99)}", 1.0), text(rng, "v", 1.0))
    d.set("ключ.\"quoted\"\\", "значение\x00\x1f😀")
    d.set("", "empty key")


def _mapped_as_scalars(rng: random.Random, d: Draft) -> None:
    """Text fields given as ints / bools (the mapping takes their text)."""
    for k in ("enduser.id", "phi.query", "phi.purpose", "phi.resource.id", "phi.resource.type",
              "http.route", "phi.device.id", "phi.disclosure.recipient", "phi.actor.type",
              "client.address", "user_agent.original", "http.request.method"):
        if rng.random() < 0.4:
            d.set(k, rng.choice([0, 1, -7, True, False, (1 << 63) - 1, -(1 << 63), ""]))


def _audit_true_text(rng: random.Random, d: Draft) -> None:
    d.set("phi.audit.event", rng.choice(["true", "TRUE", "True", "tRuE"]))


def _ids_odd(rng: random.Random, d: Draft) -> None:
    c = rng.random()
    if c < 0.4:
        d.trace_id, d.span_id = b"", b""
    elif c < 0.7:
        d.trace_id = b""
    else:
        d.trace_id, d.span_id = rng.randbytes(64), rng.randbytes(3)


def _time_edges(rng: random.Random, d: Draft) -> None:
    d.start_ns = rng.choice([MIN_TIME_US * 1000, (NOW_US + SLACK_US) * 1000 + 999,
                             MIN_TIME_US * 1000 + 1])


def _extra_scalars(rng: random.Random, d: Draft) -> None:
    d.set("app.int.min", -(1 << 63))
    d.set("app.int.max", (1 << 63) - 1)
    d.set("app.false", False)
    d.set("app.zero", 0)
    d.set("app.big.text", text(rng, "x" * rng.randint(1000, 20000)))


def _unknown_fields(rng: random.Random, d: Draft) -> None:
    """Fields no version of the schema defines (kept as unknown by protobuf)."""
    d.suffix += tag(100, 0) + varint(rng.randint(0, 1 << 40)) + ld(101, b"\x01\x02")
    d.suffix += tag(102, 5) + b"abcd" + fixed64(103, 7)


def _other_events(rng: random.Random, d: Draft) -> None:
    for name in ("exception.handled", "phi.access.log", "Exception", "phi.accessed", ""):
        if rng.random() < 0.5:
            d.events.append(_event(rng, name, {"a": 1}))


def _status_odd_code(rng: random.Random, d: Draft) -> None:
    d.status_code = rng.choice([0, 1, 3, 7, -1, -(1 << 31), (1 << 31) - 1])


def _attrs_reordered(rng: random.Random, d: Draft) -> None:
    rng.shuffle(d.attrs)


def _many_attrs_ok(rng: random.Random, d: Draft) -> None:
    while len(d.attrs) < 120:
        d.attrs.append((f"app.extra.{len(d.attrs)}", len(d.attrs)))


OK_SHAPES: list[tuple[str, Shape]] = [
    ("legacy-only", _legacy_only), ("new-and-legacy", _new_and_legacy),
    ("legacy-fallbacks", _legacy_fallbacks), ("patients-odd", _patients_odd),
    ("no-patient", _no_patient), ("outcome-ok", _outcome_ok), ("action-empty", _action_ok),
    ("count-ok", _count_ok), ("status-ok", _status_ok), ("span-failure", _span_failure),
    ("specials", _specials_everywhere), ("mapped-scalars", _mapped_as_scalars),
    ("audit-true-text", _audit_true_text), ("ids-odd", _ids_odd), ("time-edges", _time_edges),
    ("extra-scalars", _extra_scalars), ("unknown-fields", _unknown_fields),
    ("other-events", _other_events), ("status-odd-code", _status_odd_code),
    ("reordered", _attrs_reordered), ("many-attrs", _many_attrs_ok),
]

#: shapes the mapping may or may not take (it must just agree with Python when it does)
ANY_SHAPES: list[tuple[str, Shape]] = [
    ("roles-odd", _roles_odd),
]

# -- shapes the compiled extractor must leave to Python ---------------------------------------


def _py_duplicate_key(rng: random.Random, d: Draft) -> None:
    if rng.random() < 0.2:  # two attributes without a key ("" is not on the wire)
        d.attrs += [("", "keyless"), ("", rng.choice([1, "x", True]))]
        return
    k = rng.choice([*d.keys(), "app.dup"])
    d.attrs.append((k, rng.choice(["second", 5, True, "read"])))
    if k == "app.dup":
        d.attrs.insert(0, (k, "first"))


def _py_span_name_key(rng: random.Random, d: Draft) -> None:
    d.attrs.append(("span.name", "attribute named span.name"))


def _py_odd_value(rng: random.Random, d: Draft) -> None:
    v = rng.choice([1.5, float("nan"), float("inf"), -0.0, b"\x00\xffbytes", b"",
                    {"k": "v", "n": {"deep": [1, "x"]}}, {}, EMPTY, ["a", 1, True, 2.5],
                    [["nested"]], [EMPTY]])
    key = rng.choice(["app.odd", "phi.query", "enduser.id", "phi.resource.id", "http.route",
                      "client.address", "phi.patient.id", "user.roles", "phi.audit.outcome",
                      "phi.record.count", "http.response.status_code", "user.id"])
    if key in ("phi.patient.id", "user.roles") and isinstance(v, list) and \
            all(isinstance(x, str) for x in v):
        v = ["a", 3]
    d.set(key, v)


def _py_action(rng: random.Random, d: Draft) -> None:
    d.set("phi.audit.action", rng.choice(["READ", " read ", "frobnicate", "Read", "read\n",
                                          "\uff52\uff45\uff41\uff44",  # fullwidth "read"
                                          1, True, "break-glass", "BREAK_GLASS"]))


def _py_outcome(rng: random.Random, d: Draft) -> None:
    d.set("phi.audit.outcome", rng.choice([" ok", "maybe", 1, 0, "", "ok ", "succès",
                                           "successsuccessful", "\tfailure"]))


def _py_count(rng: random.Random, d: Draft) -> None:
    d.set("phi.record.count", rng.choice([-1, -(1 << 63), "12", "", True, False, "x"]))


def _py_status(rng: random.Random, d: Draft) -> None:
    key = rng.choice(["http.response.status_code", "http.status_code"])
    if key == "http.status_code":
        d.drop("http.response.status_code")
    d.set(key, rng.choice([1000, -1, "404", "", True, False, 1 << 40, -(1 << 63)]))


def _py_time(rng: random.Random, d: Draft) -> None:
    d.start_ns = rng.choice([0, 1, (1 << 64) - 1, (1 << 63), (NOW_US + 2 * SLACK_US) * 1000,
                             MIN_TIME_US * 1000 - 1, (NOW_US + SLACK_US + 1) * 1000])


def _py_access_event(rng: random.Random, d: Draft) -> None:
    attrs: dict[str, Any] = {"phi.patient.id": _patient(rng)}
    if rng.random() < 0.5:
        attrs["phi.audit.outcome"] = rng.choice(["failure", "ok", True])
    if rng.random() < 0.3:
        attrs["phi.audit.action"] = "export"
    d.events.append(_event(rng, "phi.access", attrs))
    if rng.random() < 0.3:
        d.events.append(trace_pb2.Span.Event(name="phi.access"))


def _py_db(rng: random.Random, d: Draft) -> None:
    d.set(rng.choice(["db.system", "db.system.name"]), rng.choice(["postgresql", "sqlite"]))
    d.set("db.query.text", "SELECT name FROM patients WHERE id = $1")
    d.set("db.statement", "SELECT 1")


def _py_many_attrs(rng: random.Random, d: Draft) -> None:
    while len(d.attrs) < 129 + rng.randint(0, 20):
        d.attrs.append((f"app.extra.{len(d.attrs)}", "v"))


def _py_many_roles(rng: random.Random, d: Draft) -> None:
    d.set("user.roles", [f"r{i}" for i in range(257)])


def _py_long_ids(rng: random.Random, d: Draft) -> None:
    d.trace_id = rng.randbytes(65)


def _py_patient_scalar(rng: random.Random, d: Draft) -> None:
    d.set("phi.patient.id", rng.choice([12345, 0, True, False, -1]))


def _py_roles_scalar(rng: random.Random, d: Draft) -> None:
    d.set("user.roles", rng.choice([True, 0, 7, "a\tb", "a,\xa0b", "a\x00,b", "é, b"]))


def _py_dup_name_wire(rng: random.Random, d: Draft) -> None:
    d.suffix += ld(5, b"second name")  # a singular field twice: the last one wins


def _py_dup_status_wire(rng: random.Random, d: Draft) -> None:
    d.suffix += ld(15, tag(3, 0) + varint(rng.choice([0, 2])))  # messages merge


def _py_dup_ids_wire(rng: random.Random, d: Draft) -> None:
    fieldno = rng.choice([1, 2])
    if fieldno == 1 and not d.trace_id:  # an empty id is not on the wire: no duplicate
        d.trace_id = rng.randbytes(16)
    if fieldno == 2 and not d.span_id:
        d.span_id = rng.randbytes(8)
    d.suffix += ld(fieldno, rng.randbytes(rng.choice([8, 16])))


def _py_start_wire(rng: random.Random, d: Draft) -> None:
    d.suffix += fixed64(7, (NOW_US - 10) * 1000)  # start time twice


def _py_two_members_wire(rng: random.Random, d: Draft) -> None:
    # an attribute whose AnyValue sets two members of the oneof (the last one wins)
    av = ld(1, b"first") + tag(3, 0) + varint(42)
    d.suffix += ld(9, ld(1, rng.choice([b"app.two", b"phi.query", b"enduser.id"])) + ld(2, av))


def _py_value_twice_wire(rng: random.Random, d: Draft) -> None:
    # a KeyValue whose value field comes twice (the messages merge)
    d.suffix += ld(9, ld(1, b"app.merge") + ld(2, ld(1, b"a")) + ld(2, tag(2, 0) + b"\x01"))


def _py_event_name_twice(rng: random.Random, d: Draft) -> None:
    d.suffix += ld(11, ld(2, b"exception") + ld(2, b"phi.access"))


PY_SHAPES: list[tuple[str, Shape]] = [
    ("dup-key", _py_duplicate_key), ("span.name-key", _py_span_name_key),
    ("odd-value", _py_odd_value), ("action-normalised", _py_action),
    ("outcome-unknown", _py_outcome), ("count-bad", _py_count), ("status-bad", _py_status),
    ("absurd-time", _py_time), ("phi.access", _py_access_event), ("db-span", _py_db),
    ("too-many-attrs", _py_many_attrs), ("too-many-roles", _py_many_roles),
    ("long-ids", _py_long_ids), ("patient-scalar", _py_patient_scalar),
    ("roles-scalar", _py_roles_scalar), ("wire-dup-name", _py_dup_name_wire),
    ("wire-dup-status", _py_dup_status_wire), ("wire-dup-ids", _py_dup_ids_wire),
    ("wire-dup-start", _py_start_wire), ("wire-two-members", _py_two_members_wire),
    ("wire-value-twice", _py_value_twice_wire), ("wire-event-name-twice", _py_event_name_twice),
]


def non_audit_draft(rng: random.Random, trace_id: bytes, span_id: bytes) -> Draft:
    """A span that is not an audit span (or says so in a way Python does not accept)."""
    d = plain_draft(rng, trace_id, span_id)
    c = rng.random()
    if c < 0.3:
        d.drop("phi.audit.event")
        d.shapes.append("not-audit")
    else:
        v = rng.choice([False, "yes", "1", 1, "true ", " true", "TRUE\x00", EMPTY, "",
                        "\uff54\uff52\uff55\uff45", 1.0, ["true"]])
        d.set("phi.audit.event", v)
        d.shapes.append(f"audit-event={v!r}")
    if rng.random() < 0.3:
        d.set("db.system", "postgresql")
        d.set("db.query.text", "SELECT * FROM patients WHERE id = 'pat-1'")
        d.name = "SELECT patients /p-123?x=1"
    d.python_only = True
    return d


@dataclass
class Request:
    raw: bytes
    labels: list[Draft]  # one per span, in request (ordinal) order
    resource_ok: list[bool]  # per span: its resource is one the compiled path takes


def _resource(rng: random.Random) -> tuple[bytes, bool, str]:
    """A Resource's wire bytes, whether its spans may be taken, and its shape."""
    attrs: list[tuple[str, Any]] = [("service.name", text(rng, f"svc-{rng.randint(1, 5)}", 0.1)),
                                    ("host.name", f"host-{rng.randint(1, 9)}")]
    if rng.random() < 0.3:
        attrs.append(("device.id", text(rng, f"res-dev-{rng.randint(1, 9)}")))
    attrs += [("telemetry.sdk.language", "python"), ("process.pid", rng.randint(1, 1 << 20))]
    shape, ok = "clean", True
    c = rng.random()
    if c < 0.1:
        # a duplicate key the audit rows do not read: the last one wins, and nobody reads it
        attrs += [("app.double", 2.5), ("app.list", ["a", 1]), ("app.kv", {"a": "b"}),
                  ("app.bytes", b"\x00"), ("app.empty", EMPTY), ("app.dup", 1), ("app.dup", 2),
                  ("", "keyless"), ("", 3)]
        shape = "odd-types+dup"
    elif c < 0.2:
        attrs += [("app.double", 2.5), ("app.list", ["a", 1]), ("app.kv", {"a": "b"}),
                  ("app.bytes", b"\x00"), ("app.empty", EMPTY)]
        shape = "odd-types"
    elif c < 0.3:
        k = rng.choice(["service.name", "host.name", "device.id"])
        v = rng.choice([7, True, 2.5, ["x"], EMPTY, {"a": 1}, b"b", "dup-str"])
        present = any(key == k for key, _ in attrs)
        attrs.append((k, v))
        shape, ok = f"{k}-dup-or-odd", not present and isinstance(v, str)
    elif c < 0.35:
        attrs = [(k, v) for k, v in attrs if k != "service.name"]
        attrs.append(("service.name", rng.choice([7, False, 2.5, EMPTY])))
        shape, ok = "service-odd", False
    elif c < 0.4:
        attrs = []
        shape = "empty"
    rng.shuffle(attrs)
    res = resource_pb2.Resource(attributes=[kv(k, v) for k, v in attrs]).SerializeToString()
    if rng.random() < 0.05:
        # an attribute whose key field comes twice (protobuf keeps the last one): it may be
        # service.name, host.name or device.id under another key
        last = rng.choice([b"service.name", b"host.name", b"device.id", b"app.y"])
        res += ld(1, ld(1, b"app.x") + ld(1, last) + ld(2, ld(1, b"from the second key")))
        shape, ok = "key-twice", False
    return res, ok, shape


def make_request(rng: random.Random, *, max_spans: int = 10) -> Request:
    labels: list[Draft] = []
    resource_ok: list[bool] = []
    out = bytearray()
    for _ in range(rng.randint(1, 3)):
        res, ok, _shape = _resource(rng)
        rs_parts: list[bytes] = []
        wire_res = ld(1, res)
        if rng.random() < 0.05:  # the resource twice: protobuf merges them
            wire_res += ld(1, resource_pb2.Resource(
                attributes=[kv("host.name", "second")]).SerializeToString())
            ok = False
        for _ in range(rng.randint(1, 3)):
            scope = common_pb2.InstrumentationScope(name="phiaudit.synthetic", version="1.0")
            ss = ld(1, scope.SerializeToString())
            trace_id = rng.randbytes(16)
            for _ in range(rng.randint(0, max_spans)):
                d = draft(rng, trace_id)
                ss += ld(2, d.wire())
                labels.append(d)
                resource_ok.append(ok)
            if rng.random() < 0.1:
                ss += ld(3, b"https://opentelemetry.io/schemas/1.26.0")
            rs_parts.append(ld(2, ss))
        # the resource usually first; sometimes after the scopes (allowed on the wire)
        if rng.random() < 0.8:
            out += ld(1, wire_res + b"".join(rs_parts))
        else:
            out += ld(1, b"".join(rs_parts) + wire_res)
    return Request(bytes(out), labels, resource_ok)


def draft(rng: random.Random, trace_id: bytes) -> Draft:
    span_id = rng.randbytes(8)
    c = rng.random()
    if c < 0.12:
        return non_audit_draft(rng, trace_id, span_id)
    d = plain_draft(rng, trace_id, span_id)
    if c < 0.5:
        return d  # the common case, untouched
    if c < 0.8:
        for name, shape in rng.sample(OK_SHAPES, rng.randint(1, 3)):
            shape(rng, d)
            d.shapes.append(name)
        if rng.random() < 0.15:
            name, shape = rng.choice(ANY_SHAPES)
            shape(rng, d)
            d.shapes.append(name)
        if len(d.attrs) > 128:  # shapes stacked past the compiled path's limit
            d.shapes.append("too-many-attrs")
            d.python_only = True
        return d
    if rng.random() < 0.5:
        name, shape = rng.choice(OK_SHAPES)
        shape(rng, d)
        d.shapes.append(name)
    name, shape = rng.choice(PY_SHAPES)
    shape(rng, d)
    d.shapes.append(name)
    d.python_only = True
    return d


def kind_of(d: Draft) -> str:
    """plain (untouched), ok (shapes the compiled path maps), any, or python."""
    if d.python_only:
        return "python"
    if not d.shapes:
        return "plain"
    if any(s in {n for n, _ in ANY_SHAPES} for s in d.shapes):
        return "any"
    return "ok"


# ------------------------------------------------------------------------------------------
# the comparison


@dataclass
class Keys:
    """Everything both paths need, over one key ring."""

    ring: KeyRing
    cipher: FieldCipher
    encoder: RecordEncoder
    native: NativeTraces
    extractor: Extractor

    @classmethod
    def open(cls, data_dir: Any) -> Keys:
        ring = KeyRing.open(data_dir)
        cipher = FieldCipher(ring)
        return cls(ring, cipher, RecordEncoder(cipher, BlindIndex(ring)),
                   NativeTraces(ColumnKeys.from_ring(ring)), Extractor())


def _b(v: Any) -> Any:
    """A value in one comparable form: text as UTF-8 bytes, lists as tuples."""
    if isinstance(v, str):
        return v.encode("utf-8", "surrogatepass")
    if isinstance(v, uuid.UUID):
        return v.bytes
    if isinstance(v, list | tuple):
        return tuple(_b(x) for x in v)
    return v


def table_rows(table: pa.Table) -> list[dict[str, Any]]:
    """Arrow rows as dicts of Python values; times as integer microseconds."""
    cols: dict[str, list[Any]] = {}
    for name in table.column_names:
        col = table.column(name)
        if name in TIMES:
            col = col.cast(pa.int64())
        cols[name] = col.to_pylist()
    return [{n: cols[n][i] for n in table.column_names} for i in range(table.num_rows)]


def leaf_of_arrow_row(row: dict[str, Any]) -> bytes:
    """SHA-256 of the canonical encoding of a row read back from Arrow."""
    values = [uuid.UUID(bytes=row[n]) if n == "event_id" else row[n] for n in NAMES]
    return hashlib.sha256(LEAF(values)).digest()


def _clear(keys: Keys, row: dict[str, Any], eid: bytes, nonces: list[bytes] | None
           ) -> dict[str, Any]:
    """The row with its encrypted columns decrypted (exact bytes) and no chain columns."""
    out = {}
    for n in NAMES:
        if n in CHAIN:
            continue
        v = row[n]
        if n in ENCRYPTED:
            blob = bytes(v) if not isinstance(v, bytes) else v
            if blob:
                assert blob[0] == 1 and blob[1:5] == keys.cipher.key_id.to_bytes(4, "big"), n
                assert blob[5:21] == eid, f"{n}: ciphertext bound to another event"
                if nonces is not None:
                    nonces.append(blob[21:33])
            out[n] = keys.cipher.decrypt(n, blob, eid)
        else:
            out[n] = _b(v)
    return out


@dataclass
class Outcome:
    """What one comparison saw."""

    native_none: bool
    taken: set[int]  # ordinals taken by the compiled extractor
    native_rows: int
    spans: int


def python_rows(keys: Keys, ext: Extracted) -> list[dict[str, Any]]:
    rows = []
    for ev in ext.audit:
        r = keys.encoder.audit_row(ev)
        rows.append(dict(zip(NAMES, r, strict=True)))
    return rows


def _check_python_leaf(row: dict[str, Any]) -> None:
    values = [row[n] for n in NAMES]
    assert row["hash"] == hashlib.sha256(LEAF(values)).digest()


def compare_rows(keys: Keys, ref: Sequence[dict[str, Any]], got: Sequence[dict[str, Any]],
                 where: str, nonces: list[bytes] | None = None,
                 native_eids: set[bytes] | None = None) -> None:
    """The same multiset of rows, column by column, encrypted columns decrypted. ``got`` rows
    whose event id is in ``native_eids`` (or all, when None) came from Arrow: their chain
    columns and leaf are checked too."""

    def eid_of(row: dict[str, Any]) -> bytes:
        e = row["event_id"]
        return e.bytes if isinstance(e, uuid.UUID) else bytes(e)

    by_ref: dict[bytes, list[dict[str, Any]]] = defaultdict(list)
    by_got: dict[bytes, list[dict[str, Any]]] = defaultdict(list)
    for r in ref:
        eid = eid_of(r)
        by_ref[eid].append(_clear(keys, r, eid, None))
    for r in got:
        eid = eid_of(r)
        if isinstance(r["event_id"], bytes):  # from Arrow
            # placeholders the writer replaces when it links (the native path writes empty
            # values, unlinked_table nulls)
            assert r["writer_id"] in (b"", None) and r["seq"] in (0, None), where
            assert r["prev_hash"] in (b"\x00" * 32, None), where
            assert r["hash"] == leaf_of_arrow_row(r), \
                f"{where}: the hash column is not the leaf of the row ({uuid.UUID(bytes=eid)})"
        else:
            _check_python_leaf(r)
        by_got[eid].append(_clear(keys, r, eid, nonces))
    missing = set(by_ref) - set(by_got)
    added = set(by_got) - set(by_ref)
    assert not missing and not added, \
        f"{where}: rows missing {sorted(map(str, map(_u, missing)))[:5]} " \
        f"added {sorted(map(str, map(_u, added)))[:5]}"
    for eid, rows in by_ref.items():
        other = by_got[eid]
        assert len(rows) == len(other), f"{where}: {_u(eid)}: {len(rows)} vs {len(other)} rows"
        if len(rows) == 1:
            a, b = rows[0], other[0]
            for n in a:
                assert a[n] == b[n], f"{where}: event {_u(eid)} column {n}: {a[n]!r} != {b[n]!r}"
        else:
            key = lambda r: repr(sorted(r.items()))  # noqa: E731
            assert sorted(rows, key=key) == sorted(other, key=key), \
                f"{where}: event {_u(eid)}: rows differ"


def _u(b: bytes) -> uuid.UUID:
    return uuid.UUID(bytes=b)


def differential(keys: Keys, raw: bytes, where: str = "request",
                 nonces: list[bytes] | None = None, now_us: int = NOW_US) -> Outcome:
    """Python reference vs compiled + Python for the rest, on one request (raw bytes that the
    protobuf runtime accepts). Raises AssertionError on any difference."""
    request = trace_service_pb2.ExportTraceServiceRequest.FromString(raw)
    ext = keys.extractor
    ref = ext.traces(request, SENDER, now_us=now_us)
    ref_rows = python_rows(keys, ref)
    # validating as well (where it can): bytes protobuf accepts must pass, the count must agree
    got = keys.native.extract(raw, SENDER, now_us, validate=keys.native.validates)
    if got is None:
        return Outcome(True, set(), 0, ref.stats.spans)
    table, skip, spans = got
    assert spans == ref.stats.spans, f"{where}: {spans} spans, protobuf counts {ref.stats.spans}"
    table.validate(full=True)
    assert table.schema == keys.native._schema
    assert all(1 <= o <= ref.stats.spans for o in skip), f"{where}: ordinal out of range"
    rest = ext.traces(request, SENDER, skip=skip, now_us=now_us)
    native_rows = table_rows(table)
    compare_rows(keys, ref_rows, native_rows + python_rows(keys, rest), where, nonces)
    # the rest of the request: trace rows and infrastructure events exactly as without skip
    assert rest.traces == ref.traces, f"{where}: trace rows differ"
    assert rest.infra == ref.infra, f"{where}: infra events differ"
    want = dict(ref.stats.__dict__)
    have = dict(rest.stats.__dict__)
    have["audit_events"] += len(skip)
    have["audit_rows"] += table.num_rows
    assert have == want, f"{where}: stats differ: " + ", ".join(
        f"{k} {have[k]} != {want[k]}" for k in want if have[k] != want[k])
    return Outcome(False, set(skip), table.num_rows, ref.stats.spans)


def corpus(seed: int, n: int, max_spans: int = 10) -> list[Request]:
    rng = random.Random(seed)
    return [make_request(rng, max_spans=max_spans) for _ in range(n)]


def tally(requests: Sequence[Request], outcomes: Sequence[Outcome]) -> dict[str, Counter[str]]:
    """Per span kind (plain / ok / any / python) and per shape: spans seen and taken."""
    seen: Counter[str] = Counter()
    taken: Counter[str] = Counter()
    shape_seen: Counter[str] = Counter()
    shape_taken: Counter[str] = Counter()
    for req, out in zip(requests, outcomes, strict=True):
        for i, (d, res_ok) in enumerate(zip(req.labels, req.resource_ok, strict=True), 1):
            kind = kind_of(d) if res_ok else "python"
            seen[kind] += 1
            taken[kind] += i in out.taken
            for s in d.shapes or ["plain"]:
                tagged = f"{kind}:{s}" + ("" if res_ok else "(odd resource)")
                shape_seen[tagged] += 1
                shape_taken[tagged] += i in out.taken
    return {"seen": seen, "taken": taken, "shape_seen": shape_seen, "shape_taken": shape_taken}


def clear_infra(keys: Keys, rows: list[list[Any]]) -> list[list[Any]]:
    """Infra rows with their encrypted columns decrypted and without the leaf."""
    enc = {i for i, c in enumerate(INFRA_COLUMNS) if c.kind == "encrypted"}
    out = []
    for row in rows:
        eid = row[0].bytes if isinstance(row[0], uuid.UUID) else row[0]
        out.append([keys.cipher.decrypt(INFRA_COLUMNS[i].name, v, eid) if i in enc else v
                    for i, v in enumerate(row[:-1])])
    return out
