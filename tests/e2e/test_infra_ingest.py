"""Infrastructure ingestion end to end: a real `phiaudit serve` with an `infra:` PHI catalog,
records sent as a Collector would (OpenTelemetry SDK OTLPLogExporter / OTLPSpanExporter over
gRPC), stored rows read back through `phiaudit sql --decrypt`.

One service start covers every check (pgAudit with sqlcommenter, CloudTrail, VPC flows,
unparseable records, a database client span, rollups, metrics, a re-sent batch), with the
request processing in a worker process (`worker_min_bytes: 0`).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import RunningService, start_service, tracer_provider

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"
MRN = "MRN-55102"  # synthetic patient id, inside a statement: never in clear at rest or in logs

CONFIG = """
workers: 1
worker_min_bytes: 0
infra:
  phi_catalog:
    tables: ["public.patients", "clinical.*"]
    buckets: ["phi-exports", "ehr-backups/patients/"]
    endpoints: ["10.0.5.0/24:5432"]
  rollup: true
  sample_rate: 0
"""

# every record in one minute, two minutes ago (so that the rollups are easy to check)
MINUTE_S = (int(time.time()) // 60 - 2) * 60
T_NS = MINUTE_S * 1_000_000_000 + 5_000_000_000


def pg_time(offset_s: int = 5) -> str:
    return datetime.fromtimestamp(MINUTE_S + offset_s, UTC).strftime("%Y-%m-%d %H:%M:%S.123 UTC")


def iso(offset_s: int = 5) -> str:
    return datetime.fromtimestamp(MINUTE_S + offset_s, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


PG_PHI = (f"{pg_time()} [4242] alice@ehr LOG:  AUDIT: SESSION,1,1,READ,SELECT,TABLE,"
          f"public.patients,\"SELECT given, \"\"family\"\" FROM public.patients WHERE mrn = "
          f"'{MRN}' /*controller='chart',traceparent='00-{TRACE}-{SPAN}-01'*/\",<not logged>")
PG_BARE = ("AUDIT: OBJECT,3,1,READ,SELECT,TABLE,clinical.notes,\"select body from "
           f"clinical.notes where mrn = '{MRN}'\",<not logged>")
PG_OTHER = [f"{pg_time(10 + i)} [{500 + i}] billing@ehr LOG:  AUDIT: SESSION,{i + 1},1,READ,"
            f"SELECT,TABLE,public.invoices,\"select * from public.invoices\",<not logged>"
            for i in range(3)]


def s3(name: str, bucket: str, key: str) -> dict[str, Any]:
    return {"eventVersion": "1.09", "eventSource": "s3.amazonaws.com", "eventName": name,
            "eventTime": iso(20), "eventID": str(uuid.uuid4()), "awsRegion": "us-east-1",
            "userIdentity": {"type": "AssumedRole",
                             "arn": "arn:aws:sts::111122223333:assumed-role/etl/job-7"},
            "sourceIPAddress": "203.0.113.9",
            "requestParameters": {"bucketName": bucket, "key": key}}


CT_PHI = s3("GetObject", "phi-exports", f"2026/{MRN}.csv")
CT_LOGIN = {"eventVersion": "1.08", "eventSource": "signin.amazonaws.com",
            "eventName": "ConsoleLogin", "eventTime": iso(30), "eventID": str(uuid.uuid4()),
            "userIdentity": {"type": "IAMUser", "userName": "mallory"},
            "sourceIPAddress": "198.51.100.7", "responseElements": {"ConsoleLogin": "Failure"},
            "errorMessage": "Failed authentication"}
CT_FILE = {"Records": [s3("GetObject", "public-web", "a.css"),
                       s3("GetObject", "public-web", "b.css")]}
FLOW = "2 111122223333 eni-0a1b {src} {dst} {sp} {dp} 6 12 4000 {start} {end} ACCEPT OK"
FLOW_PHI = FLOW.format(src="10.0.1.5", dst="10.0.5.7", sp=49152, dp=5432, start=MINUTE_S + 1,
                       end=MINUTE_S + 50)
FLOW_OTHER = [FLOW.format(src="10.0.1.5", dst="10.0.9.9", sp=40000 + i, dp=443,
                          start=MINUTE_S + 2 + i, end=MINUTE_S + 50) for i in range(4)]
JUNK = "%%% truncated {\"eventVersion\": " + MRN


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningService]:
    base = tmp_path_factory.mktemp("infra")
    config = base / "phiaudit.yaml"
    config.write_text(CONFIG)
    service = start_service(base / "data", "--config", str(config))
    yield service
    assert service.stop() == 0, service.log()


def emit_logs(address: str, records: list[tuple[str, dict[str, Any], int]],
              resource: dict[str, Any]) -> None:
    from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
    from opentelemetry.sdk.resources import Resource

    lp = LoggerProvider(resource=Resource.create(resource))
    lp.add_log_record_processor(BatchLogRecordProcessor(
        OTLPLogExporter(endpoint=address, insecure=True, timeout=30)))
    logger = lp.get_logger("otelcol/filelog")
    for body, attrs, t_ns in records:
        logger.emit(body=body, attributes=attrs, timestamp=t_ns)
    assert lp.force_flush(30_000)
    lp.shutdown()


def send_all(address: str, only_whole: bool = False) -> None:
    pg = [(PG_PHI, {"phi.infra.kind": "pgaudit", "log.file.name": "postgresql-Thu.log"}, T_NS),
          (PG_BARE, {"phi.infra.kind": "pgaudit", "user.name": "etl", "db.namespace": "ehr"},
           T_NS + 1)]
    cloud = [(json.dumps(CT_PHI), {}, 0), (json.dumps(CT_LOGIN), {}, 0),
             (JUNK, {"aws.s3.key": "AWSLogs/x.json.gz"}, T_NS)]
    flows: list[tuple[str, dict[str, Any], int]] = [(FLOW_PHI, {}, 0)]
    if not only_whole:
        pg += [(line, {"phi.infra.kind": "pgaudit"}, T_NS) for line in PG_OTHER]
        pg += [("garbage that is no audit line", {"phi.infra.kind": "pgaudit"}, T_NS),
               ("GET /health 200", {}, T_NS)]  # an ordinary log line: ignored
        cloud.append((json.dumps(CT_FILE), {}, 0))
        flows += [(line, {}, 0) for line in FLOW_OTHER]
    emit_logs(address, pg, {"service.name": "postgresql"})
    emit_logs(address, cloud, {"service.name": "cloudtrail-ingest", "phi.infra.kind": "cloudtrail"})
    emit_logs(address, flows, {"service.name": "vpc-flow-logs"})


@pytest.fixture(scope="module")
def stored(svc: RunningService) -> dict[str, Any]:
    send_all(svc.address)
    provider = tracer_provider(svc.address, service_name="ehr-api")
    from opentelemetry.trace import SpanKind

    tracer = provider.get_tracer("opentelemetry.instrumentation.psycopg")
    with tracer.start_as_current_span("SELECT ehr", kind=SpanKind.CLIENT, attributes={
            "db.system.name": "postgresql", "db.namespace": "ehr",
            "db.collection.name": "patients", "db.operation.name": "SELECT",
            "db.query.text": f"SELECT * FROM patients WHERE mrn = '{MRN}'",
            "server.address": "10.0.5.7", "server.port": 5432}) as span:
        db_trace = format(span.get_span_context().trace_id, "032x")
        db_span = format(span.get_span_context().span_id, "016x")
    provider.shutdown()
    rows = svc.rows("SELECT event_id, event_time, source_kind, parse_status, source, actor_id, "
                    "client_address, operation, object_type, object, phi_touch, phi_object, "
                    "outcome, record_count, trace_id, span_id, raw FROM infra_events "
                    "ORDER BY seq", decrypt=True)
    return {"rows": rows, "db_trace": db_trace, "db_span": db_span}


def by_raw(rows: list[dict[str, Any]], raw: str) -> dict[str, Any]:
    found = [r for r in rows if r["raw"] == raw]
    assert len(found) == 1, (raw[:40], len(found))
    return found[0]


def test_pgaudit_lines_with_sqlcommenter_trace_id(stored: dict[str, Any]) -> None:
    rows = stored["rows"]
    phi = by_raw(rows, PG_PHI)
    assert (phi["source_kind"], phi["parse_status"], phi["actor_id"], phi["operation"]) == (
        "pgaudit", "ok", "alice", "SELECT")
    assert (phi["object_type"], phi["object"], phi["phi_object"]) == (
        "table", "public.patients", "public.patients")
    assert phi["phi_touch"] in (True, 1, "true")
    assert phi["trace_id"] == TRACE and phi["span_id"] == SPAN
    # the time of the pgAudit line itself
    assert phi["event_time"] == datetime.fromtimestamp(MINUTE_S + 5, UTC).replace(
        microsecond=123000).isoformat()
    bare = by_raw(rows, PG_BARE)
    assert (bare["actor_id"], bare["source"], bare["phi_object"], bare["trace_id"]) == (
        "etl", "postgresql", "clinical.*", "")
    # the non-PHI reads are not kept whole: they are rolled up
    assert not [r for r in rows if r["raw"] in PG_OTHER]


def test_cloudtrail_and_flows(stored: dict[str, Any]) -> None:
    rows = stored["rows"]
    ct = next(r for r in rows if r["source_kind"] == "cloudtrail" and r["operation"] == "GetObject")
    assert (ct["object"], ct["phi_object"], ct["outcome"]) == (
        f"phi-exports/2026/{MRN}.csv", "phi-exports", "success")
    assert ct["actor_id"] == "arn:aws:sts::111122223333:assumed-role/etl/job-7"
    assert ct["client_address"] == "203.0.113.9" and json.loads(ct["raw"]) == CT_PHI
    login = next(r for r in rows if r["operation"] == "ConsoleLogin")
    assert (login["outcome"], login["actor_id"], login["object_type"]) == (
        "failure", "mallory", "login")
    assert login["phi_touch"] in (False, 0, "false")           # kept whole all the same
    flow = by_raw(rows, FLOW_PHI)
    assert (flow["source_kind"], flow["object"], flow["client_address"], flow["actor_id"]) == (
        "vpcflow", "10.0.5.7:5432", "10.0.1.5", "")
    assert flow["phi_object"] == "10.0.5.0/24:5432" and flow["record_count"] == 12
    assert not [r for r in rows if r["raw"] in FLOW_OTHER]
    assert not [r for r in rows if "public-web" in r["raw"]]


def test_db_client_span(stored: dict[str, Any], svc: RunningService) -> None:
    span = next(r for r in stored["rows"] if r["source_kind"] == "db_span")
    assert (span["trace_id"], span["span_id"]) == (stored["db_trace"], stored["db_span"])
    assert (span["actor_id"], span["operation"], span["object"], span["phi_object"]) == (
        "ehr-api", "SELECT", "patients", "public.patients")
    assert MRN in span["raw"]                                  # encrypted at rest, see below
    traces = svc.rows("SELECT SpanName, SpanAttributes FROM otel_traces")
    assert [t["SpanName"] for t in traces] == ["SELECT ehr"]
    assert "db.query.text" not in json.dumps(traces)          # a sensitive attribute


def test_unparsed_records_are_kept_and_counted(stored: dict[str, Any],
                                               svc: RunningService) -> None:
    rows = stored["rows"]
    junk = by_raw(rows, JUNK)
    assert (junk["source_kind"], junk["parse_status"], junk["phi_touch"]) == (
        "cloudtrail", "unparsed", False)
    pg_junk = by_raw(rows, "garbage that is no audit line")
    assert (pg_junk["source_kind"], pg_junk["parse_status"]) == ("pgaudit", "unparsed")
    m = svc.metrics()
    assert m["infra_unparsed"] == 2
    assert (m["infra_records_pgaudit"], m["infra_records_cloudtrail"],
            m["infra_records_vpcflow"], m["infra_records_db_span"]) == (6, 5, 5, 1)
    assert m["infra_rolled_up"] == 3 + 2 + 4 and m["logs_ignored"] == 1
    assert len(rows) == 8 == m["infra_kept_whole"]


def test_rollups_count_the_non_phi_records(stored: dict[str, Any], svc: RunningService) -> None:
    roll = svc.rows("SELECT toUnixTimestamp(minute) AS m, source_kind, actor_id, "
                    "object_name AS object_text, "
                    "operation, outcome, sum(records) AS n, sum(kept) AS kept, "
                    "sum(raw_bytes) AS bytes FROM infra_rollups GROUP BY m, source_kind, "
                    "actor_id, object_name, operation, outcome ORDER BY source_kind, object_name")
    got = [(r["source_kind"], r["actor_id"], r["object_text"], r["operation"], r["outcome"],
            int(r["n"])) for r in roll]
    role = "arn:aws:sts::111122223333:assumed-role/etl/job-7"
    assert got == [
        ("cloudtrail", role, "public-web/a.css", "GetObject", "success", 1),
        ("cloudtrail", role, "public-web/b.css", "GetObject", "success", 1),
        ("pgaudit", "billing", "public.invoices", "SELECT", "unknown", 3),
        ("vpcflow", "", "10.0.9.9:443", "ACCEPT", "success", 4),
    ]
    assert {int(r["m"]) for r in roll} == {MINUTE_S}
    assert all(int(r["kept"]) == 0 for r in roll)
    pg = next(r for r in roll if r["source_kind"] == "pgaudit")
    assert int(pg["bytes"]) == sum(len(x.encode()) for x in PG_OTHER)


def test_phi_is_encrypted_at_rest_and_not_logged(stored: dict[str, Any],
                                                 svc: RunningService) -> None:
    raw = svc.rows("SELECT hex(object) AS o, hex(raw) AS r, object_bidx FROM infra_events")
    blob = json.dumps(raw)
    assert MRN.encode().hex().upper() not in blob and b"patients".hex().upper() not in blob
    assert all(r["object_bidx"] for r in raw if r["o"])
    assert MRN not in svc.log() and "203.0.113.9" not in svc.log()


def test_resent_records_are_stored_once(stored: dict[str, Any], svc: RunningService) -> None:
    before = svc.rows("SELECT count() AS n FROM infra_events")[0]["n"]
    send_all(svc.address, only_whole=True)                    # new requests, same records
    after = svc.rows("SELECT count() AS n, uniqExact(event_id) AS u FROM infra_events")[0]
    assert int(after["n"]) == int(before) == int(after["u"])
    assert svc.metrics()["infra_unparsed"] == 3                  # counted on arrival


def test_config_errors_stop_the_service(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("infra:\n  phi_catalog:\n    tables: [3]\n  sample_rate: 7\n")
    with pytest.raises(RuntimeError) as exc:
        start_service(tmp_path / "data", "--config", str(config), wait=30)
    assert "infra.phi_catalog.tables[0]" in str(exc.value)
    assert "infra.sample_rate" in str(exc.value)
