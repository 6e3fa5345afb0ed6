"""The sample Flask service, instrumented only by the Flask/sqlite3 instrumentations and
phiaudit, driven through its test client: every PHI request becomes an audit event."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from sample.app import create_app, sample_config  # type: ignore[import-not-found]
from sample.traffic import drive_traffic  # type: ignore[import-not-found]

from .conftest import make_audited


def test_traffic_becomes_audit_events(tmp_path: Path) -> None:
    a = make_audited(tmp_path / "spool", sample_config())  # base sampler: ratio 0
    app = create_app(tmp_path / "clinic.db", tracer_provider=a.provider)
    summary = drive_traffic(app.test_client(), rounds=2)
    spans = a.audit_spans()
    http = [
        s
        for s in spans
        if (s.attributes and "http.request.method" in s.attributes)
        or (s.attributes and "http.method" in s.attributes)
    ]
    explicit = [s for s in spans if s.name.startswith("phi.")]
    db = [s for s in spans if s.attributes and "db.system" in s.attributes]
    got = Counter(str(s.attributes["phi.audit.action"]) for s in http + explicit)  # type: ignore[index]
    assert got == summary.actions
    failures = Counter(
        str(s.attributes["phi.audit.action"])
        for s in http + explicit  # type: ignore[index]
        if s.attributes.get("phi.audit.outcome") == "failure"
    )  # type: ignore[union-attr]
    assert failures == summary.failures
    touched: set[str] = set()
    for s in spans:
        pid = s.attributes.get("phi.patient.id")  # type: ignore[union-attr]
        touched.update([pid] if isinstance(pid, str) else pid or ())
    assert touched == summary.patient_ids
    assert db, "SQL on PHI tables is audited too"
    assert {s.attributes["phi.resource.type"] for s in db} >= {"Patient", "Observation"}  # type: ignore[index]
    authed = [
        s
        for s in http
        if s.attributes.get("phi.audit.outcome") == "success"  # type: ignore[union-attr]
        and s.attributes.get("phi.audit.action") != "login"
    ]  # type: ignore[union-attr]
    assert authed and all(s.attributes["enduser.id"] == "alice" for s in authed)  # type: ignore[index]
    search = next(s for s in http if s.attributes.get("phi.query") == "family=Synthetic")  # type: ignore[union-attr]
    assert search.attributes["phi.record.count"] == 5  # type: ignore[index]
    assert "Synthetic" not in str(search.attributes.get("http.target"))  # type: ignore[union-attr]
    assert a.general_spans() == ()


def test_non_phi_requests_stay_out_of_the_audit_path(tmp_path: Path) -> None:
    a = make_audited(tmp_path / "spool", sample_config(), base_sampler=ALWAYS_ON)
    client = create_app(tmp_path / "clinic.db", tracer_provider=a.provider).test_client()
    assert client.get("/healthz").status_code == 200
    assert client.get("/fhir/metadata").status_code == 200
    assert a.audit_spans() == ()
    assert {s.name for s in a.general_spans()} == {"GET /healthz", "GET /fhir/metadata"}
