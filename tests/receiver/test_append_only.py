"""Append-only through the service's own connection: after real traffic through `phiaudit
serve`, a process that opens the store exactly as the service does cannot delete, update,
truncate, drop, optimize, rename, detach, re-TTL or drop partitions of the audit tables, nor
read or write files; ClickHouse itself refuses (ACCESS_DENIED, code 497). INSERT and SELECT
still work, every row is still there, and the tables are plain MergeTree without TTL."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, cli_env, start_service, tracer_provider
from tests.receiver.append_only_probe import TABLES

PATIENTS = ["syn-pat-ao-0001", "syn-pat-ao-0002", "syn-pat-ao-0003"]
KINDS = ("ALTER TABLE {t} DELETE", "ALTER TABLE {t} UPDATE", "DELETE FROM {t}",
         "TRUNCATE TABLE {t}", "DROP TABLE {t}", "OPTIMIZE TABLE {t}", "RENAME TABLE {t}",
         "DETACH TABLE {t}", "ALTER TABLE {t} MODIFY TTL", "ALTER TABLE {t} DROP PARTITION",
         "ALTER TABLE {t} DETACH PARTITION", "ALTER TABLE {t} ADD COLUMN",
         "ALTER TABLE {t} DROP COLUMN", "ALTER TABLE {t} MODIFY SETTING",
         "INSERT INTO FUNCTION file(")


def test_service_connection_cannot_rewrite_history(tmp_path: Path) -> None:
    data = tmp_path / "data"
    svc = start_service(data)
    try:
        provider = tracer_provider(svc.address)
        tracer = provider.get_tracer("ehr")
        for p in PATIENTS:
            with tracer.start_as_current_span("GET /fhir/Patient", attributes={
                    "phi.audit.event": True, "phi.audit.action": "read",
                    "phi.patient.id": p, "enduser.id": "dr.appendonly"}):
                pass
        provider.shutdown()
        seeded = svc.rows("SELECT toString(event_id) AS id FROM audit_events")
        assert len(seeded) == len(PATIENTS)
    finally:
        assert svc.stop() == 0, svc.log()

    proc = subprocess.run(
        [sys.executable, "-m", "tests.receiver.append_only_probe", str(data)],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env=cli_env(), check=False)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)

    attacks = report["attacks"]
    allowed = [a["sql"] for a in attacks if a["ok"]]
    assert allowed == [], f"the service connection may run: {allowed}"
    for a in attacks:
        assert a["error"] == "PermanentError", a
        assert "497" in a["message"] and "ACCESS_DENIED" in a["message"], a
    tried = [a["sql"] for a in attacks]
    for table in TABLES:
        for kind in KINDS:
            prefix = kind.format(t=table)
            assert any(sql.startswith(prefix) for sql in tried), prefix
    assert any("file('/etc/passwd'" in sql for sql in tried)
    assert "DROP DATABASE phiaudit" in tried

    # nothing moved: the same rows, by id, before and after the attempts
    assert report["before"] == report["after"]
    assert sorted(report["after"]["audit_events"]["ids"]) == sorted(r["id"] for r in seeded)
    assert report["after"]["access_log"]["count"] >= 1  # the read above was recorded
    assert report["insert"]["found"] == 1  # INSERT and SELECT do work

    for table, ddl in report["create"].items():
        assert not ddl.startswith("ERROR"), (table, ddl)
        engine = ddl.split("ENGINE = ", 1)[1].split()[0]
        assert engine == "MergeTree", (table, engine)
        bare = re.sub(r"'(?:[^'\\]|\\.)*'", "''", ddl)  # comments may say "no TTL"
        assert re.search(r"\bTTL\b", bare, re.I) is None, table
    assert set(report["create"]) >= {"audit_events", "access_log", "otel_traces", "checkpoints",
                                      "legal_holds", "schema_migrations"}
