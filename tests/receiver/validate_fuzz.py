"""The compiled validator (``_native.validate_traces``) against protobuf's own parser (upb), on
mutated requests. Run by ``tests/receiver/test_validate.py``, in a process of its own (a crash
is a failed test, not a dead pytest)::

    python -m tests.receiver.validate_fuzz [--seed N] [--cases N] [--exact-buffers]

Starts from valid requests built with the real ``opentelemetry.proto`` classes (attributes of
every ``AnyValue`` kind, nested arrays and key-value lists, entity refs, events, links, status,
unknown fields, text with non-ASCII characters, bytes that are not UTF-8), and applies 1 to 3
mutations to each case: byte flips, insertions, deletions, truncations, and structure-aware
ones at any nesting level, chosen with the schema (the installed descriptors): invalid UTF-8 in
a ``string`` field and in a ``bytes`` or unknown one, known fields with another wire type,
unknown fields of every wire type, groups (nested, mismatched, unterminated, with field 0),
over-long and 11-byte varints, over-long tags and lengths, lengths off by some bytes or huge,
field number 0 and the largest ones, truncated fixed64/fixed32, nesting to around the depth
limit (messages and groups). For every case the validator's verdict must be protobuf's, and
for an accepted case its span count protobuf's. Prints one JSON summary line (counts, and the
indexes of disagreeing cases: never their bytes); exits 1 on any disagreement.

``--exact-buffers`` hands each input over in a buffer of exactly its size (``ctypes``), so that
an AddressSanitizer build (``NATIVE_TEST_SO=path``, with ``PYTHONMALLOC=malloc``) reports a
read even one byte past the end.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from tests.receiver.native_build import use_test_so

if os.environ.get("NATIVE_TEST_SO"):  # before anything imports phiaudit.receiver._fast
    use_test_so()

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from phiaudit.receiver import _fast
from tests.receiver import native_corpus as nc

try:
    from phiaudit.receiver import _native  # type: ignore[attr-defined]
except ImportError:  # not built: main() says so
    _native = None

REQUEST = "opentelemetry.proto.collector.trace.v1.ExportTraceServiceRequest"
MAX_DEPTH = 100  # upb's default depth limit (checked by test_validate's rule table)


def varint(n: int) -> bytes:
    return nc.varint(n)


def overlong(n: int, size: int) -> bytes:
    """``n`` as a varint of ``size`` bytes (padded with redundant 0x80 bytes; any size, even
    past the 10 bytes protobuf reads)."""
    b = bytearray(varint(n))
    while len(b) < size:
        b[-1] |= 0x80
        b.append(0)
    return bytes(b)


def tag(number: int, wt: int, size: int = 0) -> bytes:
    return overlong(number << 3 | wt, size) if size else varint(number << 3 | wt)


def ld(number: int, payload: bytes) -> bytes:
    return tag(number, 2) + varint(len(payload)) + payload


def span_count(raw: bytes) -> int:
    req = trace_service_pb2.ExportTraceServiceRequest.FromString(raw)
    return sum(len(ss.spans) for rs in req.resource_spans for ss in rs.scope_spans)


# ------------------------------------------------------------------------------------------
# the schema, from the installed descriptors: {message: {number: (kind, submessage)}}

SCHEMA: dict[str, dict[int, tuple[str, str]]] = {
    name: {n: (kind, sub) for n, kind, sub in fields} for name, fields in _fast.trace_schema()}
WIRE = {"varint": 0, "fixed64": 1, "fixed32": 5, "string": 2, "bytes": 2, "message": 2}


def has_field(message: Any, name: str) -> bool:
    return name in message.DESCRIPTOR.fields_by_name


# ------------------------------------------------------------------------------------------
# valid requests, built with the real classes

TEXT = ["", "a", "GET /fhir/Patient", "é", "漢字", "😀", "\x00", "\U0010ffff", "\uffff",
        "\ud7ff", "\ue000", "line\nbreak", "x" * 200, "phi.audit.event", "ß" * 30]
NOT_UTF8 = [b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x80", b"\xe2\x82",
            b"\xf8\x88\x80\x80\x80", b"\xc2", b"\xe0\x80\x80", b"\xf0\x80\x80\x80",
            b"\xed\xbf\xbf", b"\xfe\xfe", b"\xc1\xbf"]
#: valid UTF-8 at the edges of the ranges (must be accepted in a string field)
EDGE_UTF8 = [b"\x00", b"\x7f", b"\xc2\x80", b"\xdf\xbf", b"\xe0\xa0\x80", b"\xed\x9f\xbf",
             b"\xee\x80\x80", b"\xef\xbf\xbf", b"\xf0\x90\x80\x80", b"\xf4\x8f\xbf\xbf"]


def text(rng: random.Random) -> str:
    return "".join(rng.choice(TEXT) for _ in range(rng.randint(0, 3)))


def any_value(rng: random.Random, depth: int = 0) -> common_pb2.AnyValue:
    kinds = ["string", "bool", "int", "double", "bytes", "empty", "strindex"]
    if depth < 4:
        kinds += ["array", "kvlist"]
    k = rng.choice(kinds)
    if k == "string":
        return common_pb2.AnyValue(string_value=text(rng))
    if k == "bool":
        return common_pb2.AnyValue(bool_value=rng.random() < 0.5)
    if k == "int":
        return common_pb2.AnyValue(int_value=rng.choice(
            [0, 1, -1, 2**63 - 1, -(2**63), rng.randint(-10**6, 10**6)]))
    if k == "double":
        return common_pb2.AnyValue(double_value=rng.choice(
            [0.0, -0.0, 1.5, float("inf"), float("nan"), 1e308]))
    if k == "bytes":  # bytes are not text: not UTF-8 is fine
        return common_pb2.AnyValue(bytes_value=rng.choice(NOT_UTF8) + rng.randbytes(3))
    if k == "array":
        return common_pb2.AnyValue(array_value=common_pb2.ArrayValue(
            values=[any_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]))
    if k == "kvlist":
        return common_pb2.AnyValue(kvlist_value=common_pb2.KeyValueList(
            values=[key_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]))
    if k == "strindex" and has_field(common_pb2.AnyValue, "string_value_strindex"):
        return common_pb2.AnyValue(string_value_strindex=rng.randint(0, 2**31 - 1))
    return common_pb2.AnyValue()


def key_value(rng: random.Random, depth: int = 0) -> common_pb2.KeyValue:
    kv = common_pb2.KeyValue(key=text(rng) or "k", value=any_value(rng, depth))
    if has_field(kv, "key_strindex") and rng.random() < 0.1:
        kv.key_strindex = rng.randint(-5, 100)
    return kv


def attributes(rng: random.Random, n: int) -> list[common_pb2.KeyValue]:
    return [key_value(rng) for _ in range(rng.randint(0, n))]


def unknown_fields(rng: random.Random, known: dict[int, tuple[str, str]]) -> bytes:
    """Valid unknown fields (every wire type, groups among them) for a message."""
    out = b""
    for _ in range(rng.randint(1, 3)):
        number = rng.choice([n for n in (17, 18, 50, 99, 1000, 2**29 - 1) if n not in known])
        wt = rng.choice([0, 1, 2, 3, 5])
        out += valid_unknown(rng, number, wt)
    return out


def valid_unknown(rng: random.Random, number: int, wt: int) -> bytes:
    if wt == 0:
        return tag(number, 0) + varint(rng.choice([0, 1, 300, 2**64 - 1]))
    if wt == 1:
        return tag(number, 1) + rng.randbytes(8)
    if wt == 5:
        return tag(number, 5) + rng.randbytes(4)
    if wt == 2:
        return ld(number, rng.choice([b"", b"\xff\xfe", b"text", rng.randbytes(5)]))
    inner = b"".join(valid_unknown(rng, rng.choice([0, 1, 7, 200]), rng.choice([0, 1, 2, 5]))
                     for _ in range(rng.randint(0, 2)))
    return tag(number, 3) + inner + tag(number, 4)


def with_unknown(rng: random.Random, msg: Any) -> Any:
    """The same message with unknown fields (kept by protobuf, serialised again)."""
    if rng.random() >= 0.3:
        return msg
    known = SCHEMA[msg.DESCRIPTOR.full_name]
    return type(msg).FromString(msg.SerializeToString() + unknown_fields(rng, known))


def make_span(rng: random.Random) -> trace_pb2.Span:
    span = trace_pb2.Span(
        trace_id=rng.randbytes(rng.choice([16, 16, 0, 3])), span_id=rng.randbytes(8),
        trace_state=rng.choice(["", "a=b,c=d"]),
        parent_span_id=rng.randbytes(rng.choice([0, 8])), name=text(rng),
        kind=rng.choice([0, 1, 2, 3, 4, 5, 99]),  # type: ignore[arg-type]
        start_time_unix_nano=rng.randint(0, 2**64 - 1),
        end_time_unix_nano=rng.randint(0, 2**64 - 1),
        attributes=attributes(rng, 6), dropped_attributes_count=rng.choice([0, 3]),
        dropped_events_count=rng.choice([0, 1]), dropped_links_count=rng.choice([0, 2]))
    if has_field(span, "flags"):
        span.flags = rng.choice([0, 1, 0x300, 2**32 - 1])
    for _ in range(rng.randint(0, 2)):
        span.events.append(with_unknown(rng, trace_pb2.Span.Event(
            time_unix_nano=rng.randint(0, 2**64 - 1), name=text(rng),
            attributes=attributes(rng, 3), dropped_attributes_count=rng.choice([0, 1]))))
    for _ in range(rng.randint(0, 2)):
        link = trace_pb2.Span.Link(trace_id=rng.randbytes(16), span_id=rng.randbytes(8),
                                   trace_state=rng.choice(["", "k=v"]),
                                   attributes=attributes(rng, 3),
                                   dropped_attributes_count=rng.choice([0, 1]))
        if has_field(link, "flags"):
            link.flags = rng.choice([0, 1, 2**32 - 1])
        span.links.append(with_unknown(rng, link))
    if rng.random() < 0.7:
        span.status.CopyFrom(trace_pb2.Status(message=text(rng),
                                              code=rng.choice([0, 1, 2, 7])))  # type: ignore[arg-type]
    return with_unknown(rng, span)  # type: ignore[no-any-return]


def make_request(rng: random.Random) -> bytes:
    req = trace_service_pb2.ExportTraceServiceRequest()
    for _ in range(rng.randint(1, 2)):
        res = resource_pb2.Resource(attributes=[nc.kv("service.name", text(rng) or "svc"),
                                                *attributes(rng, 4)],
                                    dropped_attributes_count=rng.choice([0, 2]))
        if has_field(res, "entity_refs"):
            for _ in range(rng.randint(0, 2)):
                res.entity_refs.append(common_pb2.EntityRef(
                    schema_url=text(rng), type=rng.choice(["service", "host", "é"]),
                    id_keys=[text(rng) for _ in range(rng.randint(0, 2))],
                    description_keys=[text(rng) for _ in range(rng.randint(0, 2))]))
        rs = trace_pb2.ResourceSpans(resource=with_unknown(rng, res),
                                     schema_url=rng.choice(["", "https://x/1.26.0"]))
        for _ in range(rng.randint(1, 2)):
            scope = common_pb2.InstrumentationScope(name=text(rng), version=text(rng),
                                                    attributes=attributes(rng, 2),
                                                    dropped_attributes_count=rng.choice([0, 1]))
            ss = trace_pb2.ScopeSpans(scope=with_unknown(rng, scope),
                                      schema_url=rng.choice(["", "https://x/1.26.0"]),
                                      spans=[make_span(rng) for _ in range(rng.randint(0, 3))])
            rs.scope_spans.append(with_unknown(rng, ss))
        req.resource_spans.append(with_unknown(rng, rs))
    return with_unknown(rng, req).SerializeToString()  # type: ignore[no-any-return]


def audit_request(rng: random.Random) -> bytes:
    """Audit spans only, as an application sends them (the compiled extractor takes them all,
    so that the service does not parse the request with protobuf)."""
    trace_id = rng.randbytes(16)
    spans = [nc.plain_draft(rng, trace_id, rng.randbytes(8)).message()
             for _ in range(rng.randint(1, 4))]
    res = resource_pb2.Resource(attributes=[nc.kv("service.name", "ehr-api"),
                                            nc.kv("host.name", "host-1")])
    scope = common_pb2.InstrumentationScope(name="phiaudit.synthetic", version="1.0")
    req = trace_service_pb2.ExportTraceServiceRequest(resource_spans=[trace_pb2.ResourceSpans(
        resource=res, scope_spans=[trace_pb2.ScopeSpans(scope=scope, spans=spans)])])
    return bytes(req.SerializeToString())


def seeds(rng: random.Random, n: int) -> list[bytes]:
    """Valid requests: built here (every field), audit spans only, and audit-shaped ones
    (native_corpus)."""
    out = [make_request(rng) for _ in range(n)]
    out += [audit_request(rng) for _ in range(max(2, n // 2))]
    out += [r.raw for r in nc.corpus(rng.randint(0, 2**31), max(2, n // 4), max_spans=3)]
    return out


# ------------------------------------------------------------------------------------------
# a lenient wire reader, for structure-aware mutation


@dataclass
class Piece:
    number: int
    wt: int
    tag: bytes
    body: bytes  # wt 2: the payload; else the value bytes as on the wire

    def raw(self) -> bytes:
        return self.tag + (varint(len(self.body)) if self.wt == 2 else b"") + self.body


def parse(b: bytes) -> list[Piece] | None:
    """The fields of a message without groups; None when it is not one."""
    out: list[Piece] = []
    i = 0
    while i < len(b):
        r = nc.read_varint(b, i)
        if r is None or r[0] >> 3 == 0:
            return None
        key, j = r
        number, wt = key >> 3, key & 7
        if wt == 0:
            r = nc.read_varint(b, j)
            if r is None:
                return None
            out.append(Piece(number, 0, b[i:j], b[j:r[1]]))
            i = r[1]
        elif wt in (1, 5):
            n = 8 if wt == 1 else 4
            if j + n > len(b):
                return None
            out.append(Piece(number, wt, b[i:j], b[j:j + n]))
            i = j + n
        elif wt == 2:
            r = nc.read_varint(b, j)
            if r is None or r[1] + r[0] > len(b):
                return None
            out.append(Piece(number, 2, b[i:j], b[r[1]:r[1] + r[0]]))
            i = r[1] + r[0]
        else:
            return None
    return out


def join(pieces: list[Piece]) -> bytes:
    return b"".join(p.raw() for p in pieces)


# ------------------------------------------------------------------------------------------
# mutations of one message's fields (type `name`, at nesting level `level`); each returns the
# new encoding of the message


def bad_text(rng: random.Random, body: bytes) -> bytes:
    bad = rng.choice(NOT_UTF8)
    at = rng.randint(0, len(body))
    return body[:at] + bad + body[at:]


def _fields_of(name: str, kinds: set[str]) -> list[int]:
    return [n for n, (k, _) in SCHEMA[name].items() if k in kinds]


def m_utf8(rng: random.Random, name: str, pieces: list[Piece], level: int) -> bytes:
    """Not UTF-8 (or UTF-8 at the edges of its ranges) in a string field, a bytes field or an
    unknown one."""
    where = rng.choice(["string", "bytes", "unknown"])
    numbers = _fields_of(name, {where}) if where != "unknown" else [99, 1000]
    if not numbers:
        numbers = [99]
    number = rng.choice(numbers)
    present = [p for p in pieces if p.number == number and p.wt == 2]
    if rng.random() < 0.3:
        value = rng.choice(EDGE_UTF8) * rng.randint(1, 3)
    else:
        value = bad_text(rng, present[0].body if present else b"")
    if present and rng.random() < 0.6:
        present[0].body = value
    else:
        pieces.insert(rng.randint(0, len(pieces)), Piece(number, 2, tag(number, 2), value))
    return join(pieces)


def wire_value(rng: random.Random, wt: int) -> bytes:
    """A value for a wire type (after its tag), sometimes a broken one."""
    if wt == 0:
        return rng.choice([varint(rng.randint(0, 2**64 - 1)), overlong(1, rng.randint(1, 11)),
                           b"\xff" * 9 + bytes([rng.randint(0, 0x7F)]), b"\x80"])
    if wt == 1:
        return rng.randbytes(rng.choice([8, 8, 7]))
    if wt == 5:
        return rng.randbytes(rng.choice([4, 4, 3]))
    if wt == 2:
        body = rng.choice([b"", b"\xff", rng.randbytes(4), ld(1, b"x")])
        return varint(len(body)) + body
    return b""


def m_wire_type(rng: random.Random, name: str, pieces: list[Piece], level: int) -> bytes:
    """A known field with another wire type (an unknown field then, for protobuf)."""
    known = list(SCHEMA[name])
    number = rng.choice(known)
    own = WIRE[SCHEMA[name][number][0]]
    wt = rng.choice([w for w in (0, 1, 2, 5, 3) if w != own])
    if wt == 3:
        piece = tag(number, 3) + group_body(rng, level + 1) + tag(number, 4)
    else:
        piece = tag(number, wt) + wire_value(rng, wt)
    return insert_raw(rng, pieces, piece)


def insert_raw(rng: random.Random, pieces: list[Piece], raw: bytes) -> bytes:
    at = rng.randint(0, len(pieces))
    return join(pieces[:at]) + raw + join(pieces[at:])


def group_body(rng: random.Random, level: int, depth: int = 0) -> bytes:
    """Fields inside a group: any field number (0 too), any wire type, nested groups."""
    out = b""
    for _ in range(rng.randint(0, 3)):
        number = rng.choice([0, 1, 5, 100, 2**29 - 1])
        wt = rng.choice([0, 1, 2, 5, 3])
        if wt == 3 and depth < 3:
            out += tag(number, 3) + group_body(rng, level + 1, depth + 1) + tag(number, 4)
        elif wt != 3:
            out += tag(number, wt, rng.choice([0, 0, 0, 5])) + wire_value(rng, wt)
    return out


def m_group(rng: random.Random, name: str, pieces: list[Piece], level: int) -> bytes:
    """Groups: well-formed, mismatched, unterminated, stray end tags, over-long tags."""
    number = rng.choice([1, 2, 5, 99, 1000, 2**29 - 1])
    body = group_body(rng, level + 1)
    shape = rng.choice(["ok", "ok", "mismatch", "open", "stray-end", "overlong-end",
                        "field0", "end-field0"])
    if shape == "mismatch":
        raw = tag(number, 3) + body + tag(number + 1, 4)
    elif shape == "open":
        raw = tag(number, 3) + body
    elif shape == "stray-end":
        raw = tag(number, 4)
    elif shape == "overlong-end":
        raw = tag(number, 3) + body + tag(number, 4, rng.randint(1, 6))
    elif shape == "field0":
        raw = b"\x03" + body + b"\x04"
    elif shape == "end-field0":
        raw = tag(number, 3) + body + b"\x04"
    else:
        raw = tag(number, 3) + body + tag(number, 4)
    return insert_raw(rng, pieces, raw)


def m_unknown(rng: random.Random, name: str, pieces: list[Piece], level: int) -> bytes:
    """An unknown field of any wire type (6 and 7 included), any field number."""
    number = rng.choice([0, 17, 99, 1000, 2**29 - 1])
    wt = rng.randint(0, 7)
    return insert_raw(rng, pieces, tag(number, wt) + wire_value(rng, wt))


def m_varint(rng: random.Random, name: str, pieces: list[Piece], level: int) -> bytes:
    """A varint field's value in 1 to 11 bytes, or with high bits in the 10th."""
    vs = [p for p in pieces if p.wt == 0]
    if not vs:
        numbers = _fields_of(name, {"varint"}) or [99]
        p = Piece(rng.choice(numbers), 0, b"", b"")
        p.tag = tag(p.number, 0)
        pieces.append(p)
        vs = [p]
    p = rng.choice(vs)
    size = rng.randint(1, 11)
    p.body = rng.choice([overlong(rng.randint(0, 300), size), b"\xff" * 9 + bytes(
        [rng.randint(0, 0x7F)]), b"\x80" * (size - 1) + b"\x00"])
    return join(pieces)


def m_tag(rng: random.Random, name: str, pieces: list[Piece], level: int) -> bytes:
    """A field's tag over-long (1 to 7 bytes), or a tag value past 2^32."""
    if not pieces:
        return m_unknown(rng, name, pieces, level)
    p = rng.choice(pieces)
    if rng.random() < 0.8:
        p.tag = tag(p.number, p.wt, rng.randint(1, 7))
    else:
        p.tag = varint(rng.choice([1 << 32, (1 << 32) | p.wt, (1 << 35) - 1]) | p.wt)
    return join(pieces)


def m_length(rng: random.Random, name: str, pieces: list[Piece], level: int) -> bytes:
    """A length over-long (up to 7 bytes), off by a little, or huge."""
    ls = [i for i, p in enumerate(pieces) if p.wt == 2]
    if not ls:
        return m_unknown(rng, name, pieces, level)
    i = rng.choice(ls)
    p = pieces[i]
    n = len(p.body)
    choice = rng.random()
    if choice < 0.35:
        length = overlong(n, rng.randint(1, 7))
    elif choice < 0.7:
        length = varint(max(0, n + rng.choice([-3, -1, 1, 2, 10])))
    else:
        length = overlong(rng.choice([2**31 - 1, 2**31, 2**32 + n, 2**35 - 1, 2**63, n + 2**28]),
                          rng.choice([0, 5]))
    return join(pieces[:i]) + p.tag + length + p.body + join(pieces[i + 1:])


def m_fixed(rng: random.Random, name: str, pieces: list[Piece], level: int) -> bytes:
    """A fixed64 / fixed32 field cut short at the end of the message."""
    numbers = _fields_of(name, {"fixed64", "fixed32"})
    number = rng.choice(numbers) if numbers else 99
    wt = rng.choice([1, 5])
    return join(pieces) + tag(number, wt) + rng.randbytes(rng.randint(0, 8 if wt == 1 else 4))


def m_reorder(rng: random.Random, name: str, pieces: list[Piece], level: int) -> bytes:
    if not pieces:
        return b""
    i, j = rng.randrange(len(pieces)), rng.randrange(len(pieces))
    op = rng.randrange(3)
    if op == 0:
        pieces.insert(j, pieces[i])
    elif op == 1:
        del pieces[i]
    else:
        pieces[i], pieces[j] = pieces[j], pieces[i]
    return join(pieces)


def chain(level: int, target: int, rng: random.Random) -> bytes:
    """A KeyValue's value: AnyValues nested (arrays and key-value lists) from ``level`` (the
    KeyValue's AnyValue) to ``target``, ending in an empty message or in groups up to it."""
    # from the innermost outwards: levels level .. last, alternating the kinds
    kinds: list[str] = []
    lv = level
    while lv < target:
        k = rng.choice(["array", "kvlist"])
        step = 2 if k == "array" else 3
        if lv + step > target:
            k, step = "array", 2
            if lv + step > target:
                break
        kinds.append(k)
        lv += step
    groups = target - lv if rng.random() < 0.5 else 0
    inner = b""
    for _ in range(groups):
        inner = tag(7, 3) + inner + tag(7, 4)
    # AnyValue.array_value > ArrayValue.values > AnyValue, or
    # AnyValue.kvlist_value > KeyValueList.values > KeyValue.value > AnyValue
    for k in reversed(kinds):
        inner = ld(5, ld(1, inner)) if k == "array" else ld(6, ld(1, ld(1, b"k") + ld(2, inner)))
    return inner


def m_deep(rng: random.Random, name: str, pieces: list[Piece], level: int) -> bytes:
    """Nesting to around the depth limit: AnyValues (and groups at the bottom) inserted
    where the message takes attributes, or groups in an unknown field."""
    target = MAX_DEPTH + rng.choice([-2, -1, 0, 0, 1, 2])
    attr = {n for n, (k, sub) in SCHEMA[name].items()
            if sub == "opentelemetry.proto.common.v1.KeyValue"}
    if attr and rng.random() < 0.7:
        number = rng.choice(sorted(attr))
        raw = ld(number, ld(1, b"deep") + ld(2, chain(level + 2, target, rng)))
    else:
        g = max(0, target - level)
        raw = b""
        for _ in range(g):
            raw = tag(99, 3) + raw + tag(99, 4)
    return insert_raw(rng, pieces, raw)


def m_huge(rng: random.Random, name: str, pieces: list[Piece], level: int) -> bytes:
    """A length-delimited field claiming far more than there is."""
    number = rng.choice([*SCHEMA[name], 99])
    size = rng.choice([2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**35 - 1, 2**40])
    return insert_raw(rng, pieces, tag(number, 2) + varint(size) + b"abc")


FIELD_MUTATIONS: dict[str, Callable[[random.Random, str, list[Piece], int], bytes]] = {
    "utf8": m_utf8, "wire_type": m_wire_type, "group": m_group, "unknown": m_unknown,
    "varint": m_varint, "tag": m_tag, "length": m_length, "fixed": m_fixed,
    "reorder": m_reorder, "deep": m_deep, "huge": m_huge,
}


def structured(rng: random.Random, raw: bytes, kind: str) -> bytes:
    """``kind`` applied to one message of the request, chosen by walking down known message
    fields; the enclosing lengths re-framed (so that the mutation is inside)."""

    def at(b: bytes, name: str, level: int) -> bytes:
        pieces = parse(b)
        if pieces is None:
            return byte_mutate(rng, b)
        subs = [i for i, p in enumerate(pieces) if p.wt == 2 and p.number in SCHEMA[name]
                and SCHEMA[name][p.number][0] == "message"]
        if subs and rng.random() < 0.75:
            i = rng.choice(subs)
            sub = SCHEMA[name][pieces[i].number][1]
            pieces[i].body = at(pieces[i].body, sub, level + 1)
            return join(pieces)
        return FIELD_MUTATIONS[kind](rng, name, pieces, level)

    return at(raw, REQUEST, 0)


def byte_mutate(rng: random.Random, b: bytes) -> bytes:
    a = bytearray(b)
    op = rng.randrange(6)
    pos = rng.randint(0, len(a))
    if op == 0 and a:
        a[min(pos, len(a) - 1)] ^= 1 << rng.randrange(8)
    elif op == 1 and a:
        a[min(pos, len(a) - 1)] = rng.choice([0, 0x7F, 0x80, 0xFF, 0x04, 0x03, 0x0C])
    elif op == 2:
        a[pos:pos] = rng.randbytes(rng.randint(1, 6))
    elif op == 3 and a:
        del a[pos:pos + rng.randint(1, 8)]
    elif op == 4:
        del a[pos:]
    elif a:
        start = rng.randrange(len(a))
        a[pos:pos] = a[start:start + rng.randint(1, 24)]
    return bytes(a)


KINDS = [*FIELD_MUTATIONS, "bytes"]


@dataclass
class Case:
    index: int
    kinds: list[str]
    raw: bytes


def cases(seed: int, n: int) -> Iterator[Case]:
    """``n`` deterministic cases: the seeds themselves first, then mutations of them."""
    rng = random.Random(seed)
    pool = seeds(rng, max(8, n // 400))
    for i, raw in enumerate(pool[:n]):
        yield Case(i, ["seed"], raw)
    for i in range(len(pool), n):
        raw = rng.choice(pool)
        kinds = [rng.choice(KINDS) for _ in range(rng.choice([1, 1, 2, 3]))]
        for k in kinds:
            raw = byte_mutate(rng, raw) if k == "bytes" else structured(rng, raw, k)
        yield Case(i, kinds, raw)


# ------------------------------------------------------------------------------------------


def exact(raw: bytes) -> Any:
    """The bytes in a buffer of exactly their size (a bytes object has a NUL after its
    data, which would hide a read one past the end)."""
    return (ctypes.c_char * len(raw)).from_buffer_copy(raw) if raw else raw


def run(seed: int, n: int, exact_buffers: bool = False) -> dict[str, Any]:
    stats: Counter[str] = Counter()
    disagree: list[str] = []
    started = time.monotonic()
    for case in cases(seed, n):
        want = nc.protobuf_accepts(case.raw)
        arg = exact(case.raw) if exact_buffers else case.raw
        verdict, spans = _native.validate_traces(arg)
        stats["cases"] += 1
        stats["accepted" if want else "refused"] += 1
        for k in set(case.kinds):
            stats[f"{k}.{'accepted' if want else 'refused'}"] += 1
        if verdict is not want:
            disagree.append(f"seed {seed} case {case.index} ({'+'.join(case.kinds)}): "
                            f"protobuf {want}, compiled {verdict}")
        elif want and spans != span_count(case.raw):
            disagree.append(f"seed {seed} case {case.index}: span count differs")
    return {**dict(sorted(stats.items())), "disagreements": disagree[:20],
            "disagreement_count": len(disagree),
            "seconds": round(time.monotonic() - started, 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--cases", type=int, default=20_000)
    p.add_argument("--exact-buffers", action="store_true")
    args = p.parse_args(argv)
    if _native is None:
        print(json.dumps({"error": "the compiled extractor is not built"}))
        return 2
    summary = run(args.seed, args.cases, args.exact_buffers)
    print(json.dumps(summary))
    return 1 if summary["disagreement_count"] else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:
        traceback.print_exc()
        sys.exit(3)
