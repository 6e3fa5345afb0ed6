"""End to end for the instrumentation: the sample Flask application, audited by phiaudit with
the real OTLP exporter, against a real `phiaudit serve`, read back through `phiaudit sql`.

What the traffic should produce is computed from ``TrafficSummary`` and from what the sample
application documents (its docstrings and code), never from what the store happened to hold:

* one audit event per PHI HTTP request, per ``summary.actions``, failures per
  ``summary.failures``; the disclosure is the app's explicit ``disclosure()`` span;
* plus, ``sample_config()`` declaring the PHI tables, one database audit event per SQL
  statement on a PHI table: every authenticated, successful PHI request other than login and
  logout runs exactly one (``/login`` reads ``users``, not PHI; the 401 read stops before the
  database); its action follows the SQL verb (UPDATE -> update, INSERT -> create, SELECT ->
  read);
* one stored row per patient of an event (a search returning five patients is five rows).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, Sampler, TraceIdRatioBased

from phiaudit.instrumentation import PhiAudit, configure, without_phi
from tests.conftest import ROOT, RunningService, cli_env, start_service

if str(ROOT / "instrumentation") not in sys.path:
    sys.path.insert(0, str(ROOT / "instrumentation"))

from sample import traffic as traffic_mod  # type: ignore[import-not-found]
from sample.app import PATIENTS, create_app, sample_config  # type: ignore[import-not-found]
from sample.traffic import TrafficSummary, drive_traffic  # type: ignore[import-not-found]

CLIENT_ADDRESS = "10.20.30.40"
USER_AGENT = "EHR-Workstation/2.1 (ward-3)"
ALL_IDS = sorted(p[0] for p in PATIENTS)
SYNTHETIC_IDS = sorted(p[0] for p in PATIENTS if p[1] == "Synthetic")
NON_PHI_ROUTES = ("/healthz", "/fhir/metadata", "/api/disclosures")
COLUMNS = (
    "event_time, source, time_source, action, outcome, actor_id, actor_type, actor_roles, "
    "service_name, host_name, resource_type, resource_id, patient_id, record_count, query, "
    "purpose, recipient, client_address, user_agent, http_method, http_route, http_status, "
    "trace_id, span_id, extra"
)
OUTAGE_SECONDS = 30.0  # the acceptance text: the receiver is down for 30 s


# -- expectations, from the summary and the sample's documentation --------------------------------
def expected_request_events(summary: TrafficSummary) -> Counter[tuple[str, str]]:
    """(action, outcome) -> events, for the HTTP requests (and the explicit disclosure)."""
    out: Counter[tuple[str, str]] = Counter()
    for action, n in summary.actions.items():
        failed = summary.failures[action]
        out[(action, "failure")] += failed
        out[(action, "success")] += n - failed
    return +out


_SQL_ACTION = {"update": "update", "create": "create"}  # the route's one statement: its verb


def expected_db_events(summary: TrafficSummary) -> Counter[tuple[str, str]]:
    """(action, outcome) -> database audit events (see the module docstring)."""
    out: Counter[tuple[str, str]] = Counter()
    for action, n in summary.actions.items():
        if action in ("login", "logout"):
            continue
        out[(_SQL_ACTION.get(action, "read"), "success")] += n - summary.failures[action]
    return +out


def merged(summaries: Iterable[TrafficSummary]) -> TrafficSummary:
    total = TrafficSummary()
    for s in summaries:
        total.actions.update(s.actions)
        total.failures.update(s.failures)
        total.patient_ids |= s.patient_ids
        total.non_phi_requests += s.non_phi_requests
        total.statuses.update(s.statuses)
    return total


# -- stored rows, grouped into events -------------------------------------------------------------
@dataclass
class Event:
    """The rows of one audit span (one row per patient)."""

    rows: list[dict[str, Any]]

    def __getitem__(self, key: str) -> Any:
        values = {json.dumps(r[key], sort_keys=True) for r in self.rows if key != "patient_id"}
        assert len(values) <= 1, f"{key} differs between the rows of one event: {values}"
        return self.rows[0][key]

    @property
    def extra(self) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self.rows[0]["extra"] or "{}")
        return out

    @property
    def kind(self) -> str:
        if self["http_method"]:
            return "http"
        return "db" if "db.system" in self.extra else "explicit"

    @property
    def patients(self) -> list[str]:
        return sorted(r["patient_id"] for r in self.rows)

    @property
    def key(self) -> tuple[str, str]:
        return (self["action"], self["outcome"])


def events(service: RunningService, where: str = "") -> list[Event]:
    rows = service.rows(f"SELECT {COLUMNS} FROM audit_events {where}", decrypt=True)
    by_span: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_span.setdefault(row["span_id"], []).append(row)
    return [Event(r) for r in by_span.values()]


def assert_exactly_once(service: RunningService, summary: TrafficSummary) -> None:
    """Every expected event stored once: no duplicate row, no missing event."""
    rows = service.rows("SELECT span_id, trace_id, patient_id, action, outcome "
                        "FROM audit_events", decrypt=True)
    pairs = Counter((r["span_id"], r["patient_id"]) for r in rows)
    dups = {k: n for k, n in pairs.items() if n > 1}
    assert not dups, f"{len(dups)} (span, patient) pairs stored more than once"
    evs = events(service)
    assert len(evs) == len({e["span_id"] for e in evs})
    request = Counter(e.key for e in evs if e.kind != "db")
    db = Counter(e.key for e in evs if e.kind == "db")
    assert request == expected_request_events(summary)
    assert db == expected_db_events(summary)
    # every PHI HTTP request is a trace of its own (the disclosure's trace is its POST)
    assert len({e["trace_id"] for e in evs if e.kind != "db"}) == summary.audit_events


# -- the audited application ----------------------------------------------------------------------
def app_config(spool_dir: Path, **delivery: Any) -> Any:
    config = sample_config()
    return replace(config, delivery=replace(config.delivery, spool_dir=str(spool_dir), **delivery))


@dataclass
class AuditedApp:
    provider: TracerProvider
    audit: PhiAudit
    app: Any

    def client(self) -> Any:
        client = self.app.test_client()
        client.environ_base.update(REMOTE_ADDR=CLIENT_ADDRESS, HTTP_USER_AGENT=USER_AGENT)
        return client


def audited_app(
    address: str,
    tmp_path: Path,
    *,
    service_name: str = "sample-ehr",
    sampler: Sampler | None = None,
    general_pipeline: bool = False,
    exporter_timeout: float | None = None,
    **delivery: Any,
) -> AuditedApp:
    """The sample app on a fresh SDK provider (never the global one), audited to ``address``;
    with ``general_pipeline``, its other spans go to the same receiver through the usual
    processor, kept away from PHI by ``without_phi``."""
    kwargs: dict[str, Any] = {"sampler": sampler} if sampler is not None else {}
    provider = TracerProvider(
        resource=Resource.create({"service.name": service_name, "host.name": "app-host-1"}),
        **kwargs,
    )
    exporter = OTLPSpanExporter(endpoint=address, insecure=True, timeout=exporter_timeout)
    audit = configure(
        exporter,
        config=app_config(tmp_path / f"spool-{service_name}", **delivery),
        tracer_provider=provider,
        strict=True,
    )
    if general_pipeline:
        provider.add_span_processor(without_phi(
            SimpleSpanProcessor(OTLPSpanExporter(endpoint=address, insecure=True)),
            audit.classifier))
    app = create_app(tmp_path / f"clinic-{service_name}.db", tracer_provider=provider)
    return AuditedApp(provider, audit, app)


# -- 1. the audit trail of the sample traffic, field by field -------------------------------------
def test_sample_traffic_audit_rows_field_by_field(service: RunningService,
                                                  tmp_path: Path) -> None:
    a = audited_app(service.address, tmp_path, fsync=False)
    before = dt.datetime.now(dt.UTC)
    summary = drive_traffic(a.client(), rounds=2)
    after = dt.datetime.now(dt.UTC)
    assert a.audit.force_flush(30000)
    a.provider.shutdown()
    assert a.audit.delivery is not None and a.audit.delivery.dropped == 0

    evs = events(service)
    assert_exactly_once(service, summary)

    # when, and the fields every event has
    for e in evs:
        for r in e.rows:
            when = dt.datetime.fromisoformat(r["event_time"])
            assert when.utcoffset() == dt.timedelta(0)
            assert before - dt.timedelta(seconds=1) <= when <= after + dt.timedelta(seconds=1)
        assert e["source"] == "span" and e["time_source"] == "span"
        assert e["service_name"] == "sample-ehr" and e["host_name"] == "app-host-1"
        assert len(e["trace_id"]) == 32 and len(e["span_id"]) == 16
        assert e["http_route"] not in NON_PHI_ROUTES

    http = [e for e in evs if e.kind == "http"]
    explicit = [e for e in evs if e.kind == "explicit"]
    db = [e for e in evs if e.kind == "db"]
    # where: the HTTP events carry the address and user agent the client sent
    assert all(e["client_address"] == CLIENT_ADDRESS and e["user_agent"] == USER_AGENT
               for e in http)

    # who and outcome: the failed logins, the unauthenticated read, the successful login
    logins = [e for e in http if e["action"] == "login"]
    failed_logins = [e for e in logins if e["outcome"] == "failure"]
    assert len(failed_logins) == summary.failures["login"]
    assert all(e["actor_id"] == "mallory" and e["http_status"] == 401
               and e["http_route"] == "/login" for e in failed_logins)
    ok_logins = [e for e in logins if e["outcome"] == "success"]
    assert [e["actor_id"] for e in ok_logins] == ["alice"] * 2
    assert all(e["http_status"] == 200 for e in ok_logins)
    unauthorized = [e for e in http if e["http_status"] == 401 and e["action"] != "login"]
    assert len(unauthorized) == summary.failures["read"]
    for e in unauthorized:
        assert (e["action"], e["outcome"]) == ("read", "failure")
        assert (e["resource_type"], e["resource_id"], e.patients) == ("Patient", "p-001",
                                                                       ["p-001"])
        assert e["actor_id"] == ""  # nobody was authenticated
    # every other event was alice, a clinician, including the database and explicit ones
    authed = [e for e in evs if e not in logins and e not in unauthorized]
    assert authed and all(e["actor_id"] == "alice" and e["actor_type"] == "user"
                          and e["actor_roles"] == ["clinician"] for e in authed)

    # what: per request type
    def http_events(route: str, method: str = "GET") -> list[Event]:
        return [e for e in http if e["http_route"] == route and e["http_method"] == method
                and e["outcome"] == "success"]

    reads = http_events("/fhir/Patient/<pid>")
    assert sorted((e["resource_id"], tuple(e.patients)) for e in reads) == sorted(
        [("p-001", ("p-001",)), ("p-002", ("p-002",))] * 2)
    assert all(e["action"] == "read" and e["resource_type"] == "Patient"
               and e["http_status"] == 200 for e in reads)
    searches = http_events("/fhir/Patient")
    assert len(searches) == 2
    for e in searches:  # one row per patient the search returned
        assert e["action"] == "search" and e["resource_type"] == "Patient"
        assert e.patients == SYNTHETIC_IDS and len(e.rows) == len(SYNTHETIC_IDS)
        assert e["record_count"] == len(SYNTHETIC_IDS) and e["query"] == "family=Synthetic"
    obs = http_events("/fhir/Observation")
    assert [(e["action"], e["resource_type"], e.patients, e["query"]) for e in obs] == [
        ("search", "Observation", ["p-001"], "patient=p-001")] * 2
    enc = http_events("/fhir/Encounter")
    assert [(e["action"], e["resource_type"], e.patients) for e in enc] == [
        ("search", "Encounter", ["p-005"])] * 2
    updates = http_events("/fhir/Patient/<pid>", "PUT")
    assert [(e["action"], e["resource_id"], e.patients) for e in updates] == [
        ("update", "p-003", ["p-003"])] * 2
    creates = http_events("/fhir/Observation", "POST")
    assert len(creates) == 2
    assert all(e["action"] == "create" and e["resource_type"] == "Observation"
               and e["resource_id"].startswith("o-") and e.patients == ["p-006"]
               and e["http_status"] == 201 for e in creates)
    assert len({e["resource_id"] for e in creates}) == 2
    notes = http_events("/api/patients/<patient_id>/notes")
    assert [(e["action"], e["resource_type"], e.patients, e["record_count"]) for e in notes] == [
        ("read", "Note", ["p-002"], 1)] * 2
    exports = http_events("/fhir/Patient/$export")
    assert len(exports) == 2
    for e in exports:
        assert e["action"] == "export" and e.patients == ALL_IDS and len(e.rows) == len(ALL_IDS)
        assert e["record_count"] == len(ALL_IDS) and e["recipient"] == "bulk-data-client"
    logouts = http_events("/logout", "POST")
    assert [(e["action"], e["actor_id"]) for e in logouts] == [("logout", "alice")] * 2
    assert len(explicit) == summary.actions["disclose"] == 2
    for e in explicit:
        assert (e["action"], e["outcome"], e["resource_type"], e.patients) == (
            "disclose", "success", "Encounter", ["p-004"])
        assert e["recipient"] == "Synthetic Insurance Co" and e["purpose"] == "HPAYMT"
        assert e["record_count"] == 1

    # the database events: in the trace of a request of alice, with the statement, no patient
    request_traces = {e["trace_id"] for e in http + explicit}
    for e in db:
        assert e["trace_id"] in request_traces
        assert e["resource_type"] in {"Patient", "Observation", "Encounter", "Note"}
        assert e["query"] == e.extra["db.statement"] and e["outcome"] == "success"
        assert e.patients == [""]

    # every patient touched is in the trail, and only those
    assert {p for e in evs for p in e.patients if p} == summary.patient_ids
    assert service.rows("SELECT count() AS n FROM otel_traces")[0]["n"] == 0


# -- 2. sampled out: PHI still audited, nothing else stored ---------------------------------------
def test_ratio_zero_sampler_keeps_every_phi_event_and_nothing_else(service: RunningService,
                                                                   tmp_path: Path) -> None:
    # the application's sampler keeps no trace; its usual span pipeline sends to the same
    # receiver. A control app with ALWAYS_ON proves that pipeline does deliver. One at a time:
    # the explicit audit API uses the provider of the latest configure() (one per process).
    ratio0 = TraceIdRatioBased(0)
    summaries = {}
    for name, sampler in (("ehr-ratio0", ratio0), ("ehr-always-on", ALWAYS_ON)):
        a = audited_app(service.address, tmp_path, service_name=name, sampler=sampler,
                        general_pipeline=True, fsync=False)
        assert a.audit.sampler is not None and a.audit.sampler.delegate is sampler  # wrapped
        summaries[name] = drive_traffic(a.client(), rounds=1)
        assert a.audit.force_flush(30000)
        a.provider.shutdown()

    for name, summary in summaries.items():
        evs = events(service, f"WHERE service_name = '{name}'")
        assert Counter(e.key for e in evs if e.kind != "db") == expected_request_events(summary)
        assert Counter(e.key for e in evs if e.kind == "db") == expected_db_events(summary)
        assert {p for e in evs for p in e.patients if p} == summary.patient_ids
        assert all(e["http_route"] not in NON_PHI_ROUTES for e in evs)

    traces = service.rows("SELECT ServiceName, SpanName, SpanId, SpanAttributes "
                          "FROM otel_traces")
    assert [t for t in traces if t["ServiceName"] == "ehr-ratio0"] == []
    control_spans = [t for t in traces if t["ServiceName"] == "ehr-always-on"]
    names = Counter(t["SpanName"] for t in control_spans)
    assert names["GET /healthz"] == names["GET /fhir/metadata"] == 1
    assert names["POST /api/disclosures"] == 1
    audit_spans = {r["span_id"] for r in service.rows("SELECT span_id FROM audit_events")}
    assert not audit_spans & {t["SpanId"] for t in control_spans}, "a PHI span left as a trace"
    assert not any(k.startswith("phi.") for t in control_spans for k in t["SpanAttributes"])


# -- 3. receiver outage ---------------------------------------------------------------------------
@contextmanager
def timed_requests() -> Iterator[list[float]]:
    """Times every request ``drive_traffic`` makes."""
    latencies: list[float] = []
    original = traffic_mod._Client.call

    def call(self: Any, method: str, path: str, body: Any = None) -> Any:
        t0 = time.perf_counter()
        try:
            return original(self, method, path, body)
        finally:
            latencies.append(time.perf_counter() - t0)

    traffic_mod._Client.call = call
    try:
        yield latencies
    finally:
        traffic_mod._Client.call = original


#: the slowest a request may be while the receiver is down: the audit path may block a
#: request thread at most max_block_seconds (0.05 s) per span, and only when the queue is full.
#: On a shared machine a request can be slow for reasons of its own, so the bound is this plus
#: twice the slowest request of the healthy phase of the same run.
REQUEST_BOUND = 0.5


def outage_bound(healthy_slowest: float) -> float:
    return REQUEST_BOUND + 2 * healthy_slowest
OK_STATUSES = {200, 201, 401}


def restart_service(data_dir: Path, port: int) -> RunningService:
    return start_service(data_dir, "--listen", f"127.0.0.1:{port}")


@pytest.mark.slow
def test_receiver_outage_every_event_exactly_once(tmp_path: Path) -> None:
    from werkzeug.serving import make_server

    data = tmp_path / "data"
    svc = start_service(data)
    port = svc.port
    # retries capped at 1 s and a 5 s exporter deadline keep the recovery quick; fsync on
    a = audited_app(svc.address, tmp_path, exporter_timeout=5, retry_max_seconds=1.0)
    server = make_server("127.0.0.1", 0, a.app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    delivery = a.audit.delivery
    assert delivery is not None
    summaries: list[TrafficSummary] = []
    try:
        with timed_requests() as latencies:
            summaries.append(drive_traffic(url))
            assert a.audit.force_flush(30000)
            assert delivery.spool.pending() == 0
            healthy = max(latencies)
            latencies.clear()

            assert svc.stop() == 0, svc.log()
            down_at = time.monotonic()
            while time.monotonic() - down_at < OUTAGE_SECONDS - 2:  # keeps serving
                summaries.append(drive_traffic(url))
                time.sleep(1.0)
            during = list(latencies)
            assert delivery.spool.pending() > 0, "audit spans are held on disk while down"
            time.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - down_at)))

            svc = restart_service(data, port)
            assert svc.port == port
            summaries.append(drive_traffic(url))
        assert a.audit.force_flush(90000), "spool not replayed after the receiver came back"
        assert delivery.spool.pending() == 0
    finally:
        server.shutdown()
        a.provider.shutdown()
        code = svc.stop()
    assert code == 0, svc.log()
    assert len(summaries) >= 10
    assert max(during) < outage_bound(healthy), (
        f"a request took {max(during):.3f}s during the outage ({healthy:.3f}s before)")
    total = merged(summaries)
    assert set(total.statuses) <= OK_STATUSES, total.statuses
    assert delivery.dropped == 0
    assert_exactly_once(svc, total)


class AppProcess:
    """``tests/e2e/app_process.py``: the audited sample app in its own process."""

    def __init__(self, endpoint: str, spool_dir: Path, db: Path, log: Path) -> None:
        env = cli_env(PHIAUDIT_SPOOL_DIR=str(spool_dir))
        self._log = open(log, "a")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.e2e.app_process", "--endpoint", endpoint,
             "--db", str(db)],
            cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self._log, text=True)
        self.ready = self._read()
        assert self.ready.get("ready"), self.ready

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"the app process exited ({self.proc.poll()})"
        out: dict[str, Any] = json.loads(line)
        return out

    def ask(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._read()

    def traffic(self, rounds: int = 1) -> tuple[TrafficSummary, float]:
        answer = self.ask(f"traffic {rounds}")
        s = answer["summary"]
        summary = TrafficSummary(Counter(s["actions"]), Counter(s["failures"]),
                                 set(s["patient_ids"]), s["non_phi_requests"],
                                 Counter({int(k): v for k, v in s["statuses"].items()}))
        return summary, float(answer["max_latency"])

    def wait(self, timeout: float = 60) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.wait()


@pytest.mark.slow
def test_app_killed_during_outage_spool_replayed_by_next_run(tmp_path: Path) -> None:
    """The application process dies (SIGKILL: a crash, an OOM kill, a container killed
    after its grace period) while the receiver is down; the next run replays its spool."""
    data, spool, db = tmp_path / "data", tmp_path / "spool", tmp_path / "clinic.db"
    log = tmp_path / "app.log"
    svc = start_service(data)
    port = svc.port
    summaries: list[TrafficSummary] = []
    first = AppProcess(svc.address, spool, db, log)
    try:
        assert first.ready["spool_dir"] == str(spool)
        summary, healthy = first.traffic()
        summaries.append(summary)
        assert first.ask("flush 30") == {"flushed": True}

        assert svc.stop() == 0, svc.log()
        down_at = time.monotonic()
        summary, slowest = first.traffic()
        summaries.append(summary)
        # at the start of an outage, the batch being exported is held in memory until the
        # exporter gives up (its 5 s deadline here); wait for it to reach the spool
        deadline = time.monotonic() + 20
        while (state := first.ask("pending"))["unsettled"] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert state["unsettled"] == 0 and state["segments"] > 0 and state["dropped"] == 0
        # from then on, with a backlog on disk, what the application does reaches the disk
        # within the intake delay (0.2 s), whatever the sender is retrying: the application
        # keeps serving for a while, and the crash comes 1 s after its last request
        for _ in range(8):
            summary, latency = first.traffic()
            summaries.append(summary)
            slowest = max(slowest, latency)
            time.sleep(0.5)
        assert slowest < outage_bound(healthy), (
            f"a request took {slowest:.3f}s during the outage ({healthy:.3f}s before)")
        time.sleep(1.0)
        first.kill()
    finally:
        if first.proc.poll() is None:
            first.kill()
    assert list(spool.glob("*.jsonl*")), "the dead process left its spool"

    time.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - down_at)))
    svc = restart_service(data, port)
    second = AppProcess(svc.address, spool, db, log)
    try:
        summaries.append(second.traffic()[0])
        assert second.ask("flush 90") == {"flushed": True}
        assert second.ask("exit") == {"bye": True, "dropped": 0}
        assert second.wait() == 0
    finally:
        if second.proc.poll() is None:
            second.kill()
        code = svc.stop()
    assert code == 0, svc.log()
    assert sorted(os.listdir(spool)) == [], "spool fully acknowledged"
    total = merged(summaries)
    assert set(total.statuses) <= OK_STATUSES, total.statuses
    assert_exactly_once(svc, total)


def test_spool_never_replays_a_segment_still_being_written(tmp_path: Path) -> None:
    """Found by the outage test above: with a backlog, new batches are appended while the
    sender replays, and a half-written ``.tmp-`` segment (it sorts first) was claimed and
    sent, and the batch whose file was taken from under it counted as dropped."""
    from phiaudit.instrumentation._spool import Spool

    spool = Spool(tmp_path / "spool", 1 << 20, fsync=False)
    writing = tmp_path / "spool" / f".tmp-{time.time_ns():020d}-{os.getpid()}-00000001.jsonl"
    writing.write_text('{"name": "half')
    assert spool.pending() == 0
    assert spool.claim_oldest() is None
    assert writing.exists()
