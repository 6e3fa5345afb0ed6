"""The package's shape: public API pinned, PEP 420 namespace, imports kept to OpenTelemetry."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import phiaudit.instrumentation as api

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "instrumentation" / "src" / "phiaudit" / "instrumentation"


def test_public_api_is_pinned() -> None:
    assert sorted(api.__all__) == sorted(
        [
            "DROPPED_METRIC",
            "Action",
            "Actor",
            "ActorType",
            "AuditDelivery",
            "AuditScope",
            "ClassificationConfig",
            "Classifier",
            "ConfigError",
            "DeliveryConfig",
            "InstrumentationConfig",
            "InstrumentationError",
            "Outcome",
            "PhiAudit",
            "PhiSampler",
            "PhiSpanProcessor",
            "RouteRule",
            "UserResolver",
            "access",
            "annotate",
            "audit_attributes",
            "break_glass",
            "configure",
            "disclosure",
            "django_response_hook",
            "flask_user",
            "identify",
            "login",
            "logout",
            "record_access",
            "user_from_request",
            "without_phi",
        ]
    )
    for name in api.__all__:
        assert hasattr(api, name), name


def test_namespace_package_and_typing_marker() -> None:
    assert not (PACKAGE.parent / "__init__.py").exists()
    assert (PACKAGE / "py.typed").exists()
    private = [
        p.name
        for p in PACKAGE.glob("*.py")
        if p.name not in ("__init__.py", "environment_variables.py")
    ]
    assert private and all(name.startswith("_") for name in private)


def test_import_pulls_in_only_opentelemetry_and_the_stdlib() -> None:
    code = (
        "import sys, json; before = set(sys.modules);"
        "import phiaudit.instrumentation;"
        "print(json.dumps(sorted(set(sys.modules) - before)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = json.loads(out.stdout)
    roots = {name.split(".")[0] for name in loaded}
    stdlib = set(sys.stdlib_module_names) | {"_distutils_hack"}
    third_party = {r for r in roots if r not in stdlib and not r.startswith("_")}
    assert third_party <= {
        "opentelemetry",
        "phiaudit",
        "typing_extensions",
        "importlib_metadata",
        "zipp",
        "wrapt",
        "deprecated",
    }, third_party
    ours = {n for n in loaded if n.startswith("phiaudit.") and n != "phiaudit.instrumentation"}
    assert all(n.startswith("phiaudit.instrumentation.") for n in ours), ours
    assert "yaml" not in roots and "flask" not in roots and "grpc" not in roots
