"""Turning one OTLP request into rows: parse, extract, encrypt. In process or in workers.

This is the CPU-heavy part of the service (tens of microseconds per span, most of it
protobuf attribute access and per-field Python work), and Python runs it on one core at a
time. With ``workers > 0`` the service hands large requests to that many worker processes,
each with its own ``RequestProcessor`` over the same key ring, so that both cores work; small
requests stay in process, where a round trip to a worker would cost more than it saves. The
chain, the writer and the store stay in the service process.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from phiaudit.storage import (
    AUDIT_COLUMNS,
    ColumnKeys,
    KeyRing,
    RecordEncoder,
    unlinked_table,
)

from ._extract import Extracted, Extractor, TooManyRows
from ._fast import MalformedTraces, NativeTraces, native_available
from ._infra import InfraConfig, roll_up

__all__ = ["MalformedRequest", "Processed", "RequestProcessor", "init_worker", "work"]

_log = logging.getLogger("phiaudit.receiver")


class MalformedRequest(Exception):
    """The bytes are not a valid OTLP protobuf message (the reason carries no data)."""


class RequestTooLarge(Exception):
    """The request would make more audit rows (one per patient touched) than the configured
    ``max_rows_per_request``: refused whole, before its rows fill memory."""


@dataclass
class Processed:
    #: rows, or (compiled extractor) one Arrow table of the audit_events schema
    audit_rows: list[list[Any]] | pa.Table
    trace_rows: list[list[Any]]
    stats: dict[str, int]
    infra_rows: list[list[Any]] = field(default_factory=list)
    rollup_rows: list[list[Any]] = field(default_factory=list)
    #: the request's ``request_key`` (``process_keyed``; the service always sets it)
    key: bytes | None = None


def request_key(signal: str, raw: bytes) -> bytes:
    """The writer's key for a request: identical request bytes are stored once (a client's
    retry of a request whose acknowledgement it missed). SHA-256, ~0.3 ms per 370 KB
    request: computed with the extraction (``process_keyed``), off the event loop."""
    digest = hashlib.sha256(signal.encode() + b"|")
    digest.update(raw)  # not concatenated: no copy of the request
    return digest.digest()


class RequestProcessor:
    def __init__(self, encoder: RecordEncoder, extractor: Extractor,
                 native: NativeTraces | None = None, max_rows: int | None = None) -> None:
        self.encoder = encoder
        self.extractor = extractor
        self.native = native
        #: audit rows one request may make at most (None: no limit)
        self.max_rows = max_rows
        self.native_failures = 0

    @classmethod
    def for_data_dir(cls, data_dir: Path, sensitive: list[str],
                     infra: dict[str, Any] | None = None,
                     native: bool = True, max_rows: int | None = None) -> RequestProcessor:
        ring = KeyRing.open(data_dir, create=False)
        return cls(RecordEncoder.for_ring(ring),
                   Extractor(sensitive, InfraConfig.from_mapping(infra or {})),
                   native_for(ring) if native else None, max_rows)

    def _native_traces(self, raw: bytes, request: Any, sender: str) -> Processed | None:
        """The compiled extractor's rows plus the Python path's for the spans it left;
        None when it did not take the request. ``request`` None: the compiled validator
        stands in for protobuf's (``MalformedRequest`` when it refuses the bytes), and the
        request is parsed with protobuf only when the Python path has spans to map."""
        assert self.native is not None
        now_us = time.time_ns() // 1000
        try:
            got = self.native.extract(raw, sender, now_us, self.max_rows or 0,
                                      validate=request is None)
        except MalformedTraces:
            raise MalformedRequest("not a valid protobuf message") from None
        except Exception as exc:  # never lose a request to the fast path: Python does it
            self.native_failures += 1
            if self.native_failures == 1:
                _log.error("compiled extractor failed (%s); this request goes through Python",
                           type(exc).__name__)
            return None
        if got is None:
            return None
        table, skip, total = got
        if len(skip) == total:  # the common case: nothing left for the Python path
            extracted = Extracted()
            extracted.stats.spans = total
        else:
            if request is None:
                request = _parse("traces", raw)
            extracted = self.extractor.traces(
                request, sender, skip=skip, now_us=now_us,
                max_rows=None if self.max_rows is None else self.max_rows - table.num_rows)
        if extracted.audit:
            rest = unlinked_table(AUDIT_COLUMNS, [self.encoder.audit_row(ev)
                                                  for ev in extracted.audit])
            table = pa.concat_tables([table, rest]) if table.num_rows else rest
        stats = extracted.stats
        stats.audit_events += len(skip)
        stats.audit_rows += table.num_rows - len(extracted.audit)
        return self._finish(extracted, table, native_spans=len(skip))

    def process_keyed(self, signal: str, raw: bytes, sender: str) -> Processed:
        """``process``, and the request's ``request_key`` beside it."""
        processed = self.process(signal, raw, sender)
        processed.key = request_key(signal, raw)
        return processed

    def process(self, signal: str, raw: bytes, sender: str) -> Processed:
        # traces with the compiled extractor: its validator gives protobuf's verdict, and the
        # protobuf parse (~2 us a span, GIL held) runs only for spans it leaves to Python
        request = None
        if signal == "traces" and self.native is not None and not self.native.validates:
            request = _parse(signal, raw)
        try:
            if signal == "traces":
                if self.native is not None:
                    done = self._native_traces(raw, request, sender)
                    if done is not None:
                        return done
                if request is None:
                    request = _parse(signal, raw)
                extracted = self.extractor.traces(request, sender, max_rows=self.max_rows)
            else:
                extracted = self.extractor.logs(_parse(signal, raw), sender,
                                                max_rows=self.max_rows)
        except TooManyRows:
            raise RequestTooLarge(f"more than {self.max_rows} audit rows") from None
        audit_row = self.encoder.audit_row
        return self._finish(extracted, [audit_row(ev) for ev in extracted.audit])

    def _finish(self, extracted: Any, audit: list[list[Any]] | pa.Table,
                native_spans: int = 0) -> Processed:
        stats = dict(extracted.stats.__dict__)
        if native_spans:
            stats["native_spans"] = native_spans
        infra_rows: list[list[Any]] = []
        rollup_rows: list[list[Any]] = []
        if extracted.infra:
            # noise control: records that touch no PHI are rolled up per minute (and sampled)
            split = roll_up(extracted.infra, self.extractor.infra)
            infra_row = self.encoder.infra_row
            infra_rows = [infra_row(ev) for ev in split.whole]
            rollup_rows = split.rollups
            stats["infra_kept_whole"] = len(infra_rows)
            stats["infra_rolled_up"] = split.rolled_up
            stats["infra_sampled"] = split.sampled
        return Processed(audit, extracted.traces, stats, infra_rows, rollup_rows)


def _parse(signal: str, raw: bytes) -> Any:
    """The request parsed by protobuf; ``MalformedRequest`` when it refuses the bytes."""
    try:
        if signal == "traces":
            return trace_service_pb2.ExportTraceServiceRequest.FromString(raw)
        return logs_service_pb2.ExportLogsServiceRequest.FromString(raw)
    except (DecodeError, RuntimeError, ValueError):
        raise MalformedRequest("not a valid protobuf message") from None


def native_for(ring: KeyRing) -> NativeTraces | None:
    """The compiled extractor over this key ring, or None (logged once) when not built."""
    ok, why = native_available()
    if not ok:
        _log.warning("%s: audit spans are extracted in Python (slower)", why)
        return None
    return NativeTraces(ColumnKeys.from_ring(ring))


_worker: RequestProcessor | None = None


def _exit_with(service_pid: int) -> None:
    """A worker never outlives its service, even one killed with SIGKILL."""
    while True:
        time.sleep(1.0)
        try:
            os.kill(service_pid, 0)
        except ProcessLookupError:
            os._exit(0)
        except PermissionError:
            pass


def init_worker(data_dir: str, sensitive: list[str], service_pid: int,
                infra: dict[str, Any] | None = None, native: bool = True,
                max_rows: int | None = None) -> None:
    global _worker
    logging.getLogger("clickhouse_connect").setLevel(logging.ERROR)
    threading.Thread(target=_exit_with, args=(service_pid,), daemon=True,
                     name="phiaudit-worker-watch").start()
    _worker = RequestProcessor.for_data_dir(Path(data_dir), sensitive, infra, native, max_rows)


def work(signal: str, raw: bytes, sender: str) -> Processed:
    if _worker is None:
        raise RuntimeError("worker not initialised")
    return _worker.process_keyed(signal, raw, sender)
