"""The rule engine against a real embedded store: every built-in rule fires on a positive case
and stays quiet on a near miss; watermarks, lateness, overlapping windows, backfill
idempotence; alert summaries free of PHI.

Each test uses its own time range and renamed copies of the rules (their own watermarks and
alerts) over one store shared by this process (one chDB engine per process).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from phiaudit.rules import Rule, RuleEngine, RulesConfig, builtin_rules
from phiaudit.storage import (
    ACCESS_LOG_COLUMNS,
    ALERT_COLUMNS,
    AUDIT_COLUMNS,
    CARE_COLUMNS,
    INFRA_COLUMNS,
    RULE_RUN_COLUMNS,
    AccessRecord,
    Alert,
    AuditEvent,
    BatchWriter,
    BlindIndex,
    InfraEvent,
    KeyRing,
    RecordEncoder,
    Store,
    StoreLocation,
    TableSpec,
    migrate,
)

S = 1_000_000  # microseconds per second
MIN = 60 * S
HOUR = 3600 * S
DAY = 86400 * S
#: a Monday, 00:00 UTC; each test gets its own week after it
EPOCH = int(dt.datetime(2026, 1, 5, tzinfo=dt.UTC).timestamp()) * S


@dataclass
class Env:
    store: Store
    writer: BatchWriter
    encoder: RecordEncoder
    index: BlindIndex

    def submit(self, tables: dict[str, list[list[Any]]]) -> None:
        # a unique key: with None the writer's dedup token of unchained tables may repeat
        self.writer.submit(uuid.uuid4().bytes, tables).result(60)

    def write(self, events: Sequence[AuditEvent | InfraEvent] = (),
              access: Sequence[tuple[AccessRecord, int]] = (),
              care: Sequence[list[Any]] = ()) -> None:
        tables: dict[str, list[list[Any]]] = {}
        audit = [self.encoder.audit_row(e) for e in events if isinstance(e, AuditEvent)]
        infra = [self.encoder.infra_row(e) for e in events if isinstance(e, InfraEvent)]
        for name, rows in (("audit_events", audit), ("infra_events", infra),
                           ("access_log", [self.encoder.access_row(r, t) for r, t in access]),
                           ("care_relationships", list(care))):
            if rows:
                tables[name] = rows
        self.submit(tables)

    def alerts(self, rule_id: str) -> list[dict[str, Any]]:
        cols, rows = self.store.query(
            "SELECT alert_id, rule_id, group_key, summary, value, evidence, evidence_count, "
            "trace_ids, mode, toUnixTimestamp64Micro(window_start) AS ws, "
            "toUnixTimestamp64Micro(window_end) AS we FROM alerts "
            "WHERE rule_id = {r:String} ORDER BY ws", {"r": rule_id})
        return [dict(zip(cols, r, strict=True)) for r in rows]

    def engine(self, rules: Sequence[Rule], **config: Any) -> RuleEngine:
        return RuleEngine(self.store, self.submit, self.encoder, rules,
                          RulesConfig.from_mapping(config))


def open_env(root: Path) -> Env:
    """A store of its own for one test module. chDB opens one data directory per process at
    a time, so every module that opens a store in this process closes it at its end (see
    ``env``): pytest runs modules one after the other."""
    data = root / f"rules-store-{uuid.uuid4().hex[:8]}"
    loc = StoreLocation(data_dir=data)
    migrate(loc)
    store = Store.open(loc)
    ring = KeyRing.open(data)
    writer = BatchWriter(store, "rules-tests", [
        TableSpec("audit_events", AUDIT_COLUMNS, True, "event_id"),
        TableSpec("infra_events", INFRA_COLUMNS, True, "event_id"),
        TableSpec("access_log", ACCESS_LOG_COLUMNS, True),
        TableSpec("alerts", ALERT_COLUMNS, True, "alert_id"),
        TableSpec("care_relationships", CARE_COLUMNS, False),
        TableSpec("rule_runs", RULE_RUN_COLUMNS, False),
    ], max_wait=0.01)
    writer.start()
    return Env(store, writer, RecordEncoder.for_ring(ring),
               BlindIndex(ring))


def close_env(env: Env) -> None:
    env.writer.shutdown()
    env.store.close()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    e = open_env(tmp_path_factory.getbasetemp())
    yield e
    close_env(e)


_weeks = iter(range(1, 10_000))


@pytest.fixture
def base() -> int:
    """A Monday 00:00 UTC that no other test of this module uses."""
    return EPOCH + next(_weeks) * 7 * DAY


def rule(rule_id: str, **settings: Any) -> Rule:
    """A renamed copy of a built-in rule (its own watermark and alerts), with settings."""
    r = next(r for r in builtin_rules() if r.id == rule_id)
    if settings:
        r = r.with_settings(settings)
    return dataclasses.replace(r, id=f"{rule_id}-{uuid.uuid4().hex[:8]}")


def audit(t: int, action: str = "read", outcome: str = "success", actor: str = "dr-a",
          patient: str = "", roles: Sequence[str] = ("physician",), client: str = "",
          trace: str = "", count: int = 0, purpose: str = "") -> AuditEvent:
    return AuditEvent(uuid.uuid4(), t, t, action, outcome, actor_id=actor,
                      actor_roles=list(roles), patient_id=patient,
                      resource_type="Patient" if patient else "",
                      resource_id=patient, client_address=client, trace_id=trace,
                      record_count=count, purpose=purpose, service_name="ehr-api")


def infra(t: int, kind: str = "pgaudit", phi: bool = True, trace: str = "",
          actor: str = "app_rw", operation: str = "SELECT", outcome: str = "success",
          ) -> InfraEvent:
    return InfraEvent(uuid.uuid4(), t, t, kind, actor_id=actor, operation=operation,
                      object_type="table", object="public.patients" if phi else "public.x",
                      phi_touch=phi, phi_object="public.patients" if phi else "",
                      outcome=outcome, trace_id=trace, raw="AUDIT: SESSION,...",
                      client_address="10.1.2.3")


def uid() -> str:
    return uuid.uuid4().hex[:10]


PHI_STRINGS = ("pat-", "10.1.2.3", "203.0.113.", "public.patients")


def assert_no_phi(alerts: Sequence[Alert | dict[str, Any]]) -> None:
    for a in alerts:
        summary = a.summary if isinstance(a, Alert) else a["summary"]
        key = a.group_key if isinstance(a, Alert) else a["group_key"]
        for s in PHI_STRINGS:
            assert s not in summary and s not in key


def backfill(env: Env, r: Rule, start: int, end: int, **config: Any) -> list[Alert]:
    alerts = env.engine([r], **config).backfill(start, end)
    assert_no_phi(alerts)
    return alerts




# -- the built-in rules ----------------------------------------------------------------------

def test_bulk_access(env: Env, base: int) -> None:
    r = rule("bulk-access", threshold=5)
    a, b = "bulk-" + uid(), "near-" + uid()
    t = base + 10 * HOUR
    env.write([audit(t + i * S, actor=a, patient=f"pat-{i}") for i in range(6)]
              + [audit(t + i * S, actor=b, patient=f"pat-{i % 5}") for i in range(9)]
              + [audit(t + 30 * S, action="login", actor=b, patient="pat-99")])
    alerts = backfill(env, r, base, base + DAY)
    assert [(x.group_key, x.value) for x in alerts] == [(f'{{"actor_id":"{a}"}}', 6)]
    assert alerts[0].evidence_count == 6 and len(alerts[0].evidence) == 6
    assert a in alerts[0].summary and "6 distinct patients" in alerts[0].summary


def test_windows_are_not_materialized_unless_asked(env: Env, base: int) -> None:
    # a materialized window holds its matching events in the engine's memory: 1,466 against
    # 754 MiB for one window of 5.76M bench events (bench/README.md, session 10)
    r = rule("bulk-access", threshold=5)
    eng = env.engine([r])
    assert "MATERIALIZED" not in eng.compile(r.id, base, base + DAY).sql
    eng.materialize_windows = True  # ClickHouse 26.x reads the events once then
    assert "ev AS MATERIALIZED" in eng.compile(r.id, base, base + DAY).sql
    # both give the same alerts (each on a day of its own: backfills skip alerts on record)
    for day, materialize in ((0, False), (2, True)):
        a, start = "mat-" + uid(), base + day * DAY
        env.write([audit(start + 10 * HOUR + i * S, actor=a, patient=f"pat-{i}")
                   for i in range(6)])
        e = env.engine([r])
        e.materialize_windows = materialize
        alerts = e.backfill(start, start + DAY)
        assert [(x.group_key, x.value) for x in alerts] == [(f'{{"actor_id":"{a}"}}', 6)]


def test_large_export(env: Env, base: int) -> None:
    r = rule("large-export", max_records=1000)
    a = "exp-" + uid()
    t = base + 3 * HOUR
    big = audit(t, action="export", actor=a, count=1001, patient="pat-1")
    env.write([big, audit(t + S, action="export", actor=a, count=1000),
               audit(t + 2 * S, action="read", actor=a, count=5000)])
    alerts = backfill(env, r, base, base + DAY)
    assert len(alerts) == 1 and alerts[0].evidence == [big.event_id]
    assert alerts[0].value == 1001 and "1001 records" in alerts[0].summary


def test_off_hours_schedule_roles_users_and_time_zone(env: Env, base: int) -> None:
    r = rule("off-hours", schedule={
        "timezone": "UTC", "days": ["mon", "tue", "wed", "thu", "fri"], "hours": [7, 19],
        "roles": {"nurse": {"days": "all", "hours": [0, 24]}},
        "users": {"dr-ny": {"timezone": "America/New_York", "hours": [8, 18]}}})
    night, day, nurse = "night-" + uid(), "day-" + uid(), "nurse-" + uid()
    env.write([
        audit(base + 3 * HOUR, actor=night, patient="pat-1"),           # Mon 03:00 UTC
        audit(base + 10 * HOUR, actor=day, patient="pat-1"),            # Mon 10:00
        audit(base + 5 * DAY + 11 * HOUR, actor=day, patient="pat-1"),  # Sat 11:00
        audit(base + 3 * HOUR, actor=nurse, roles=["nurse"], patient="pat-1"),
        audit(base + 3 * HOUR, actor=night, action="login"),  # not an access to data
    ])
    # dr-ny works 08-18 New York time (13:00-23:00 UTC in January)
    env.write([audit(base + 22 * HOUR, actor="dr-ny", patient="pat-2"),   # 17:00 NY
               audit(base + 1 * DAY + 12 * HOUR, actor="dr-ny", patient="pat-2")])  # 07:00 NY
    alerts = backfill(env, r, base, base + 7 * DAY)
    got = sorted((x.group_key, x.window_start_us <= t < x.window_end_us)
                 for x in alerts for t in [x.window_end_us - 1])
    keys = sorted(x.group_key for x in alerts)
    assert keys == sorted([f'{{"actor_id":"{night}"}}', f'{{"actor_id":"{day}"}}',
                           '{"actor_id":"dr-ny"}']), got
    ny = next(x for x in alerts if "dr-ny" in x.group_key)
    assert ny.window_start_us <= base + DAY + 12 * HOUR < ny.window_end_us


def test_off_hours_history_baseline(env: Env, base: int) -> None:
    r = rule("off-hours", baseline="history", history_days=7, history_min_events=3)
    a = "hist-" + uid()
    # a week of work at 10:00 UTC, every day
    env.write([audit(base + d * DAY + 10 * HOUR + i * MIN, actor=a, patient="pat-1")
               for d in range(7) for i in range(2)])
    t_usual, t_odd = base + 7 * DAY + 10 * HOUR + 30 * MIN, base + 7 * DAY + 3 * HOUR
    env.write([audit(t_usual, actor=a, patient="pat-1"), audit(t_odd, actor=a, patient="pat-1")])
    alerts = backfill(env, r, base + 7 * DAY, base + 8 * DAY)
    assert len(alerts) == 1
    assert alerts[0].window_start_us <= t_odd < alerts[0].window_end_us


def test_failed_auth_user(env: Env, base: int) -> None:
    r = rule("failed-auth-user", threshold=5)
    a, b = "fail-" + uid(), "fail4-" + uid()
    t = base + 9 * HOUR
    env.write([audit(t + i * 30 * S, "login", "failure", actor=a) for i in range(5)]
              + [audit(t + i * 30 * S, "login", "failure", actor=b) for i in range(4)]
              + [audit(t + 20 * MIN, "login", "failure", actor=b)])  # outside b's 10m
    alerts = backfill(env, r, base, base + DAY)
    assert [(x.group_key, x.value) for x in alerts] == [(f'{{"actor_id":"{a}"}}', 5)]


def test_failed_auth_source(env: Env, base: int) -> None:
    r = rule("failed-auth-source", threshold=10)
    ip, other = "203.0.113.7", "203.0.113.8"
    t = base + 9 * HOUR
    env.write([audit(t + i * S, "login", "failure", actor=f"u{i}", client=ip)
               for i in range(10)]
              + [audit(t + i * S, "login", "failure", actor=f"u{i}", client=other)
                 for i in range(9)])
    alerts = backfill(env, r, base, base + DAY)
    assert len(alerts) == 1 and alerts[0].value == 10
    assert env.index("client", ip) in alerts[0].group_key  # the blind index, never the address
    assert ip not in alerts[0].summary + alerts[0].group_key


def test_success_after_failures(env: Env, base: int) -> None:
    r = rule("success-after-failures", failures=3)
    a, b, c = "saf-" + uid(), "before-" + uid(), "two-" + uid()
    t = base + 8 * HOUR
    env.write(
        [audit(t + i * 10 * S, "login", "failure", actor=a) for i in range(3)]
        + [audit(t + 40 * S, "login", "success", actor=a)]
        # b: the success comes first
        + [audit(t, "login", "success", actor=b)]
        + [audit(t + (i + 1) * 10 * S, "login", "failure", actor=b) for i in range(3)]
        # c: only two failures
        + [audit(t + i * 10 * S, "login", "failure", actor=c) for i in range(2)]
        + [audit(t + 40 * S, "login", "success", actor=c)])
    alerts = backfill(env, r, base, base + DAY)
    assert [x.group_key for x in alerts] == [f'{{"actor_id":"{a}"}}']
    assert alerts[0].evidence_count == 4


def test_no_care_relationship(env: Env, base: int) -> None:
    r = rule("no-care-relationship")
    a = "care-" + uid()
    t = base + 10 * HOUR
    p1 = env.index("patient", "pat-care-1")
    env.write(care=[[a, p1, base, base + 2 * DAY, "encounter", "b1", base, "test"]])
    env.write([audit(t, actor=a, patient="pat-care-1")])                       # covered
    alerts = backfill(env, r, base, base + DAY)
    assert alerts == []
    late = audit(base + 3 * DAY, actor=a, patient="pat-care-1")                # after the end
    other = audit(base + 3 * DAY + MIN, actor=a, patient="pat-care-2")         # never related
    glass = audit(base + 3 * DAY + 2 * MIN, actor=a, patient="pat-care-3", purpose="ETREAT")
    env.write([late, other, glass])
    alerts = backfill(env, r, base + DAY, base + 4 * DAY)
    # the first window with one such patient raises; the next one starts after it ends
    assert sum(x.value for x in alerts) == 2
    assert {e for x in alerts for e in x.evidence} == {late.event_id, other.event_id}


def test_break_glass(env: Env, base: int) -> None:
    r = rule("break-glass")
    a = "bg-" + uid()
    t = base + 2 * HOUR
    glass = audit(t, action="break_glass", actor=a, patient="pat-1", purpose="ETREAT")
    glass2 = audit(t + S, action="break_glass", actor=a, patient="pat-2", purpose="ETREAT")
    env.write([glass, glass2, audit(t, actor=a, patient="pat-1", purpose="ETREAT")])
    alerts = backfill(env, r, base, base + DAY)
    assert sorted(x.evidence[0] for x in alerts) == sorted([glass.event_id, glass2.event_id])
    assert all(x.evidence_count == 1 for x in alerts)


def test_app_bypass(env: Env, base: int) -> None:
    r = rule("app-bypass")
    t = base + 14 * HOUR
    tr_app, tr_alone = uuid.uuid4().hex, uuid.uuid4().hex
    via_app = infra(t + 2 * S, trace=tr_app, actor="app_rw")
    alone = infra(t + 5 * S, trace=tr_alone, actor="dba_bob")
    no_trace = infra(t + 6 * S, trace="", actor="dba_bob")
    cloud = infra(t + 7 * S, kind="cloudtrail", trace="", actor="arn:aws:iam::1:user/x",
                  operation="GetObject")
    env.write([audit(t, actor="dr-a", patient="pat-1", trace=tr_app), via_app, alone,
               no_trace, cloud,
               infra(t + 8 * S, phi=False, trace="", actor="dba_bob"),    # not PHI
               infra(t + 9 * S, kind="db_span", trace="", actor="app_rw")])  # app's own span
    alerts = backfill(env, r, base, base + DAY)
    by_key = {x.group_key: x for x in alerts}
    assert set(by_key) == {'{"actor_id":"dba_bob","source_kind":"pgaudit"}',
                           '{"actor_id":"arn:aws:iam::1:user/x","source_kind":"cloudtrail"}'}
    bob = by_key['{"actor_id":"dba_bob","source_kind":"pgaudit"}']
    assert set(bob.evidence) == {alone.event_id, no_trace.event_id}
    assert bob.trace_ids == [tr_alone]


def test_app_bypass_audit_event_too_far_away(env: Env, base: int) -> None:
    r = rule("app-bypass", within="1m")
    t = base + 14 * HOUR
    tr = uuid.uuid4().hex
    far = infra(t + 10 * MIN, trace=tr, actor="app_" + uid())
    env.write([audit(t, actor="dr-a", patient="pat-1", trace=tr), far])
    alerts = backfill(env, r, base, base + DAY)
    assert [x.evidence for x in alerts] == [[far.event_id]]


def test_audit_read_refused(env: Env, base: int) -> None:
    r = rule("audit-read-refused")
    p = "mallory-" + uid()
    t = base + HOUR
    env.write(access=[
        (AccessRecord(p, "auditor", "service", "SELECT * FROM audit_events", True, 0,
                      "denied", "role may not decrypt"), t),
        (AccessRecord(p, "auditor", "service", "SELECT 1", False, 1, "ok"), t + S),
        (AccessRecord("alice-" + uid(), "auditor", "service", "SELECT 1", False, 1, "ok"),
         t + 2 * S)])
    alerts = backfill(env, r, base, base + DAY)
    assert [(x.group_key, x.value) for x in alerts] == [(f'{{"principal":"{p}"}}', 1)]


def test_failed_auth_cloud(env: Env, base: int) -> None:
    r = rule("failed-auth-cloud", threshold=5)
    a = "arn:aws:iam::1:user/" + uid()
    t = base + HOUR
    env.write([infra(t + i * S, kind="cloudtrail", phi=False, actor=a, operation="ConsoleLogin",
                     outcome="failure") for i in range(5)]
              + [infra(t + i * S, kind="cloudtrail", phi=False, actor=a + "x",
                       operation="ConsoleLogin", outcome="failure") for i in range(4)])
    alerts = backfill(env, r, base, base + DAY)
    assert [x.value for x in alerts] == [5]


# -- scheduling, watermark, dedup ----------------------------------------------------------

def test_run_due_watermark_lateness_and_no_repeat(env: Env, base: int) -> None:
    r = rule("failed-auth-user", threshold=2)
    eng = env.engine([r], lateness_s=120, step_s=60)
    a = "wm-" + uid()
    now = base + 12 * HOUR
    assert eng.run_due(now) == []                 # first run: one step, sets the watermark
    _, rows = env.store.query(
        "SELECT toUnixTimestamp64Micro(max(window_to)) FROM rule_runs WHERE rule_id = {r:String}",
        {"r": r.id})
    mark = rows[0][0]
    assert mark == (now - 120 * S) // MIN * MIN
    t = mark + 30 * S                             # in the window ending at mark + 1 min
    env.write([audit(t, "login", "failure", actor=a)])
    assert eng.run_due(t + 10 * S) == []          # that window is not due yet
    # a second failure arrives late (100 s after it happened), inside the lateness
    env.write([audit(t + 5 * S, "login", "failure", actor=a)])
    alerts = eng.run_due(mark + MIN + 120 * S)    # the window ending at mark+1m is now due
    assert [(x.group_key, x.value) for x in alerts] == [(f'{{"actor_id":"{a}"}}', 2)]
    assert eng.run_due(mark + MIN + 120 * S) == []
    assert eng.run_due(mark + 5 * MIN + 120 * S) == []  # overlapping later windows: nothing
    stored = env.alerts(r.id)
    assert len(stored) == 1 and stored[0]["mode"] == "scheduled"
    _, runs = env.store.query(
        "SELECT count(), sum(alerts) FROM rule_runs WHERE rule_id = {r:String}", {"r": r.id})
    assert runs[0][1] == 1 and runs[0][0] >= 3


def test_overlapping_windows_give_one_alert(env: Env, base: int) -> None:
    r = rule("failed-auth-user", threshold=2)
    a = "ov-" + uid()
    t = base + 5 * HOUR
    env.write([audit(t + i * 10 * S, "login", "failure", actor=a) for i in range(3)])
    alerts = backfill(env, r, base, base + DAY)
    assert len(alerts) == 1                            # ten candidate windows, one alert
    assert alerts[0].window_start_us <= t + 10 * S < alerts[0].window_end_us
    # much later, a new burst: a new alert (windows do not overlap)
    env.write([audit(t + HOUR + i * S, "login", "failure", actor=a) for i in range(2)])
    again = backfill(env, r, base, base + DAY)
    assert len(again) == 1 and again[0].window_start_us > alerts[0].window_end_us - 1


def test_backfill_is_idempotent(env: Env, base: int) -> None:
    r = rule("bulk-access", threshold=2)
    a = "bf-" + uid()
    env.write([audit(base + d * DAY + 10 * HOUR + i * S, actor=a, patient=f"pat-{i}")
               for d in range(3) for i in range(3)])
    first = backfill(env, r, base, base + 3 * DAY)
    assert len(first) == 3 and all(x.mode == "backfill" for x in first)
    assert backfill(env, r, base, base + 3 * DAY) == []
    assert backfill(env, r, base + DAY, base + 2 * DAY) == []
    assert len(env.alerts(r.id)) == 3
    # a scheduled run over the same period adds nothing either
    eng = env.engine([r], lateness_s=0)
    eng.run_due(base)  # first run: sets the watermark one step before base
    assert eng.run_due(base + 3 * DAY) == []


def test_alert_ids_are_deterministic(env: Env, base: int) -> None:
    from phiaudit.rules import alert_id

    r = rule("break-glass")
    glass = audit(base + HOUR, action="break_glass", actor="bg-" + uid(), patient="pat-1")
    env.write([glass])
    dry = env.engine([r]).evaluate(r, base, base + DAY)
    real = backfill(env, r, base, base + DAY)
    assert [x.alert_id for x in dry] == [x.alert_id for x in real]
    assert real[0].alert_id == alert_id(r.id, real[0].group_key, real[0].window_start_us)
    assert env.engine([r]).evaluate(r, base, base + DAY) == []  # stored now


def test_every_builtin_rule_runs_on_the_store(env: Env, base: int) -> None:
    rules = [dataclasses.replace(r, id=f"{r.id}-{uid()}") for r in builtin_rules()]
    eng = env.engine(rules)
    assert eng.run_due(base + HOUR) == []  # nothing happened in this week
    _, rows = env.store.query("SELECT count() FROM rule_runs WHERE rule_id IN {r:Array(String)}",
                              {"r": [r.id for r in rules]})
    assert rows[0][0] == len(rules)
    for r in rules:
        assert f"rule {r.id} " in eng.explain(r.id) and "-- parameters:" in eng.explain(r.id)
    # a scheduled run's two stages are both shown; a rule of one query shows one
    text = {r.id.rsplit("-", 1)[0]: eng.explain(r.id) for r in rules}
    assert "-- stage 1:" in text["bulk-access"] and "uniqUpTo(50)(f)" in text["bulk-access"]
    assert "-- stage 2:" in text["bulk-access"] and "evidence" in text["bulk-access"]
    assert "-- stage 1:" not in text["break-glass"]
    assert eng.backfill(base, base + DAY) == []


def test_a_failing_rule_does_not_stop_the_others(env: Env, base: int) -> None:
    from phiaudit.rules import parse_rule

    # valid for Python's re, refused by ClickHouse's RE2 (look-behind): fails at query time
    broken = parse_rule({
        "id": "broken-" + uid(), "title": "t", "source": "audit_events",
        "detection": {"s": {"actor_id|re": "(?<=a)b"}, "condition": "s"},
        "correlation": {"type": "none"}, "summary": "x"})
    good = rule("break-glass")
    env.write([audit(base + HOUR, action="break_glass", actor="bg-" + uid())])
    eng = env.engine([broken, good], lateness_s=0)
    eng.run_due(base + HOUR - MIN)
    alerts = eng.run_due(base + 2 * HOUR)
    assert [a.rule_id for a in alerts] == [good.id]
    assert eng.stats.failures >= 1
    _, rows = env.store.query(
        "SELECT toUnixTimestamp64Micro(max(window_to)) FROM rule_runs WHERE rule_id = {r:String}",
        {"r": broken.id})
    assert rows[0][0] == base + HOUR - MIN  # its watermark did not move: retried next time


# -- the memory a rule query may use -----------------------------------------------------------

def _rows(env: Env, r: Rule, start: int, end: int, shard: tuple[int, int] = (0, 1),
          ) -> list[tuple[Any, ...]]:
    from phiaudit.rules import compile_rule

    compiled = compile_rule(r, start, end, materialize=False, shard=shard)
    return env.store.query(compiled.sql, compiled.params)[1]


def _key(row: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(tuple(sorted(map(str, v))) if isinstance(v, list) else v for v in row)


def test_shards_together_are_the_whole_query(env: Env, base: int) -> None:
    # every correlation counts within a group: the shards of the groups give exactly the rows
    # of the whole query, whatever the correlation (02:00 on a Monday: off hours too)
    t = base + 2 * HOUR
    actors = [f"shard-{i}-{uid()}" for i in range(24)]
    env.write([audit(t + (i * 7 + j) * S, actor=a, patient=f"pat-s{j}", outcome=outcome,
                     action="login" if outcome == "failure" else "read")
               for i, a in enumerate(actors) for j in range(3 + i % 5)
               for outcome in ("success", "failure")])
    for r in (rule("bulk-access", threshold=4), rule("failed-auth-user"),
              rule("no-care-relationship"), rule("off-hours")):
        whole = sorted(map(_key, _rows(env, r, base, base + DAY)))
        assert whole, r.id
        for n in (2, 4, 16):
            parts = [_rows(env, r, base, base + DAY, (i, n)) for i in range(n)]
            assert sorted(_key(x) for p in parts for x in p) == whole, (r.id, n)
        assert sum(1 for p in parts if p) > 1  # the groups did spread over the shards


def test_a_rule_without_groups_is_not_sharded() -> None:
    from phiaudit.rules import compile_rule, parse_rule

    r = parse_rule({"id": "ungrouped", "title": "t", "source": "audit_events",
                    "detection": {"s": {"action": "export"}, "condition": "s"},
                    "correlation": {"type": "none"}, "summary": "x"})
    assert compile_rule(r, 0, 60 * S).sql
    for shard in ((0, 2), (1, 1), (-1, 4)):
        with pytest.raises(ValueError, match="shard"):
            compile_rule(r, 0, 60 * S, shard=shard)


def _need(env: Env, r: Rule, start: int, end: int, shard: tuple[int, int] = (0, 1),
          stage: str = "all") -> int:
    """The least memory limit (to 1 MiB) the rule's query runs within, found by bisection."""
    from phiaudit.rules import compile_rule
    from phiaudit.storage import MemoryLimitExceeded

    compiled = compile_rule(r, start, end, materialize=False, shard=shard, stage=stage)
    lo, hi = 0, 1 << 30
    while hi - lo > 1 << 20:
        mid = (lo + hi) // 2
        try:
            env.store.query(compiled.sql, compiled.params, settings={"max_memory_usage": mid})
            hi = mid
        except MemoryLimitExceeded:
            lo = mid
    return hi


def test_a_query_over_its_memory_is_split_and_raises_the_same_alerts(
        env: Env, base: int) -> None:
    # 60 users reading 2,000 or 1,000 patients each in an hour: the distinct (user, patient)
    # pairs make the query's memory, and a shard of the users holds about a quarter of them
    # (beside what every query needs: measured 38 MiB whole, 22 the largest quarter)
    r = rule("bulk-access", threshold=1500)
    t = base + 10 * HOUR
    tag = uid()
    for a in range(60):
        env.write([audit(t + (a * 7 + j) * 1000, actor=f"mem-{a}-{tag}", patient=f"pat-{j}")
                   for j in range(2000 - (a % 2) * 1000)])  # half of them above the threshold
    whole = _need(env, r, base, base + DAY)
    quarter = max(_need(env, r, base, base + DAY, (i, 4)) for i in range(4))
    assert quarter + (6 << 20) <= whole, (quarter >> 20, whole >> 20)  # MiB
    expected = env.engine([r]).evaluate(r, base, base + DAY)  # no limit: one query
    assert len(expected) == 30
    limit = (quarter + whole) // 2
    eng = RuleEngine(env.store, env.submit, env.encoder, [r], max_query_bytes=limit)
    alerts = eng.backfill(base, base + DAY)
    assert eng.stats.splits == 1 and eng._shards == {(r.id, "all"): 4} and eng.stats.failures == 0
    assert sorted((a.group_key, a.value, a.evidence_count) for a in alerts) == sorted(
        (a.group_key, a.value, a.evidence_count) for a in expected)
    # the next run of that rule starts from the shards that fitted: no failed query first
    later = base + 2 * DAY
    env.write([audit(later + 10 * HOUR + j * 500_000, actor=f"mem-x-{tag}", patient=f"pat-{j}")
               for j in range(1600)])
    again = eng.backfill(later, later + DAY)
    assert len(again) == 1 and again[0].value >= 1500
    assert eng.stats.splits == 1 and eng._shards == {(r.id, "all"): 4}
    # after shard_decay runs that fitted, the next tries a quarter of the shards (here back to
    # one query); a window that needs them again splits again
    eng.shard_decay = 3
    assert eng.backfill(later + DAY, later + 2 * DAY) == []
    assert eng._shards == {} and eng.stats.splits == 1
    assert eng.backfill(base, base + DAY) == []  # alerted already; the query still runs
    assert eng.stats.splits == 2 and eng._shards == {(r.id, "all"): 4}


def test_a_rule_that_does_not_fit_in_its_shards_fails_alone(env: Env, base: int) -> None:
    # a limit below what every shard needs: after the most shards it may use, the rule fails
    # like a broken rule (logged, counted, its watermark not moved: retried next run), and
    # the other rules' alerts are raised
    big, small = rule("bulk-access", threshold=1500), rule("break-glass")
    t = base + 10 * HOUR
    tag = uid()
    for a in range(60):
        env.write([audit(t + (a * 7 + j) * 1000, actor=f"fit-{a}-{tag}", patient=f"pat-{j}")
                   for j in range(2000)])
    env.write([audit(t, action="break_glass", actor="bg-" + tag)])
    least = min(_need(env, big, t - MIN, t + HOUR, (i, 4)) for i in range(4))
    eng = RuleEngine(env.store, env.submit, env.encoder, [big, small],
                     RulesConfig.from_mapping({"lateness_s": 0}), max_query_bytes=least // 2)
    eng.max_shards = 4
    eng.run_due(t - MIN)
    alerts = eng.run_due(t + HOUR)
    assert [a.rule_id for a in alerts] == [small.id]
    assert eng.stats.failures == 1 and eng.stats.splits == 1 and eng._shards == {(big.id, "all"): 4}
    _, rows = env.store.query(
        "SELECT toUnixTimestamp64Micro(max(window_to)) FROM rule_runs WHERE rule_id = {r:String}",
        {"r": big.id})
    assert rows[0][0] == t - MIN  # its watermark did not move: retried next time


# -- scheduled runs: two stages ---------------------------------------------------------------

def _stage_rows(env: Env, r: Rule, start: int, end: int, **kw: Any) -> list[tuple[Any, ...]]:
    from phiaudit.rules import compile_rule

    compiled = compile_rule(r, start, end, materialize=False, **kw)
    return env.store.query(compiled.sql, compiled.params)[1]


def test_the_check_stage_finds_the_windows_of_the_whole_query(env: Env, base: int) -> None:
    # one scheduled window: the first stage gives the (window, group) rows of the whole query,
    # each value exact up to the threshold and threshold + 1 above it (02:00 on a Monday:
    # off hours too); the group hash it returns selects that group alone
    from phiaudit.rules import two_stage

    t = base + 2 * HOUR
    actors = [f"two-{i}-{uid()}" for i in range(12)]
    env.write([audit(t + (i * 20 + j) * S, actor=a, patient=f"pat-t{j % (i + 1)}")
               for i, a in enumerate(actors) for j in range(2 * i + 2)]
              + [audit(t + (i * 20 + j) * S, "login", "failure", actor=a)
                 for i, a in enumerate(actors) for j in range(i % 4)])
    end = t // MIN * MIN + 5 * MIN
    for r, cap in ((rule("bulk-access", threshold=4), 5), (rule("failed-auth-user", threshold=2),
                   None), (rule("no-care-relationship"), 2), (rule("off-hours"), None)):
        assert two_stage(r, end - MIN, end) and two_stage(r, end - 2 * MIN, end)
        assert not two_stage(r, end - 3 * MIN, end)  # a longer range: the one query
        whole = {row[:3]: row[3] for row in _stage_rows(env, r, end - MIN, end)}
        check = {row[:3]: row[3] for row in _stage_rows(env, r, end - MIN, end, stage="check")}
        assert whole and check.keys() == whole.keys(), r.id
        assert check == {k: v if cap is None else min(v, cap) for k, v in whole.items()}, r.id
        if cap is not None:
            assert max(whole.values()) > cap  # the cap did apply
        first = _stage_rows(env, r, end - MIN, end, stage="check")[0]
        alone = _stage_rows(env, r, end - MIN, end, only=[first[-1]])
        assert [row[:4] for row in alone] == [(*first[:3], whole[first[:3]])]
    for other in (rule("break-glass"), rule("success-after-failures")):
        assert not two_stage(other, end - MIN, end)


def test_a_scheduled_run_reads_no_evidence_of_groups_already_alerted(
        env: Env, base: int) -> None:
    # the bench's steady state: every user over the threshold for the hour. The first run
    # raises their alerts, exact values and evidence; the runs after it find the same groups
    # over the threshold, already alerted on, and read no evidence: they fit in a memory limit
    # that the whole query does not fit in
    r = rule("bulk-access", threshold=50)
    t = base + 10 * HOUR
    tag = uid()
    # 60 users, 40,000 patients each, within 4 ms: made by the engine (INSERT SELECT), as the
    # encoder would take a minute for them; the rule reads only these columns
    env.store.command(
        "INSERT INTO audit_events (event_id, event_time, received_time, action, outcome, "
        "actor_id, actor_roles, patient_bidx) SELECT generateUUIDv4(number), "
        "fromUnixTimestamp64Micro({t:Int64} + intDiv(number, 600), 'UTC') AS et, et, 'read', "
        "'success', concat({tag:String}, toString(number % 60)), ['physician'], "
        "hex(SHA256(toString(intDiv(number, 60)))) FROM numbers(2400000)",
        {"t": t, "tag": f"st-{tag}-"})
    end = t // MIN * MIN + MIN
    eng = env.engine([r], lateness_s=0)
    eng.run_due(end - MIN)
    first = eng.run_due(end)
    assert len(first) == 60 and eng.stats.fired == 60 and eng.stats.fired_known == 0
    assert {(a.value, a.evidence_count, len(a.evidence)) for a in first} == {(40000, 40000, 100)}
    whole = _need(env, r, end, end + MIN)
    check = _need(env, r, end, end + MIN, stage="check")
    # measured 24 MiB (the reads: at most 51 values a group) against 256 (2.4M values)
    assert 4 * check <= whole, (check >> 20, whole >> 20)  # MiB
    limited = RuleEngine(env.store, env.submit, env.encoder, [r],
                         RulesConfig.from_mapping({"lateness_s": 0}),
                         max_query_bytes=(check + whole) // 2)
    assert limited.run_due(end + MIN) == []
    assert limited.stats.fired == 60 and limited.stats.fired_known == 60
    assert limited.stats.splits == 0 and limited.stats.failures == 0
    assert len(env.alerts(r.id)) == 60


class _Submits:
    """``env.submit`` that records what each call wrote, and can fail one call (a write that
    fails, as the writer's would when the store is down: injected, as it cannot be made to
    happen on cue)."""

    def __init__(self, env: Env, fail_at: int = 0) -> None:
        self.env, self.fail_at = env, fail_at
        self.calls: list[tuple[int, list[str]]] = []

    def __call__(self, tables: dict[str, list[list[Any]]]) -> None:
        self.calls.append((len(tables["alerts"]), [row[0] for row in tables["rule_runs"]]))
        if len(self.calls) == self.fail_at:
            raise OSError("injected: the write failed")
        self.env.submit(tables)


def _parts_engine(env: Env, r: Rule, part: int, submit: Any = None) -> RuleEngine:
    eng = RuleEngine(env.store, submit or env.submit, env.encoder, [r],
                     RulesConfig.from_mapping({"lateness_s": 0}))
    eng.part_alerts = part
    return eng


def test_a_run_writes_its_alerts_in_parts_and_its_watermark_after_them(
        env: Env, base: int) -> None:
    # the second stage reads the groups that fired part_alerts at a time (here 2), and the
    # run writes each part on its own, the rule's run row (its watermark) with the last: every
    # group gets its alert, with its own value and evidence; keep=False returns none of them
    r = rule("failed-auth-user", threshold=2)
    t = base + 10 * HOUR
    actors = [f"parts-{i}-{uid()}" for i in range(5)]
    env.write([audit(t + j * S, "login", "failure", actor=a)
               for i, a in enumerate(actors) for j in range(i + 2)])
    end = t // MIN * MIN + MIN
    submits = _Submits(env)
    eng = _parts_engine(env, r, 2, submits)
    eng.run_due(end - MIN)
    assert submits.calls == [(0, [r.id])]
    submits.calls.clear()
    assert eng.run_due(end, keep=False) == []
    assert submits.calls == [(2, []), (2, []), (1, [r.id])]
    assert eng.stats.alerts == 5 and eng.stats.duplicates == 0
    stored = env.alerts(r.id)
    assert sorted((a["group_key"], a["value"], a["evidence_count"], len(a["evidence"]))
                  for a in stored) == sorted(
        (f'{{"actor_id":"{a}"}}', i + 2, i + 2, i + 2) for i, a in enumerate(actors))
    _, runs = env.store.query("SELECT alerts FROM rule_runs WHERE rule_id = {r:String} "
                              "ORDER BY window_to", {"r": r.id})
    assert [row[0] for row in runs] == [0, 5]


def test_a_run_that_stops_between_parts_loses_and_repeats_no_alert(
        env: Env, base: int) -> None:
    # the second part's write fails: the first part is stored, the watermark is not moved;
    # the next run evaluates the same window, writes the other alerts and none twice
    r = rule("failed-auth-user", threshold=2)
    t = base + 10 * HOUR
    actors = [f"stop-{i}-{uid()}" for i in range(5)]
    env.write([audit(t + j * S, "login", "failure", actor=a) for a in actors for j in range(3)])
    end = t // MIN * MIN + MIN
    _parts_engine(env, r, 2).run_due(end - MIN)
    failing = _Submits(env, fail_at=2)
    with pytest.raises(OSError, match="injected"):
        _parts_engine(env, r, 2, failing).run_due(end)
    assert failing.calls == [(2, []), (2, [])]
    assert len(env.alerts(r.id)) == 2
    _, marks = env.store.query("SELECT count() FROM rule_runs WHERE rule_id = {r:String}",
                               {"r": r.id})
    assert marks[0][0] == 1  # only the first run's

    again = _parts_engine(env, r, 2)
    alerts = again.run_due(end)
    assert len(alerts) == 3 and again.stats.fired_known == 2  # the two written before
    stored = env.alerts(r.id)
    assert sorted(a["group_key"] for a in stored) == sorted(
        f'{{"actor_id":"{a}"}}' for a in actors)
    assert again.run_due(end) == []


def test_parts_keep_the_earliest_of_overlapping_windows(env: Env, base: int) -> None:
    # a backfill over two days is two queries (one a day), each with non-overlapping windows
    # per group; around midnight the second day's first windows overlap the first day's last
    # ones and are dropped. In parts of one alert the run keeps the same windows as in one
    t = base + DAY - 30 * MIN
    actors = [f"ovp-{i}-{uid()}" for i in range(3)]
    env.write([audit(t + (i * 7 + j * 150) * S, "login", "failure", actor=a)
               for i, a in enumerate(actors) for j in range(24)])
    got = []
    for part in (1, 1000):
        r = rule("failed-auth-user", threshold=3)
        eng = _parts_engine(env, r, part)
        alerts = eng.backfill(base, base + 2 * DAY)
        got.append(sorted((a.group_key, a.window_start_us, a.value) for a in alerts))
        assert eng.stats.duplicates >= len(actors)  # one a group at least, at midnight
    assert got[0] == got[1] and len(got[0]) >= 3 * len(actors)
    for key in {g for g, _, _ in got[0]}:
        starts = [ws for g, ws, _ in got[0] if g == key]
        assert all(b - a >= 10 * MIN for a, b in itertools.pairwise(starts))


def test_a_run_holds_one_part_of_its_alerts(env: Env, base: int) -> None:
    # an alert storm: 2,000 groups fire at once, each with 50 evidence ids. Written in parts
    # of 100, the run's Python allocations peak far lower than in one part of all of them:
    # it holds one part's rows, alerts and insert at a time (measured: 4 against 37 MiB)
    import tracemalloc

    t = base + 10 * HOUR
    tag = uid()
    env.store.command(
        "INSERT INTO audit_events (event_id, event_time, received_time, action, outcome, "
        "actor_id, actor_roles, trace_id) SELECT generateUUIDv4(number), "
        "fromUnixTimestamp64Micro({t:Int64} + intDiv(number, 200), 'UTC') AS et, et, "
        "'login', 'failure', concat({tag:String}, toString(number % 2000)), ['physician'], "
        "hex(SHA256(toString(number))) FROM numbers(100000)", {"t": t, "tag": f"hp-{tag}-"})
    end = t // MIN * MIN + MIN
    peaks = {}
    for part in (100, 2000):
        r = rule("failed-auth-user", threshold=2)
        eng = _parts_engine(env, r, part)
        eng.run_due(end - MIN)
        tracemalloc.start()
        try:
            assert eng.run_due(end, keep=False) == []
            peaks[part] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert eng.stats.alerts == 2000 and len(env.alerts(r.id)) == 2000
    assert 3 * peaks[100] < peaks[2000], {k: v >> 20 for k, v in peaks.items()}
