"""Audit spans are never dropped silently: spool, retry, restart, cap, bounded blocking."""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from phiaudit.instrumentation import DROPPED_METRIC, AuditDelivery, access
from phiaudit.instrumentation._serialize import span_from_dict, span_to_dict

from .conftest import fast_delivery


class FlakyExporter(SpanExporter):
    """Fails the first ``failures`` calls (alternately FAILURE and raising), then records."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0
        self.received: list[ReadableSpan] = []
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with self._lock:
            self.calls += 1
            if self.calls <= self.failures:
                if self.calls % 2:
                    return SpanExportResult.FAILURE
                raise ConnectionError("receiver down: patient p-001")  # must not be logged
            self.received.extend(spans)
            return SpanExportResult.SUCCESS


class DownExporter(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.FAILURE


class HangingExporter(SpanExporter):
    def __init__(self) -> None:
        self.release = threading.Event()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.release.wait(10)
        return SpanExportResult.FAILURE


def make_spans(n: int, provider: TracerProvider | None = None) -> list[ReadableSpan]:
    provider = provider or TracerProvider()
    tracer = provider.get_tracer("test")
    spans = []
    for i in range(n):
        span = tracer.start_span(
            f"phi.read {i}", attributes={"phi.audit.event": True, "phi.patient.id": f"p-{i:04d}"}
        )
        span.end()
        spans.append(span)
    return spans


def ids(spans: Sequence[ReadableSpan]) -> list[int]:
    return [s.context.span_id for s in spans if s.context is not None]


def test_flaky_exporter_gets_every_span_exactly_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    exporter = FlakyExporter(failures=5)
    delivery = AuditDelivery(exporter, fast_delivery(tmp_path, max_batch=7))
    spans = make_spans(50)
    with caplog.at_level(logging.DEBUG, logger="phiaudit"):
        for span in spans:
            delivery.submit(span)
        assert delivery.force_flush(10000)
    assert sorted(ids(exporter.received)) == sorted(ids(spans))
    assert len(exporter.received) == len(set(ids(exporter.received)))
    assert exporter.calls > 5
    assert delivery.spool.pending() == 0
    assert delivery.dropped == 0
    assert "p-001" not in caplog.text and "p-0001" not in caplog.text
    delivery.shutdown()


def test_spool_survives_a_restart(tmp_path: Path) -> None:
    spans = make_spans(20)
    first = AuditDelivery(DownExporter(), fast_delivery(tmp_path))
    for span in spans:
        first.submit(span)
    assert not first.force_flush(300)  # the receiver is down: nothing acknowledged
    first.shutdown()  # the application stops
    segments = [p for p in tmp_path.iterdir() if p.name.endswith(".jsonl")]
    assert segments, "unacknowledged audit spans must be on disk"
    for seg in segments:
        assert stat.S_IMODE(seg.stat().st_mode) == 0o600
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o700

    receiver = InMemorySpanExporter()
    second = AuditDelivery(receiver, fast_delivery(tmp_path))  # the application restarts
    assert second.force_flush(5000)
    got = receiver.get_finished_spans()
    assert sorted(ids(got)) == sorted(ids(spans))
    by_id = {s.context.span_id: s for s in got if s.context is not None}
    original = spans[3]
    assert original.context is not None
    replayed = by_id[original.context.span_id]
    assert replayed.attributes == original.attributes
    assert replayed.start_time == original.start_time
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".jsonl")]
    second.shutdown()


def test_spool_cap_drops_are_counted_and_reported_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    reader = InMemoryMetricReader()
    delivery = AuditDelivery(
        DownExporter(),
        fast_delivery(tmp_path, spool_max_bytes=4000, max_batch=1),
        meter_provider=MeterProvider(metric_readers=[reader]),
    )
    with caplog.at_level(logging.ERROR, logger="phiaudit"):
        for span in make_spans(30):
            delivery.submit(span)  # must not raise
        delivery.force_flush(500)
        delivery.shutdown()
    assert delivery.spool.size_bytes() <= 4000
    assert 0 < delivery.dropped < 30
    data = reader.get_metrics_data()
    assert data is not None
    points = [
        (dict(p.attributes or {}), p.value)
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        if m.name == DROPPED_METRIC
        for p in m.data.data_points  # type: ignore[union-attr]
    ]
    assert points == [({"reason": "spool_full"}, delivery.dropped)]
    assert "dropped PHI audit spans" in caplog.text
    assert "p-00" not in caplog.text  # no PHI in the report
    assert caplog.text.count("dropped PHI audit spans") <= 2  # once per interval, not per span


def test_hanging_exporter_never_blocks_the_application(tmp_path: Path) -> None:
    exporter = HangingExporter()
    config = fast_delivery(tmp_path, queue_size=4, max_block_seconds=0.01)
    delivery = AuditDelivery(exporter, config)
    spans = make_spans(200)
    started = time.monotonic()
    for span in spans:
        delivery.submit(span)
    elapsed = time.monotonic() - started
    # a generous bound: 200 submits, each allowed max_block_seconds, never the export hang
    assert elapsed < 200 * config.max_block_seconds + 2
    deadline = time.monotonic() + 5
    while delivery.spool.pending() == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert delivery.spool.pending() > 0, "while the exporter hangs, spans go to the spool"
    exporter.release.set()
    delivery.shutdown(2000)


def test_application_thread_never_sees_exporter_exceptions(audited_tmp: Path) -> None:
    class Exploding(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            raise RuntimeError("boom")

    from .conftest import make_audited

    a = make_audited(audited_tmp)
    a.audit.delivery.exporter = Exploding()  # type: ignore[union-attr]
    tracer = a.provider.get_tracer("t")
    for _ in range(5):
        with (
            access("read", resource_type="Patient", patients="p-1"),
            tracer.start_as_current_span("w"),
        ):
            pass
    assert not a.audit.force_flush(200)
    a.audit.shutdown()


@pytest.fixture
def audited_tmp(tmp_path: Path) -> Path:
    return tmp_path / "spool"


def test_span_json_round_trip_keeps_what_exporters_read() -> None:
    provider = TracerProvider()
    tracer = provider.get_tracer("scope", "1.2")
    with tracer.start_as_current_span("parent") as parent:
        span = tracer.start_span(
            "child",
            kind=SpanKind.SERVER,
            links=[Link(parent.get_span_context(), {"k": 1})],
            attributes={"b": True, "i": 3, "f": 1.5, "s": "x", "seq": ("a", "b"), "ints": (1, 2)},
        )
        span.add_event("phi.access", {"phi.patient.id": ("1", "2")})
        span.set_status(Status(StatusCode.ERROR, "Oops"))
        span.end()
    back = span_from_dict(span_to_dict(span))
    assert back.name == "child" and back.kind is SpanKind.SERVER
    assert back.context == span.context and back.parent == span.parent
    assert dict(back.attributes or {}) == dict(span.attributes or {})
    assert [(e.name, dict(e.attributes or {}), e.timestamp) for e in back.events] == [
        (e.name, dict(e.attributes or {}), e.timestamp) for e in span.events
    ]
    assert back.links[0].context == span.links[0].context
    assert back.status.status_code is StatusCode.ERROR and back.status.description == "Oops"
    assert (back.start_time, back.end_time) == (span.start_time, span.end_time)
    assert back.resource.attributes == span.resource.attributes
    assert back.instrumentation_scope == span.instrumentation_scope


def test_stale_claims_of_a_dead_process_are_replayed(tmp_path: Path) -> None:
    first = AuditDelivery(DownExporter(), fast_delivery(tmp_path))
    for span in make_spans(3):
        first.submit(span)
    first.force_flush(200)
    first.shutdown()
    seg = next(p for p in tmp_path.iterdir() if p.name.endswith(".jsonl"))
    os.rename(seg, seg.with_name(seg.name + ".inflight-999999999"))  # a dead pid's claim
    receiver = InMemorySpanExporter()
    second = AuditDelivery(receiver, fast_delivery(tmp_path))
    assert second.force_flush(5000)
    assert len(receiver.get_finished_spans()) == 3
    second.shutdown()


class RecordingExporter(SpanExporter):
    """Records each call's batch; the first ``hang`` calls wait for ``release`` and then
    answer ``hang_result``."""

    def __init__(self, hang: int = 0, hang_result: SpanExportResult = SpanExportResult.SUCCESS):
        self.hang = hang
        self.hang_result = hang_result
        self.release = threading.Event()
        self.batches: list[list[ReadableSpan]] = []
        self.calls = 0
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with self._lock:
            self.calls += 1
            call = self.calls
        if call <= self.hang:
            self.release.wait(10)
            if self.hang_result is not SpanExportResult.SUCCESS:
                return self.hang_result
        with self._lock:
            self.batches.append(list(spans))
        return SpanExportResult.SUCCESS

    def received(self) -> list[ReadableSpan]:
        with self._lock:
            return [s for batch in self.batches for s in batch]


def test_batches_are_filled_and_force_flush_sends_at_once(tmp_path: Path) -> None:
    exporter = RecordingExporter()
    # a long fill delay: only max_batch or force_flush end a batch
    delivery = AuditDelivery(
        exporter, fast_delivery(tmp_path, schedule_delay_seconds=30.0, max_batch=40)
    )
    spans = make_spans(100)
    for span in spans:  # spread out: an intake that sends what it has would make tiny batches
        delivery.submit(span)
        time.sleep(0.001)
    started = time.monotonic()
    assert delivery.force_flush(10000)
    assert time.monotonic() - started < 5, "force_flush must not wait for the fill delay"
    assert [len(b) for b in exporter.batches] == [40, 40, 20]
    assert sorted(ids(exporter.received())) == sorted(ids(spans))
    assert delivery.spooled == 0 and delivery.dropped == 0
    delivery.shutdown()


def wait_for(predicate: Callable[[], bool], seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.01)
    return predicate()


@pytest.mark.parametrize(
    "late_result", [SpanExportResult.SUCCESS, SpanExportResult.FAILURE], ids=["ok", "failed"]
)
def test_a_hanging_export_is_copied_to_the_spool_and_delivered_once(
    tmp_path: Path, late_result: SpanExportResult
) -> None:
    exporter = RecordingExporter(hang=1, hang_result=late_result)
    delivery = AuditDelivery(exporter, fast_delivery(tmp_path, export_hang_seconds=0.1))
    spans = make_spans(30)
    for span in spans:
        delivery.submit(span)
    # the whole batch is in flight: after export_hang_seconds it is on disk too (settled)
    assert wait_for(lambda: delivery.spool.pending() > 0)
    assert delivery.force_flush(100) is False  # a backlog on disk: not acknowledged yet
    exporter.release.set()  # the export returns: deleted (ok) or replayed (failed)
    assert delivery.force_flush(10000)
    assert delivery.spool.pending() == 0
    got = ids(exporter.received())
    assert sorted(got) == sorted(ids(spans)), "every span exactly once"
    assert delivery.dropped == 0
    delivery.shutdown()


def test_a_crash_while_the_export_hangs_loses_nothing(tmp_path: Path) -> None:
    hanging = RecordingExporter(hang=1, hang_result=SpanExportResult.FAILURE)
    first = AuditDelivery(hanging, fast_delivery(tmp_path, export_hang_seconds=0.1))
    spans = make_spans(25)
    for span in spans:
        first.submit(span)
    assert wait_for(lambda: first.spool.pending() > 0)
    # the process dies here (its batch never came back from the exporter): the next run,
    # same spool, delivers it
    receiver = InMemorySpanExporter()
    second = AuditDelivery(receiver, fast_delivery(tmp_path))
    assert second.force_flush(5000)
    assert sorted(ids(receiver.get_finished_spans())) == sorted(ids(spans))
    second.shutdown()
    hanging.release.set()
    first.shutdown(2000)
