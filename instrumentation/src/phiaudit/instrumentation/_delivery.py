"""The export path of PHI audit spans: never dropped silently.

``BatchSpanProcessor`` drops spans without a trace when its queue is full, which an audit
trail cannot afford. :class:`AuditDelivery` instead:

* takes spans from the application thread into a bounded in-memory queue; if it is full
  the thread waits at most ``max_block_seconds``, never longer (whatever the batch size:
  the queue is drained by the intake thread, which never waits on the exporter);
* an *intake* thread fills batches (up to ``max_batch`` spans, at most
  ``schedule_delay_seconds`` after their first span, or at once on ``force_flush``: the
  exporter's cost per call is large) and hands them to the *sender* thread, or writes them
  to the on-disk spool (:mod:`._spool`) when the sender is busy, hanging or backing off, so
  the queue keeps draining at disk speed even while the exporter hangs;
* an export still running after ``export_hang_seconds`` is treated as hanging: the intake
  thread copies its batch (and the one waiting for the sender) to the spool, so a crash
  while the exporter hangs loses nothing; the copy is deleted if the export then succeeds;
* the sender exports: to an ``OTLPSpanExporter`` (gRPC) a batch goes as one request
  encoded by :mod:`._otlp` (a fraction of the SDK encoder's cost), to any other exporter as
  ``ReadableSpan`` objects; on anything but ``SpanExportResult.SUCCESS`` (or an exception)
  spools the batch and retries the spool oldest first with exponential backoff until the
  exporter acknowledges; the spool is replayed by the next run after a restart;
* only when the spool is at its cap (or the queue stays full past the bound) are spans
  dropped: they are counted in the ``phiaudit.instrumentation.audit_spans.dropped``
  counter (label ``reason`` only) and reported in the log at most once per interval,
  without any PHI.

Nothing here raises into the application.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import random
import threading
import time
import weakref
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opentelemetry import metrics
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from phiaudit.instrumentation._config import DeliveryConfig
from phiaudit.instrumentation._otlp import (
    Encoded,
    Entry,
    NotSpans,
    disable_fast_path,
    encode_request,
    supports_fast_path,
)
from phiaudit.instrumentation._spool import Spool, SpoolCorrupt

_log = logging.getLogger("phiaudit.instrumentation")

DROPPED_METRIC = "phiaudit.instrumentation.audit_spans.dropped"
SPOOLED_METRIC = "phiaudit.instrumentation.audit_spans.spooled"

_NOT_SENT = object()
_IDLE_WAIT = 0.05  # seconds: how often the intake thread looks at an export in flight


class PendingSpan:
    """An ended audit span whose final attributes are worked out on the delivery's intake
    thread, not on the application thread (see :class:`PhiSpanProcessor`)."""

    __slots__ = ("span",)

    def __init__(self, span: ReadableSpan) -> None:
        self.span = span

    def attributes(self) -> Mapping[str, Any]:
        """The attributes to deliver (instead of ``span.attributes``)."""
        raise NotImplementedError


def _entry(item: ReadableSpan | PendingSpan) -> Entry:
    if not isinstance(item, PendingSpan):
        return item, None  # its own attributes
    try:
        return item.span, item.attributes()
    except Exception as exc:  # deliver what the span has rather than nothing
        _log.error(
            "phiaudit: internal error while enriching an audit span (%s)", type(exc).__name__
        )
        return item.span, None


def _as_span(entry: Entry) -> ReadableSpan:
    """A ``ReadableSpan`` carrying the entry's attributes (for exporters and the spool)."""
    span, attrs = entry
    if attrs is None:
        return span
    return ReadableSpan(
        name=span.name,
        context=span.context,
        parent=span.parent,
        resource=span.resource,
        attributes=attrs,
        events=span.events,
        links=span.links,
        kind=span.kind,
        status=span.status,
        start_time=span.start_time,
        end_time=span.end_time,
        instrumentation_scope=span.instrumentation_scope,
    )


def _spans(batch: Sequence[Entry]) -> list[ReadableSpan]:
    return [_as_span(e) for e in batch]


@dataclass
class _InFlight:
    """A batch the sender is exporting (shared by the sender and the intake watchdog)."""

    batch: list[Entry]
    started: float
    copy: Path | None = None  # its safety copy in the spool (this process's claim)
    copying: bool = False  # the intake thread is writing the copy
    copy_tried: bool = False
    result: bool | None = None  # set when the export returned while the copy was written


class AuditDelivery:
    """Delivers audit spans to ``exporter``: acknowledged, spooled, or counted as dropped."""

    def __init__(
        self,
        exporter: SpanExporter,
        config: DeliveryConfig | None = None,
        *,
        meter_provider: metrics.MeterProvider | None = None,
    ) -> None:
        self.exporter = exporter
        self.config = config or DeliveryConfig()
        meter = metrics.get_meter("phiaudit.instrumentation", meter_provider=meter_provider)
        self._dropped_counter = meter.create_counter(
            DROPPED_METRIC, unit="{span}", description="PHI audit spans dropped (spool full)"
        )
        self._spooled_counter = meter.create_counter(
            SPOOLED_METRIC, unit="{span}", description="PHI audit spans written to the spool"
        )
        self._dropped_total = 0
        self._spooled_total = 0
        self._unreported: Counter[str] = Counter()
        self._last_report = 0.0
        self._export_errors = 0
        self._stats_lock = threading.Lock()
        self._stopped = False
        self._init_runtime()
        ref = weakref.WeakMethod(self._init_runtime)
        os.register_at_fork(after_in_child=lambda: (m := ref()) is not None and m())

    def _init_runtime(self) -> None:
        cfg = self.config
        self.spool = Spool(cfg.spool_dir, cfg.spool_max_bytes, fsync=cfg.fsync)
        # the application thread appends without waking the intake thread up (a wake-up per
        # span costs more than the rest of the audit path): the intake thread takes batches
        # every schedule_delay_seconds, or sooner when woken (full batch, flush, shutdown)
        self._buffer: deque[ReadableSpan | PendingSpan] = deque()
        self._wake = threading.Event()
        self._flush = threading.Event()
        self._handoff: queue.Queue[list[Entry]] = queue.Queue(1)
        self._flight_lock = threading.Lock()
        self._flight: _InFlight | None = None
        self._cond = threading.Condition()
        self._unsettled = 0
        self._backlog = self.spool.pending() > 0
        self._next_attempt = 0.0
        self._failing = False  # the last export failed (none succeeded since)
        self._delay = cfg.retry_initial_seconds
        self._stop = threading.Event()
        self._intake_done = threading.Event()
        self._intake = threading.Thread(
            target=self._intake_loop, name="phiaudit-intake", daemon=True
        )
        self._sender = threading.Thread(
            target=self._sender_loop, name="phiaudit-sender", daemon=True
        )
        self._intake.start()
        self._sender.start()

    # -- application side ---------------------------------------------------------------------
    @property
    def dropped(self) -> int:
        """Audit spans dropped since start (spool full or queue blocked past the bound)."""
        return self._dropped_total

    @property
    def spooled(self) -> int:
        """Audit spans written to the spool since start (the exporter was busy, hanging or
        failing); they are delivered from there."""
        return self._spooled_total

    def submit(self, span: ReadableSpan | PendingSpan) -> None:
        """Queue one audit span; waits at most ``max_block_seconds``; never raises."""
        try:
            if self._stopped:
                self._drop(1, "shutdown")
                return
            cfg = self.config
            buffer = self._buffer
            with self._cond:
                queued = len(buffer) < cfg.queue_size
                if queued:
                    buffer.append(span)
                    self._unsettled += 1
            if not queued:
                queued = self._submit_when_room(span)
            if not queued:
                self._drop(1, "queue_full")
            elif len(buffer) >= cfg.max_batch:
                self._wake.set()
        except Exception:  # pragma: no cover - defensive: never raise into the app
            _log.error("phiaudit: internal error while queueing an audit span", exc_info=False)

    def _submit_when_room(self, span: ReadableSpan | PendingSpan) -> bool:
        """The queue is full: wait for room, at most ``max_block_seconds``."""
        deadline = time.monotonic() + self.config.max_block_seconds
        while True:
            self._wake.set()
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(left, 0.001))
            with self._cond:
                if len(self._buffer) < self.config.queue_size:
                    self._buffer.append(span)
                    self._unsettled += 1
                    return True

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Wait until every queued span is acknowledged and the spool is empty."""
        deadline = time.monotonic() + timeout_millis / 1000
        if self._unsettled:  # send what is queued now, not after the fill delay
            self._flush.set()
            self._wake.set()
        with self._cond:
            while self._unsettled or self._backlog:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
        return True

    def shutdown(self, timeout_millis: int = 30000) -> None:
        """Flush what is in memory (to the exporter, else to the spool) and stop."""
        if self._stopped:
            return
        self._stopped = True
        self._stop.set()
        self._wake.set()
        deadline = time.monotonic() + timeout_millis / 1000
        self._intake.join(max(0.0, deadline - time.monotonic()))
        self._sender.join(max(0.0, deadline - time.monotonic()))
        self.spool.release_claims()
        self._report(force=True)
        try:
            self.exporter.shutdown()
        except Exception as exc:
            _log.warning("phiaudit: exporter shutdown failed (%s)", type(exc).__name__)

    # -- intake thread --------------------------------------------------------------------------
    def _collect(self) -> list[Entry]:
        """The next batch: up to ``max_batch`` spans, taken when that many are queued, when
        ``schedule_delay_seconds`` have passed, on a flush, or at shutdown. Meanwhile it
        keeps an eye on the export in flight (:meth:`_watch`)."""
        cfg = self.config
        buffer = self._buffer
        deadline = time.monotonic() + cfg.schedule_delay_seconds
        while len(buffer) < cfg.max_batch and not self._flush.is_set() and not self._stop.is_set():
            self._watch()
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._wake.wait(min(left, _IDLE_WAIT) if self._flight is not None else left)
            self._wake.clear()
        batch: list[Entry] = []
        with contextlib.suppress(IndexError):
            while len(batch) < cfg.max_batch:
                batch.append(_entry(buffer.popleft()))
        if not buffer:
            self._flush.clear()
        return batch

    def _intake_loop(self) -> None:
        try:
            while True:
                batch = self._collect()
                if not batch:
                    if self._stop.is_set() and not self._buffer:
                        return
                    continue
                # the exporter is failing (backing off, or retrying since its last failure)
                # or hanging: straight to disk, not into memory behind an export that may
                # hang until its deadline (a crash would lose it); replayed oldest first
                if self._failing or not self._due() or self._hanging():
                    self._to_spool(batch)
                    continue
                try:
                    self._handoff.put(batch, timeout=self.config.schedule_delay_seconds)
                except queue.Full:
                    self._to_spool(batch)
        except Exception as exc:  # pragma: no cover - defensive
            _log.error("phiaudit: intake thread stopped (%s)", type(exc).__name__)
        finally:
            self._intake_done.set()

    def _hanging(self) -> bool:
        flight = self._flight
        return (
            flight is not None
            and time.monotonic() - flight.started >= self.config.export_hang_seconds
        )

    def _watch(self) -> None:
        """An export hanging past ``export_hang_seconds``: copy its batch to the spool, and
        the batch waiting for the sender too, so that a crash now loses nothing."""
        if not self._hanging():
            return
        with contextlib.suppress(queue.Empty):
            self._to_spool(self._handoff.get_nowait())
        with self._flight_lock:
            flight = self._flight
            if flight is None or flight.copy_tried:
                return
            flight.copying = flight.copy_tried = True
        try:
            copy = self.spool.append_claimed(_spans(flight.batch))
        except OSError:
            copy = None
        with self._flight_lock:
            flight.copying = False
            flight.copy = copy
            result = flight.result
        if copy is not None:  # on disk: settled; replayed by this process if the export fails
            self._count_spooled(len(flight.batch))
            with self._cond:
                self._backlog = True
            self._settle(len(flight.batch))
        if result is not None:  # the export returned while the copy was being written
            self._resolve(flight, result)

    # -- sender thread --------------------------------------------------------------------------
    def _due(self) -> bool:
        return time.monotonic() >= self._next_attempt

    def _sender_loop(self) -> None:
        while True:
            replaying = self._backlog and self._due() and not self._stop.is_set()
            try:  # with a backlog to replay, do not pause between segments
                batch = self._handoff.get(timeout=0.001 if replaying else 0.05)
            except queue.Empty:
                batch = None
            try:
                if batch is not None:
                    if self._failing or (self._stop.is_set() and not self._due()):
                        self._to_spool(batch)  # on disk while the exporter is failing
                    else:
                        self._send(batch)
                    continue
                if self._intake_done.is_set() and self._handoff.empty():
                    return
                if self._backlog and self._due() and not self._stop.is_set():
                    self._replay_one()
                self._report()
            except Exception as exc:  # pragma: no cover - defensive
                _log.error("phiaudit: sender error (%s)", type(exc).__name__)

    def _send(self, batch: list[Entry]) -> None:
        flight = _InFlight(batch, time.monotonic())
        with self._flight_lock:
            self._flight = flight
        ok = False
        try:
            ok = self._export(batch)
        finally:
            with self._flight_lock:
                self._flight = None
                flight.result = ok
                copying = flight.copying
            if not copying:  # else the intake thread resolves it when its copy is written
                self._resolve(flight, ok)

    def _resolve(self, flight: _InFlight, ok: bool) -> None:
        """Settle a batch whose export returned."""
        if flight.copy is not None:  # already on disk (and settled)
            if ok:
                self.spool.acknowledge(flight.copy)
            # else: the copy is this process's claim, replayed first
        elif ok:
            self._settle(len(flight.batch))
        else:
            self._to_spool(flight.batch)

    def _export(self, batch: Sequence[Entry]) -> bool:
        try:
            exporter = self.exporter  # may be replaced at run time
            result: object = _NOT_SENT
            if supports_fast_path(exporter):  # encoded once, here, by the lean encoder
                try:
                    result = exporter.export(Encoded(encode_request(batch), len(batch)))
                except NotSpans:  # not the exporter this fast path expects: spans from now on
                    disable_fast_path(exporter)
            if result is _NOT_SENT:
                result = exporter.export(_spans(batch))
            ok = result is SpanExportResult.SUCCESS
        except Exception as exc:
            ok = False
            self._export_errors += 1
            if self._export_errors == 1:  # the type only: exporter messages may echo data
                _log.warning("phiaudit: audit exporter raised %s; retrying", type(exc).__name__)
        self._failing = not ok
        if ok:
            self._delay = self.config.retry_initial_seconds
            self._next_attempt = 0.0
        else:
            jitter = random.uniform(0.8, 1.2)  # noqa: S311 - backoff jitter, not security
            self._next_attempt = time.monotonic() + self._delay * jitter
            self._delay = min(self._delay * 2, self.config.retry_max_seconds)
        return ok

    def _replay_one(self) -> None:
        segment = self.spool.claim_oldest()
        if segment is None:
            with self._cond:
                self._backlog = False
                self._cond.notify_all()
            return
        try:
            spans = self.spool.read(segment)
        except SpoolCorrupt:
            self.spool.quarantine(segment)
            self._drop(1, "corrupt_segment")
            return
        except OSError:
            return  # e.g. vanished: the next round looks again
        if self._export([(s, None) for s in spans]):
            self.spool.acknowledge(segment)

    def _to_spool(self, batch: list[Entry]) -> None:
        try:
            stored = self.spool.append(_spans(batch))
            reason = "spool_full"
        except OSError:
            stored = False
            reason = "spool_error"
        if stored:
            self._count_spooled(len(batch))
            with self._cond:
                self._backlog = True
        else:
            self._drop(len(batch), reason)
        self._settle(len(batch))

    # -- accounting -------------------------------------------------------------------------
    def _count_spooled(self, n: int) -> None:
        with self._stats_lock:
            self._spooled_total += n
        with contextlib.suppress(Exception):  # a broken meter must not break delivery
            self._spooled_counter.add(n)

    def _settle(self, n: int) -> None:
        with self._cond:
            self._unsettled -= n
            self._cond.notify_all()

    def _drop(self, n: int, reason: str) -> None:
        with self._stats_lock:
            self._dropped_total += n
            self._unreported[reason] += n
        with contextlib.suppress(Exception):  # a broken meter must not break delivery
            self._dropped_counter.add(n, {"reason": reason})
        self._report()

    def _report(self, force: bool = False) -> None:
        now = time.monotonic()
        with self._stats_lock:
            if not self._unreported:
                return
            if (
                not force
                and self._last_report
                and now - self._last_report < (self.config.report_interval_seconds)
            ):
                return
            self._last_report = now
            detail = ", ".join(f"{reason}={n}" for reason, n in sorted(self._unreported.items()))
            self._unreported.clear()
        _log.error(
            "phiaudit: dropped PHI audit spans (%s); total since start %d; spool cap %d bytes",
            detail,
            self._dropped_total,
            self.config.spool_max_bytes,
        )
