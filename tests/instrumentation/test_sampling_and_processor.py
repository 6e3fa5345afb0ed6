"""PhiSampler and PhiSpanProcessor against the real SDK: PHI is never sampled out."""

from __future__ import annotations

from pathlib import Path

from opentelemetry import trace
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, Decision, TraceIdRatioBased
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags

from phiaudit.instrumentation import (
    ClassificationConfig,
    Classifier,
    InstrumentationConfig,
    PhiSampler,
)

from .conftest import Audited, make_audited

FHIR_READ = {
    "http.request.method": "GET",
    "url.path": "/fhir/Patient/p-1",
    "http.route": "/fhir/Patient/<pid>",
}


def test_ratio_zero_still_exports_every_phi_span_and_no_other(audited: Audited) -> None:
    tracer = audited.provider.get_tracer("app")
    for i in range(20):
        tracer.start_span(
            "GET /fhir/Patient/<pid>",
            kind=SpanKind.SERVER,
            attributes={**FHIR_READ, "url.path": f"/fhir/Patient/p-{i}"},
        ).end()
        tracer.start_span(
            "GET /healthz",
            kind=SpanKind.SERVER,
            attributes={"http.request.method": "GET", "url.path": "/healthz"},
        ).end()
    spans = audited.audit_spans()
    assert len(spans) == 20
    assert {s.attributes["phi.patient.id"] for s in spans} == {f"p-{i}" for i in range(20)}  # type: ignore[index]
    assert all(s.attributes["phi.audit.event"] is True for s in spans)  # type: ignore[index]
    assert audited.general_spans() == ()  # ratio 0: nothing else, and no PHI there


def test_phi_span_sampled_under_a_non_sampled_parent(audited: Audited) -> None:
    parent = SpanContext(
        trace_id=0xABC, span_id=0xDEF, is_remote=True, trace_flags=TraceFlags(TraceFlags.DEFAULT)
    )
    ctx = trace.set_span_in_context(NonRecordingSpan(parent))
    tracer = audited.provider.get_tracer("app")
    span = tracer.start_span("GET", context=ctx, kind=SpanKind.SERVER, attributes=FHIR_READ)
    assert span.get_span_context().trace_flags.sampled
    span.end()
    (got,) = audited.audit_spans()
    assert got.context is not None and got.context.trace_id == 0xABC


def test_sampler_delegates_non_phi_and_describes_itself() -> None:
    sampler = PhiSampler(ALWAYS_ON)
    result = sampler.should_sample(
        None, 1, "GET /x", SpanKind.SERVER, {"http.request.method": "GET", "url.path": "/x"}
    )
    assert result.decision is Decision.RECORD_AND_SAMPLE
    assert "phi.audit.event" not in result.attributes
    phi = PhiSampler(TraceIdRatioBased(0.0)).should_sample(
        None, 1, "GET", SpanKind.SERVER, FHIR_READ
    )
    assert phi.decision is Decision.RECORD_AND_SAMPLE
    assert phi.attributes["phi.audit.action"] == "read"
    assert PhiSampler(ALWAYS_ON).get_description() == "PhiSampler{AlwaysOnSampler}"


def test_db_span_on_phi_table_audited_even_when_not_sampled(tmp_path: Path) -> None:
    config = InstrumentationConfig(ClassificationConfig(phi_tables={"patients": "Patient"}))
    a = make_audited(tmp_path, config)
    tracer = a.provider.get_tracer("db")
    # as the DB-API instrumentation does: statement set after the span started
    for statement in ("SELECT * FROM patients WHERE id = ?", "SELECT * FROM doctors"):
        with tracer.start_as_current_span("SELECT", kind=SpanKind.CLIENT) as span:
            assert span.is_recording()
            span.set_attributes({"db.system": "sqlite", "db.statement": statement})
    (got,) = a.audit_spans()
    assert got.attributes is not None
    assert got.attributes["phi.audit.action"] == "read"
    assert got.attributes["phi.resource.type"] == "Patient"
    assert got.attributes["phi.query"] == "SELECT * FROM patients WHERE id = ?"
    assert a.general_spans() == ()
    sampler = PhiSampler(TraceIdRatioBased(0.0), Classifier(config.classification))
    assert (
        sampler.should_sample(None, 1, "SELECT", SpanKind.CLIENT).decision is Decision.RECORD_ONLY
    )
    assert sampler.should_sample(None, 1, "GET", SpanKind.SERVER).decision is Decision.DROP


def test_query_moved_out_of_standard_attributes(audited: Audited) -> None:
    tracer = audited.provider.get_tracer("app")
    attrs = {
        "http.request.method": "GET",
        "url.path": "/fhir/Observation",
        "url.query": "patient=p-9&code=8867-4",
        "url.full": "http://h/fhir/Observation?patient=p-9&code=8867-4",
        "http.target": "/fhir/Observation?patient=p-9&code=8867-4",
    }
    span = tracer.start_span("GET /fhir/Observation", kind=SpanKind.SERVER, attributes=attrs)
    assert span.attributes is not None and span.attributes["url.query"] == "REDACTED"  # writable
    # an instrumentation sets the clear value again after start (Flask does)
    span.set_attribute("http.target", "/fhir/Observation?patient=p-9&code=8867-4")
    span.set_attribute("http.response.status_code", 200)
    span.end()
    (got,) = audited.audit_spans()
    assert got.attributes is not None
    assert got.attributes["phi.query"] == "patient=p-9&code=8867-4"
    assert got.attributes["phi.patient.id"] == "p-9"
    assert got.attributes["phi.audit.outcome"] == "success"
    for key in ("url.query", "url.full", "http.target"):
        assert "p-9" not in str(got.attributes[key])


def test_forbidden_on_a_phi_route_is_a_failed_access(audited: Audited) -> None:
    tracer = audited.provider.get_tracer("app")
    span = tracer.start_span("GET", kind=SpanKind.SERVER, attributes=FHIR_READ)
    span.set_attribute("http.response.status_code", 403)
    span.end()
    (got,) = audited.audit_spans()
    assert got.attributes is not None and got.attributes["phi.audit.outcome"] == "failure"


def test_identity_propagates_to_phi_spans_of_the_trace(audited: Audited) -> None:
    from phiaudit.instrumentation import identify, record_access

    tracer = audited.provider.get_tracer("app")
    with tracer.start_as_current_span("GET", kind=SpanKind.SERVER, attributes=FHIR_READ):
        identify("dr-who", roles=["clinician"])
        with tracer.start_as_current_span("inner") as inner:  # ratio 0: not recording
            assert not inner.is_recording()
            record_access("read", resource_type="Note", patients="p-1")  # emits its own span
    spans = {s.name: s for s in audited.audit_spans()}
    assert set(spans) == {"GET", "phi.read"}
    for name in ("GET", "phi.read"):
        attrs = spans[name].attributes
        assert attrs is not None and attrs["enduser.id"] == "dr-who"
    assert spans["GET"].attributes["user.roles"] == ("clinician",)  # type: ignore[index]
