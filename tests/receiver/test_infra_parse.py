"""Infrastructure records -> InfraEvent: every parser and the PHI catalog on realistic records,
malformed ones included, through the receiver's real extraction code (real protobuf)."""

from __future__ import annotations

import json
import os
import time
import uuid
from typing import Any

import pytest
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.logs.v1 import logs_pb2
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from phiaudit.receiver._config import ServiceConfig
from phiaudit.receiver._extract import Extractor
from phiaudit.receiver._infra import (
    InfraConfig,
    RecordContext,
    parse_cloudtrail,
    parse_pgaudit,
    parse_record,
    parse_vpcflow,
    roll_up,
    sniff_kind,
    sql_tables,
    sql_verb,
)
from phiaudit.storage import ConfigError, InfraEvent

from .otlp_raw import kv

CONFIG = {
    "phi_catalog": {
        "tables": ["public.patients", "public.observations", "clinical.*", "encounters"],
        "buckets": ["phi-exports", "ehr-backups/patients/"],
        "endpoints": ["10.0.5.0/24:5432", "db.internal:5432", "[fd00::5]:5432"],
    },
    "sample_rate": 0.0,
}
CFG = InfraConfig.from_mapping(CONFIG)
CAT = CFG.catalog
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"
T_LINE = 1795694400123000  # 2026-11-26 12:00:00.123 UTC
PATIENT = "MRN-88123"      # synthetic; must never appear in an error text


def ctx(attrs: dict[str, Any] | None = None, time_us: int = 0, **kw: Any) -> RecordContext:
    now = time.time_ns() // 1000
    return RecordContext(attrs or {}, {}, time_us, now, seed=b"test-seed", **kw)


def one(result: Any) -> InfraEvent:
    assert len(result.events) == 1
    ev: InfraEvent = result.events[0]
    return ev


# -- configuration and catalog -------------------------------------------------------------

def test_config_defaults_and_values() -> None:
    empty = InfraConfig.from_mapping({})
    assert empty.enabled and empty.rollup and empty.sample_rate == 0 and empty.catalog.empty
    assert InfraConfig.from_mapping(None).catalog.empty
    assert CFG.catalog.tables[0] == "public.patients" and not CFG.catalog.empty
    assert InfraConfig.from_mapping({"rollup": False, "sample_rate": 1}).rollup is False


def test_config_errors_name_every_key_path_and_never_the_value() -> None:
    bad = {"phi_catalog": {"tables": [PATIENT + ".a.b", 3, ""], "buckets": "phi-exports",
                           "endpoints": [f"{PATIENT}/33:5432", "10.0.0.0/8:99999", "[fd00::1"],
                           "hosts": []},
           "rollup": "yes", "sample_rate": 1.5, "windows": 3}
    with pytest.raises(ConfigError) as exc:
        InfraConfig.from_mapping(bad)
    errors = exc.value.errors
    for path in ("infra.windows", "infra.rollup", "infra.sample_rate", "infra.phi_catalog.hosts",
                 "infra.phi_catalog.tables[0]", "infra.phi_catalog.tables[1]",
                 "infra.phi_catalog.tables[2]", "infra.phi_catalog.buckets",
                 "infra.phi_catalog.endpoints[0]", "infra.phi_catalog.endpoints[1]",
                 "infra.phi_catalog.endpoints[2]"):
        assert any(e.startswith(path + ":") for e in errors), (path, errors)
    assert PATIENT not in str(exc.value)
    with pytest.raises(ConfigError, match="infra: must be a mapping"):
        InfraConfig.from_mapping(["x"])
    with pytest.raises(ConfigError, match=r"infra\.sample_rate"):
        InfraConfig.from_mapping({"sample_rate": True})


def test_service_config_validates_infra_with_the_other_errors() -> None:
    cfg = ServiceConfig(data_dir="/tmp/x", infra={"rollup": 1, "phi_catalog": {"tables": [1]}},
                        batch_max_rows=0)
    with pytest.raises(ConfigError) as exc:
        cfg.validate()
    assert any(e.startswith("infra.rollup") for e in exc.value.errors)
    assert any(e.startswith("infra.phi_catalog.tables[0]") for e in exc.value.errors)
    assert any(e.startswith("batch_max_rows") for e in exc.value.errors)
    ServiceConfig(data_dir="/tmp/x", infra=CONFIG).validate()


@pytest.mark.parametrize(("name", "entry"), [
    ("public.patients", "public.patients"),
    ('"public"."Patients"', "public.patients"),
    ("ehr.public.patients", "public.patients"),   # database-qualified
    ("patients", "public.patients"),              # unqualified: schema unknown, so PHI
    ("clinical.notes", "clinical.*"),
    ("billing.encounters", "encounters"),         # bare entry: any schema
    ("public.invoices", ""),
    ("audit.patients", ""),
    ("", ""),
])
def test_catalog_tables(name: str, entry: str) -> None:
    assert CAT.match_table(name) == entry


def test_catalog_buckets_and_prefixes() -> None:
    assert CAT.match_bucket("phi-exports", "any/key.csv") == "phi-exports"
    assert CAT.match_bucket("ehr-backups", "patients/2026/p.json") == "ehr-backups/patients/"
    assert CAT.match_bucket("ehr-backups", "logs/app.log") == ""
    # a listing of the bucket root can reveal the PHI keys' names
    assert CAT.match_bucket("ehr-backups", "", listing=True) == "ehr-backups/patients/"
    assert CAT.match_bucket("ehr-backups", "logs/", listing=True) == ""
    assert CAT.match_bucket("public-assets", "x") == ""
    assert CAT.match_bucket("", "x") == ""


def test_catalog_endpoints() -> None:
    assert CAT.match_endpoint("10.0.5.17", 5432) == "10.0.5.0/24:5432"
    assert CAT.match_endpoint("10.0.5.17", 443) == ""
    assert CAT.match_endpoint("10.0.6.17", 5432) == ""
    assert CAT.match_endpoint("DB.internal", 5432) == "db.internal:5432"
    assert CAT.match_endpoint("fd00::5", 5432) == "[fd00::5]:5432"
    assert CAT.match_endpoint("[fd00::5]", 5432) == "[fd00::5]:5432"
    any_port = InfraConfig.from_mapping({"phi_catalog": {"endpoints": ["10.1.0.0/16"]}})
    assert any_port.catalog.match_endpoint("10.1.2.3", 1) == "10.1.0.0/16"
    assert CAT.match_endpoint("", 5432) == ""


# -- SQL helpers -------------------------------------------------------------------------

def test_sql_tables_and_verbs() -> None:
    q = ("/* app */ WITH recent AS (SELECT * FROM clinical.notes) "
         "SELECT p.name FROM public.patients p JOIN recent r ON r.pid = p.id "
         "WHERE p.note = 'FROM secret_table' -- FROM other")
    assert sql_tables(q) == ["clinical.notes", "public.patients"]
    assert sql_verb(q) == "SELECT"
    assert sql_verb("with x as (select 1) delete from public.patients") == "DELETE"
    assert sql_tables('INSERT INTO "Clinical"."Notes" VALUES (1)') == ["Clinical.Notes"]
    assert sql_tables("UPDATE encounters SET x = 1") == ["encounters"]
    assert sql_verb("") == "" and sql_tables("") == []


# -- pgAudit ---------------------------------------------------------------------------------

PG_LINE = (
    "2026-11-26 12:00:00.123 UTC [4242] alice@ehr LOG:  AUDIT: SESSION,1,1,READ,SELECT,TABLE,"
    "public.patients,\"SELECT name, \"\"given\"\" FROM public.patients WHERE mrn = '" + PATIENT
    + "', 'a,b' /*controller='chart',traceparent='00-" + TRACE + "-" + SPAN + "-01'*/\","
    "<not logged>")


def test_pgaudit_line_with_prefix_and_sqlcommenter() -> None:
    ev = one(parse_pgaudit(PG_LINE, ctx(), CAT))
    assert ev.parse_status == "ok" and ev.source_kind == "pgaudit"
    assert ev.event_time_us == T_LINE
    assert (ev.actor_id, ev.source, ev.operation) == ("alice", "ehr", "SELECT")
    assert (ev.object_type, ev.object) == ("table", "public.patients")
    assert ev.phi_touch and ev.phi_object == "public.patients"
    assert (ev.trace_id, ev.span_id) == (TRACE, SPAN)
    assert ev.raw == PG_LINE
    assert PATIENT not in repr(ev)


def test_pgaudit_bare_body_with_collector_attributes() -> None:
    body = ("AUDIT: OBJECT,7,1,WRITE,UPDATE,TABLE,clinical.notes,\"UPDATE clinical.notes\n"
            "   SET body = 'x'\",<not logged>")
    rec_time = T_LINE + 5_000_000
    ev = one(parse_pgaudit(body, ctx({"user.name": "etl", "db.namespace": "ehr",
                                      "client.address": "10.0.1.5"}, rec_time,
                                     trace_id="ab" * 16, span_id="cd" * 8), CAT))
    assert (ev.actor_id, ev.source, ev.client_address) == ("etl", "ehr", "10.0.1.5")
    assert ev.event_time_us == rec_time                  # no prefix: the record's time
    assert ev.operation == "UPDATE" and ev.phi_object == "clinical.*"
    assert ev.trace_id == "ab" * 16                      # no traceparent: the record's


def test_pgaudit_not_logged_statement_and_no_object() -> None:
    body = "AUDIT: SESSION,2,1,READ,SELECT,,,<not logged>,<not logged>"
    ev = one(parse_pgaudit(body, ctx({"db.user": "report"}), CAT))
    assert ev.parse_status == "ok" and ev.operation == "SELECT" and ev.object == ""
    assert not ev.phi_touch and ev.trace_id == ""
    # no object name (pgaudit.log_relation off): the tables come from the statement
    body = "AUDIT: SESSION,3,1,READ,SELECT,,,\"select * from patients where id=$1\",<none>"
    ev = one(parse_pgaudit(body, ctx(), CAT))
    assert ev.object == "patients" and ev.phi_object == "public.patients"


def test_pgaudit_other_prefix_formats_and_rows() -> None:
    line = ("2026-11-26 13:00:00 +01 [77]: user=bob,db=ehr,app=psql,client=10.0.1.9 LOG:  "
            "AUDIT: SESSION,4,1,READ,SELECT,TABLE,public.invoices,select 1,<not logged>,12")
    ev = one(parse_pgaudit(line, ctx(), CAT))
    assert (ev.actor_id, ev.source, ev.client_address) == ("bob", "ehr", "10.0.1.9")
    assert ev.event_time_us == 1795694400000000  # 13:00 at +01 = 12:00 UTC
    assert ev.record_count == 12 and not ev.phi_touch
    # a named zone other than UTC: the offset is unknown, so the record's time is used
    rec_time = T_LINE + 1
    line = "2026-11-26 07:00:00.000 EST [1] a@b LOG:  AUDIT: SESSION,1,1,READ,SELECT,,,x,<none>"
    assert one(parse_pgaudit(line, ctx(time_us=rec_time), CAT)).event_time_us == rec_time


def test_pgaudit_absurd_time_is_clamped() -> None:
    line = "1970-01-01 00:00:01.000 UTC [1] a@b LOG:  AUDIT: SESSION,1,1,READ,SELECT,,,x,<none>"
    c = ctx()
    res = parse_pgaudit(line, c, CAT)
    assert res.absurd_times == 1 and one(res).event_time_us == c.now_us


@pytest.mark.parametrize("body", [
    "AUDIT: SESSION,1",                                             # too few fields
    "AUDIT: SESSION,x,1,READ,SELECT,TABLE,public.patients,q,<none>",  # not a statement id
    'AUDIT: SESSION,1,1,READ,SELECT,TABLE,public.patients,"unterminated ' + PATIENT,
    "LOG:  connection received: host=10.0.0.1",                    # not an audit line at all
])
def test_pgaudit_malformed_lines_are_kept_unparsed(body: str) -> None:
    ev = one(parse_pgaudit(body, ctx(time_us=T_LINE), CAT))
    assert ev.parse_status == "unparsed" and ev.source_kind == "pgaudit"
    assert ev.raw == body and ev.event_time_us == T_LINE and not ev.phi_touch
    assert PATIENT not in repr(ev)


# -- CloudTrail -----------------------------------------------------------------------------

def s3_event(name: str, bucket: str, key: str | None, **extra: Any) -> dict[str, Any]:
    params: dict[str, Any] = {"bucketName": bucket, "Host": f"{bucket}.s3.amazonaws.com"}
    if key is not None:
        params["key"] = key
    rec = {
        "eventVersion": "1.09", "eventSource": "s3.amazonaws.com", "eventName": name,
        "eventTime": "2026-11-26T12:01:02Z", "eventID": str(uuid.uuid4()),
        "awsRegion": "us-east-1", "eventType": "AwsApiCall", "eventCategory": "Data",
        "userIdentity": {"type": "AssumedRole", "principalId": "AROA:etl",
                         "arn": "arn:aws:sts::111122223333:assumed-role/etl/job-1",
                         "accountId": "111122223333"},
        "sourceIPAddress": "203.0.113.9", "userAgent": "aws-sdk-go/1.44",
        "requestParameters": params, "responseElements": None,
        "resources": [{"type": "AWS::S3::Bucket", "ARN": f"arn:aws:s3:::{bucket}"}],
    }
    rec.update(extra)
    return rec


def console_login(result: str, user: str = "mallory") -> dict[str, Any]:
    rec: dict[str, Any] = {
        "eventVersion": "1.08", "eventSource": "signin.amazonaws.com",
        "eventName": "ConsoleLogin", "eventTime": "2026-11-26T12:02:00Z",
        "eventID": str(uuid.uuid4()), "eventType": "AwsConsoleSignIn",
        "userIdentity": {"type": "IAMUser", "principalId": "AIDA:x", "accountId": "1",
                         "userName": user},
        "sourceIPAddress": "198.51.100.7", "responseElements": {"ConsoleLogin": result},
        "additionalEventData": {"MFAUsed": "No"},
    }
    if result == "Failure":
        rec["errorMessage"] = "Failed authentication"
    return rec


def test_cloudtrail_s3_data_events() -> None:
    rec = s3_event("GetObject", "ehr-backups", f"patients/{PATIENT}.json")
    ev = one(parse_cloudtrail(json.dumps(rec), ctx(), CAT))
    assert ev.parse_status == "ok" and ev.operation == "GetObject" and ev.outcome == "success"
    assert ev.actor_id == "arn:aws:sts::111122223333:assumed-role/etl/job-1"
    assert (ev.object_type, ev.object) == ("object", f"ehr-backups/patients/{PATIENT}.json")
    assert ev.phi_touch and ev.phi_object == "ehr-backups/patients/"
    assert ev.client_address == "203.0.113.9" and ev.event_time_us == 1795694462000000
    ev = one(parse_cloudtrail(json.dumps(s3_event("PutObject", "public-web", "a.css")), ctx(),
                              CAT))
    assert not ev.phi_touch and ev.object == "public-web/a.css"
    listing = s3_event("ListObjects", "ehr-backups", None)
    listing["requestParameters"]["prefix"] = ""
    assert one(parse_cloudtrail(json.dumps(listing), ctx(), CAT)).phi_touch
    # no bucketName: the bucket comes from the resources' ARN
    arn_only = s3_event("GetObject", "x", None, requestParameters={},
                        resources=[{"type": "AWS::S3::Object",
                                    "ARN": "arn:aws:s3:::phi-exports/2026/file.csv"}])
    assert one(parse_cloudtrail(arn_only, ctx(), CAT)).phi_object == "phi-exports"  # map body


def test_cloudtrail_authentication_failures() -> None:
    ev = one(parse_cloudtrail(json.dumps(console_login("Failure")), ctx(), CAT))
    assert (ev.operation, ev.outcome, ev.actor_id) == ("ConsoleLogin", "failure", "mallory")
    assert (ev.object_type, ev.object) == ("login", "signin.amazonaws.com")
    assert not ev.phi_touch
    assert one(parse_cloudtrail(json.dumps(console_login("Success")), ctx(),
                                CAT)).outcome == "success"
    denied = {"eventVersion": "1.08", "eventSource": "ec2.amazonaws.com",
              "eventName": "DescribeInstances", "eventTime": "2026-11-26T12:03:00Z",
              "errorCode": "Client.UnauthorizedOperation", "errorMessage": "You are not...",
              "userIdentity": {"type": "IAMUser", "userName": "intern"}}
    ev = one(parse_cloudtrail(json.dumps(denied), ctx(), CAT))
    assert (ev.outcome, ev.object_type, ev.object) == ("failure", "endpoint",
                                                       "ec2.amazonaws.com")
    s3_denied = s3_event("GetObject", "phi-exports", "a.csv", errorCode="AccessDenied")
    ev = one(parse_cloudtrail(json.dumps(s3_denied), ctx(), CAT))
    assert ev.outcome == "failure" and ev.phi_touch


def test_cloudtrail_records_file_gives_one_row_per_record_and_keeps_bad_ones() -> None:
    good = s3_event("GetObject", "phi-exports", "x.csv")
    body = json.dumps({"Records": [good, console_login("Failure"), {"eventName": 3}, "junk"]})
    res = parse_cloudtrail(body, ctx(), CAT)
    assert [e.parse_status for e in res.events] == ["ok", "ok", "unparsed", "unparsed"]
    assert json.loads(res.events[0].raw) == good
    assert len({e.event_id for e in res.events}) == 4
    # the same record again (another file, another time): the same event id (eventID)
    again = one(parse_cloudtrail(json.dumps(good), ctx(), CAT))
    assert again.event_id == res.events[0].event_id


@pytest.mark.parametrize("body", ['{"eventVersion": "1.08", "eventSource": ', "[1, 2]", "null",
                                  json.dumps({"eventVersion": "1", "eventSource": "s3"})])
def test_cloudtrail_malformed_is_kept_unparsed(body: str) -> None:
    ev = one(parse_cloudtrail(body, ctx(), CAT))
    assert ev.parse_status == "unparsed" and ev.source_kind == "cloudtrail" and ev.raw == body


# -- VPC flow logs ---------------------------------------------------------------------------

FLOW = ("2 111122223333 eni-0a1b2c3d {src} {dst} {sp} {dp} 6 {pk} 8400 1795694400 1795694460 "
        "{act} OK")


def flow(src: str = "10.0.1.5", dst: str = "10.0.5.7", sp: int = 49152, dp: int = 5432,
         pk: int = 20, act: str = "ACCEPT") -> str:
    return FLOW.format(src=src, dst=dst, sp=sp, dp=dp, pk=pk, act=act)


def test_vpcflow_lines() -> None:
    ev = one(parse_vpcflow(flow(), ctx(), CAT))
    assert ev.parse_status == "ok" and ev.source_kind == "vpcflow"
    assert (ev.operation, ev.outcome, ev.actor_id) == ("ACCEPT", "success", "")
    assert (ev.object_type, ev.object, ev.client_address) == ("endpoint", "10.0.5.7:5432",
                                                              "10.0.1.5")
    assert ev.phi_object == "10.0.5.0/24:5432" and ev.record_count == 20
    assert ev.event_time_us == 1795694400 * 1_000_000 and ev.source == "eni-0a1b2c3d"
    # the reply direction touches the same PHI endpoint
    ev = one(parse_vpcflow(flow("10.0.5.7", "10.0.1.5", 5432, 49152), ctx(), CAT))
    assert ev.phi_touch and ev.object == "10.0.5.7:5432" and ev.client_address == "10.0.1.5"
    ev = one(parse_vpcflow(flow(dst="10.0.9.9", dp=443, act="REJECT"), ctx(), CAT))
    assert (ev.outcome, ev.phi_touch) == ("failure", False)
    # a reply from any service: the object is still the service's end
    ev = one(parse_vpcflow(flow("10.0.9.9", "10.0.1.5", 443, 51000), ctx(), CAT))
    assert (ev.object, ev.client_address, ev.phi_touch) == ("10.0.9.9:443", "10.0.1.5", False)
    ev = one(parse_vpcflow(flow("fd00::9", "fd00::5"), ctx(), CAT))
    assert ev.phi_touch


def test_vpcflow_nodata_skipdata_header_and_several_lines() -> None:
    header = ("version account-id interface-id srcaddr dstaddr srcport dstport protocol "
              "packets bytes start end action log-status")
    body = "\n".join([
        header, flow(),
        "2 111122223333 eni-0a1b2c3d - - - - - - - 1795694400 1795694460 - NODATA",
        "2 111122223333 eni-0a1b2c3d - - - - - - - 1795694400 1795694460 - SKIPDATA",
        "2 111122223333 eni-0a1b2c3d 10.0.1.5 not-an-ip 1 2 6 1 1 1795694400 1795694460 ACCEPT OK",
        "3 vpc-1 subnet-1 eni-1 10.0.1.5 10.0.5.7",
    ])
    res = parse_vpcflow(body, ctx(), CAT)
    assert res.skipped == 1
    assert [(e.parse_status, e.operation) for e in res.events] == [
        ("ok", "ACCEPT"), ("ok", "NODATA"), ("ok", "SKIPDATA"), ("unparsed", ""),
        ("unparsed", "")]
    assert len({e.event_id for e in res.events}) == 5
    assert res.events[1].object == "" and not res.events[1].phi_touch


# -- dispatch and sniffing -------------------------------------------------------------------

def test_sniffing_and_labelled_dispatch() -> None:
    assert sniff_kind(PG_LINE) == "pgaudit"
    assert sniff_kind(json.dumps(console_login("Failure"))) == "cloudtrail"
    assert sniff_kind(json.dumps({"Records": []})) == "cloudtrail"
    assert sniff_kind(console_login("Success")) == "cloudtrail"   # a map body
    assert sniff_kind(flow()) == "vpcflow"
    for other in ("GET /health 200", '{"level": "info"}', "", None, 42, "2 fields only"):
        assert sniff_kind(other) == ""
    ev = one(parse_record("vpcflow", {"not": "a line"}, ctx(), CAT))
    assert (ev.source_kind, ev.parse_status) == ("vpcflow", "unparsed")
    ev = one(parse_record("syslog", "something", ctx(), CAT))
    assert (ev.source_kind, ev.parse_status, ev.raw) == ("unknown", "unparsed", "something")


# -- through the extractor (real OTLP protobuf) ----------------------------------------------

def log_record(body: Any, attrs: dict[str, Any] | None = None, t_ns: int = 0,
               observed_ns: int = 0) -> logs_pb2.LogRecord:
    b = (common_pb2.AnyValue(string_value=body) if isinstance(body, str)
         else common_pb2.AnyValue(int_value=body))
    return logs_pb2.LogRecord(time_unix_nano=t_ns, observed_time_unix_nano=observed_ns or
                              time.time_ns(), body=b,
                              attributes=[kv(k, v) for k, v in (attrs or {}).items()])


def logs_req(records: list[logs_pb2.LogRecord], res: dict[str, Any] | None = None
             ) -> logs_service_pb2.ExportLogsServiceRequest:
    return logs_service_pb2.ExportLogsServiceRequest(resource_logs=[logs_pb2.ResourceLogs(
        resource=resource_pb2.Resource(attributes=[kv(k, v) for k, v in (res or {}).items()]),
        scope_logs=[logs_pb2.ScopeLogs(log_records=records)])])


def test_extractor_logs_infra_audit_and_ignored() -> None:
    ex = Extractor(infra=CFG)
    records = [
        log_record(PG_LINE, {"phi.infra.kind": "pgaudit", "log.file.name": "pg.log"}),
        log_record(flow()),                                           # recognised body
        log_record("just an application log line"),                   # ignored as before
        log_record("x", {"phi.audit.event": True, "phi.audit.action": "read"}),  # audit
        log_record("garbage " + PATIENT, {"phi.infra.kind": "cloudtrail"}),
        log_record(12345, {"phi.infra.kind": "pgaudit"}),             # not a string body
    ]
    out = ex.logs(logs_req(records, {"service.name": "postgresql"}), sender="collector-1")
    st = out.stats
    assert (st.log_records, st.logs_ignored, st.audit_events) == (6, 1, 1)
    assert (st.infra_records_pgaudit, st.infra_records_vpcflow,
            st.infra_records_cloudtrail, st.infra_unparsed) == (2, 1, 1, 2)
    kinds = [(e.source_kind, e.parse_status) for e in out.infra]
    assert kinds == [("pgaudit", "ok"), ("vpcflow", "ok"), ("cloudtrail", "unparsed"),
                     ("pgaudit", "unparsed")]
    assert all(e.sender == "collector-1" for e in out.infra)
    assert out.infra[0].source == "postgresql" and out.infra[0].trace_id == TRACE
    # resource-level label
    out = ex.logs(logs_req([log_record(json.dumps(console_login("Failure")))],
                           {"phi.infra.kind": "cloudtrail"}))
    assert out.infra[0].outcome == "failure"
    # disabled: infrastructure records are ignored like any other log record
    off = Extractor(infra=InfraConfig.from_mapping({"enabled": False}))
    assert off.logs(logs_req([log_record(PG_LINE)])).stats.logs_ignored == 1


def test_extractor_event_ids_are_deterministic() -> None:
    ex = Extractor(infra=CFG)
    bare = "AUDIT: SESSION,1,1,READ,SELECT,TABLE,public.patients,select 1,<not logged>"
    a = ex.logs(logs_req([log_record(bare, {"user.name": "a"}, T_LINE * 1000, 1)])).infra
    # re-sent later: another observed time, same record: same id
    b = ex.logs(logs_req([log_record(bare, {"user.name": "a"}, T_LINE * 1000, 2)])).infra
    # the same body from another session/user is another record
    c = ex.logs(logs_req([log_record(bare, {"user.name": "b"}, T_LINE * 1000, 1)])).infra
    assert a[0].event_id == b[0].event_id != c[0].event_id


def test_extractor_db_client_spans() -> None:
    ex = Extractor(infra=CFG)
    tid, sid = os.urandom(16), os.urandom(8)
    now = time.time_ns()

    def span(attrs: dict[str, Any], status: int = 0, span_id: bytes = sid) -> trace_pb2.Span:
        return trace_pb2.Span(
            trace_id=tid, span_id=span_id, name="SELECT ehr", kind=trace_pb2.Span.SPAN_KIND_CLIENT,
            start_time_unix_nano=now, end_time_unix_nano=now + 1000,
            attributes=[kv(k, v) for k, v in attrs.items()],
            status=trace_pb2.Status(code=status))  # type: ignore[arg-type]
    spans = [
        span({"db.system.name": "postgresql", "db.collection.name": "patients",
              "db.operation.name": "select", "server.address": "10.0.5.7", "server.port": 5432,
              "db.query.text": "SELECT * FROM patients WHERE id = $1"}),
        span({"db.system": "sqlite", "db.statement": "INSERT INTO audit_outbox VALUES (?)",
              "db.user": "app"}, status=2, span_id=os.urandom(8)),
        span({"db.system.name": "postgresql", "server.address": "db.internal",
              "server.port": 5432, "db.query.text": "SELECT 1"}, span_id=os.urandom(8)),
        span({"http.route": "/health"}, span_id=os.urandom(8)),
    ]
    req = trace_service_pb2.ExportTraceServiceRequest(resource_spans=[trace_pb2.ResourceSpans(
        resource=resource_pb2.Resource(attributes=[kv("service.name", "ehr-api")]),
        scope_spans=[trace_pb2.ScopeSpans(spans=spans)])])
    out = ex.traces(req)
    assert out.stats.trace_rows == 4 and out.stats.infra_records_db_span == 3
    a, b, c = out.infra
    assert (a.source_kind, a.actor_id, a.operation, a.object, a.phi_object) == (
        "db_span", "ehr-api", "SELECT", "patients", "public.patients")
    assert (a.trace_id, a.span_id) == (tid.hex(), sid.hex()) and a.outcome == "success"
    assert a.event_time_us == now // 1000 and json.loads(a.raw)["span.name"] == "SELECT ehr"
    assert (b.actor_id, b.operation, b.object, b.outcome, b.phi_touch) == (
        "app", "INSERT", "audit_outbox", "failure", False)
    assert (c.object_type, c.object, c.phi_object) == ("endpoint", "db.internal:5432",
                                                       "db.internal:5432")
    # the statement still leaves otel_traces (a sensitive attribute by default)
    again = ex.traces(req).infra
    assert [e.event_id for e in again] == [e.event_id for e in out.infra]


# -- noise control ---------------------------------------------------------------------------

def events(n: int, phi_every: int = 0) -> list[InfraEvent]:
    out = []
    for i in range(n):
        phi = bool(phi_every) and i % phi_every == 0
        out.append(InfraEvent(uuid.uuid5(uuid.NAMESPACE_OID, str(i)), T_LINE + i * 1_000_000,
                              T_LINE, "vpcflow", actor_id="", operation="ACCEPT",
                              object="10.0.5.7:5432" if phi else "10.0.9.9:443",
                              phi_touch=phi, phi_object="x" if phi else "", outcome="success",
                              raw="r" * 10))
    return out


def test_rollups_keep_phi_whole_and_count_the_rest() -> None:
    evs = events(120, phi_every=10)   # 12 PHI, 108 not, over two minutes
    evs.append(InfraEvent(uuid.uuid4(), T_LINE, T_LINE, "unknown", parse_status="unparsed",
                          raw="?"))
    res = roll_up(evs, CFG)
    assert len(res.whole) == 13 and all(e.phi_touch or e.parse_status == "unparsed"
                                        for e in res.whole)
    assert res.rolled_up == 108 and res.sampled == 0
    assert sum(r[6] for r in res.rollups) == 108 and sum(r[8] for r in res.rollups) == 1080
    minutes = {r[0] for r in res.rollups}
    assert all(m % 60_000_000 == 0 for m in minutes) and len(res.rollups) == len(minutes) <= 3
    assert {r[3] for r in res.rollups} == {"10.0.9.9:443"}
    off = roll_up(evs, InfraConfig.from_mapping({"rollup": False}))
    assert len(off.whole) == 121 and off.rollups == []


def test_authentication_records_are_never_rolled_up() -> None:
    ctx_ = ctx()
    login_ok = one(parse_cloudtrail(console_login("Success"), ctx_, CAT))
    login_bad = one(parse_cloudtrail(console_login("Failure"), ctx_, CAT))
    denied = one(parse_cloudtrail(
        s3_event("GetObject", "public-web", "a", errorCode="AccessDenied"), ctx_, CAT))
    listed = one(parse_cloudtrail(s3_event("ListObjects", "public-web", None), ctx_, CAT))
    rejected = one(parse_vpcflow(flow(dst="10.0.9.9", dp=22, act="REJECT"), ctx_, CAT))
    res = roll_up([login_ok, login_bad, denied, listed, rejected], CFG)
    assert res.whole == [login_ok, login_bad, denied]
    assert res.rolled_up == 2 and {r[4] for r in res.rollups} == {"ListObjects", "REJECT"}


def test_sampling_is_deterministic_by_event_id() -> None:
    cfg = InfraConfig.from_mapping({"sample_rate": 0.25})
    evs = events(4000)
    first = roll_up(evs, cfg)
    second = roll_up(list(reversed(evs)), cfg)
    assert {e.event_id for e in first.whole} == {e.event_id for e in second.whole}
    assert 800 < first.sampled < 1200 and first.sampled == len(first.whole)
    assert sum(r[7] for r in first.rollups) == first.sampled
    assert roll_up(evs, InfraConfig.from_mapping({"sample_rate": 1})).sampled == 4000


def test_span_names_in_otel_traces_lose_ids_and_query_strings() -> None:
    from phiaudit.receiver._extract import scrub_span_name

    kept = ["GET /health", "GET /Patient/{id}", "SELECT ehr", "GET /api/v2/patients", "child"]
    assert [scrub_span_name(n) for n in kept] == kept
    assert scrub_span_name("GET /Patient/p-12345/_history?name=Doe") == \
        "GET /Patient/{id}/_history"
    assert scrub_span_name("GET /fhir/Observation/0f8fad5b-d9cb-469f-a165-70867728950e") == \
        "GET /fhir/Observation/{id}"
    assert scrub_span_name("GET /api/patients/123") == "GET /api/patients/{id}"
    assert scrub_span_name("GET /search?ssn=123-45-6789") == "GET /search"
