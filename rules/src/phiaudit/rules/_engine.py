"""The rule engine: evaluates due windows, deduplicates, and writes alerts with the watermark.

Scheduled runs (``run_due``) evaluate, for each enabled rule, the windows ending in
``(watermark, now - lateness]``: the watermark is the largest ``window_to`` of the rule's
scheduled runs in ``rule_runs`` (a first run starts one step before ``now - lateness``, not at
the beginning of time). An event that arrives at most ``lateness`` after its time is therefore
counted; later ones are for ``backfill``.

A run writes its alerts in parts of at most ``part_alerts`` (1,000), each one ``submit`` (one
commit), and a rule's ``rule_runs`` row, which advances its watermark, after the rule's last
part: a run holds one part's alerts and evidence in memory, not all of them (an alert storm
raises thousands at once). A run that stops between parts (a crash, a failed write) leaves
its rules' watermarks where they were; the next run evaluates the same windows again and the
deduplication drops the alerts already written.

Deduplication: an alert's id is derived from (rule, group key, window start), and a candidate
is dropped when an alert of the same rule and group key exists with an overlapping window;
among the candidates of one run the earliest of overlapping windows wins. Backfills and
re-runs therefore never raise an alert twice.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import string
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

from phiaudit.storage import Alert, MemoryLimitExceeded, PermanentError, RecordEncoder

from ._compile import MAX_ROWS, Compiled, compile_rule, effective_grid, rule_hash, two_stage
from ._config import RulesConfig
from ._model import Rule

__all__ = ["RuleEngine", "RunStats", "alert_id"]

_log = logging.getLogger("phiaudit.rules")

#: one query covers at most this much time; a scheduled run catches up at most MAX_CATCHUP
CHUNK_US = 86_400 * 1_000_000
MAX_CATCHUP_US = 6 * 3600 * 1_000_000
#: a rule query that needs more memory than it may use is split into SHARD_FACTOR times as
#: many shards (by its group-by values), up to MAX_SHARDS
SHARD_FACTOR = 4
MAX_SHARDS = 256
#: after this many runs that fitted, a query tries SHARD_FACTOR times fewer shards
SHARD_DECAY = 10
#: a run writes its alerts in parts of at most this many, and the second stage of a two-stage
#: rule reads the evidence of at most this many groups a query. Measured in-process, 6,000
#: alerts of 100 evidence ids at once: the process's anonymous memory rose 830-843 MiB over
#: the run in parts of 5,000 and one write, 203-259 in parts of 1,000 (bench/README.md,
#: session 14)
PART_ALERTS = 1_000


class QueryStore(Protocol):
    def query(self, sql: str, parameters: dict[str, Any] | None = None, *,
              settings: dict[str, Any] | None = None, binary: bool = False,
              ) -> tuple[list[str], list[tuple[Any, ...]]]: ...


Submit = Callable[[dict[str, list[list[Any]]]], None]


def alert_id(rule_id: str, group_key: str, window_start_us: int) -> uuid.UUID:
    """The deterministic id of an alert: SHA-256 of (rule, group key, window start)."""
    digest = hashlib.sha256(
        json.dumps([rule_id, group_key, window_start_us], separators=(",", ":")).encode()
    ).digest()
    return uuid.UUID(bytes=digest[:16])


@dataclass(frozen=True)
class _Fired:
    """A (group, window) that crossed its rule's threshold, before its evidence is read."""

    alert_id: uuid.UUID
    rule_id: str
    group_key: str
    window_start_us: int
    window_end_us: int
    group_hash: int


_W = TypeVar("_W", Alert, _Fired)


class _Seen:
    """The alerts a run must not raise: those stored, read for each set of candidates (their
    rules and time range), and those the run kept already, which may not be stored yet.
    Among candidates the earliest of overlapping windows of a rule and group wins, also
    across sets when every set's windows start no earlier than the previous set's windows
    of the same groups (``_candidates`` yields them so)."""

    def __init__(self, store: QueryStore) -> None:
        self.store = store
        self.ids: set[uuid.UUID] = set()
        self.taken: dict[tuple[str, str], set[tuple[int, int]]] = {}

    def fresh(self, candidates: Sequence[_W]) -> list[_W]:
        if not candidates:
            return []
        lo = min(a.window_start_us for a in candidates)
        hi = max(a.window_end_us for a in candidates)
        rule_ids = sorted({a.rule_id for a in candidates})
        _, rows = self.store.query(
            "SELECT alert_id, rule_id, group_key, toUnixTimestamp64Micro(window_start), "
            "toUnixTimestamp64Micro(window_end) FROM alerts "
            "WHERE rule_id IN {rules:Array(String)} "
            "AND window_end > fromUnixTimestamp64Micro({lo:Int64}, 'UTC') "
            "AND window_start < fromUnixTimestamp64Micro({hi:Int64}, 'UTC')",
            {"rules": rule_ids, "lo": lo, "hi": hi})
        ids, taken = self.ids, self.taken
        for aid, rid, key, ws, we in rows:
            ids.add(aid if isinstance(aid, uuid.UUID) else uuid.UUID(str(aid)))
            taken.setdefault((str(rid), str(key)), set()).add((int(ws), int(we)))
        kept: list[_W] = []
        for a in sorted(candidates, key=lambda a: (a.window_start_us, a.window_end_us)):
            if a.alert_id in ids:
                continue
            spans = taken.setdefault((a.rule_id, a.group_key), set())
            if any(ws < a.window_end_us and a.window_start_us < we for ws, we in spans):
                continue
            spans.add((a.window_start_us, a.window_end_us))
            ids.add(a.alert_id)
            kept.append(a)
        return kept


class _Outbox:
    """A run's writes: alerts in parts of at most ``part`` rows, each ``rule_runs`` row in
    the first submit after the last of its rule's alerts."""

    def __init__(self, submit: Submit, encoder: RecordEncoder, part: int) -> None:
        self.submit, self.encoder, self.part = submit, encoder, part
        self.alerts: list[Alert] = []
        self.runs: list[list[Any]] = []

    def add(self, alerts: Sequence[Alert]) -> None:
        self.alerts += alerts
        while len(self.alerts) >= self.part:
            self.flush(self.part)

    def flush(self, n: int | None = None) -> None:
        part = self.alerts if n is None else self.alerts[:n]
        if not part and not self.runs:
            return
        self.submit({"alerts": [self.encoder.alert_row(a) for a in part],
                     "rule_runs": self.runs})
        self.alerts = [] if n is None else self.alerts[n:]
        self.runs = []


def _group_key(group_by: Sequence[str], row: Sequence[Any]) -> tuple[str, list[str]]:
    """The alert's group key (JSON of the group's values) and the values, from a result row's
    group columns."""
    groups = [("" if v is None else str(v)) for v in row[2:2 + len(group_by)]]
    key = json.dumps(dict(zip(group_by, groups, strict=True)), sort_keys=True,
                     separators=(",", ":"))
    return key, groups


@dataclass
class RunStats:
    rules: int = 0
    candidates: int = 0
    alerts: int = 0
    duplicates: int = 0
    failures: int = 0
    truncated: int = 0
    #: queries that needed more memory than they may use and were split into shards
    splits: int = 0
    #: (group, window) pairs of two-stage rules that crossed their threshold, and those of
    #: them dropped before their evidence was read (already alerted on, or overlapping an
    #: earlier window of the same group in the same run)
    fired: int = 0
    fired_known: int = 0
    seconds: float = 0.0


def _iso(us: int) -> str:
    return datetime.fromtimestamp(us / 1_000_000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _span_text(seconds: int) -> str:
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % n == 0:
            return f"{seconds // n}{unit}"
    return f"{seconds}s"


def render_summary(rule: Rule, values: dict[str, Any]) -> str:
    """The rule's summary template filled with plain values (validated names only)."""
    out: list[str] = []
    for literal, name, _spec, _conv in string.Formatter().parse(rule.summary):
        out.append(literal)
        if name is None:
            continue
        if name.startswith("params."):
            v: Any = rule.params.get(name[7:], "")
        else:
            v = values.get(name, "")
        out.append(str(v))
    return "".join(out)


class RuleEngine:
    """Evaluates ``rules`` against ``store`` and appends alerts through ``submit``.

    ``max_query_bytes`` (0: no limit): the memory one rule query may use in the engine. The
    service sets it, so that the rules, which run beside the ingestion in one process, cannot
    take the memory the audit trail needs. A query that needs more is evaluated again in
    shards of its groups (``compile_rule``'s ``shard``), 4, 16, ... 256 of them; the number
    that fitted is kept for the rule's next runs, and divided by 4 again after 10 runs that
    fitted. A rule that does not fit in 256 shards, or that has no groups to split, fails
    like a broken rule: logged, counted, retried on the next run, the other rules
    unaffected. A scheduled run of a grouped counting rule is two queries (``two_stage``):
    the second, with evidence, only for the groups that crossed the threshold and were not
    alerted on already.

    Runs write their alerts in parts of ``part_alerts`` (see the module). ``run_due`` and
    ``backfill`` return the alerts written; with ``keep=False`` they return none, so that a
    run holds one part's alerts at a time (the service's scheduled runs; ``stats`` counts
    them)."""

    def __init__(self, store: QueryStore, submit: Submit, encoder: RecordEncoder,
                 rules: Sequence[Rule], config: RulesConfig | None = None, *,
                 max_query_bytes: int = 0) -> None:
        self.store = store
        self.submit = submit
        self.encoder = encoder
        self.config = config or RulesConfig()
        self.rules = {r.id: r for r in rules}
        self.stats = RunStats()
        self._lock = threading.Lock()
        self._materialize: bool | None = None
        self._settings = {"max_memory_usage": max_query_bytes} if max_query_bytes else None
        self._shards: dict[tuple[str, str], int] = {}
        self._fitted: dict[tuple[str, str], int] = {}

    # -- public entry points ----------------------------------------------------------
    @property
    def active(self) -> list[Rule]:
        return [r for r in self.rules.values() if r.enabled]

    def explain(self, rule_id: str, now_us: int | None = None) -> str:
        """The rule's SQL over its latest due window, with the parameters shown."""
        rule = self._rule(rule_id)
        now = now_us if now_us is not None else time.time_ns() // 1000
        step, _span = effective_grid(rule, self.config.step_s)
        step_us = step * 1_000_000
        to = (now - self.config.lateness_s * 1_000_000) // step_us * step_us
        compiled = self._compile(rule, to - step_us, to)
        head = (f"-- rule {rule.id} ({rule.severity}): {rule.title}\n"
                f"-- source {rule.source}, correlation {rule.correlation.type}, "
                f"windows ending in ({_iso(to - step_us)}, {_iso(to)}]\n")
        if not two_stage(rule, to - step_us, to, self.config.step_s):
            return head + compiled.explain()
        check = self._compile(rule, to - step_us, to, stage="check")
        return (head + "-- stage 1: the (group, window) pairs over the threshold, no evidence\n"
                + check.explain() + "-- stage 2: this query, restricted to the groups of "
                "stage 1 not yet alerted on (cityHash64 of the group IN [...])\n"
                + compiled.explain())

    def compile(self, rule_id: str, window_from_us: int, window_to_us: int) -> Compiled:
        return self._compile(self._rule(rule_id), window_from_us, window_to_us)

    #: read a rule's filtered events once, into a materialized CTE (ClickHouse 26.x), instead
    #: of once per use. On, the engine holds the window's matching events in memory for the
    #: query. Measured on one window of 5.76M bench events (RuleEngine.run_due, one
    #: process; bench/README.md, session 10): peak RSS 1,466 MiB materialized against 754 not
    #: (bulk-access +734 MiB against +35), for 6.4 s of evaluation against 2.6 s; the same
    #: alerts. Evaluation is background work; the service's memory is not.
    materialize_windows: bool = False

    #: a run writes its alerts in parts of at most this many; a two-stage rule's evidence is
    #: read for this many groups a query
    part_alerts: int = PART_ALERTS

    #: the most shards a query that needs more memory than it may use is split into
    max_shards: int = MAX_SHARDS
    #: after this many runs of a query that fitted in its shards, the next run tries
    #: SHARD_FACTOR times fewer (a window that held a burst holds less once it has passed)
    shard_decay: int = SHARD_DECAY

    def _compile(self, rule: Rule, window_from_us: int, window_to_us: int,
                 shard: tuple[int, int] = (0, 1), *, stage: str = "all",
                 only: Sequence[int] | None = None) -> Compiled:
        if self.materialize_windows and self._materialize is None:
            # materialized CTEs (read the filtered events once) need ClickHouse 26.x
            try:
                self.store.query("WITH x AS MATERIALIZED (SELECT 1 AS a) SELECT a FROM x "
                                 "SETTINGS enable_materialized_cte = 1")
                self._materialize = True
            except PermanentError:  # an older server: read the events once per use
                self._materialize = False
        return compile_rule(rule, window_from_us, window_to_us, self.config.step_s,
                            materialize=self.materialize_windows and bool(self._materialize),
                            shard=shard, stage=stage, only=only)

    def run_due(self, now_us: int | None = None, *, keep: bool = True) -> list[Alert]:
        """Evaluate every enabled rule's due windows; write the alerts and the watermarks.
        Returns the alerts written (none with ``keep=False``)."""
        with self._lock:
            now = now_us if now_us is not None else time.time_ns() // 1000
            horizon = now - self.config.lateness_s * 1_000_000
            marks = self._watermarks()
            plan: list[tuple[Rule, int, int]] = []
            for rule in self.active:
                step, _span = effective_grid(rule, self.config.step_s)
                step_us = step * 1_000_000
                to = horizon // step_us * step_us
                frm = marks.get(rule.id, to - step_us)
                if to - frm > MAX_CATCHUP_US:  # catch up a long outage over several runs
                    to = frm + MAX_CATCHUP_US // step_us * step_us
                if to > frm:
                    plan.append((rule, frm, to))
            return self._run(plan, "scheduled", now, keep)

    def backfill(self, start_us: int, end_us: int, rule_ids: Iterable[str] | None = None,
                 *, keep: bool = True) -> list[Alert]:
        """Evaluate the windows ending in ``(start_us, end_us]`` (mode ``backfill``); never
        raises an alert that overlaps an existing one of the same rule and group."""
        if end_us <= start_us:
            raise PermanentError("backfill: the end must be after the start")
        chosen = [self._rule(r) for r in rule_ids] if rule_ids else self.active
        with self._lock:
            now = time.time_ns() // 1000
            out: list[Alert] = []
            frm = start_us
            while frm < end_us:
                to = min(end_us, frm + CHUNK_US)
                out += self._run([(r, frm, to) for r in chosen], "backfill", now, keep)
                frm = to
            return out

    def evaluate(self, rule: Rule, start_us: int, end_us: int) -> list[Alert]:
        """A dry run: the alerts ``rule`` would raise for windows ending in
        ``(start_us, end_us]``, deduplicated against stored alerts, nothing written."""
        now = time.time_ns() // 1000
        seen = _Seen(self.store)
        return [a for part in self._candidates(rule, start_us, end_us, "test", now)
                for a in seen.fresh(part)]

    # -- internals --------------------------------------------------------------------
    def _rule(self, rule_id: str) -> Rule:
        try:
            return self.rules[rule_id]
        except KeyError:
            raise PermanentError(f"no rule with id {rule_id!r}") from None

    def _watermarks(self) -> dict[str, int]:
        _, rows = self.store.query(
            "SELECT rule_id, toUnixTimestamp64Micro(max(window_to)) FROM rule_runs "
            "WHERE mode = 'scheduled' GROUP BY rule_id")
        return {str(r[0]): int(r[1]) for r in rows}

    def _run(self, plan: list[tuple[Rule, int, int]], mode: str, now: int,
             keep: bool = True) -> list[Alert]:
        started = time.monotonic()
        seen = _Seen(self.store)
        outbox = _Outbox(self.submit, self.encoder, self.part_alerts)
        written: list[Alert] = []
        raised = 0
        for rule, frm, to in plan:
            t0 = time.monotonic()
            count, failed = 0, False
            parts = self._rule_parts(rule, frm, to, mode, now)
            while not failed:
                try:
                    part = next(parts, None)
                except (PermanentError, MemoryLimitExceeded) as exc:
                    # one broken rule does not stop the others; its watermark stays, it is
                    # retried (the alerts it wrote before are dropped then as duplicates)
                    self.stats.failures += 1
                    _log.error("rules: rule %s failed: %s", rule.id, exc)
                    failed = True
                    continue
                if part is None:
                    break
                # outside the rule's errors: a failed read of the alerts or a failed write
                # ends the run (the scheduler retries it)
                fresh = seen.fresh(part)
                self.stats.candidates += len(part)
                self.stats.duplicates += len(part) - len(fresh)
                count += len(fresh)
                raised += len(fresh)
                outbox.add(fresh)
                if keep:
                    written += fresh
            if failed:
                continue
            outbox.runs.append([rule.id, mode, frm, to, now, count,
                                int((time.monotonic() - t0) * 1_000_000), rule_hash(rule)])
        outbox.flush()
        self.stats.rules += len(plan)
        self.stats.alerts += raised
        self.stats.seconds += time.monotonic() - started
        if raised:
            _log.info("rules: %d alert(s) raised (%s)", raised, mode)
        return written

    def _query(self, rule: Rule, stage: str, make: Callable[[tuple[int, int]], Compiled],
               ) -> tuple[Compiled, list[tuple[Any, ...]], bool]:
        """The rows of the query ``make(shard)`` compiles, in as many shards as it takes to
        stay within the memory a query may use, and whether a query hit ``MAX_ROWS``. The
        number of shards is kept per rule and ``stage``."""
        key = (rule.id, stage)
        shards = self._shards.get(key, 1)
        while True:
            rows: list[tuple[Any, ...]] = []
            truncated = False
            try:
                for i in range(shards):
                    compiled = make((i, shards))
                    part = self.store.query(compiled.sql, compiled.params,
                                            settings=self._settings)[1]
                    truncated = truncated or len(part) >= MAX_ROWS  # per query: its LIMIT
                    rows += part
            except MemoryLimitExceeded:
                if not rule.correlation.group_by or shards >= self.max_shards:
                    raise
                shards = min(self.max_shards, shards * SHARD_FACTOR)
                self._shards[key] = shards
                self._fitted.pop(key, None)
                self.stats.splits += 1
                _log.info("rules: rule %s (%s) needs more memory than a query may use; "
                          "evaluated in %d shards from now on", rule.id, stage, shards)
                continue
            if shards > 1:  # a burst passes: after shard_decay runs that fitted, try fewer
                self._fitted[key] = self._fitted.get(key, 0) + 1
                if self._fitted[key] >= self.shard_decay:
                    del self._fitted[key]
                    if shards // SHARD_FACTOR > 1:
                        self._shards[key] = shards // SHARD_FACTOR
                    else:
                        del self._shards[key]
            return compiled, rows, truncated

    def _rule_parts(self, rule: Rule, frm: int, to: int, mode: str, now: int,
                    ) -> Iterator[list[Alert]]:
        cursor = frm
        while cursor < to:
            nxt = min(to, cursor + CHUNK_US)
            yield from self._candidates(rule, cursor, nxt, mode, now)
            cursor = nxt

    def _candidates(self, rule: Rule, frm: int, to: int, mode: str, now: int,
                    ) -> Iterator[list[Alert]]:
        """The candidate alerts of ``rule`` for the windows ending in ``(frm, to]``, in parts
        of at most ``part_alerts``; a group's windows come in the order they start."""
        if two_stage(rule, frm, to, self.config.step_s):
            yield from self._two_stage(rule, frm, to, mode, now)
            return
        compiled, rows, truncated = self._query(
            rule, "all", lambda shard: self._compile(rule, frm, to, shard))
        if truncated:
            self.stats.truncated += 1
            _log.warning("rules: rule %s matched %d events or more in one range; the rest of "
                         "the range is not alerted on", rule.id, MAX_ROWS)
        yield from self._parts(rule, compiled, rows, mode, now)

    def _parts(self, rule: Rule, compiled: Compiled, rows: list[tuple[Any, ...]], mode: str,
               now: int) -> Iterator[list[Alert]]:
        """``rows`` as alerts, ``part_alerts`` at a time. A query's rows come ordered by their
        window's end, and a group's rows all come from one shard: a group's windows come in
        the order they start, as ``_Seen`` needs."""
        for i in range(0, len(rows), self.part_alerts):
            yield self._alerts(rule, compiled, rows[i:i + self.part_alerts], mode, now)

    def _two_stage(self, rule: Rule, frm: int, to: int, mode: str, now: int,
                   ) -> Iterator[list[Alert]]:
        """Which (group, window) pairs cross the threshold, without evidence; then the whole
        query over the groups among them not yet alerted on (``compile_rule``'s stages),
        ``part_alerts`` groups a query: a group's windows all come from one query."""
        compiled, rows, _ = self._query(
            rule, "check", lambda shard: self._compile(rule, frm, to, shard, stage="check"))
        fired = []
        for row in rows:
            key, _groups = _group_key(compiled.group_by, row)
            ws = int(row[0])
            fired.append(_Fired(alert_id(rule.id, key, ws), rule.id, key, ws, int(row[1]),
                                int(row[-1])))
        del rows
        fresh = _Seen(self.store).fresh(fired)
        self.stats.fired += len(fired)
        self.stats.fired_known += len(fired) - len(fresh)
        # a fresh group's other window (or a group sharing a fresh one's hash) may come back
        # too: the run's deduplication drops it, as it dropped it here
        hashes = sorted({f.group_hash for f in fresh})
        del fired, fresh
        step = self.part_alerts
        for i in range(0, len(hashes), step):
            compiled, rows, _ = self._query(rule, "evidence", functools.partial(
                self._compile, rule, frm, to, only=hashes[i:i + step]))
            yield from self._parts(rule, compiled, rows, mode, now)

    def _alerts(self, rule: Rule, compiled: Compiled, rows: list[tuple[Any, ...]], mode: str,
                now: int) -> list[Alert]:
        """The candidate alerts of a query's rows (``compile_rule``'s result columns)."""
        ngroup = len(compiled.group_by)
        span_s = compiled.span_us // 1_000_000
        out = []
        for row in rows:
            ws, we = int(row[0]), int(row[1])
            key, groups = _group_key(compiled.group_by, row)
            value, evidence, ev_count, traces = row[2 + ngroup:6 + ngroup]
            values: dict[str, Any] = dict(zip(compiled.group_by, groups, strict=True))
            values.update(value=int(value), evidence_count=int(ev_count),
                          window_start=_iso(ws), window_end=_iso(we),
                          timespan=_span_text(span_s), rule_id=rule.id, title=rule.title,
                          severity=rule.severity)
            out.append(Alert(
                alert_id(rule.id, key, ws), now, rule.id, rule.severity, ws, we, key,
                render_summary(rule, values), int(value),
                [e if isinstance(e, uuid.UUID) else uuid.UUID(str(e)) for e in evidence],
                int(ev_count), [str(t) for t in traces], mode))
        return out
