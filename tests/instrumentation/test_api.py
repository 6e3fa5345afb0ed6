"""The explicit audit API, and that nothing in it ever raises into the application."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import ReadableSpan

from phiaudit.instrumentation import (
    access,
    annotate,
    break_glass,
    configure,
    disclosure,
    login,
    logout,
    record_access,
)

from .conftest import Audited, fast_delivery


def attrs(span: ReadableSpan) -> dict[str, object]:
    return dict(span.attributes or {})


def test_access_context_manager_and_outcome(audited: Audited) -> None:
    with access(
        "read", resource_type="Note", resource_id="n-1", patients=["p-1", "p-2"], purpose="TREAT"
    ) as audit:
        audit.add_patients("p-3", "p-1")
        audit.set_record_count(3)
    # the application's own exception passes through untouched
    with pytest.raises(KeyError), access("update", resource_type="Note", patients="p-1"):
        raise KeyError("app error")
    ok, failed = audited.audit_spans()
    assert attrs(ok) | {} == attrs(ok)
    assert attrs(ok)["phi.audit.action"] == "read"
    assert attrs(ok)["phi.patient.id"] == ("p-1", "p-2", "p-3")
    assert attrs(ok)["phi.record.count"] == 3
    assert attrs(ok)["phi.purpose"] == "TREAT"
    assert attrs(ok)["phi.audit.outcome"] == "success"
    assert attrs(failed)["phi.audit.outcome"] == "failure"
    assert failed.status.description == "KeyError"  # the type, never the message


def test_access_decorator_takes_patient_from_argument(audited: Audited) -> None:
    @access("read", resource_type="Chart", patient_arg="patient_id")
    def open_chart(patient_id: str, *, full: bool = False) -> str:
        return f"chart of {patient_id}"

    assert open_chart("p-42") == "chart of p-42"
    assert open_chart(patient_id="p-43", full=True) == "chart of p-43"
    spans = audited.audit_spans()
    assert [attrs(s)["phi.patient.id"] for s in spans] == ["p-42", "p-43"]


def test_disclosure_login_logout_break_glass(audited: Audited) -> None:
    with disclosure("Synthetic Insurance", patients="p-7", resource_type="Claim", purpose="HPAYMT"):
        pass
    login("alice", success=False)
    login("alice")
    with (
        break_glass(patients="p-8", reason="ER"),
        access("read", resource_type="Patient", patients="p-8"),
    ):
        pass
    with access("read", resource_type="Patient", patients="p-8"):
        pass
    logout("alice")
    got = [attrs(s) for s in audited.audit_spans()]
    actions = [(a["phi.audit.action"], a.get("phi.audit.outcome")) for a in got]
    assert actions == [
        ("disclose", "success"),
        ("login", "failure"),
        ("login", "success"),
        ("break_glass", "success"),
        ("read", "success"),
        ("read", "success"),
        ("logout", "success"),
    ]
    assert got[0]["phi.disclosure.recipient"] == "Synthetic Insurance"
    assert got[1]["enduser.id"] == "alice"
    assert got[3]["phi.purpose"] == "ETREAT" and got[3]["phi.patient.id"] == "p-8"
    assert got[4]["phi.purpose"] == "ETREAT"  # inside break_glass
    assert "phi.purpose" not in got[5]  # outside it


def test_several_accesses_in_one_span_are_phi_access_events(tmp_path: Path) -> None:
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    from .conftest import make_audited

    audited = make_audited(tmp_path, base_sampler=ParentBased(TraceIdRatioBased(0.0)))
    tracer = audited.provider.get_tracer("app")
    # "batch" is sampled: a child of a sampled PHI span
    with access("search", resource_type="Patient"), tracer.start_as_current_span("batch"):
        record_access("read", resource_type="Observation", patients="p-1")
        record_access("read", resource_type="Observation", patients="p-2")
    spans = {s.name: s for s in audited.audit_spans()}
    batch = spans["batch"]
    assert "phi.audit.event" not in attrs(batch)  # the span itself is not an audit event
    events = [dict(e.attributes or {}) for e in batch.events if e.name == "phi.access"]
    assert [e["phi.patient.id"] for e in events] == ["p-1", "p-2"]
    assert audited.general_spans() == ()


def test_annotate_merges_into_the_current_audit_span(audited: Audited) -> None:
    with access("search", resource_type="Patient", patients="p-1"):
        annotate(patients=["p-2", "p-1"], record_count=2)
    annotate(patients="p-9")  # outside any span: a no-op, no error
    (span,) = audited.audit_spans()
    assert attrs(span)["phi.patient.id"] == ("p-1", "p-2")
    assert attrs(span)["phi.record.count"] == 2


def test_bad_calls_and_faulty_user_callback_never_raise(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from phiaudit.instrumentation import InstrumentationConfig

    def broken_resolver() -> str:
        raise RuntimeError("resolver leaked p-SECRET")

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    audit = configure(
        exporter,
        tracer_provider=provider,
        user_resolver=broken_resolver,
        config=InstrumentationConfig(delivery=fast_delivery(tmp_path)),
    )
    with caplog.at_level(logging.WARNING, logger="phiaudit"):
        with access("read", resource_type="Patient", patients="p-1"):
            pass
        with access("no-such-action", patients="p-1"):  # type: ignore[arg-type]
            pass
        record_access("bogus")
        login(None)  # type: ignore[arg-type]
    assert audit.force_flush(5000)
    spans = exporter.get_finished_spans()
    assert len(spans) == 3  # the resolver failure did not lose the event
    assert "enduser.id" not in attrs(spans[0])
    assert "p-SECRET" not in caplog.text and "RuntimeError" in caplog.text
    audit.shutdown()


def test_bad_config_reported_at_start_up_never_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from opentelemetry.sdk.trace import TracerProvider

    bad = tmp_path / "bad.json"
    bad.write_text('{"classification": {"routes": [{"template": "x"}]}, "nope": 1}')
    with caplog.at_level(logging.ERROR, logger="phiaudit"):
        audit = configure(None, config=bad, tracer_provider=TracerProvider())
    assert "nope: unknown key" in audit.errors
    assert "config error: nope: unknown key" in caplog.text
    assert audit.config.classification.fhir_base_paths == ("/fhir",)  # defaults in force
    with pytest.raises(Exception, match="unknown key"):
        configure(None, config=bad, tracer_provider=TracerProvider(), strict=True)
