"""ReadableSpan <-> JSON, for the on-disk spool (stdlib only, no protobuf needed).

Everything an exporter reads survives the round trip: name, kind, trace/span/parent ids and
flags, trace state, times, status, attributes (bool/int/float/str and their sequences),
events, links, resource and instrumentation scope.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.span import TraceState
from opentelemetry.util.types import Attributes, AttributeValue


def _attrs_out(attrs: Attributes) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple | list) else v for k, v in (attrs or {}).items()}


def _attrs_in(data: Mapping[str, Any] | None) -> dict[str, AttributeValue]:
    out: dict[str, AttributeValue] = {}
    for key, value in (data or {}).items():
        out[key] = tuple(value) if isinstance(value, list) else value
    return out


def _ctx_out(ctx: SpanContext | None) -> dict[str, Any] | None:
    if ctx is None:
        return None
    return {
        "trace_id": f"{ctx.trace_id:032x}",
        "span_id": f"{ctx.span_id:016x}",
        "flags": int(ctx.trace_flags),
        "remote": ctx.is_remote,
        "state": ctx.trace_state.to_header() if ctx.trace_state else "",
    }


def _ctx_in(data: Mapping[str, Any] | None) -> SpanContext | None:
    if data is None:
        return None
    return SpanContext(
        trace_id=int(data["trace_id"], 16),
        span_id=int(data["span_id"], 16),
        is_remote=bool(data.get("remote", False)),
        trace_flags=TraceFlags(int(data.get("flags", 0))),
        trace_state=TraceState.from_header([data["state"]]) if data.get("state") else None,
    )


def span_to_dict(span: ReadableSpan) -> dict[str, Any]:
    """A JSON-ready dict of everything an exporter reads from ``span``."""
    scope = span.instrumentation_scope
    return {
        "name": span.name,
        "kind": span.kind.name,
        "context": _ctx_out(span.context),
        "parent": _ctx_out(span.parent),
        "start": span.start_time,
        "end": span.end_time,
        "status": {"code": span.status.status_code.name, "description": span.status.description},
        "attributes": _attrs_out(span.attributes),
        "events": [
            {"name": e.name, "ts": e.timestamp, "attributes": _attrs_out(e.attributes)}
            for e in span.events
        ],
        "links": [
            {"context": _ctx_out(link.context), "attributes": _attrs_out(link.attributes)}
            for link in span.links
        ],
        "resource": {
            "attributes": _attrs_out(span.resource.attributes),
            "schema_url": span.resource.schema_url,
        },
        "scope": None
        if scope is None
        else {"name": scope.name, "version": scope.version, "schema_url": scope.schema_url},
    }


def span_from_dict(data: Mapping[str, Any]) -> ReadableSpan:
    """The inverse of :func:`span_to_dict`."""
    status = data.get("status") or {}
    scope = data.get("scope")
    resource = data.get("resource") or {}
    events: Sequence[Event] = [
        Event(e["name"], _attrs_in(e.get("attributes")), e.get("ts")) for e in data["events"]
    ]
    links = [
        Link(cast(SpanContext, _ctx_in(lk["context"])), _attrs_in(lk.get("attributes")))
        for lk in data.get("links", ())
    ]
    return ReadableSpan(
        name=data["name"],
        context=_ctx_in(data["context"]),
        parent=_ctx_in(data.get("parent")),
        resource=Resource(_attrs_in(resource.get("attributes")), resource.get("schema_url")),
        attributes=_attrs_in(data.get("attributes")),
        events=events,
        links=links,
        kind=SpanKind[data.get("kind", "INTERNAL")],
        status=Status(StatusCode[status.get("code", "UNSET")], status.get("description")),
        start_time=data.get("start"),
        end_time=data.get("end"),
        instrumentation_scope=None
        if scope is None
        else InstrumentationScope(scope["name"], scope.get("version"), scope.get("schema_url")),
    )
