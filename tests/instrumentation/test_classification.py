"""Classification: FHIR REST, route templates, databases, auth, query hygiene, config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.trace import SpanKind

from phiaudit.instrumentation import (
    Action,
    ClassificationConfig,
    Classifier,
    ConfigError,
    InstrumentationConfig,
    RouteRule,
)
from phiaudit.instrumentation.environment_variables import PHIAUDIT_INSTRUMENTATION_CONFIG

FHIR = Classifier()


def http(method: str, target: str, **extra: Any) -> dict[str, Any]:
    path, _, query = target.partition("?")
    attrs: dict[str, Any] = {"http.request.method": method, "url.path": path}
    if query:
        attrs["url.query"] = query
    attrs.update(extra)
    return attrs


# method, target, action, resource type, resource id, patient(s)
FHIR_CASES = [
    ("GET", "/fhir/Patient/123", "read", "Patient", "123", "123"),
    ("GET", "/fhir/Patient/123/_history/2", "read", "Patient", "123", "123"),
    ("GET", "/fhir/Patient/123/_history", "read", "Patient", "123", "123"),
    ("GET", "/fhir/Observation/o1/_history/4", "read", "Observation", "o1", None),
    ("GET", "/fhir/Observation?patient=123", "search", "Observation", None, "123"),
    (
        "GET",
        "/fhir/Observation?subject=Patient/9,Patient/10",
        "search",
        "Observation",
        None,
        ("9", "10"),
    ),
    ("GET", "/fhir/Observation?subject=Group/7", "search", "Observation", None, None),
    (
        "GET",
        "/fhir/Encounter?patient=https://ehr.example/fhir/Patient/55",
        "search",
        "Encounter",
        None,
        "55",
    ),
    ("GET", "/fhir/Patient?_id=1,2", "search", "Patient", None, ("1", "2")),
    ("GET", "/fhir/Patient", "search", "Patient", None, None),
    ("POST", "/fhir/Observation/_search?patient=77", "search", "Observation", None, "77"),
    ("GET", "/fhir/Patient/123/Observation", "search", "Observation", None, "123"),
    ("POST", "/fhir/Observation", "create", "Observation", None, None),
    ("PUT", "/fhir/Patient/123", "update", "Patient", "123", "123"),
    ("PATCH", "/fhir/Observation/o1", "update", "Observation", "o1", None),
    ("DELETE", "/fhir/Encounter/e1", "delete", "Encounter", "e1", None),
    ("DELETE", "/fhir/Observation?patient=5", "delete", "Observation", None, "5"),
    ("GET", "/fhir/Patient/123/$everything", "read", "Patient", "123", "123"),
    ("GET", "/fhir/$export", "export", None, None, None),
    ("GET", "/fhir/Patient/$export?_type=Observation", "export", "Patient", None, None),
    ("POST", "/fhir/Group/g1/$export", "export", "Group", "g1", None),
]


@pytest.mark.parametrize(("method", "target", "action", "rtype", "rid", "patients"), FHIR_CASES)
def test_fhir_rest_interactions(
    method: str, target: str, action: str, rtype: str | None, rid: str | None, patients: Any
) -> None:
    tags = FHIR.classify("span", SpanKind.SERVER, http(method, target))
    assert tags is not None
    assert tags["phi.audit.event"] is True
    assert tags["phi.audit.action"] == action
    assert tags.get("phi.resource.type") == rtype
    assert tags.get("phi.resource.id") == rid
    assert tags.get("phi.patient.id") == patients
    query = target.partition("?")[2]
    assert tags.get("phi.query") == (query or None)


@pytest.mark.parametrize(
    "target",
    [
        "/fhir/metadata",
        "/fhir/ValueSet/abc",
        "/fhir/CodeSystem?url=x",
        "/healthz",
        "/fhirx/Patient/1",
        "/fhir/Patient/1/$validate-unknown",
    ],
)
def test_non_phi_requests_are_not_audit_events(target: str) -> None:
    assert FHIR.classify("span", SpanKind.SERVER, http("GET", target)) is None


def test_old_http_semconv_target_and_status_outcome() -> None:
    attrs = {
        "http.method": "GET",
        "http.target": "/fhir/Patient/9?_format=json",
        "http.status_code": 403,
    }
    tags = FHIR.classify("GET", SpanKind.SERVER, attrs, ended=True)
    assert tags is not None
    assert tags["phi.audit.action"] == "read"
    assert tags["phi.patient.id"] == "9"
    assert tags["phi.query"] == "_format=json"
    assert tags["phi.audit.outcome"] == "failure"


def test_explicit_attributes_are_never_overwritten() -> None:
    attrs = http(
        "GET", "/fhir/Patient/1", **{"phi.patient.id": "explicit", "phi.audit.outcome": "success"}
    )
    tags = FHIR.classify("x", SpanKind.SERVER, attrs, ended=True)
    assert tags is not None
    assert "phi.patient.id" not in tags and "phi.audit.outcome" not in tags


ROUTES = Classifier(
    ClassificationConfig(
        routes=(
            RouteRule("/api/patients/{patient_id}/notes", "Note", patient_param="patient_id"),
            RouteRule(
                "/api/patients/<int:patient_id>/notes/<note_id>",
                "Note",
                patient_param="patient_id",
                id_param="note_id",
                actions={"POST": Action.PRINT},
                purpose="TREAT",
            ),
            RouteRule("/api/patients", "Patient"),
        ),
        auth_routes={"/auth/signin": Action.LOGIN, "/auth/signout": Action.LOGOUT},
    )
)


@pytest.mark.parametrize(
    ("method", "attrs", "expected"),
    [
        (
            "GET",
            {
                "http.route": "/api/patients/<patient_id>/notes",
                "url.path": "/api/patients/42/notes",
            },
            {"phi.audit.action": "read", "phi.resource.type": "Note", "phi.patient.id": "42"},
        ),
        (
            "GET",
            {"url.path": "/api/patients/42/notes/n7"},
            {
                "phi.audit.action": "read",
                "phi.patient.id": "42",
                "phi.resource.id": "n7",
                "phi.purpose": "TREAT",
            },
        ),
        ("POST", {"url.path": "/api/patients/42/notes/n7"}, {"phi.audit.action": "print"}),
        ("DELETE", {"url.path": "/api/patients/42/notes"}, {"phi.audit.action": "delete"}),
        (
            "GET",
            {"http.route": "/api/patients", "url.path": "/api/patients", "url.query": "name=x"},
            {"phi.audit.action": "search", "phi.resource.type": "Patient", "phi.query": "name=x"},
        ),
        ("POST", {"url.path": "/auth/signin"}, {"phi.audit.action": "login"}),
        ("POST", {"http.route": "/auth/signout"}, {"phi.audit.action": "logout"}),
    ],
)
def test_route_templates(method: str, attrs: dict[str, Any], expected: dict[str, Any]) -> None:
    tags = ROUTES.classify("x", SpanKind.SERVER, {"http.request.method": method, **attrs})
    assert tags is not None
    for key, value in expected.items():
        assert tags[key] == value


def test_unlisted_route_is_not_phi() -> None:
    attrs = {"http.request.method": "GET", "url.path": "/api/doctors/1"}
    assert ROUTES.classify("x", SpanKind.SERVER, attrs) is None


DB = Classifier(ClassificationConfig(phi_tables={"patients": "Patient", "labs": "Observation"}))


@pytest.mark.parametrize(
    ("attrs", "action", "rtype"),
    [
        (
            {
                "db.system": "postgresql",
                "db.statement": "SELECT * FROM public.patients WHERE id=$1",
            },
            "read",
            "Patient",
        ),
        (
            {"db.system.name": "mysql", "db.query.text": "INSERT INTO `labs` (a) VALUES (?)"},
            "create",
            "Observation",
        ),
        (
            {"db.system": "sqlite", "db.statement": "UPDATE patients SET x=? WHERE id=?"},
            "update",
            "Patient",
        ),
        (
            {"db.system": "sqlite", "db.statement": "DELETE FROM labs WHERE id=?"},
            "delete",
            "Observation",
        ),
        (
            {
                "db.system": "postgresql",
                "db.statement": "SELECT a FROM visits v JOIN Patients p ON p.id = v.pid",
            },
            "read",
            "Patient",
        ),
        (
            {"db.system": "postgresql", "db.statement": "COPY patients TO STDOUT"},
            "export",
            "Patient",
        ),
        ({"db.system.name": "mongodb", "db.collection.name": "patients"}, "read", "Patient"),
    ],
)
def test_database_spans_on_phi_tables(attrs: dict[str, Any], action: str, rtype: str) -> None:
    tags = DB.classify("SELECT", SpanKind.CLIENT, attrs)
    assert tags is not None
    assert (tags["phi.audit.action"], tags["phi.resource.type"]) == (action, rtype)


@pytest.mark.parametrize(
    "statement",
    [
        "SELECT * FROM users WHERE name = 'patients'",
        "SELECT 1 -- FROM patients",
        "SELECT * FROM patients_archive_index",
    ],
)
def test_database_spans_elsewhere_are_not_phi(statement: str) -> None:
    assert (
        DB.classify("SELECT", SpanKind.CLIENT, {"db.system": "x", "db.statement": statement})
        is None
    )


def test_config_file_json_and_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = {
        "classification": {
            "fhir_base_paths": ["/r4"],
            "routes": [
                {"template": "/charts/{pid}", "resource_type": "Chart", "patient_param": "pid"}
            ],
            "phi_tables": ["charts"],
        },
        "delivery": {"spool_max_bytes": 1000},
    }
    path = tmp_path / "audit.json"
    path.write_text(json.dumps(data))
    monkeypatch.setenv(PHIAUDIT_INSTRUMENTATION_CONFIG, str(path))
    config = InstrumentationConfig.from_env()
    assert config.delivery.spool_max_bytes == 1000
    c = Classifier(config.classification)
    assert c.classify("x", None, http("GET", "/r4/Patient/1")) is not None
    assert c.classify("x", None, http("GET", "/fhir/Patient/1")) is None
    tags = c.classify("x", None, http("GET", "/charts/5"))
    assert tags is not None and tags["phi.patient.id"] == "5"
    yaml_path = tmp_path / "audit.yaml"
    yaml_path.write_text("classification:\n  phi_tables: {charts: Chart}\n")
    assert InstrumentationConfig.from_file(yaml_path).classification.phi_tables == {
        "charts": "Chart"
    }


def test_config_errors_have_key_paths_and_no_values(tmp_path: Path) -> None:
    secret_looking = "p-SECRET-VALUE"
    bad = {
        "classification": {
            "routes": [
                {"template": "no-slash", "resource_type": "X"},
                {"template": "/a", "resource_type": "Y", "actions": {"GET": "peek"}},
            ],
            "auth_routes": {"/in": "read"},
            "bogus": secret_looking,
        },
        "delivery": {"spool_max_bytes": -5},
    }
    with pytest.raises(ConfigError) as info:
        InstrumentationConfig.from_mapping(bad)
    errors = info.value.errors
    assert "classification.routes[0].template: must start with '/'" in errors
    assert "classification.routes[1].actions.GET: not a known action" in errors
    assert "classification.auth_routes./in: must be login or logout" in errors
    assert "classification.bogus: unknown key" in errors
    assert "delivery.spool_max_bytes: must be a positive integer" in errors
    assert secret_looking not in str(info.value)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json " + secret_looking)
    with pytest.raises(ConfigError) as info2:
        InstrumentationConfig.from_file(broken)
    assert secret_looking not in str(info2.value)
