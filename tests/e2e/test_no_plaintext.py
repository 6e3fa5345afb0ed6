"""No PHI in clear anywhere under the data directory, nor in the service's log.

Two layers keep it out: field encryption (AES-256-GCM per PHI column) and, by default, an
encrypted disk under the tables (AES-256-CTR). The first test switches the disk encryption off
to show that field encryption alone keeps every PHI value out of the files: the grep is shown
to work by a control, a value stored in clear on purpose (the user agent string, which is not
PHI), found in the same files by the same grep. ClickHouse compresses column files with LZ4,
which keeps unique short strings as literals; the control proves that for this run. The second
test shows that with the encrypted disk even the control is gone.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from tests.conftest import RunningService, start_service, tracer_provider


def _all_bytes(root: Path) -> list[tuple[Path, bytes]]:
    out = []
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            if p.is_file():
                out.append((p, p.read_bytes()))
    return out


def _traffic(service: RunningService) -> tuple[list[str], str]:
    """Send PHI traffic; return the PHI values sent and the clear (non-PHI) control value."""
    tag = uuid.uuid4().hex[:10]
    patients = [f"MRN{tag}{i:03d}" for i in range(20)]
    resources = [f"OBSX{tag}{i:03d}" for i in range(20)]
    ips = [f"10.{i}.77.{100 + i}" for i in range(20)]
    recipient = f"RecipientCorp{tag}"
    query = f"family=Smith{tag}"
    control = f"ControlAgent/{tag}"
    provider = tracer_provider(service.address)
    tracer = provider.get_tracer("ehr")
    for i in range(20):
        with tracer.start_as_current_span(f"GET /fhir/Observation/{resources[i]}", attributes={
                "phi.audit.event": True, "phi.audit.action": "disclose" if i % 5 == 0 else "read",
                "phi.resource.type": "Observation", "phi.resource.id": resources[i],
                "phi.patient.id": [patients[i], patients[(i + 1) % 20]],
                "phi.query": query, "phi.disclosure.recipient": recipient,
                "client.address": ips[i], "user_agent.original": control,
                "enduser.id": "dr-grep", "custom.note": f"note-{patients[i]}"}):
            pass
        # a non-audit span with PHI in attributes that must be stripped
        with tracer.start_as_current_span("GET /search", attributes={
                "phi.patient.id": patients[i], "url.query": f"mrn={patients[i]}",
                "client.address": ips[i], "user_agent.original": control}):
            pass
    provider.shutdown()
    # an investigator's look-up by patient: the statement (with the id) goes to access_log
    assert service.rows(f"SELECT count() AS n FROM audit_events WHERE patient_bidx = "
                        f"blind_index('patient', '{patients[3]}')")[0]["n"] == 2
    assert service.rows("SELECT count() AS n FROM audit_events")[0]["n"] == 40
    decrypted = service.rows("SELECT patient_id, client_address FROM audit_events",
                             decrypt=True)
    assert {r["patient_id"] for r in decrypted} == set(patients)
    assert service.stop() == 0
    return [*patients, *resources, *ips, recipient, query], control


def test_field_encryption_alone_keeps_phi_off_disk(tmp_path: Path) -> None:
    cfg = tmp_path / "plain-disk.yaml"
    cfg.write_text("disk_encryption: false\n")
    service = start_service(tmp_path / "data", "--config", str(cfg))
    secrets, control = _traffic(service)

    files = _all_bytes(service.data_dir)
    assert len(files) > 20
    blob_hits = [p for p, data in files if control.encode() in data]
    assert blob_hits, "control value not found: the grep cannot see stored text"
    for path, data in files:
        for s in secrets:
            assert s.encode() not in data, f"plaintext PHI in {path.relative_to(service.data_dir)}"
    log = service.log()
    for s in secrets:
        assert s not in log


def test_encrypted_disk_hides_even_the_clear_columns(tmp_path: Path) -> None:
    service = start_service(tmp_path / "data")
    secrets, control = _traffic(service)
    files = _all_bytes(service.data_dir)
    assert any("clickhouse-disks" in str(p) and p.name.endswith(".bin") for p, _ in files)
    for path, data in files:
        rel = path.relative_to(service.data_dir)
        assert control.encode() not in data, f"clear column text on disk in {rel}"
        for s in secrets:
            assert s.encode() not in data, f"plaintext PHI in {rel}"
