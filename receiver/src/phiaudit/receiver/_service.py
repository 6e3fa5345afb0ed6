"""The service: wiring and lifecycle, collector-style.

Start order: keys and credentials, schema migration, the store, the writer (exporter side),
then the gRPC server (receiver side) last. Stop in reverse: the server stops taking requests
and drains the ones in flight, the writer flushes, the store closes. ``stop()`` is idempotent
and safe before ``start()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import multiprocessing
import os
import secrets
import signal
import socket
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc

from phiaudit.storage import (
    ACCESS_LOG_COLUMNS,
    AUDIT_COLUMNS,
    INFRA_COLUMNS,
    ROLLUP_COLUMNS,
    SCHEMA_VERSION,
    TRACE_COLUMNS,
    AccessRecord,
    BatchSpool,
    BatchWriter,
    ConfigError,
    Credentials,
    KeyRing,
    QueryGateway,
    RecordEncoder,
    Store,
    StoreLocation,
    TableSpec,
    migrate,
)
from phiaudit.storage import ALERT_COLUMNS as _ALERT_COLUMNS
from phiaudit.storage import CARE_COLUMNS as _CARE_COLUMNS
from phiaudit.storage import DELIVERY_COLUMNS as _DELIVERY_COLUMNS
from phiaudit.storage import RULE_RUN_COLUMNS as _RULE_RUN_COLUMNS

from ._checkpointer import Checkpointer
from ._checkpointer import for_service as checkpointer_for_service
from ._config import ServiceConfig
from ._extract import Extractor
from ._fast import native_block_encoder, native_linker
from ._infra import InfraConfig
from ._memory import MemoryGuard
from ._metrics import Metrics
from ._process import Processed, RequestProcessor, init_worker, native_for, work
from ._rules_service import RuleScheduler
from ._server import build_handlers

__all__ = ["Service", "open_local", "run_service", "writer_identity"]

_log = logging.getLogger("phiaudit.service")

TABLES = (
    TableSpec("audit_events", AUDIT_COLUMNS, chained=True, dedup_column="event_id"),
    TableSpec("otel_traces", TRACE_COLUMNS, chained=False),
    TableSpec("access_log", ACCESS_LOG_COLUMNS, chained=True),
    # infrastructure records (PHI-touching ones whole) and the rollups of the others
    TableSpec("infra_events", INFRA_COLUMNS, chained=True, dedup_column="event_id"),
    TableSpec("infra_rollups", ROLLUP_COLUMNS, chained=False),
    # the rule engine's tables (alerts, runs, deliveries, care relationships)
    TableSpec("alerts", _ALERT_COLUMNS, chained=True, dedup_column="alert_id"),
    TableSpec("rule_runs", _RULE_RUN_COLUMNS, chained=False),
    TableSpec("alert_deliveries", _DELIVERY_COLUMNS, chained=False),
    TableSpec("care_relationships", _CARE_COLUMNS, chained=False),
)


def writer_identity(data_dir: Path, configured: str = "") -> str:
    """The writer id of this data directory: configured, or created once and kept."""
    if configured:
        return configured
    path = data_dir / "writer_id"
    if path.exists():
        return path.read_text().strip()
    wid = f"{socket.gethostname()[:40]}-{secrets.token_hex(4)}"
    path.write_text(wid + "\n")
    return wid


def extract_threads(config: ServiceConfig) -> int:
    """The extraction threads: ``extract_threads``, or one more than the cores (-1). With one
    thread a core, a core idles whenever its thread waits for the GIL (to start a request, or
    to build its Arrow columns) while the event loop or another thread holds it."""
    if config.extract_threads > 0:
        return config.extract_threads
    return (os.cpu_count() or 1) + 1


class _Local:
    """Keys, credentials, store, writer and gateway over one data directory."""

    def __init__(self, config: ServiceConfig, *, writer_suffix: str = "",
                 store_factory: Any = None) -> None:
        self.config = config
        self.data_dir = Path(config.data_dir).resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.data_dir, 0o700)
        self.keys = KeyRing.open(self.data_dir)
        self.encoder = RecordEncoder.for_ring(self.keys)
        self.credentials = Credentials(self.data_dir)
        self.admin_token_file = self.credentials.ensure_admin()
        self.location = StoreLocation(
            data_dir=None if config.clickhouse_url else self.data_dir,
            url=config.clickhouse_url or None, database=config.database,
            ca_file=config.clickhouse_ca_file or None,
            disk_encryption=config.disk_encryption)
        if self.location.embedded:
            migrate(self.location)  # admin engine in a child process, before ours opens
        store = Store.open(self.location)
        if store.schema_version() < SCHEMA_VERSION:
            store.close()
            raise ConfigError("the ClickHouse schema is missing or old: run `phiaudit migrate "
                              "--clickhouse ADMIN_URL` with an administrator account first")
        if config.native_extractor:
            store.block_encoder = native_block_encoder()
        self.store = store_factory(store) if store_factory else store
        self.writer_id = writer_identity(self.data_dir, config.writer_id) + writer_suffix
        # the service's writer spools to local disk while the store fails; the command line's
        # writer (access records of direct reads) does not
        spool = (BatchSpool(self.data_dir / "spool", config.spool_max_bytes)
                 if config.spool_max_bytes > 0 and not writer_suffix else None)
        #: requests being processed, whose rows the writer will get soon (it waits for them)
        self.processing = 0
        self.writer = BatchWriter(
            self.store, self.writer_id, TABLES, max_rows=config.batch_max_rows,
            expecting=lambda: self.processing,
            max_wait=config.batch_max_wait_ms / 1000, max_queue_rows=config.max_queue_rows,
            spool=spool, linker=native_linker() if config.native_extractor else None)
        self.writer.start()
        #: what one rule or staff query may use of the engine this process shares with the
        #: ingestion (embedded only: a ClickHouse server's own profiles limit its queries)
        self.query_memory_bytes = config.query_memory_mb << 20 if self.location.embedded else 0
        self.gateway = QueryGateway(self.store, self.encoder, self.credentials,
                                    self._record_access,
                                    max_memory_bytes=self.query_memory_bytes)

    def _record_access(self, rec: AccessRecord) -> None:
        row = self.encoder.access_row(rec, time.time_ns() // 1000)
        # fail closed: no result leaves before its access record is committed
        self.writer.submit(None, {"access_log": [row]}).result(timeout=60)

    def close(self) -> None:
        self.writer.shutdown()
        self.store.close()


def open_local(config: ServiceConfig) -> _Local:
    """Open a data directory directly (no service running): for the command line."""
    return _Local(config, writer_suffix="/cli")


class Service:
    def __init__(self, config: ServiceConfig, *, store_factory: Any = None) -> None:
        self.config = config
        self.metrics = Metrics()
        self.extractor = Extractor(config.sensitive_attributes,
                                   InfraConfig.from_mapping(config.infra))
        self._store_factory = store_factory
        self._local: _Local | None = None
        self._server: grpc.aio.Server | None = None
        self._pool: ProcessPoolExecutor | None = None
        self._processor: RequestProcessor | None = None
        self._threads = ThreadPoolExecutor(max_workers=extract_threads(config),
                                           thread_name_prefix="phiaudit-extract")
        self._checkpointer: Checkpointer | None = None
        self._rules: RuleScheduler | None = None
        self._memory: MemoryGuard | None = None
        self._stopped = False
        self.port = 0

    # components the handlers use
    @property
    def local(self) -> _Local:
        assert self._local is not None
        return self._local

    @property
    def writer(self) -> BatchWriter:
        assert self._local is not None
        return self._local.writer

    @property
    def encoder(self) -> RecordEncoder:
        assert self._local is not None
        return self._local.encoder

    @property
    def gateway(self) -> QueryGateway:
        assert self._local is not None
        return self._local.gateway

    def rule_metrics(self) -> dict[str, int]:
        """The scheduled rule runs' counters (none while the rules are off)."""
        sched = self._rules
        if sched is None or not sched.rules_config.enabled:
            return {}
        st = sched.engine.stats
        return {"rule_ticks": sched.ticks, "rule_ticks_failed": sched.failures,
                "rule_ticks_skipped": sched.skipped, "rule_failures": st.failures,
                "rule_alerts": st.alerts, "rule_query_splits": st.splits,
                "rule_windows_fired": st.fired, "rule_windows_already_alerted": st.fired_known}

    async def process(self, signal: str, raw: bytes, sender: str) -> Processed:
        """Parse, extract and encrypt one request, and compute its writer key (``key``): in a
        worker when it is large enough, on an extraction thread when it is over 4 KiB."""
        pool = self._pool
        loop = asyncio.get_running_loop()
        processor = self._processor
        assert processor is not None
        # traces with the compiled extractor stay in process (a worker's round trip would cost
        # more than the extraction); the Python path's large requests go to the workers
        native = signal == "traces" and processor.native is not None
        if pool is not None and not native and len(raw) >= self.config.worker_min_bytes:
            return await loop.run_in_executor(pool, work, signal, raw, sender)
        if len(raw) >= 4096:
            # off the event loop: the compiled extractor releases the GIL, and other requests
            # are taken meanwhile (the writer then sees them coming and batches them together)
            return await loop.run_in_executor(self._threads, processor.process_keyed, signal,
                                              raw, sender)
        return processor.process_keyed(signal, raw, sender)

    def _start_workers(self) -> None:
        n = self.config.workers
        if n < 0:
            n = (os.cpu_count() or 1) if (os.cpu_count() or 1) > 1 else 0
        if n == 0:
            return
        # spawn: the workers are the service's own children, with nothing of its state (no
        # engine, no keys in the environment); each one exits if the service dies
        ctx = multiprocessing.get_context("spawn")
        self._pool = ProcessPoolExecutor(
            max_workers=n, mp_context=ctx, initializer=init_worker,
            initargs=(str(Path(self.config.data_dir).resolve()),
                      list(self.config.sensitive_attributes), os.getpid(),
                      dict(self.config.infra or {}), self.config.native_extractor,
                      self.config.max_rows_per_request))
        # start them now, not on the first request
        for f in [self._pool.submit(os.getpid) for _ in range(n)]:
            f.result(timeout=120)

    def restart_workers(self) -> None:
        old = self._pool
        self._pool = None
        if old is not None:
            old.shutdown(wait=False, cancel_futures=True)
        try:
            self._start_workers()
        except Exception:
            _log.error("could not restart the worker pool; processing in process")
            self._pool = None

    @property
    def run_file(self) -> Path:
        return Path(self.config.data_dir).resolve() / "run" / "service.json"

    async def start(self) -> None:
        cfg = self.config
        self._local = local = _Local(cfg, store_factory=self._store_factory)
        self._processor = RequestProcessor(
            local.encoder, self.extractor,
            native_for(local.keys) if cfg.native_extractor else None,
            cfg.max_rows_per_request)
        self._checkpointer = checkpointer_for_service(cfg, local)  # after the writer
        self._checkpointer.start()
        self._rules = RuleScheduler(cfg, local)  # after the writer; runs rules, sends alerts
        self._rules.start()
        # a test's store wrapper may not have it: nothing to release then
        release = getattr(local.store, "release_memory", lambda: False)
        self._memory = MemoryGuard(
            cfg.memory_release_mb << 20, release,
            count=lambda: self.metrics.inc("memory_releases"),
            code=getattr(local.store, "engine_code", ()),
            count_code=lambda: self.metrics.inc("memory_code_page_outs"))
        self._memory.start()
        await asyncio.get_running_loop().run_in_executor(None, self._start_workers)
        if local.admin_token_file:
            _log.warning("created the initial security credential in %s (mode 0600)",
                         local.admin_token_file)
        options = [
            ("grpc.max_receive_message_length", cfg.max_message_bytes),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
            ("grpc.so_reuseport", 0),
        ]
        server = grpc.aio.server(options=options, handlers=build_handlers(self))
        if cfg.tls:
            creds = grpc.ssl_server_credentials(
                [(Path(cfg.tls_key_file).read_bytes(), Path(cfg.tls_cert_file).read_bytes())],
                root_certificates=(Path(cfg.tls_client_ca_file).read_bytes()
                                   if cfg.tls_client_ca_file else None),
                require_client_auth=bool(cfg.tls_client_ca_file))
            self.port = server.add_secure_port(cfg.listen, creds)
        else:
            self.port = server.add_insecure_port(cfg.listen)
        if not self.port:
            raise OSError(f"cannot listen on {cfg.listen}")
        await server.start()
        self._server = server
        self.run_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.run_file.write_text(json.dumps({
            "pid": os.getpid(), "address": f"{cfg.host}:{self.port}", "tls": cfg.tls,
            # for the command line: the certificate to trust when no --ca-file is given
            "tls_cert_file": str(Path(cfg.tls_cert_file).resolve()) if cfg.tls else "",
            "mtls": bool(cfg.tls_client_ca_file)}))
        _log.info("listening on %s:%d (%s), writer %s", cfg.host, self.port,
                  "TLS" if cfg.tls else "plaintext, loopback only", local.writer_id)

    async def stop(self, grace: float = 10.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self._server is not None:
            await self._server.stop(grace)
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._threads.shutdown(wait=True)
        if self._rules is not None:  # before the checkpointer: its last rows are covered
            await asyncio.get_running_loop().run_in_executor(None, self._rules.shutdown)
        if self._checkpointer is not None:  # before the writer: a last checkpoint
            await asyncio.get_running_loop().run_in_executor(None, self._checkpointer.shutdown)
        if self._memory is not None:
            self._memory.stop()
        if self._local is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._local.close)
            stats = self._local.writer.stats
            _log.info("stopped: %d batches, rows %s", stats.batches, stats.rows)
        with contextlib.suppress(FileNotFoundError):
            self.run_file.unlink()


async def serve_until_signalled(config: ServiceConfig, *, store_factory: Any = None) -> None:
    """Start the service, serve until SIGTERM or SIGINT, then stop it (flushing)."""
    service = Service(config, store_factory=store_factory)
    await service.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"phiaudit: serving OTLP on {config.host}:{service.port}", flush=True)
    await stop.wait()
    await service.stop()


def run_service(config: ServiceConfig) -> None:
    asyncio.run(serve_until_signalled(config))
