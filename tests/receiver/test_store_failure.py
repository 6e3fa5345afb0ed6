"""A failing store with no room to spool (``spool_max_bytes: 0``; the same holds when the
spool is full): the receiver answers UNAVAILABLE with RetryInfo (trailer and status details),
acknowledges nothing it has not committed, stores a retried request exactly once, and sheds
load with a bounded queue. ``test_spool.py`` covers the spool itself.

The store failure is injected by ``tests.receiver.flaky_service`` (a test double: the real
service and chDB store, with ``insert`` failing while a flag file exists), because the
embedded ClickHouse cannot be made to fail for real here. Everything else is real: the gRPC
server, the OTLP exporter, the writer, the store.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2, status_pb2
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

from tests.conftest import RunningService, start_service
from tests.receiver.flaky_service import flag_path
from tests.receiver.otlp_raw import RawClient, audit_span, new_trace_id, span, trace_request

ACK_TIMEOUT_MS = 500
RETRY_AFTER_MS = 1000
MAX_QUEUE_ROWS = 50
SENT: list[str] = []


@pytest.fixture(scope="module")
def flaky(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningService]:
    base = tmp_path_factory.mktemp("flaky")
    config = base / "phiaudit.yaml"
    config.write_text(f"ack_timeout_ms: {ACK_TIMEOUT_MS}\nretry_after_ms: {RETRY_AFTER_MS}\n"
                      f"max_queue_rows: {MAX_QUEUE_ROWS}\nspool_max_bytes: 0\n")
    service = start_service(base / "data", "--config", str(config),
                            module="tests.receiver.flaky_service")
    yield service
    flag_path(service.data_dir).unlink(missing_ok=True)
    code = service.stop()
    log = service.log()
    assert code == 0, log
    for ident in SENT:
        assert ident not in log


@pytest.fixture
def flag(flaky: RunningService) -> Iterator[Path]:
    path = flag_path(flaky.data_dir)
    yield path
    path.unlink(missing_ok=True)


def _patients(tag: str, n: int) -> list[str]:
    out = [f"syn-pat-{tag}-{len(SENT) + i:05d}" for i in range(n)]
    SENT.extend(out)
    return out


def _request(tag: str, n: int) -> tuple[str, bytes]:
    trace_id = new_trace_id()
    return trace_id.hex(), trace_request([audit_span(trace_id, p) for p in _patients(tag, n)])


def _until_ok(client: RawClient, raw: bytes, deadline_s: float = 20) -> int:
    """Resend ``raw`` as a client would, until it is acknowledged; return the attempts."""
    deadline = time.monotonic() + deadline_s
    attempts = 0
    while True:
        attempts += 1
        code = client.export(raw, timeout=5)
        if code == grpc.StatusCode.OK:
            return attempts
        assert code == grpc.StatusCode.UNAVAILABLE, code
        assert time.monotonic() < deadline, "never acknowledged"
        time.sleep(0.2)


def _counts_by_trace(svc: RunningService, trace_ids: list[str]) -> dict[str, dict[str, int]]:
    ids = ", ".join(f"'{t}'" for t in trace_ids)
    rows = svc.rows(f"SELECT trace_id, count() AS n, uniqExact(event_id) AS ids, "
                    f"uniqExact(seq) AS seqs FROM audit_events WHERE trace_id IN ({ids}) "
                    "GROUP BY trace_id")
    return {r["trace_id"]: {"n": int(r["n"]), "ids": int(r["ids"]), "seqs": int(r["seqs"])}
            for r in rows}


@pytest.mark.parametrize("spans", [3, 40])
def test_unavailable_with_retry_info_then_stored_exactly_once(flaky: RunningService,
                                                              flag: Path, spans: int) -> None:
    """``spans`` 3: a request processed on the event loop; 40 (over 4 KiB): one processed on
    the extraction threads, where its key is computed too. Either way a retry attaches to
    the pending batch, and a late duplicate adds nothing."""
    trace_id, raw = _request(f"retry{spans}", spans)
    assert (len(raw) >= 4096) is (spans == 40)
    flag.touch()
    with RawClient(flaky.address) as client:
        err = client.export_error(raw, timeout=5)
        assert err.code() == grpc.StatusCode.UNAVAILABLE
        trailers = dict(err.trailing_metadata() or ())
        info = error_details_pb2.RetryInfo.FromString(trailers["google.rpc.retryinfo-bin"])
        delay = info.retry_delay.seconds + info.retry_delay.nanos / 1e9
        assert delay == pytest.approx(RETRY_AFTER_MS / 1000)
        status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
        assert status.code == code_pb2.UNAVAILABLE
        details = [d for d in status.details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
        assert len(details) == 1
        from_status = error_details_pb2.RetryInfo()
        assert details[0].Unpack(from_status)
        assert from_status.retry_delay.ToMilliseconds() == RETRY_AFTER_MS
        # a retry while the store still fails: still UNAVAILABLE, and it adds nothing
        assert client.export(raw, timeout=5) == grpc.StatusCode.UNAVAILABLE
        assert flaky.metrics()["queued_rows"] == 0  # the pending batch is the writer's
        flag.unlink()
        _until_ok(client, raw)
        assert client.export(raw) == grpc.StatusCode.OK  # a late duplicate: OK, no rows
    counts = _counts_by_trace(flaky, [trace_id])
    assert counts == {trace_id: {"n": spans, "ids": spans, "seqs": spans}}
    assert flaky.metrics()["export_unavailable"] >= 2


class _Recording(SpanExporter):
    """The real OTLP exporter, with each export's result recorded (not a double)."""

    def __init__(self, inner: OTLPSpanExporter) -> None:
        self.inner = inner
        self.results: list[tuple[list[str], SpanExportResult]] = []

    def export(self, spans: Any) -> SpanExportResult:
        result = self.inner.export(spans)
        self.results.append(([format(s.context.span_id, "016x") for s in spans], result))
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()


def test_real_exporter_retries_through_an_outage(flaky: RunningService, flag: Path) -> None:
    before = flaky.metrics()
    exporter = _Recording(OTLPSpanExporter(endpoint=flaky.address, insecure=True, timeout=30))
    provider = TracerProvider(resource=Resource.create({"service.name": "ehr-api"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("ehr")
    patients = _patients("outage", 5)
    flag.touch()
    timer = threading.Timer(2.0, lambda: flag.unlink(missing_ok=True))
    timer.start()
    started = time.monotonic()
    trace_ids = set()
    try:
        for p in patients:
            with tracer.start_as_current_span("GET /fhir/Patient", attributes={
                    "phi.audit.event": True, "phi.audit.action": "read",
                    "phi.patient.id": p, "enduser.id": "dr.outage"}) as s:
                trace_ids.add(format(s.get_span_context().trace_id, "032x"))
    finally:
        timer.join()
        provider.shutdown()
    assert time.monotonic() - started >= 1.9  # the first export waited out the outage
    assert [r for _, r in exporter.results] == [SpanExportResult.SUCCESS] * 5
    after = flaky.metrics()
    assert after["export_unavailable"] - before.get("export_unavailable", 0) >= 1
    sent_ids = [sid for ids, _ in exporter.results for sid in ids]
    rows = flaky.rows("SELECT span_id, patient_id FROM audit_events "
                      "WHERE actor_id = 'dr.outage' ORDER BY seq", decrypt=True)
    assert sorted(r["span_id"] for r in rows) == sorted(sent_ids)  # each exactly once
    assert sorted(r["patient_id"] for r in rows) == sorted(patients)


def test_overload_sheds_with_unavailable_and_bounded_queue(flaky: RunningService,
                                                           flag: Path) -> None:
    before = flaky.metrics()
    ta, a = _request("shed-a", 10)
    tb, b = _request("shed-b", 10)
    tc, c = _request("shed-c", MAX_QUEUE_ROWS + 10)
    flag.touch()
    with RawClient(flaky.address) as client:
        # a: taken by the writer, which keeps retrying it; b: waits in the queue
        assert client.export(a, timeout=5) == grpc.StatusCode.UNAVAILABLE
        assert client.export(b, timeout=5) == grpc.StatusCode.UNAVAILABLE
        assert flaky.metrics()["queued_rows"] == 10
        # c does not fit beside b: shed at once, again and again, the queue stays bounded
        for _ in range(3):
            t0 = time.monotonic()
            err = client.export_error(c, timeout=5)
            assert err.code() == grpc.StatusCode.UNAVAILABLE
            assert "overloaded" in (err.details() or "")
            assert "google.rpc.retryinfo-bin" in dict(err.trailing_metadata() or ())
            assert time.monotonic() - t0 < ACK_TIMEOUT_MS / 1000  # not waiting on a commit
        snap = flaky.metrics()
        assert snap["export_shed"] - before.get("export_shed", 0) == 3
        assert snap["queued_rows"] == 10 <= MAX_QUEUE_ROWS
        flag.unlink()
        for raw in (a, b, c):  # the clients retry: everything lands, once
            _until_ok(client, raw)
    counts = _counts_by_trace(flaky, [ta, tb, tc])
    assert counts == {ta: {"n": 10, "ids": 10, "seqs": 10}, tb: {"n": 10, "ids": 10, "seqs": 10},
                      tc: {"n": 60, "ids": 60, "seqs": 60}}


def test_permanent_rejection_of_one_table_keeps_the_chain_intact(flaky: RunningService) -> None:
    """A request whose audit rows are stored but whose trace rows the store rejects for good:
    the audit chain must not fork (the next request's rows get new sequence numbers)."""
    reject = flag_path(flaky.data_dir).with_name("reject-otel_traces")
    first, second = new_trace_id(), new_trace_id()
    mixed = trace_request([
        audit_span(first, _patients("reject", 1)[0]),
        span(first, {"http.route": "/health"}, name="GET /health"),
    ])
    reject.touch()
    try:
        with RawClient(flaky.address) as client:
            assert client.export(mixed) == grpc.StatusCode.INTERNAL  # rejected for good
            reject.unlink()
            after = trace_request([audit_span(second, p) for p in _patients("reject", 2)])
            assert client.export(after) == grpc.StatusCode.OK
    finally:
        reject.unlink(missing_ok=True)
    chains = flaky.rows("SELECT writer_id, count() AS n, max(seq) AS hi, "
                        "uniqExact(seq) AS distinct_seqs FROM audit_events GROUP BY writer_id")
    for c in chains:
        assert int(c["n"]) == int(c["hi"]) == int(c["distinct_seqs"]), c
    assert _counts_by_trace(flaky, [second.hex()])[second.hex()]["n"] == 2
