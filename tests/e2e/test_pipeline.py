"""End to end: the real OpenTelemetry SDK and OTLP exporter -> `phiaudit serve` -> chDB,
read back through `phiaudit sql`, field by field."""

from __future__ import annotations

import datetime as dt
import time

from opentelemetry.trace import Status, StatusCode

from tests.conftest import RunningService, tracer_provider

PATIENTS = ["pat-7f3a91", "pat-2b8c44", "pat-9d1e07"]


def _read_span(provider, **overrides):
    tracer = provider.get_tracer("ehr")
    attrs = {
        "phi.audit.event": True,
        "phi.audit.action": "read",
        "phi.resource.type": "Observation",
        "phi.resource.id": "obs-5521",
        "phi.patient.id": PATIENTS[0],
        "phi.purpose": "TREAT",
        "enduser.id": "dr.house",
        "user.roles": ["physician", "attending"],
        "client.address": "10.20.30.40",
        "user_agent.original": "Mozilla/5.0 (ward-pc)",
        "http.request.method": "GET",
        "http.route": "/fhir/Observation/{id}",
        "http.response.status_code": 200,
        "custom.ward": "ICU-3",
    }
    attrs.update(overrides)
    with tracer.start_as_current_span("GET /fhir/Observation/obs-5521", attributes=attrs) as span:
        ctx = span.get_span_context()
    return ctx


def test_span_becomes_audit_row_field_by_field(service: RunningService) -> None:
    provider = tracer_provider(service.address)
    before = dt.datetime.now(dt.UTC)
    ctx = _read_span(provider)
    provider.shutdown()
    rows = service.rows("SELECT * FROM audit_events", decrypt=True)
    assert len(rows) == 1
    r = rows[0]
    assert r["action"] == "read" and r["outcome"] == "success"
    assert r["actor_id"] == "dr.house" and r["actor_type"] == "user"
    assert r["actor_roles"] == ["physician", "attending"]
    assert r["service_name"] == "ehr-api" and r["host_name"] == "app-host-1"
    assert r["resource_type"] == "Observation" and r["resource_id"] == "obs-5521"
    assert r["patient_id"] == PATIENTS[0]
    assert r["purpose"] == "TREAT"
    assert r["client_address"] == "10.20.30.40"
    assert r["user_agent"] == "Mozilla/5.0 (ward-pc)"
    assert r["http_method"] == "GET" and r["http_status"] == 200
    assert r["http_route"] == "/fhir/Observation/{id}"
    assert r["trace_id"] == format(ctx.trace_id, "032x")
    assert r["span_id"] == format(ctx.span_id, "016x")
    assert r["source"] == "span" and r["time_source"] == "span"
    when = dt.datetime.fromisoformat(r["event_time"])
    assert when.tzinfo is not None and when.utcoffset() == dt.timedelta(0)
    assert abs((when - before).total_seconds()) < 60
    # unknown attributes and the span name are kept, encrypted
    assert '"custom.ward":"ICU-3"' in r["extra"]
    assert "obs-5521" in r["extra"]  # the span name carried the id: kept, but encrypted
    # without --decrypt, PHI columns are ciphertext
    clear = service.rows("SELECT patient_id, resource_id, client_address, extra FROM audit_events")
    for value in clear[0].values():
        assert value.startswith("enc:")
        assert PATIENTS[0] not in value and "10.20.30.40" not in value


def test_one_row_per_patient_and_blind_index(service: RunningService) -> None:
    provider = tracer_provider(service.address)
    _read_span(provider, **{"phi.audit.action": "search", "phi.patient.id": PATIENTS,
                            "phi.record.count": 3, "phi.query": "name=smith&birthdate=1970"})
    provider.shutdown()
    rows = service.rows("SELECT event_id, patient_id, query, record_count, action "
                        "FROM audit_events ORDER BY seq", decrypt=True)
    assert sorted(r["patient_id"] for r in rows) == sorted(PATIENTS)
    assert len({r["event_id"] for r in rows}) == 3
    assert all(r["query"] == "name=smith&birthdate=1970" and r["record_count"] == 3
               and r["action"] == "search" for r in rows)
    hit = service.rows(f"SELECT patient_id FROM audit_events "
                       f"WHERE patient_bidx = blind_index('patient', '{PATIENTS[1]}')",
                       decrypt=True)
    assert [h["patient_id"] for h in hit] == [PATIENTS[1]]


def test_outcomes_explicit_and_derived(service: RunningService) -> None:
    provider = tracer_provider(service.address)
    tracer = provider.get_tracer("ehr")
    base = {"phi.audit.event": True, "phi.audit.action": "read", "phi.patient.id": "p1",
            "enduser.id": "u1"}
    with tracer.start_as_current_span("explicit", attributes={**base,
                                      "phi.audit.outcome": "failure", "custom.case": "a"}):
        pass
    with tracer.start_as_current_span("status", attributes={**base, "custom.case": "b"}) as s:
        s.set_status(Status(StatusCode.ERROR))
    with tracer.start_as_current_span("http", attributes={
            **base, "custom.case": "c", "http.response.status_code": 403}):
        pass
    try:
        with tracer.start_as_current_span("exc", attributes={**base, "custom.case": "d"},
                                          set_status_on_exception=False):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    with tracer.start_as_current_span("ok", attributes={**base, "custom.case": "e"}):
        pass
    provider.shutdown()
    rows = service.rows("SELECT outcome, outcome_reason, extra FROM audit_events", decrypt=True)
    got = {}
    for r in rows:
        case = r["extra"].split('"custom.case":"')[1][0]
        got[case] = (r["outcome"], r["outcome_reason"])
    assert got == {"a": ("failure", "explicit"), "b": ("failure", "status"),
                   "c": ("failure", "http"), "d": ("failure", "exception"),
                   "e": ("success", "default")}


def test_span_events_and_log_records(service: RunningService) -> None:
    from opentelemetry._logs import LogRecord, SeverityNumber
    from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk._logs.export import SimpleLogRecordProcessor
    from opentelemetry.sdk.resources import Resource

    provider = tracer_provider(service.address)
    tracer = provider.get_tracer("ehr")
    with tracer.start_as_current_span("batch-job", attributes={"enduser.id": "svc-reports",
                                                               "phi.actor.type": "system"}) as s:
        for i, pid in enumerate(["pe-1", "pe-2"]):
            s.add_event("phi.access", {"phi.audit.action": "print", "phi.patient.id": pid,
                                       "phi.resource.type": "Encounter",
                                       "phi.resource.id": f"enc-{i}"})
    provider.shutdown()
    lp = LoggerProvider(resource=Resource.create({"service.name": "portal"}))
    lp.add_log_record_processor(SimpleLogRecordProcessor(
        OTLPLogExporter(endpoint=service.address, insecure=True)))
    logger = lp.get_logger("audit")
    logger.emit(LogRecord(
        timestamp=time.time_ns(), severity_number=SeverityNumber.INFO, body="disclosure sent",
        attributes={"phi.audit.event": True, "phi.audit.action": "disclose",
                    "phi.patient.id": "pl-1", "phi.disclosure.recipient": "Acme Insurance",
                    "phi.purpose": "HPAYMT", "enduser.id": "clerk-9"}))
    logger.emit(LogRecord(timestamp=time.time_ns(), body="not an audit record",
                          attributes={"http.route": "/health"}))
    lp.shutdown()
    rows = service.rows("SELECT source, action, patient_id, resource_id, recipient, actor_id, "
                        "actor_type, service_name, extra FROM audit_events ORDER BY seq",
                        decrypt=True)
    by_source = sorted((r["source"], r["patient_id"]) for r in rows)
    assert by_source == [("log", "pl-1"), ("span_event", "pe-1"), ("span_event", "pe-2")]
    events = [r for r in rows if r["source"] == "span_event"]
    assert all(r["action"] == "print" and r["actor_id"] == "svc-reports"
               and r["actor_type"] == "system" for r in events)
    assert {r["resource_id"] for r in events} == {"enc-0", "enc-1"}
    log = next(r for r in rows if r["source"] == "log")
    assert log["recipient"] == "Acme Insurance" and log["action"] == "disclose"
    assert log["service_name"] == "portal" and "disclosure sent" in log["extra"]
    # the span that carried the events is a trace, without its phi.access events
    traces = service.rows("SELECT SpanName, Events.Name AS names FROM otel_traces")
    assert [(t["SpanName"], t["names"]) for t in traces] == [("batch-job", [])]


def test_non_audit_spans_go_to_otel_traces_stripped(service: RunningService) -> None:
    provider = tracer_provider(service.address)
    tracer = provider.get_tracer("ehr")
    with (tracer.start_as_current_span("GET /health", attributes={
            "http.route": "/health", "phi.patient.id": "leaky-pat-1", "url.query": "ssn=123",
            "db.statement": "SELECT * FROM patients WHERE mrn='M-1'", "server.port": 8080}),
          tracer.start_as_current_span("child")):
        pass
    # a hand-made span named after a raw path: its ids and query string never reach the disk
    with tracer.start_as_current_span("GET /Patient/pat-98765/_history?name=Doe"):
        pass
    provider.shutdown()
    rows = service.rows("SELECT SpanName, SpanKind, ServiceName, SpanAttributes, TraceId, "
                        "ParentSpanId, Duration FROM otel_traces ORDER BY Timestamp")
    assert [r["SpanName"] for r in rows] == ["GET /health", "child",
                                             "GET /Patient/{id}/_history"]
    attrs = rows[0]["SpanAttributes"]
    assert attrs == {"http.route": "/health", "server.port": "8080"}
    assert rows[0]["ServiceName"] == "ehr-api"
    assert rows[1]["ParentSpanId"] != "" and rows[0]["TraceId"] == rows[1]["TraceId"]
    assert service.rows("SELECT count() AS n FROM audit_events")[0]["n"] == 0
