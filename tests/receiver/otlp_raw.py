"""Hand-built OTLP requests and a raw gRPC client, for tests that must send exact bytes."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence
from typing import Any

import grpc
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.logs.v1 import logs_pb2
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

TRACE_EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
LOGS_EXPORT = "/opentelemetry.proto.collector.logs.v1.LogsService/Export"


def kv(key: str, value: Any) -> common_pb2.KeyValue:
    """An OTLP attribute with exactly the protobuf type of ``value``."""
    if isinstance(value, bool):
        any_value = common_pb2.AnyValue(bool_value=value)
    elif isinstance(value, int):
        any_value = common_pb2.AnyValue(int_value=value)
    elif isinstance(value, float):
        any_value = common_pb2.AnyValue(double_value=value)
    elif isinstance(value, list):
        any_value = common_pb2.AnyValue(array_value=common_pb2.ArrayValue(
            values=[kv("", v).value for v in value]))
    else:
        any_value = common_pb2.AnyValue(string_value=str(value))
    return common_pb2.KeyValue(key=key, value=any_value)


def new_trace_id() -> bytes:
    return os.urandom(16)


def span(trace_id: bytes, attrs: dict[str, Any], *, name: str = "GET /fhir/Patient",
         start_ns: int | None = None, events: Sequence[trace_pb2.Span.Event] = ()
         ) -> trace_pb2.Span:
    start = time.time_ns() if start_ns is None else start_ns
    end = min(start + 1_000_000, 2**64 - 1)
    return trace_pb2.Span(
        trace_id=trace_id, span_id=os.urandom(8), name=name, kind=trace_pb2.Span.SPAN_KIND_SERVER,
        start_time_unix_nano=start, end_time_unix_nano=end,
        attributes=[kv(k, v) for k, v in attrs.items()], events=list(events))


def audit_span(trace_id: bytes, patient: Any, **extra: Any) -> trace_pb2.Span:
    attrs: dict[str, Any] = {"phi.audit.event": True, "phi.audit.action": "read",
                             "phi.patient.id": patient, "enduser.id": "dr.synthetic"}
    start_ns = extra.pop("start_ns", None)
    attrs.update(extra)
    return span(trace_id, attrs, start_ns=start_ns)


def trace_request(spans: Iterable[trace_pb2.Span], service: str = "ehr-api") -> bytes:
    req = trace_service_pb2.ExportTraceServiceRequest(resource_spans=[trace_pb2.ResourceSpans(
        resource=resource_pb2.Resource(attributes=[kv("service.name", service)]),
        scope_spans=[trace_pb2.ScopeSpans(spans=list(spans))])])
    return req.SerializeToString()


def logs_request(records: Iterable[logs_pb2.LogRecord]) -> bytes:
    req = logs_service_pb2.ExportLogsServiceRequest(resource_logs=[logs_pb2.ResourceLogs(
        scope_logs=[logs_pb2.ScopeLogs(log_records=list(records))])])
    return req.SerializeToString()


class RawClient:
    """A plain gRPC channel to the service; requests and responses stay bytes."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.traces = self.channel.unary_unary(TRACE_EXPORT)
        self.logs = self.channel.unary_unary(LOGS_EXPORT)

    def export(self, raw: bytes, *, timeout: float = 10, logs: bool = False,
               compression: grpc.Compression | None = None) -> grpc.StatusCode:
        """Send ``raw``; return the status code (OK or the error's)."""
        try:
            (self.logs if logs else self.traces)(raw, timeout=timeout, compression=compression)
        except grpc.RpcError as exc:
            return exc.code()  # type: ignore[no-any-return]
        return grpc.StatusCode.OK

    def export_error(self, raw: bytes, *, timeout: float = 10) -> grpc.RpcError:
        """Send ``raw`` and return the error it must produce."""
        try:
            self.traces(raw, timeout=timeout)
        except grpc.RpcError as exc:
            return exc
        raise AssertionError("the export was answered OK")

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
