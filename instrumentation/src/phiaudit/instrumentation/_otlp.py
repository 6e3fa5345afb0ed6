"""A lean OTLP/protobuf encoder for audit spans, and the fast path of the OTLP exporter.

The SDK's encoder (``opentelemetry-exporter-otlp-proto-common``) builds a protobuf
message object per attribute in Python, which costs more than everything else phiaudit
does per span. :func:`encode_request` writes the same ``ExportTraceServiceRequest`` bytes
directly (same fields, same grouping by resource then instrumentation scope, same
defaults), with the encoded attribute keys, resources and scopes cached, and the fields of
a few low-cardinality attributes that never hold PHI (``_REPEATED_KEYS``).

:func:`supports_fast_path` lets an ``OTLPSpanExporter`` (gRPC) take those bytes through its
own ``export`` (so its retries, deadline, headers, compression and metrics still apply): its
request builder is given the already encoded request instead of spans. Any other exporter
is called with ``ReadableSpan`` objects, as before; so is an OTLP exporter whose internals
turn out different (:class:`NotSpans`).
"""

from __future__ import annotations

import contextlib
import struct
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext

#: (span, the attributes to send instead of ``span.attributes``, None for its own)
Entry = tuple[ReadableSpan, Mapping[str, Any] | None]

_INT64 = 1 << 63
_FLAGS_HAS_IS_REMOTE = 0x100
_FLAGS_IS_REMOTE = 0x200
_pack_double = struct.Struct("<d").pack
_pack_fixed64 = struct.Struct("<Q").pack
_pack_fixed32 = struct.Struct("<I").pack


def _varint_slow(n: int) -> bytes:
    if n < 0:
        n += 1 << 64  # int64: two's complement, 10 bytes
    out = bytearray()
    while True:
        low = n & 0x7F
        n >>= 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


_SMALL = [_varint_slow(i) for i in range(16384)]


def _varint(n: int) -> bytes:
    return _SMALL[n] if 0 <= n < 16384 else _varint_slow(n)


def _ld(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field."""
    n = len(payload)
    return tag + (_SMALL[n] if n < 16384 else _varint_slow(n)) + payload


# tags: (field number << 3) | wire type
_T1_LD = b"\x0a"  # field 1, length-delimited
_T2_LD = b"\x12"
_T3_LD = b"\x1a"
_T4_LD = b"\x22"
_T5_LD = b"\x2a"
_T6_LD = b"\x32"
_T7_LD = b"\x3a"
_T9_LD = b"\x4a"
_T11_LD = b"\x5a"
_T13_LD = b"\x6a"
_T15_LD = b"\x7a"
_T16_I32 = b"\x85\x01"  # field 16, fixed32

_EMPTY_ANY = b"\x12\x00"  # KeyValue.value = AnyValue{} (a None value)
_BOOL = {True: b"\x10\x01", False: b"\x10\x00"}


def _any(value: Any) -> bytes:
    """An ``AnyValue`` message body (as the SDK's ``_encode_value``)."""
    if value is None:
        return b""
    if value is True or value is False:
        return _BOOL[value]
    if isinstance(value, str):
        return _ld(_T1_LD, value.encode("utf-8"))
    if isinstance(value, int):
        if not -_INT64 <= value < _INT64:
            raise ValueError("integer attribute out of the int64 range")
        return b"\x18" + _varint(value)
    if isinstance(value, float):
        return b"\x21" + _pack_double(value)
    if isinstance(value, bytes):
        return _ld(_T7_LD, value)
    if isinstance(value, Sequence):
        return _ld(_T5_LD, b"".join([_ld(_T1_LD, _any(v)) for v in value]))
    if isinstance(value, Mapping):
        return _ld(_T6_LD, b"".join([_ld(_T1_LD, _kv(str(k), v)) for k, v in value.items()]))
    raise TypeError(f"unsupported attribute value type {type(value).__name__}")


_KEYS: dict[str, bytes] = {}  # attribute key -> its encoded KeyValue.key field
_KEYS_MAX = 4096


def _key(key: str) -> bytes:
    encoded = _KEYS.get(key)
    if encoded is None:
        encoded = _ld(_T1_LD, key.encode("utf-8"))
        if len(_KEYS) >= _KEYS_MAX:
            _KEYS.clear()
        _KEYS[key] = encoded
    return encoded


def _kv(key: str, value: Any) -> bytes:
    if type(value) is str:  # the common case, inline
        raw = value.encode("utf-8")
        n = len(raw)
        body = b"\x0a" + (_SMALL[n] if n < 16384 else _varint_slow(n)) + raw
    else:
        body = _any(value)
    n = len(body)
    return _key(key) + b"\x12" + (_SMALL[n] if n < 16384 else _varint_slow(n)) + body


#: attributes whose values are few and never PHI (methods, schemes, hosts, route templates,
#: status codes, audit actions...): their encoded fields are remembered. Values of other
#: keys (paths, queries, ids, users, addresses) are encoded every time, never kept
_REPEATED_KEYS = frozenset(
    {
        "http.method",
        "http.request.method",
        "http.scheme",
        "url.scheme",
        "http.server_name",
        "http.host",
        "net.host.name",
        "net.host.port",
        "server.address",
        "server.port",
        "http.flavor",
        "network.protocol.version",
        "http.route",
        "http.status_code",
        "http.response.status_code",
        "http.user_agent",
        "user_agent.original",
        "db.system",
        "db.system.name",
        "db.name",
        "db.namespace",
        "db.operation",
        "db.operation.name",
        "phi.audit.event",
        "phi.audit.action",
        "phi.audit.outcome",
        "phi.resource.type",
        "phi.actor.type",
        "phi.purpose",
    }
)
_SCALARS = (str, bool, int, float)
_FIELDS: dict[tuple[bytes, str, type, Any], bytes] = {}
_FIELDS_MAX = 4096


def _attributes(tag: bytes, attrs: Mapping[str, Any] | None) -> list[bytes]:
    """Repeated ``KeyValue`` fields (values that cannot be encoded are left out, as the
    SDK's encoder does)."""
    if not attrs:
        return []
    out = []
    fields = _FIELDS
    for key, value in attrs.items():
        cls = value.__class__
        cacheable = key in _REPEATED_KEYS and cls in _SCALARS
        if cacheable:
            field = fields.get((tag, key, cls, value))
            if field is not None:
                out.append(field)
                continue
        try:
            field = _ld(tag, _kv(key, value))
        except (TypeError, ValueError, UnicodeError):
            continue
        if cacheable:
            if len(fields) >= _FIELDS_MAX:
                fields.clear()
            fields[(tag, key, cls, value)] = field
        out.append(field)
    return out


def _span_flags(ctx: SpanContext | None) -> bytes:
    flags = _FLAGS_HAS_IS_REMOTE
    if ctx is not None and ctx.is_remote:
        flags |= _FLAGS_IS_REMOTE
    return _pack_fixed32(flags)


def _status(span: ReadableSpan) -> bytes:
    status = span.status
    if status is None:
        return b""
    body = b""
    if status.description:
        body = _ld(_T2_LD, status.description.encode("utf-8"))
    code = status.status_code.value
    if code:
        body += b"\x18" + _varint(code)
    return _ld(_T15_LD, body)


def encode_span(span: ReadableSpan, attrs: Mapping[str, Any] | None) -> bytes:
    """One ``Span`` message body, with ``attrs`` (None: the span's own) as its attributes."""
    ctx = span.get_span_context()
    parts: list[bytes] = []
    if ctx is not None:
        parts.append(b"\x0a\x10" + ctx.trace_id.to_bytes(16, "big"))
        parts.append(b"\x12\x08" + ctx.span_id.to_bytes(8, "big"))
        state = ctx.trace_state
        if state:
            parts.append(
                _ld(_T3_LD, ",".join(f"{k}={v}" for k, v in state.items()).encode("utf-8"))
            )
    parent = span.parent
    if parent:
        parts.append(b"\x22\x08" + parent.span_id.to_bytes(8, "big"))
    if span.name:
        parts.append(_ld(_T5_LD, span.name.encode("utf-8")))
    parts.append(b"\x30" + _SMALL[span.kind.value + 1])
    if span.start_time:
        parts.append(b"\x39" + _pack_fixed64(span.start_time))
    if span.end_time:
        parts.append(b"\x41" + _pack_fixed64(span.end_time))
    parts.extend(_attributes(_T9_LD, span.attributes if attrs is None else attrs))
    if span.dropped_attributes:
        parts.append(b"\x50" + _varint(span.dropped_attributes))
    for event in span.events:
        body = [b"\x09" + _pack_fixed64(event.timestamp)] if event.timestamp else []
        if event.name:
            body.append(_ld(_T2_LD, event.name.encode("utf-8")))
        body.extend(_attributes(_T3_LD, event.attributes))
        if event.dropped_attributes:
            body.append(b"\x20" + _varint(event.dropped_attributes))
        parts.append(_ld(_T11_LD, b"".join(body)))
    if span.dropped_events:
        parts.append(b"\x60" + _varint(span.dropped_events))
    for link in span.links:
        lctx = link.context
        body = [
            b"\x0a\x10" + lctx.trace_id.to_bytes(16, "big"),
            b"\x12\x08" + lctx.span_id.to_bytes(8, "big"),
        ]
        body.extend(_attributes(_T4_LD, link.attributes))
        if link.dropped_attributes:
            body.append(b"\x28" + _varint(link.dropped_attributes))
        body.append(b"\x35" + _span_flags(lctx))
        parts.append(_ld(_T13_LD, b"".join(body)))
    if span.dropped_links:
        parts.append(b"\x70" + _varint(span.dropped_links))
    parts.append(_status(span))
    parts.append(_T16_I32 + _span_flags(parent))
    return b"".join(parts)


class _Cache:
    """Encoded resources and scopes, by identity (applications have one or a few)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._resources: dict[int, tuple[Resource, bytes]] = {}
        self._scopes: dict[int, tuple[InstrumentationScope, tuple[bytes, bytes]]] = {}

    def resource(self, resource: Resource) -> bytes:
        hit = self._resources.get(id(resource))
        if hit is not None and hit[0] is resource:
            return hit[1]
        encoded = _ld(_T1_LD, b"".join(_attributes(_T1_LD, resource.attributes)))
        with self._lock:
            if len(self._resources) >= 64:
                self._resources.clear()
            self._resources[id(resource)] = (resource, encoded)
        return encoded

    def scope(self, scope: InstrumentationScope | None) -> tuple[bytes, bytes]:
        """(``ScopeSpans.scope`` field, ``ScopeSpans.schema_url`` field)."""
        if scope is None:
            return _EMPTY_SCOPE
        hit = self._scopes.get(id(scope))
        if hit is not None and hit[0] is scope:
            return hit[1]
        body = []
        if scope.name:
            body.append(_ld(_T1_LD, scope.name.encode("utf-8")))
        if scope.version:
            body.append(_ld(_T2_LD, scope.version.encode("utf-8")))
        body.extend(_attributes(_T3_LD, scope.attributes))
        schema = _ld(_T3_LD, scope.schema_url.encode("utf-8")) if scope.schema_url else b""
        encoded = (_ld(_T1_LD, b"".join(body)), schema)
        with self._lock:
            if len(self._scopes) >= 256:
                self._scopes.clear()
            self._scopes[id(scope)] = (scope, encoded)
        return encoded


_EMPTY_SCOPE = (_ld(_T1_LD, b""), b"")


_CACHE = _Cache()


def encode_request(entries: Iterable[Entry]) -> bytes:
    """An ``ExportTraceServiceRequest``: spans grouped by resource, then by scope, in the
    order first seen (as the SDK's ``encode_spans``)."""
    groups: dict[Resource, dict[InstrumentationScope | None, list[bytes]]] = {}
    last_resource: Resource | None = None
    last_scopes: dict[InstrumentationScope | None, list[bytes]] = {}
    for span, attrs in entries:
        resource = span.resource
        if resource is not last_resource:
            last_scopes = groups.setdefault(resource, {})
            last_resource = resource
        scope = span.instrumentation_scope or None
        spans = last_scopes.get(scope)
        if spans is None:
            spans = last_scopes[scope] = []
        spans.append(_ld(_T2_LD, encode_span(span, attrs)))
    out = []
    for resource, scopes in groups.items():
        body = [_CACHE.resource(resource)]
        for scope, spans in scopes.items():
            head, schema = _CACHE.scope(scope)
            body.append(_ld(_T2_LD, head + b"".join(spans) + schema))
        if resource.schema_url:
            body.append(_ld(_T3_LD, resource.schema_url.encode("utf-8")))
        out.append(_ld(_T1_LD, b"".join(body)))
    return b"".join(out)


# ----------------------------------------------------------------------------------------
# the OTLP exporter's fast path
# ----------------------------------------------------------------------------------------
class NotSpans(TypeError):
    """An exporter tried to read spans out of an :class:`Encoded` request (its fast path is
    not what this module expects, e.g. another SDK version): use spans for it instead."""


class Encoded(Sequence[ReadableSpan]):
    """An encoded request standing in for its spans (``len`` is the span count, which the
    exporter uses for its metrics)."""

    __slots__ = ("payload", "size")

    def __init__(self, payload: bytes, size: int) -> None:
        self.payload = payload
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: Any) -> Any:
        raise NotSpans("an encoded OTLP request has no span objects")

    def __iter__(self) -> Iterator[ReadableSpan]:
        raise NotSpans("an encoded OTLP request has no span objects")


_PATCHED = "_phiaudit_fast_path"


def supports_fast_path(exporter: object) -> bool:
    """True for the OTLP/gRPC span exporter (given encoded requests from now on)."""
    known = getattr(exporter, _PATCHED, None)
    if known is not None:
        return bool(known)
    cls = type(exporter)
    if cls.__name__ != "OTLPSpanExporter" or not cls.__module__.startswith(
        "opentelemetry.exporter.otlp.proto.grpc"
    ):
        return False
    original = getattr(exporter, "_translate_data", None)
    if not callable(original):
        return False
    try:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )
    except ImportError:  # pragma: no cover - the exporter depends on it
        return False
    parse = ExportTraceServiceRequest.FromString

    def translate(data: Any) -> Any:
        if isinstance(data, Encoded):
            return parse(data.payload)
        return original(data)

    try:
        exporter._translate_data = translate  # type: ignore[attr-defined]
        setattr(exporter, _PATCHED, True)
    except AttributeError:  # pragma: no cover - e.g. __slots__
        return False
    return True


def disable_fast_path(exporter: object) -> None:
    """Give ``exporter`` spans from now on (it could not take an encoded request)."""
    with contextlib.suppress(AttributeError):
        del exporter._translate_data  # type: ignore[attr-defined]
    with contextlib.suppress(AttributeError):
        setattr(exporter, _PATCHED, False)
