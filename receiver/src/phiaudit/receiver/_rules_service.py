"""The rule engine inside the service, and the rule, alert and care operations of the command
line (through the service's gRPC port, or on a store opened directly).

``RuleScheduler`` is a thread of the service: every ``rules.interval_s`` it runs the rules'
due windows (``RuleEngine.run_due``), then delivers the pending alerts to the configured
sinks (``deliver_pending``). It writes through the service's writer, so alerts, rule runs and
delivery attempts are chained and committed like every other row. It never dies: an error is
logged by its type only (a message could quote data) and the next tick tries again; the
engine's watermark and the delivery table make every tick pick up where the last one stopped,
across restarts too. Command-line runs (``phiaudit rules run``) take the same lock.

``RulesOps`` are the operations behind ``phiaudit rules|alerts|care``: each one checks the
caller's credential (security or compliance; ``care load`` security only) and records the
call in ``access_log`` (refused ones too) before anything is returned.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import threading
import time
import uuid
from concurrent.futures import Future
from typing import Any

from phiaudit.storage import (
    ROLES,
    AccessDenied,
    AccessRecord,
    Alert,
    PermanentError,
    PhiAuditError,
    Principal,
)

__all__ = ["RuleScheduler", "RulesOps", "iso_us"]

_log = logging.getLogger("phiaudit.rules.scheduler")


def iso_us(us: int) -> str:
    t = _dt.datetime.fromtimestamp(int(us) / 1_000_000, _dt.UTC)
    return t.isoformat(timespec="seconds").replace("+00:00", "Z")


class _YieldingStore:
    """The store as the rule engine sees it: ingestion first. The store serializes queries
    and inserts on one (unfair) lock, so back-to-back rule queries could keep the writer
    waiting; before a query this waits (up to 2 s) while the writer has rows queued, and
    after it leaves the lock free a moment for a waiting insert."""

    def __init__(self, store: Any, writer: Any) -> None:
        self._store = store
        self._writer = writer

    def query(self, *args: Any, **kwargs: Any) -> Any:
        deadline = time.monotonic() + 2.0
        while self._writer.queued_rows and time.monotonic() < deadline:
            time.sleep(0.01)
        try:
            return self._store.query(*args, **kwargs)
        finally:
            time.sleep(0.002)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


class RuleScheduler:
    """The service's rule runs and alert deliveries. Start after the writer, shut down
    before it."""

    def __init__(self, config: Any, local: Any) -> None:
        from phiaudit.rules import RuleEngine, RulesConfig, build_sinks, load_rules

        self.rules_config = RulesConfig.from_mapping(dict(config.rules or {}))
        self.rules = load_rules(self.rules_config)
        self.sinks = build_sinks(list(self.rules_config.sinks or []))
        self.local = local
        writer = local.writer
        self._last_write: Future[None] | None = None

        def submit(tables: dict[str, list[list[Any]]]) -> None:
            self._last_write = writer.submit(None, tables)
            self._last_write.result(timeout=60)

        self.submit = submit
        self.store = _YieldingStore(local.store, writer)
        self.engine = RuleEngine(self.store, submit, local.encoder, self.rules,
                                 self.rules_config,
                                 max_query_bytes=local.query_memory_bytes)
        self.interval_s = float(self.rules_config.interval_s)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.ticks = 0
        self.failures = 0
        self.skipped = 0

    def start(self) -> None:
        if not self.rules_config.enabled:
            _log.info("rules disabled: no scheduled runs")
            return
        self._thread = threading.Thread(target=self._loop, name="phiaudit-rules", daemon=True)
        self._thread.start()
        _log.info("rules: %d rule(s), every %gs, %d sink(s)", len(self.rules),
                  self.interval_s, len(self.sinks))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.tick()

    def store_ready(self) -> bool:
        """False while the writer fails or drains its spool, or an earlier write of ours is
        still pending: a run now would not see its own last watermark and would only queue
        rows behind the failing batch. The tick after the store is back catches up."""
        writer = self.local.writer
        if self._last_write is not None and not self._last_write.done():
            return False
        return bool(writer.healthy) and not writer.spool_bytes

    def tick(self) -> None:
        """One scheduled run and delivery; never raises."""
        try:
            if not self.store_ready():
                self.skipped += 1
                return
            self.run_once(keep=False)  # the alerts are written; not held for a caller
        except Exception as exc:
            self.failures += 1
            _log.error("scheduled rule run failed (%s); retrying at the next tick",
                       type(exc).__name__)
        finally:
            self.ticks += 1

    def deliver(self) -> int:
        from phiaudit.rules import deliver_pending

        if not self.sinks:
            return 0
        return deliver_pending(self.store, self.submit, self.sinks)

    def run_once(self, now_us: int | None = None, *, keep: bool = True,
                 ) -> tuple[list[Alert], int]:
        """One scheduled run, then a delivery: the alerts written (none with ``keep=False``)
        and the number of deliveries."""
        with self._lock:
            alerts = self.engine.run_due(now_us, keep=keep)
            delivered = self._deliver_safely()
        return alerts, delivered

    def backfill(self, start_us: int, end_us: int) -> tuple[list[Alert], int]:
        with self._lock:
            alerts = list(self.engine.backfill(start_us, end_us))
            delivered = self._deliver_safely()
        return alerts, delivered

    def _deliver_safely(self) -> int:
        try:
            return self.deliver()
        except Exception as exc:  # the alerts are stored: the next tick delivers them
            _log.error("alert delivery failed (%s); retrying at the next tick",
                       type(exc).__name__)
            return 0

    def shutdown(self, timeout: float = 120) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)


_ALERTS_SQL = """
SELECT toString(a.alert_id), toUnixTimestamp64Micro(a.time), a.rule_id, a.severity,
       toUnixTimestamp64Micro(a.window_start), toUnixTimestamp64Micro(a.window_end),
       a.group_key, a.summary, a.value, a.evidence_count,
       arrayMap(x -> toString(x), a.evidence), a.trace_ids, a.mode,
       arraySort(d.sinks)
FROM (SELECT * FROM alerts WHERE time >= fromUnixTimestamp64Micro({since:Int64}) {rule}
      ORDER BY time DESC LIMIT 1 BY alert_id LIMIT {limit:UInt32}) AS a
LEFT JOIN (SELECT alert_id, groupUniqArray(sink) AS sinks FROM alert_deliveries
           WHERE outcome = 'delivered' GROUP BY alert_id) AS d ON d.alert_id = a.alert_id
ORDER BY a.time DESC, a.alert_id
"""

ALERT_FIELDS = ["time", "alert_id", "rule_id", "severity", "window_start", "window_end",
                "group", "summary", "value", "evidence_count", "evidence", "trace_ids", "mode",
                "delivered_to"]


def _text(v: Any) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes | bytearray) else str(v)


class RulesOps:
    """``phiaudit rules|alerts|care`` over an open data directory (the service's or the
    command line's ``_Local``), with the scheduler that holds the engine."""

    def __init__(self, local: Any, scheduler: RuleScheduler, interface: str) -> None:
        self.local = local
        self.scheduler = scheduler
        self.interface = interface

    # -- access ---------------------------------------------------------------------------
    def _record(self, who: Principal, what: str, rows: int, outcome: str, reason: str) -> None:
        self.local._record_access(AccessRecord(
            principal=who.name or "(unauthenticated)", role=who.role,
            interface=self.interface, statement=what, decrypt=False, rows_returned=rows,
            outcome=outcome, reason=reason[:200]))

    def _run(self, token: str | None, what: str, roles: frozenset[str], fn: Any) -> Any:
        """Authenticate, run ``fn(principal) -> (result, rows)``, record, return the result."""
        who = Principal("", "")
        try:
            who = self.local.credentials.authenticate(token)
            if who.role not in roles:
                raise AccessDenied("only the security role may load care relationships"
                                   if roles == {"security"} else
                                   "this role may not read the audit trail")
        except AccessDenied as exc:
            self._record(who, what, 0, "denied", str(exc))
            raise
        try:
            result, rows = fn(who)
        except PhiAuditError as exc:
            self._record(who, what, 0, "error", type(exc).__name__)
            raise
        except Exception as exc:
            self._record(who, what, 0, "error", type(exc).__name__)
            raise PhiAuditError(f"{what} failed ({type(exc).__name__})") from None
        self._record(who, what, rows, "ok", "")
        return result

    # -- operations ------------------------------------------------------------------------
    def list_rules(self, token: str | None) -> dict[str, Any]:
        def fn(_: Principal) -> tuple[dict[str, Any], int]:
            rows = []
            for r in self.scheduler.rules:
                rows.append([r.id, r.severity, r.title, bool(r.enabled), str(r.origin),
                             json.dumps(dict(r.params), sort_keys=True, default=str)])
            return {"columns": ["id", "severity", "title", "enabled", "origin", "params"],
                    "rows": rows}, len(rows)

        result: dict[str, Any] = self._run(token, "phiaudit rules list", ROLES, fn)
        return result

    def explain(self, token: str | None, rule_id: str) -> str:
        def fn(_: Principal) -> tuple[str, int]:
            if rule_id not in {r.id for r in self.scheduler.rules}:
                raise PermanentError(f"no rule {rule_id!r}: see phiaudit rules list")
            return str(self.scheduler.engine.explain(rule_id)), 1

        safe = rule_id if rule_id.replace("-", "").replace("_", "").isalnum() else "?"
        result: str = self._run(token, f"phiaudit rules explain {safe}", ROLES, fn)
        return result

    def run(self, token: str | None, backfill: tuple[int, int] | None = None,
            ) -> dict[str, Any]:
        what = "phiaudit rules run" + (
            f" --backfill {iso_us(backfill[0])} {iso_us(backfill[1])}" if backfill else "")

        def fn(_: Principal) -> tuple[dict[str, Any], int]:
            if backfill:
                if backfill[1] <= backfill[0]:
                    raise PermanentError("--backfill: TO must be after FROM")
                alerts, delivered = self.scheduler.backfill(*backfill)
            else:
                alerts, delivered = self.scheduler.run_once()
            out = [{"alert_id": str(a.alert_id), "rule_id": a.rule_id, "severity": a.severity,
                    "window_start": iso_us(a.window_start_us),
                    "window_end": iso_us(a.window_end_us), "summary": a.summary}
                   for a in alerts]
            return {"alerts": out, "delivered": delivered,
                    "mode": "backfill" if backfill else "scheduled"}, len(out)

        result: dict[str, Any] = self._run(token, what, ROLES, fn)
        return result

    def alerts(self, token: str | None, *, since_us: int = 0, rule: str = "",
               limit: int = 1000) -> dict[str, Any]:
        what = "phiaudit alerts list" + (f" --since {iso_us(since_us)}" if since_us else "") + (
            f" --rule {rule}" if rule else "")

        def fn(_: Principal) -> tuple[dict[str, Any], int]:
            params: dict[str, Any] = {"since": since_us, "limit": limit}
            cond = ""
            if rule:
                cond, params["rule"] = "AND rule_id = {rule:String}", rule
            _, rows = self.local.store.query(_ALERTS_SQL.replace("{rule}", cond), params)
            out = []
            for r in rows:
                try:
                    group = json.loads(_text(r[6]) or "{}")
                except ValueError:
                    group = {}
                out.append([iso_us(r[1]), _text(r[0]), _text(r[2]), _text(r[3]), iso_us(r[4]),
                            iso_us(r[5]), group, _text(r[7]), int(r[8]), int(r[9]),
                            [_text(x) for x in r[10]], [_text(x) for x in r[11]],
                            _text(r[12]), [_text(x) for x in (r[13] or [])]])
            return {"columns": ALERT_FIELDS, "rows": out}, len(out)

        result: dict[str, Any] = self._run(token, what, ROLES, fn)
        return result

    def care_load(self, token: str | None, data: bytes, fmt: str) -> dict[str, Any]:
        from phiaudit.rules import care_rows_from_bytes

        def fn(who: Principal) -> tuple[dict[str, Any], int]:
            batch = str(uuid.uuid4())
            rows = care_rows_from_bytes(data, fmt, self.local.encoder.index, who.name,
                                        batch_id=batch, loaded_us=time.time_ns() // 1000)
            self.local.writer.submit(None, {"care_relationships": rows}).result(timeout=120)
            kinds: dict[str, int] = {}
            for r in rows:
                kinds[r[4]] = kinds.get(r[4], 0) + 1
            return {"batch_id": batch, "rows": len(rows), "relationships": kinds}, len(rows)

        result: dict[str, Any] = self._run(
            token, f"phiaudit care load --format {fmt}", frozenset({"security"}), fn)
        return result
