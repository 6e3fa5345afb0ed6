"""Zero-code set-up through ``opentelemetry-instrument`` and the sampler entry points."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from opentelemetry.sdk._configuration import _import_sampler
from opentelemetry.trace import SpanKind

from phiaudit.instrumentation import PhiSampler

ROOT = Path(__file__).resolve().parents[2]

APP = """
from sample.app import create_app
client = create_app(instrument=False).test_client()
client.get("/healthz")
client.post("/login", json={"username": "alice", "password": "synthetic-pw"})
token = client.post("/login", json={"username": "alice", "password": "synthetic-pw"}).get_json()
client.get("/fhir/Patient/p-001", headers={"Authorization": "Bearer " + token["token"]})
"""


def test_distro_only_sets_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    from phiaudit.instrumentation._auto import PhiAuditDistro

    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_on")
    monkeypatch.delenv("OTEL_PYTHON_CONFIGURATOR", raising=False)
    PhiAuditDistro().configure()
    assert os.environ["OTEL_TRACES_SAMPLER"] == "always_on"  # the user's choice stands
    assert os.environ["OTEL_PYTHON_CONFIGURATOR"] == "phiaudit"


@pytest.mark.parametrize(
    "name", ["phiaudit", "phiaudit_traceidratio", "phiaudit_parentbased_traceidratio"]
)
def test_sampler_by_name_keeps_phi_at_ratio_zero(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0")
    monkeypatch.setenv("PHIAUDIT_BASE_SAMPLER", "traceidratio")
    sampler = _import_sampler(name)  # exactly what the SDK does for OTEL_TRACES_SAMPLER
    assert isinstance(sampler, PhiSampler)
    phi = {"http.request.method": "GET", "url.path": "/fhir/Patient/1"}
    assert sampler.should_sample(None, 2**100, "GET", SpanKind.SERVER, phi).decision.is_sampled()
    other = {"http.request.method": "GET", "url.path": "/healthz"}
    assert not sampler.should_sample(
        None, 2**100, "GET", SpanKind.SERVER, other
    ).decision.is_sampled()


def _instrument(tmp_path: Path, traces_exporter: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "PHIAUDIT_"))}
    env.update(
        OTEL_PYTHON_DISTRO="phiaudit",
        OTEL_TRACES_EXPORTER=traces_exporter,
        OTEL_METRICS_EXPORTER="none",
        OTEL_LOGS_EXPORTER="none",
        PHIAUDIT_EXPORTER="console",
        PHIAUDIT_SPOOL_DIR=str(tmp_path / "spool"),
        PYTHONPATH=str(ROOT / "instrumentation"),
    )
    script = tmp_path / "app.py"
    script.write_text(APP)
    instrument = Path(sys.executable).parent / "opentelemetry-instrument"
    out = subprocess.run(
        [str(instrument), sys.executable, str(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return out.stdout


def test_opentelemetry_instrument_audits_without_code(tmp_path: Path) -> None:
    out = _instrument(tmp_path, "none")
    assert out.count('"name": "GET /fhir/Patient/<pid>"') == 1
    assert '"phi.audit.event": true' in out
    assert '"phi.patient.id": "p-001"' in out
    assert '"enduser.id": "alice"' in out
    assert "/healthz" not in out  # not PHI, and no general exporter configured


def test_phi_spans_are_not_duplicated_to_the_general_exporter(tmp_path: Path) -> None:
    out = _instrument(tmp_path, "console")
    assert out.count('"name": "GET /fhir/Patient/<pid>"') == 1  # audit path only
    assert out.count('"name": "GET /healthz"') == 1  # general path
