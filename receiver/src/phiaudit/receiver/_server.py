"""The gRPC surface: OTLP TraceService and LogsService, and the phiaudit query service.

Handlers take the raw request bytes (identity deserializer) so that a malformed message is
answered INVALID_ARGUMENT by us, with a counter, and so that the request's digest identifies
it across client retries. A request is answered OK only after every row it produced is
committed; when the store is failing or the queue is full the answer is UNAVAILABLE with
RetryInfo, in the trailer (``google.rpc.retryinfo-bin``, read by the Python exporter) and in
the status details (``grpc-status-details-bin``, read by the Go exporter). ``partial_success``
is never used: it would tell the client to drop data.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import duration_pb2
from google.protobuf.any_pb2 import Any as AnyProto
from google.rpc import code_pb2, error_details_pb2, status_pb2
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from phiaudit.storage import (
    AccessDenied,
    Overloaded,
    PermanentError,
    PhiAuditError,
    StorageUnavailable,
)

from ._auth import SenderAuth, Unauthenticated
from ._process import MalformedRequest, RequestTooLarge

if TYPE_CHECKING:
    from ._service import Service

__all__ = ["build_handlers"]

_log = logging.getLogger("phiaudit.receiver")

_TRACE_RESPONSE: bytes = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
_LOGS_RESPONSE: bytes = logs_service_pb2.ExportLogsServiceResponse().SerializeToString()


def _identity(b: bytes) -> bytes:
    return b


def _retry_metadata(message: str, delay_ms: int) -> tuple[tuple[str, bytes], ...]:
    info = error_details_pb2.RetryInfo(
        retry_delay=duration_pb2.Duration(seconds=delay_ms // 1000,
                                          nanos=(delay_ms % 1000) * 1_000_000))
    detail = AnyProto()
    detail.Pack(info)
    status = status_pb2.Status(code=code_pb2.UNAVAILABLE, message=message, details=[detail])
    return (
        ("google.rpc.retryinfo-bin", info.SerializeToString()),
        ("grpc-status-details-bin", status.SerializeToString()),
    )


def _bearer(context: grpc.aio.ServicerContext) -> str:
    """The caller's credential of the query methods (``authorization: Bearer TOKEN``)."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[7:]
    return ""


class _Otlp:
    def __init__(self, service: Service) -> None:
        self.svc = service
        self.auth = SenderAuth.from_config(service.config)

    async def _sender(self, context: grpc.aio.ServicerContext) -> str:
        """The authenticated sender (see ``_auth``), or abort with UNAUTHENTICATED."""
        try:
            return self.auth.identify(context.invocation_metadata(), context.auth_context())
        except Unauthenticated as exc:
            self.svc.metrics.inc("export_unauthenticated")
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
            raise  # not reached: abort raises

    async def _unavailable(self, context: grpc.aio.ServicerContext, message: str) -> None:
        self.svc.metrics.inc("export_unavailable")
        await context.abort(grpc.StatusCode.UNAVAILABLE, message,
                            trailing_metadata=_retry_metadata(message,
                                                              self.svc.config.retry_after_ms))

    async def _export(self, raw: bytes, context: grpc.aio.ServicerContext, signal: str) -> None:
        svc = self.svc
        svc.metrics.inc(f"{signal}_requests")
        sender = await self._sender(context)
        if not raw:
            return
        local = svc.local
        local.processing += 1  # until submitted, the writer waits for this request's rows
        try:
            future = await self._process_and_submit(svc, raw, context, signal, sender)
        finally:
            local.processing -= 1
        if future is None:
            return
        wait = svc.config.ack_timeout_ms / 1000
        remaining = context.time_remaining()
        if remaining is not None:
            wait = max(0.05, min(wait, remaining - 0.25))
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), timeout=wait)
        except TimeoutError:
            await self._unavailable(context, "not yet committed: retry later")
        except StorageUnavailable:
            await self._unavailable(context, "the audit store is unavailable: retry later")
        except PermanentError:
            svc.metrics.inc("export_rejected")
            await context.abort(grpc.StatusCode.INTERNAL, "the store rejected the data")
        svc.metrics.inc(f"{signal}_acknowledged")

    async def _process_and_submit(self, svc: Service, raw: bytes,
                                  context: grpc.aio.ServicerContext, signal: str,
                                  sender: str) -> Future[None] | None:
        """Parse, extract and queue the request's rows; their commit's future (None: none)."""
        try:
            processed = await svc.process(signal, raw, sender)
        except MalformedRequest:
            svc.metrics.inc(f"{signal}_malformed")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "malformed OTLP request: not a valid protobuf message")
        except RequestTooLarge:
            svc.metrics.inc(f"{signal}_too_many_rows")
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the request would make more than {svc.config.max_rows_per_request} audit rows "
                "(one per patient touched; max_rows_per_request): send it in smaller parts")
        except BrokenProcessPool:
            svc.metrics.inc("worker_failures")
            _log.error("a worker process died; restarting the worker pool")
            svc.restart_workers()
            await self._unavailable(context, "temporarily unable to process: retry later")
        except Exception as exc:
            svc.metrics.inc(f"{signal}_extract_errors")
            # the message of an exception may quote a field value: log its type only
            _log.error("could not process an OTLP %s request (%s; contents not logged)",
                       signal, type(exc).__name__)
            await context.abort(grpc.StatusCode.INTERNAL, "could not process the request")
        for name, value in processed.stats.items():
            svc.metrics.inc(name, value)
        tables: dict[str, Any] = {}
        if len(processed.audit_rows):
            tables["audit_events"] = processed.audit_rows
        if processed.trace_rows:
            tables["otel_traces"] = processed.trace_rows
        if processed.infra_rows:
            tables["infra_events"] = processed.infra_rows
        if processed.rollup_rows:
            tables["infra_rollups"] = processed.rollup_rows
        if not tables:
            return None
        if processed.key is None:  # Service.process always sets it: never store unkeyed
            raise RuntimeError("a processed request without its key")
        try:
            return svc.writer.submit(processed.key, tables)
        except Overloaded:
            svc.metrics.inc("export_shed")
            await self._unavailable(context, "overloaded: retry later")
        except StorageUnavailable:
            await self._unavailable(context, "the audit store is unavailable: retry later")
        return None  # not reached: _unavailable aborts

    async def traces(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await self._export(raw, context, "traces")
        return _TRACE_RESPONSE

    async def logs(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await self._export(raw, context, "logs")
        return _LOGS_RESPONSE


class _Query:
    """``phiaudit.v1.Query/Sql``: JSON in, JSON out; the credential in ``authorization``."""

    def __init__(self, service: Service) -> None:
        self.svc = service

    async def sql(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        token = _bearer(context)
        try:
            req = json.loads(raw or b"{}")
            sql = str(req["sql"])
            decrypt = bool(req.get("decrypt", False))
        except (ValueError, KeyError, TypeError):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "expected {\"sql\": ...}")
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(
                None, lambda: self.svc.gateway.run(token, sql, decrypt=decrypt))
        except AccessDenied as exc:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        except PermanentError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except PhiAuditError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        return json.dumps({"columns": result.columns, "rows": result.rows},
                          default=str).encode()

    async def metrics(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        snap = self.svc.metrics.snapshot()
        snap["queued_rows"] = self.svc.writer.queued_rows
        snap["spool_bytes"] = self.svc.writer.spool_bytes
        stats = self.svc.writer.stats
        snap["spooled_blocks"] = stats.spooled_blocks
        snap["drained_blocks"] = stats.drained_blocks
        snap["spool_skipped_blocks"] = stats.skipped_blocks
        snap["spool_reinserted_blocks"] = stats.reinserted_blocks
        snap["spool_rejected_blocks"] = stats.rejected_blocks
        snap["writer_batches"] = stats.batches
        snap["writer_rows"] = sum(stats.rows.values())
        snap["writer_busy_ms"] = int(stats.busy_seconds * 1000)
        # inserts the engine reported done without their parts (see Store.insert_arrow)
        snap["writer_lost_inserts"] = stats.lost_inserts
        snap["writer_unconfirmed_inserts"] = stats.unconfirmed_inserts
        snap.update(self.svc.rule_metrics())
        return json.dumps(snap).encode()


class _Rules:
    """``phiaudit.v1.Rules/{List,Explain,Run}``, ``phiaudit.v1.Alerts/List`` and
    ``phiaudit.v1.Care/Load``: JSON in, JSON out, the credential in ``authorization``; each
    call is checked and recorded in access_log by ``RulesOps``."""

    def __init__(self, service: Service) -> None:
        self.svc = service

    async def _call(self, raw: bytes, context: grpc.aio.ServicerContext, op: str) -> bytes:
        from phiaudit.storage import ConfigError

        from ._rules_service import RulesOps

        token = _bearer(context)
        try:
            req = json.loads(raw or b"{}")
            if not isinstance(req, dict):
                raise TypeError
        except (ValueError, TypeError):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "expected a JSON object")
        scheduler: Any = getattr(self.svc, "_rules", None)
        local: Any = getattr(self.svc, "_local", None)
        if scheduler is None or local is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the rule engine is not running")
        ops = RulesOps(local, scheduler, "service")

        def run() -> Any:
            if op == "list":
                return ops.list_rules(token)
            if op == "explain":
                return {"sql": ops.explain(token, str(req.get("rule", "")))}
            if op == "run":
                window = req.get("backfill")
                return ops.run(token, (int(window[0]), int(window[1])) if window else None)
            if op == "alerts":
                return ops.alerts(token, since_us=int(req.get("since_us", 0)),
                                  rule=str(req.get("rule", "")),
                                  limit=int(req.get("limit", 1000)))
            return ops.care_load(token, base64.b64decode(str(req.get("data", ""))),
                                 str(req.get("format", "csv")))

        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(None, run)
        except AccessDenied as exc:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        except (PermanentError, ConfigError) as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except (ValueError, TypeError, IndexError):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed request")
        except PhiAuditError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        return json.dumps(result, default=str).encode()

    async def list(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return await self._call(raw, context, "list")

    async def explain(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return await self._call(raw, context, "explain")

    async def run(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return await self._call(raw, context, "run")

    async def alerts(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return await self._call(raw, context, "alerts")

    async def care(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return await self._call(raw, context, "care")


def build_handlers(service: Service) -> list[grpc.GenericRpcHandler]:
    otlp = _Otlp(service)
    query = _Query(service)
    rules = _Rules(service)

    def unary(fn: Any) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(
            fn, request_deserializer=_identity, response_serializer=_identity)

    return [
        grpc.method_handlers_generic_handler(
            "opentelemetry.proto.collector.trace.v1.TraceService", {"Export": unary(otlp.traces)}),
        grpc.method_handlers_generic_handler(
            "opentelemetry.proto.collector.logs.v1.LogsService", {"Export": unary(otlp.logs)}),
        grpc.method_handlers_generic_handler(
            "phiaudit.v1.Query", {"Sql": unary(query.sql), "Metrics": unary(query.metrics)}),
        grpc.method_handlers_generic_handler(
            "phiaudit.v1.Rules", {"List": unary(rules.list), "Explain": unary(rules.explain),
                                  "Run": unary(rules.run)}),
        grpc.method_handlers_generic_handler("phiaudit.v1.Alerts", {"List": unary(rules.alerts)}),
        grpc.method_handlers_generic_handler("phiaudit.v1.Care", {"Load": unary(rules.care)}),
    ]
