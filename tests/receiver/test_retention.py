"""Retention and keys: the six-year rule, legal holds, whole-partition purges that are
themselves audited, and data-key rotation that keeps old rows readable."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.conftest import cli_env, run_cli, start_service, tracer_provider


def _send(address: str, n: int, tag: str) -> None:
    provider = tracer_provider(address)
    tracer = provider.get_tracer("ehr")
    for i in range(n):
        with tracer.start_as_current_span("read", attributes={
                "phi.audit.event": True, "phi.audit.action": "read",
                "phi.patient.id": f"{tag}-{i}", "enduser.id": "dr.r"}):
            pass
    provider.shutdown()


def _insert_old_rows(data_dir: Path, year: int, n: int) -> None:
    """Rows from `year` (event and receipt), written by an administrator engine: the only way
    to have data that is really six years old in a test. The service is stopped."""
    code = textwrap.dedent(f"""
        import uuid
        from phiaudit.storage import admin_client
        c = admin_client("{data_dir}")
        t = c.query("SELECT toUnixTimestamp64Micro("
                    "toDateTime64('{year}-03-15 10:00:00', 6, 'UTC'))").result_rows[0][0]
        rows = [[uuid.uuid4(), t, t, 'read', 'success', 'old-writer', i + 1] for i in range({n})]
        c.insert('phiaudit.audit_events', rows, column_names=['event_id', 'event_time',
                 'received_time', 'action', 'outcome', 'writer_id', 'seq'])
        c.close()
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def _retention(data_dir: Path, token: str, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("retention", "--data-dir", str(data_dir), *args,
                   env=cli_env(PHIAUDIT_TOKEN=token))


def _count(data_dir: Path, token: str, where: str) -> int:
    res = run_cli("sql", "--data-dir", str(data_dir), "--format", "csv",
                  f"SELECT count() FROM audit_events WHERE {where}",
                  env=cli_env(PHIAUDIT_TOKEN=token))
    assert res.returncode == 0, res.stderr
    return int(res.stdout.splitlines()[1])


def test_six_year_rule_legal_holds_and_audited_purge(tmp_path: Path) -> None:
    svc = start_service(tmp_path / "data")
    _send(svc.address, 5, "young")
    admin = svc.admin_token
    issued = run_cli("token", "--data-dir", str(svc.data_dir), "--role", "compliance",
                     "--principal", "carol", env=cli_env(PHIAUDIT_TOKEN=admin))
    compliance = issued.stdout.strip()
    # retention works on the store itself: refused while the service runs
    running = _retention(svc.data_dir, admin)
    assert running.returncode == 2 and "stop the service" in running.stderr
    assert svc.stop() == 0
    data = svc.data_dir
    _insert_old_rows(data, 2018, 7)

    report = _retention(data, compliance)
    assert report.returncode == 0, report.stderr
    assert "audit_events" in report.stdout and "oldest 2018-03-15" in report.stdout
    assert "earliest lawful purge 2024-03-15" in report.stdout

    # compliance may read the report, not purge
    denied = _retention(data, compliance, "purge", "--before", "2019-01-01")
    assert denied.returncode == 2 and "security" in denied.stderr

    # a legal hold over 2018 stops the lawful purge; young data is never purged, whatever
    # the date asked for
    hold = _retention(data, admin, "hold", "--from", "2018-01-01", "--to", "2018-12-31",
                      "--reason", "case 2026-114")
    assert hold.returncode == 0, hold.stderr
    hold_id = hold.stdout.strip()
    young = _retention(data, admin, "purge", "--before", "2100-01-01")
    assert young.returncode == 2, young.stdout + young.stderr
    assert "younger than 6 years" in young.stdout
    assert f"under legal hold {hold_id}" in young.stdout
    assert _count(data, admin, "actor_id = 'dr.r'") == 5
    assert _count(data, admin, "writer_id = 'old-writer'") == 7
    held = _retention(data, admin, "purge", "--before", "2019-01-01")
    assert held.returncode == 2 and f"under legal hold {hold_id}" in held.stdout
    assert _count(data, admin, "writer_id = 'old-writer'") == 7

    released = _retention(data, admin, "release", hold_id)
    assert released.returncode == 0, released.stderr
    purged = _retention(data, admin, "purge", "--before", "2019-01-01")
    assert purged.returncode == 0, purged.stdout + purged.stderr
    assert "purged" in purged.stdout and "audit_events/201803" in purged.stdout
    assert _count(data, admin, "writer_id = 'old-writer'") == 0
    assert _count(data, admin, "actor_id = 'dr.r'") == 5

    # every purge decision is itself an audit event: refused, authorized, purged
    res = run_cli("sql", "--data-dir", str(data), "--format", "json", "--decrypt",
                  "SELECT event_id, outcome, resource_id, actor_id, extra FROM audit_events "
                  "WHERE resource_type = 'AuditPartition' ORDER BY seq",
                  env=cli_env(PHIAUDIT_TOKEN=admin))
    assert res.returncode == 0, res.stderr
    events = json.loads(res.stdout)
    assert all(e["actor_id"] == "security-admin" for e in events)
    lines = [f"{e['outcome']},{e['resource_id']},{json.loads(e['extra'])['phase']}"
             for e in events]
    assert any(line.startswith("failure,audit_events/2018") and line.endswith(",refused")
               for line in lines)
    assert any(line.startswith("failure,audit_events/20") and "/2018" not in line
               and line.endswith(",refused") for line in lines)
    assert "success,audit_events/201803,authorized" in lines
    assert "success,audit_events/201803,purged" in lines


def test_keys_status_and_rotation_keep_old_rows_readable(tmp_path: Path) -> None:
    svc = start_service(tmp_path / "data")
    _send(svc.address, 2, "before")
    admin = svc.admin_token
    assert svc.stop() == 0
    data = svc.data_dir
    env = cli_env(PHIAUDIT_TOKEN=admin)
    status = run_cli("keys", "--data-dir", str(data), "status", env=env)
    assert status.returncode == 0 and "data" in status.stdout and "index" in status.stdout
    assert "disk" in status.stdout
    assert "[REDACTED]" not in status.stdout and len(status.stdout.splitlines()) == 3
    nobody = run_cli("keys", "--data-dir", str(data), "rotate", env=cli_env())
    assert nobody.returncode == 2
    rotated = run_cli("keys", "--data-dir", str(data), "rotate", env=env)
    assert rotated.returncode == 0, rotated.stderr
    svc2 = start_service(data)
    _send(svc2.address, 2, "after")
    rows = svc2.rows("SELECT key_id, patient_id FROM audit_events ORDER BY seq", decrypt=True)
    assert svc2.stop() == 0
    assert [r["patient_id"] for r in rows] == ["before-0", "before-1", "after-0", "after-1"]
    assert rows[0]["key_id"] != rows[2]["key_id"]
    assert rows[0]["key_id"] == rows[1]["key_id"] and rows[2]["key_id"] == rows[3]["key_id"]


def test_a_legal_hold_the_engine_drops_is_an_error_not_a_hold_id(tmp_path: Path) -> None:
    """The embedded engine's insert can return without an error and keep nothing (a full
    disk; here a CHECK constraint, added by the administrator engine, refuses one reason):
    `retention hold` must then fail, not print a hold id that no purge will ever see."""
    svc = start_service(tmp_path / "data")
    admin = svc.admin_token
    assert svc.stop() == 0
    data = svc.data_dir
    code = textwrap.dedent(f"""
        from phiaudit.storage import admin_client
        c = admin_client("{data}")
        c.command("ALTER TABLE phiaudit.legal_holds ADD CONSTRAINT lost "
                  "CHECK reason != 'dropped by the engine'")
        c.close()
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)

    lost = _retention(data, admin, "hold", "--from", "2018-01-01", "--to", "2018-12-31",
                      "--reason", "dropped by the engine")
    assert lost.returncode == 1, lost.stdout + lost.stderr
    assert "did not keep the legal hold" in lost.stderr and not lost.stdout.strip()
    kept = _retention(data, admin, "hold", "--from", "2018-01-01", "--to", "2018-12-31",
                      "--reason", "case 2026-115")
    assert kept.returncode == 0, kept.stderr
    report = _retention(data, admin)
    assert f"legal hold {kept.stdout.strip()}" in report.stdout
    assert "dropped by the engine" not in report.stdout
