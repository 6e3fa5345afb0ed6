"""The cluster DDL in deploy/ is generated from the schema module: it must not drift from it
(a new table or column that the embedded store has but a cluster lacks would break the
server-mode service at its first insert)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_cluster_sql_matches_the_schema() -> None:
    res = subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "clickhouse" / "gen_cluster_sql.py"), "--check"],
        capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def test_every_table_has_a_sharding_key() -> None:
    sql = (ROOT / "deploy" / "clickhouse" / "cluster.sql").read_text()
    for table in ("audit_events", "access_log", "infra_events", "infra_rollups", "alerts",
                  "care_relationships", "rule_runs", "alert_deliveries"):
        assert f"`phiaudit`.{table}_local ON CLUSTER" in sql, table
        assert f"'{table}_local'," in sql, table
