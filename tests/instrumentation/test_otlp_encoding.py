"""The lean OTLP encoder writes what the SDK's encoder writes, and the OTLP/gRPC exporter's
fast path puts exactly those bytes on the wire (real exporter, real gRPC server)."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.exporter.otlp.proto.common._internal import _encode_attributes
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    set_span_in_context,
)
from opentelemetry.trace.span import TraceState

from phiaudit.instrumentation import AuditDelivery
from phiaudit.instrumentation._delivery import PendingSpan
from phiaudit.instrumentation._otlp import encode_request, supports_fast_path

from .conftest import fast_delivery

Request = trace_service_pb2.ExportTraceServiceRequest


def varied_spans() -> list[ReadableSpan]:
    """Spans of every shape the encoder handles: kinds, parents (local and remote), trace
    state, status, events, links, dropped counts, every attribute type, two resources and
    several scopes (with version, schema URL and attributes)."""
    limits = SpanLimits(max_span_attributes=12, max_events=2, max_links=1)
    first = TracerProvider(
        resource=Resource({"service.name": "clinic", "deployment": "test"}, "https://s/1"),
        span_limits=limits,
    )
    second = TracerProvider(resource=Resource({"service.name": "billing", "n": 3}))
    tracers = [
        first.get_tracer("flask", "3.1", "https://schema/flask", attributes={"lib": "x"}),
        first.get_tracer("sqlite3"),
        second.get_tracer("explicit", "1.0"),
    ]
    remote = SpanContext(
        0x0AF7651916CD43DD8448EB211C80319C,
        0xB7AD6B7169203331,
        is_remote=True,
        trace_flags=TraceFlags(1),
        trace_state=TraceState([("vendor", "v1"), ("other", "x")]),
    )
    spans: list[ReadableSpan] = []
    for i in range(12):
        tracer = tracers[i % 3]
        ctx = set_span_in_context(NonRecordingSpan(remote)) if i % 4 == 0 else None
        attrs: dict[str, Any] = {
            "phi.audit.event": True,
            "phi.audit.action": "read",
            "phi.patient.id": f"p-{i:03d}",
            "http.status_code": 200 + i,
            "negative": -5 - i,
            "big": 2**62,
            "ratio": 0.25 * i,
            "flag": i % 2 == 0,
            "user.roles": ("clinician", "admin"),
            "ints": (1, -2, 3),
            "floats": (1.5, -0.0),
            "bools": (True, False),
            "unicode": "Zoë ✓ 患者",
            "empty": "",
        }
        links = [Link(remote, {"link.kind": "follows"})] if i % 3 == 1 else []
        kind = list(SpanKind)[i % 5]
        with tracer.start_as_current_span(
            f"span {i}", context=ctx, kind=kind, attributes=attrs, links=links
        ) as span:
            if i % 2:
                span.add_event("phi.access", {"phi.patient.id": "p-9", "n": i})
                span.add_event("second", timestamp=1_700_000_000_000_000_000 + i)
                span.add_event("third (dropped past the limit)")
            if i % 5 == 2:
                span.set_status(Status(StatusCode.ERROR, "denied"))
            elif i % 5 == 3:
                span.set_status(Status(StatusCode.OK))
            with tracer.start_as_current_span(f"child {i}") as child:
                child.set_attribute("db.statement", "SELECT * FROM patients WHERE id = ?")
            spans.append(child)  # type: ignore[arg-type]
        spans.append(span)  # type: ignore[arg-type]
    # an instrumentation scope of None, and no parent, set by hand
    spans.append(
        ReadableSpan(
            name="bare",
            context=SpanContext(1, 2, is_remote=False),
            resource=Resource({}),
            attributes={"k": "v"},
            start_time=10,
            end_time=20,
            instrumentation_scope=None,
        )
    )
    spans.append(
        ReadableSpan(
            name="scoped",
            context=SpanContext(3, 4, is_remote=False),
            resource=Resource({}),
            instrumentation_scope=InstrumentationScope("only-name"),
        )
    )
    return spans


def test_lean_encoder_writes_the_sdk_encoders_bytes() -> None:
    spans = varied_spans()
    expected = encode_spans(spans)
    ours = encode_request([(s, s.attributes or {}) for s in spans])
    assert Request.FromString(ours) == expected
    assert ours == expected.SerializeToString()


def test_lean_encoder_uses_the_attributes_it_is_given() -> None:
    span = varied_spans()[1]
    extra = {**(span.attributes or {}), "phi.audit.outcome": "failure", "enduser.id": "alice"}
    decoded = Request.FromString(encode_request([(span, extra)]))
    (got,) = decoded.resource_spans[0].scope_spans[0].spans
    values = {kv.key: kv.value for kv in got.attributes}
    assert values["phi.audit.outcome"].string_value == "failure"
    assert values["enduser.id"].string_value == "alice"
    assert len(got.attributes) == len(extra)


def test_unencodable_values_are_left_out_like_the_sdk_does() -> None:
    span = ReadableSpan(
        name="odd",
        context=SpanContext(5, 6, is_remote=False),
        resource=Resource({}),
        attributes={"ok": "v", "huge": 2**70, "obj": object(), "after": 1},  # type: ignore[dict-item]
    )
    decoded = Request.FromString(encode_request([(span, span.attributes or {})]))
    keys = [kv.key for kv in decoded.resource_spans[0].scope_spans[0].spans[0].attributes]
    assert keys == ["ok", "after"]


class Recorder(trace_service_pb2_grpc.TraceServiceServicer):
    """A real OTLP/gRPC trace endpoint that keeps the raw requests."""

    def __init__(self) -> None:
        self.requests: list[Any] = []
        self.lock = threading.Lock()

    def Export(self, request: Any, context: Any) -> Any:  # the gRPC method name
        with self.lock:
            self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture
def endpoint() -> Iterator[tuple[str, Recorder]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    recorder = Recorder()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(recorder, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", recorder
    finally:
        server.stop(None)


class _Tagged(PendingSpan):
    __slots__ = ()

    def attributes(self) -> dict[str, Any]:
        return {**(self.span.attributes or {}), "phi.audit.outcome": "success"}


def test_otlp_exporter_fast_path_sends_what_the_sdk_would(
    tmp_path: Path, endpoint: tuple[str, Recorder]
) -> None:
    address, recorder = endpoint
    exporter = OTLPSpanExporter(endpoint=address, insecure=True)
    delivery = AuditDelivery(exporter, fast_delivery(tmp_path))
    spans = varied_spans()
    for i, span in enumerate(spans):
        delivery.submit(_Tagged(span) if i % 2 else span)
    assert delivery.force_flush(10000)
    delivery.shutdown()
    assert supports_fast_path(exporter)
    got = [
        s
        for request in recorder.requests
        for rs in request.resource_spans
        for ss in rs.scope_spans
        for s in ss.spans
    ]
    want = []
    for i, span in enumerate(spans):  # the SDK's encoding of each span, then its attributes
        (message,) = encode_spans([span]).resource_spans[0].scope_spans[0].spans
        if i % 2:
            del message.attributes[:]
            message.attributes.extend(
                _encode_attributes({**(span.attributes or {}), "phi.audit.outcome": "success"})
            )
        want.append(message)
    key = lambda s: (s.trace_id, s.span_id)  # noqa: E731
    assert sorted(got, key=key) == sorted(want, key=key)
    assert delivery.dropped == 0 and delivery.spooled == 0


class Plain(SpanExporter):
    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        assert all(isinstance(s, ReadableSpan) for s in spans)
        self.spans.extend(spans)
        return SpanExportResult.SUCCESS


def test_other_exporters_still_get_readable_spans_with_the_enriched_attributes(
    tmp_path: Path,
) -> None:
    exporter = Plain()
    assert not supports_fast_path(exporter)
    delivery = AuditDelivery(exporter, fast_delivery(tmp_path))
    spans = varied_spans()[:4]
    for span in spans:
        delivery.submit(_Tagged(span))
    assert delivery.force_flush(5000)
    delivery.shutdown()
    assert [s.context.span_id for s in exporter.spans if s.context] == [
        s.context.span_id for s in spans if s.context
    ]
    assert all((s.attributes or {})["phi.audit.outcome"] == "success" for s in exporter.spans)


def test_an_exporter_that_reads_spans_falls_back_to_spans_once(
    tmp_path: Path, endpoint: tuple[str, Recorder]
) -> None:
    """If the OTLP exporter's internals are not what the fast path expects (another SDK
    version), the batch is sent as spans, once, and every later batch too."""
    address, recorder = endpoint
    exporter = OTLPSpanExporter(endpoint=address, insecure=True)
    assert supports_fast_path(exporter)
    calls: list[int] = []
    original = exporter.export

    def reads_spans(spans: Sequence[ReadableSpan]) -> SpanExportResult:
        calls.append(len(list(spans)))  # iterating an encoded request raises
        return original(spans)

    exporter.export = reads_spans  # type: ignore[method-assign]
    delivery = AuditDelivery(exporter, fast_delivery(tmp_path))
    spans = varied_spans()
    for span in spans[:5]:
        delivery.submit(span)
    assert delivery.force_flush(10000)
    for span in spans[5:]:
        delivery.submit(span)
    assert delivery.force_flush(10000)
    delivery.shutdown()
    assert not supports_fast_path(exporter)
    got = [
        s.span_id
        for r in recorder.requests
        for rs in r.resource_spans
        for ss in rs.scope_spans
        for s in ss.spans
    ]
    assert sorted(got) == sorted(s.context.span_id.to_bytes(8, "big") for s in spans if s.context)
    assert sum(calls) == len(spans)
    assert delivery.dropped == 0 and delivery.spooled == 0
