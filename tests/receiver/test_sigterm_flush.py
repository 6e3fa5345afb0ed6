"""SIGTERM mid-stream: `phiaudit serve` stops taking requests, answers the ones in flight
after committing them, exits 0; after a restart on the same data directory every acknowledged
span is stored exactly once and every writer's chain has gap-free sequence numbers."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

from tests.conftest import start_service

THREADS = 8
SPANS_PER_THREAD = 200


class _Acknowledged(SpanExporter):
    """The real OTLP exporter; records the span ids of every export answered SUCCESS."""

    def __init__(self, inner: OTLPSpanExporter, acked: list[str], failed: threading.Event
                 ) -> None:
        self.inner = inner
        self.acked = acked
        self.failed = failed

    def export(self, spans: Any) -> SpanExportResult:
        result = self.inner.export(spans)
        if result == SpanExportResult.SUCCESS:
            self.acked.extend(format(s.context.span_id, "016x") for s in spans)
        else:
            self.failed.set()
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()


def _client(address: str, n: int, acked: list[str], patients: list[str]) -> None:
    failed = threading.Event()
    exporter = _Acknowledged(OTLPSpanExporter(endpoint=address, insecure=True, timeout=3),
                             acked, failed)
    provider = TracerProvider(resource=Resource.create({"service.name": f"ehr-{n}"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("ehr")
    try:
        for i in range(SPANS_PER_THREAD):
            patient = f"syn-pat-term-{n}-{i:04d}"
            patients.append(patient)
            with tracer.start_as_current_span("GET /fhir/Patient/{id}", attributes={
                    "phi.audit.event": True, "phi.audit.action": "read",
                    "phi.patient.id": patient, "enduser.id": f"dr.thread{n}",
                    "client.address": f"198.51.100.{n + 1}"}):
                pass
            if failed.is_set():  # the service is gone: stop, as an application would
                return
    finally:
        provider.shutdown()


def test_sigterm_mid_stream_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    svc = start_service(data)
    acked: list[list[str]] = [[] for _ in range(THREADS)]
    patients: list[str] = []
    threads = [threading.Thread(target=_client, args=(svc.address, n, acked[n], patients))
               for n in range(THREADS)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while sum(map(len, acked)) < 150 and time.monotonic() < deadline:
        time.sleep(0.01)
    code = svc.stop()
    for t in threads:
        t.join(60)
        assert not t.is_alive()
    log = svc.log()
    assert code == 0, log
    all_acked = [sid for per in acked for sid in per]
    assert 150 <= len(all_acked) < THREADS * SPANS_PER_THREAD, "SIGTERM was not mid-stream"

    again = start_service(data)
    try:
        rows = again.rows("SELECT span_id, count() AS n FROM audit_events GROUP BY span_id")
        stored = {r["span_id"]: int(r["n"]) for r in rows}
        missing = [sid for sid in all_acked if sid not in stored]
        assert missing == [], f"{len(missing)} acknowledged spans were lost"
        assert {sid: n for sid, n in stored.items() if n != 1} == {}
        assert len(set(all_acked)) == len(all_acked)
        # the requests in flight at SIGTERM were committed and then answered, not cut off
        assert sorted(stored) == sorted(all_acked)
        for table in ("audit_events", "access_log"):
            chains = again.rows(f"SELECT writer_id, count() AS n, min(seq) AS lo, "
                                f"max(seq) AS hi, uniqExact(seq) AS distinct_seqs "
                                f"FROM {table} GROUP BY writer_id")
            assert chains, table
            for c in chains:
                assert (int(c["lo"]), int(c["hi"]), int(c["distinct_seqs"])) == (
                    1, int(c["n"]), int(c["n"])), (table, c)
    finally:
        assert again.stop() == 0, again.log()
    for text in (log, again.log()):
        assert "Traceback" not in text
        for ident in patients + [f"198.51.100.{n + 1}" for n in range(THREADS)]:
            assert ident not in text
