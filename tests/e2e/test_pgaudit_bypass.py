"""The real pgAudit path: PostgreSQL with pgAudit, the sample application over it, one direct
``psql`` read of a PHI table, and the ``app-bypass`` rule.

* PostgreSQL + pgAudit from Debian's packages (``make test`` installs them with
  ``deploy/ci/ensure-postgres.sh``), a cluster made and started by ``tests/e2e/pg.py``;
* the sample application in PostgreSQL mode (psycopg 3, traced with sqlcommenter on, so every
  statement carries its ``traceparent`` into pgAudit's log), audited by phiaudit with the
  real OTLP exporter to a real ``phiaudit serve``, driven by ``sample.traffic``;
* one direct read, ``SELECT * FROM patients`` with ``psql`` as another database role;
* the pgAudit records of the log file forwarded as OTLP logs by ``pg.forward_log_file``,
  which stands in for the Collector's ``filelog`` receiver (no Collector binary here;
  ``otel-config.yaml`` shows the real pipeline): body = the log entry, ``log.file.name``,
  ``phi.infra.kind: pgaudit``;
* the rules run over the period (``phiaudit rules run --backfill FROM TO``).

What must hold: the application's pgAudit records carry the trace ids of its audit events;
exactly one ``app-bypass`` alert is raised, with the direct read as its only evidence.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider

from phiaudit.instrumentation import configure
from tests.conftest import ROOT, RunningService, cli_env, run_cli, start_service
from tests.e2e import pg

if str(ROOT / "instrumentation") not in sys.path:
    sys.path.insert(0, str(ROOT / "instrumentation"))

from sample.app import create_app, sample_config  # type: ignore[import-not-found]
from sample.traffic import drive_traffic  # type: ignore[import-not-found]

PHI_TABLES = [f"public.{t}" for t in pg.PHI_TABLES]


@pytest.fixture
def cluster() -> Iterator[pg.PgCluster]:
    c = pg.pgaudit_cluster()
    try:
        yield c
    finally:
        pg.destroy(c)


@pytest.fixture
def service(tmp_path: Path) -> Iterator[RunningService]:
    config = {
        "infra": {"phi_catalog": {"tables": PHI_TABLES}, "rollup": True, "sample_rate": 0.0},
        # no scheduled run during the test: the backfill below is the run under test
        "rules": {"interval_s": 3600, "sinks": []},
    }
    path = tmp_path / "phiaudit.yaml"
    path.write_text(yaml.safe_dump(config))
    svc = start_service(tmp_path / "data", "--config", str(path))
    yield svc
    assert svc.stop() == 0, svc.log()


def wait_for(what: str, check: Any, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def iso(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def run_rules(service: RunningService, start: dt.datetime, end: dt.datetime) -> list[str]:
    """``phiaudit rules run --backfill FROM TO`` through the running service: the rule ids of
    the new alerts."""
    env = cli_env(PHIAUDIT_TOKEN=service.admin_token)
    res = run_cli("rules", "run", "--data-dir", str(service.data_dir),
                  "--backfill", iso(start), iso(end), "--format", "json", env=env)
    assert res.returncode == 0, res.stderr
    result = json.loads(res.stdout)
    assert result["mode"] == "backfill"
    return [a["rule_id"] for a in result["alerts"]]


def test_only_the_direct_read_raises_a_bypass_alert(cluster: pg.PgCluster,
                                                     service: RunningService) -> None:
    start = dt.datetime.now(dt.UTC)
    # the application, in PostgreSQL mode, audited to the service (its own SDK provider)
    provider = TracerProvider(resource=Resource.create(
        {"service.name": "sample-ehr", "host.name": "app-host-1"}))
    audit = configure(OTLPSpanExporter(endpoint=service.address, insecure=True, timeout=30),
                      config=sample_config(), tracer_provider=provider, strict=True)
    app = create_app(cluster.url(pg.APP_ROLE), tracer_provider=provider)
    summary = drive_traffic(app.test_client(), rounds=1)
    assert audit.force_flush(30_000)
    provider.shutdown()
    assert set(summary.statuses) <= {200, 201, 401}, summary.statuses

    # the direct read, outside the application
    out = cluster.psql(pg.ANALYST_ROLE, "SELECT * FROM patients")
    assert out.stdout.strip(), "psql read the table"
    wait_for("the direct read in pgAudit's log",
             lambda: f"{pg.ANALYST_ROLE}@{pg.DATABASE} LOG:  AUDIT:" in cluster.log())

    # what the application sent to the database: one statement per PHI request (see
    # test_instrumented_app.expected_db_events), each one pgAudit record (log_relation)
    app_statements = sum(n - summary.failures[a] for a, n in summary.actions.items()
                         if a not in ("login", "logout"))
    entries = pg.log_entries(cluster.log_path)
    audit_entries = [e for e in entries if "AUDIT: SESSION," in e]
    app_entries = [e for e in audit_entries if f"] {pg.APP_ROLE}@{pg.DATABASE} " in e]
    assert all("traceparent='00-" in e for e in app_entries)  # sqlcommenter, every statement
    assert sum(",TABLE,public.users," not in e for e in app_entries) == app_statements

    # the Collector's part: the pgAudit entries of the log file (its filelog receiver drops
    # the other lines with a filter operator), as OTLP log records
    sent = pg.forward_log_file(cluster.log_path, service.address, only="AUDIT: ")
    assert sent == len(audit_entries) > app_statements
    phi_rows = app_statements + 1
    wait_for("the pgAudit records in infra_events", lambda: service.rows(
        "SELECT count() AS n FROM infra_events WHERE source_kind = 'pgaudit' AND phi_touch"
    )[0]["n"] >= phi_rows)

    infra = service.rows(
        "SELECT event_id, actor_id, operation, object_type, object, phi_touch, phi_object, "
        "outcome, trace_id, span_id, parse_status FROM infra_events "
        "WHERE source_kind = 'pgaudit'",
        decrypt=True)
    # every record parsed; those on PHI tables kept whole, the others (the login's read of
    # `users`) only counted in infra_rollups (sample_rate 0)
    assert all(r["parse_status"] == "ok" and r["phi_touch"] for r in infra)
    phi = infra
    non_phi = sum(",TABLE,public.users," in e for e in audit_entries)
    assert non_phi == summary.actions["login"]  # failed logins read `users` too
    rolled = service.rows("SELECT sum(records) AS n FROM infra_rollups "
                          "WHERE source_kind = 'pgaudit'")
    assert rolled[0]["n"] == non_phi
    assert Counter(r["actor_id"] for r in phi) == {pg.APP_ROLE: app_statements,
                                                   pg.ANALYST_ROLE: 1}
    assert {r["phi_object"] for r in phi} <= set(PHI_TABLES)
    assert all(r["object_type"] == "table" and r["object"] in PHI_TABLES for r in phi)

    # the application's records carry the traces of its audit events
    app_rows = [r for r in phi if r["actor_id"] == pg.APP_ROLE]
    assert all(len(r["trace_id"]) == 32 for r in app_rows)
    events = service.rows("SELECT trace_id, span_id, extra FROM audit_events "
                          "WHERE service_name = 'sample-ehr'", decrypt=True)
    audit_traces = {e["trace_id"] for e in events}
    # each statement's record names the database span the application audited
    db_spans = {(e["trace_id"], e["span_id"]) for e in events
                if "db.system" in json.loads(e["extra"])}
    assert len(db_spans) == app_statements
    assert {(r["trace_id"], r["span_id"]) for r in app_rows} == db_spans
    assert {t for t, _ in db_spans} <= audit_traces
    (direct,) = [r for r in phi if r["actor_id"] == pg.ANALYST_ROLE]
    assert (direct["operation"], direct["object"], direct["trace_id"]) == (
        "SELECT", "public.patients", "")

    # the rules over the whole period: one app-bypass alert, the direct read its evidence
    end = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=1)
    raised = run_rules(service, start - dt.timedelta(minutes=2), end)
    assert raised.count("app-bypass") == 1
    alerts = service.rows("SELECT alert_id, rule_id, evidence, evidence_count, trace_ids "
                          "FROM alerts WHERE rule_id = 'app-bypass'")
    assert len(alerts) == 1, [a["evidence_count"] for a in alerts]
    (alert,) = alerts
    assert alert["evidence"] == [direct["event_id"]]
    assert alert["evidence_count"] == 1
    assert not {r["event_id"] for r in app_rows} & set(alert["evidence"])

    # a second run over the same period raises nothing new
    assert "app-bypass" not in run_rules(service, start - dt.timedelta(minutes=2), end)
    again = service.rows("SELECT count() AS n FROM alerts WHERE rule_id = 'app-bypass'")
    assert again[0]["n"] == 1
