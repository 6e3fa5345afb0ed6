"""The compiled SQL, run on a real store: window grid and bounds, counting across step buckets,
evidence limits, sequences, anti-joins, and hostile values bound as parameters."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from phiaudit.rules import Compiled, compile_rule, parse_rule
from phiaudit.storage import ConfigError
from tests.rules.test_engine import (
    DAY,
    EPOCH,
    HOUR,
    MIN,
    Env,
    S,
    audit,
    close_env,
    infra,
    open_env,
    uid,
)

# this module's weeks start far after test_engine's
_weeks = iter(range(5000, 10_000))


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    e = open_env(tmp_path_factory.getbasetemp())
    yield e
    close_env(e)


@pytest.fixture
def base() -> int:
    return EPOCH + next(_weeks) * 7 * DAY


def rule(correlation: dict[str, Any], detection: dict[str, Any] | None = None,
         source: str = "audit_events", summary: str = "{value}",
         params: dict[str, Any] | None = None) -> Any:
    return parse_rule({
        "id": "t-" + uid(), "title": "test", "source": source, "params": params or {},
        "detection": detection or {"sel": {"action": "read"}, "condition": "sel"},
        "correlation": correlation, "summary": summary})


def run(env: Env, c: Compiled) -> list[dict[str, Any]]:
    cols, rows = env.store.query(c.sql, c.params)
    return [dict(zip(cols, r, strict=True)) for r in rows]


def test_windows_on_the_step_grid_ending_in_the_range(env: Env, base: int) -> None:
    actor = "grid-" + uid()
    r = rule({"type": "event_count", "group-by": ["actor_id"], "timespan": "3m"},
             {"sel": {"actor_id": actor}, "condition": "sel"})
    t = base + 90 * S
    env.write([audit(t, actor=actor)])
    rows = run(env, compile_rule(r, base, base + 10 * MIN, 60))
    # [end - 3m, end) contains base+90s for ends base+2m, +3m and +4m: the query keeps the
    # earliest (overlapping windows are one alert)
    assert [(x["window_start"], x["window_end"]) for x in rows] == [(base - MIN, base + 2 * MIN)]
    assert rows[0]["g0"] == actor and rows[0]["value"] == 1
    # a scheduled run (one or two window ends): every window ending in (from, to]
    for end in (2, 3, 4):
        rows = run(env, compile_rule(r, base + (end - 1) * MIN, base + end * MIN, 60))
        assert [x["window_end"] for x in rows] == [base + end * MIN]
    assert run(env, compile_rule(r, base + 4 * MIN, base + 5 * MIN, 60)) == []
    rows = run(env, compile_rule(r, base + 2 * MIN, base + 4 * MIN, 60))
    assert [x["window_end"] for x in rows] == [base + 3 * MIN, base + 4 * MIN]
    # longer ranges: the windows where a count can first cross the threshold, ending right
    # after an event's step or starting at it (one ending at +3m holds no more than the one
    # ending at +2m), the earliest of overlapping ones
    rows = run(env, compile_rule(r, base + 3 * MIN, base + 10 * MIN, 60))
    assert [(x["window_start"], x["window_end"]) for x in rows] == [(base + MIN, base + 4 * MIN)]
    assert run(env, compile_rule(r, base + 4 * MIN, base + 10 * MIN, 60)) == []
    # a timespan shorter than the step refines the grid
    r30 = rule({"type": "event_count", "group-by": ["actor_id"], "timespan": "30s"},
               {"sel": {"actor_id": actor}, "condition": "sel"})
    rows = run(env, compile_rule(r30, base, base + 10 * MIN, 60))
    assert [(x["window_start"], x["window_end"]) for x in rows] == [(base + 90 * S, base + 2 * MIN)]


def test_sustained_activity_gives_one_window_per_timespan(env: Env, base: int) -> None:
    actor = "sus-" + uid()
    r = rule({"type": "value_count", "field": "patient_bidx", "group-by": ["actor_id"],
              "timespan": "10m", "condition": {"gte": 2}},
             {"sel": {"actor_id": actor}, "condition": "sel"})
    # two new patients every minute for 35 minutes
    env.write([audit(base + m * MIN + i * S, actor=actor, patient=f"pat-{m}-{i}")
               for m in range(35) for i in range(2)])
    rows = run(env, compile_rule(r, base, base + HOUR, 60))
    assert [x["window_end"] - base for x in rows] == [m * MIN for m in (1, 11, 21, 31, 41)]
    assert [x["value"] for x in rows] == [2, 20, 20, 20, 8]
    assert [x["evidence_count"] for x in rows] == [2, 20, 20, 20, 8]


def test_value_count_merges_buckets_without_double_counting(env: Env, base: int) -> None:
    actor = "vc-" + uid()
    r = rule({"type": "value_count", "field": "patient_bidx", "group-by": ["actor_id"],
              "timespan": "10m", "condition": {"gte": 3}},
             {"sel": {"actor_id": actor}, "condition": "sel"})
    # the same two patients every minute, a third one once
    env.write([audit(base + m * MIN + S, actor=actor, patient=f"pat-{m % 2}") for m in range(6)]
              + [audit(base + 7 * MIN, actor=actor, patient="pat-x")])
    rows = run(env, compile_rule(r, base, base + 20 * MIN, 60))
    assert rows and all(x["value"] == 3 for x in rows)
    first = rows[0]
    assert first["window_end"] == base + 8 * MIN and first["evidence_count"] == 7


def test_evidence_is_limited_to_100(env: Env, base: int) -> None:
    actor = "many-" + uid()
    r = rule({"type": "event_count", "group-by": ["actor_id"], "timespan": "1h",
              "condition": {"gt": 120}}, {"sel": {"actor_id": actor}, "condition": "sel"})
    trace = uuid.uuid4().hex
    env.write([audit(base + i * S, actor=actor, trace=trace) for i in range(150)])
    rows = run(env, compile_rule(r, base, base + 5 * MIN, 60))
    assert rows
    assert all(len(x["evidence"]) == 100 and x["evidence_count"] == 150 for x in rows)
    assert rows[0]["trace_ids"] == [trace]


def test_temporal_unordered_and_ordered(env: Env, base: int) -> None:
    detection = {"fail": {"action": "login", "outcome": "failure"},
                 "ok": {"action": "login", "outcome": "success"}, "condition": "fail or ok"}
    a = "tmp-" + uid()
    env.write([audit(base + 10 * S, "login", "success", actor=a),
               audit(base + 20 * S, "login", "failure", actor=a),
               audit(base + 30 * S, "login", "failure", actor=a)])
    steps = [{"selection": "fail", "min": 2}, "ok"]
    unordered = rule({"type": "temporal", "group-by": ["actor_id"], "timespan": "5m",
                      "steps": steps}, detection)
    ordered = rule({"type": "temporal_ordered", "group-by": ["actor_id"], "timespan": "5m",
                    "steps": steps}, detection)
    assert [x["g0"] for x in run(env, compile_rule(unordered, base, base + MIN, 60))] == [a]
    assert run(env, compile_rule(ordered, base, base + 10 * MIN, 60)) == []
    env.write([audit(base + 40 * S, "login", "success", actor=a)])
    rows = run(env, compile_rule(ordered, base, base + 10 * MIN, 60))
    assert rows and rows[0]["window_end"] == base + MIN and rows[0]["evidence_count"] == 4


def test_lookup_without_period_and_absent_without_empty(env: Env, base: int) -> None:
    a = "lk-" + uid()
    p = env.index("patient", "pat-lk")
    env.write(care=[[a, p, 0, 1, "careteam", "b", base, "t"]])  # any period: the pair exists
    env.write([audit(base + S, actor=a, patient="pat-lk"), audit(base + 2 * S, actor=a,
                                                               patient="pat-other")])
    r = rule({"type": "lookup", "group-by": ["actor_id"], "timespan": "1m",
              "lookup": {"table": "care_relationships",
                         "match": {"actor_id": "actor_id", "patient_bidx": "patient_bidx"}}},
             {"sel": {"actor_id": a}, "condition": "sel"})
    rows = run(env, compile_rule(r, base, base + MIN, 60))
    assert [x["evidence_count"] for x in rows] == [1]
    actor = "ab-" + uid()
    env.write([infra(base + S, trace="", actor=actor)])
    absent = rule({"type": "absent", "group-by": ["actor_id"], "timespan": "1m",
                   "absent": {"source": "audit_events", "match": {"trace_id": "trace_id"},
                              "empty": False}},
                  {"sel": {"actor_id": actor}, "condition": "sel"}, source="infra_events")
    assert run(env, compile_rule(absent, base, base + MIN, 60)) == []


def test_hostile_values_are_matched_literally(env: Env, base: int) -> None:
    evil = "x' OR '1'='1"
    other = "x"
    env.write([audit(base + S, actor=evil), audit(base + S, actor=other),
               audit(base + S, actor="y", roles=["a'b"])])
    r = rule({"type": "event_count", "group-by": ["actor_id"], "timespan": "1m"},
             {"sel": {"actor_id": evil}, "condition": "sel"})
    rows = run(env, compile_rule(r, base, base + MIN, 60))
    assert [x["g0"] for x in rows] == [evil]
    r = rule({"type": "event_count", "group-by": ["actor_id"], "timespan": "1m"},
             {"sel": {"actor_roles": "a'b", "actor_id|re": "^y$"}, "condition": "sel"})
    assert [x["g0"] for x in run(env, compile_rule(r, base, base + MIN, 60))] == ["y"]
    _, rows2 = env.store.query("SELECT count() FROM audit_events")
    assert rows2[0][0] > 0  # still there


def test_none_gives_one_row_per_event_with_its_step(env: Env, base: int) -> None:
    a = "none-" + uid()
    r = rule({"type": "none", "group-by": ["actor_id"], "field": "record_count"},
             {"sel": {"actor_id": a, "record_count|gte": 10}, "condition": "sel"})
    e1 = audit(base + 61 * S, actor=a, count=10)
    env.write([e1, audit(base + 62 * S, actor=a, count=9)])
    rows = run(env, compile_rule(r, base, base + 5 * MIN, 60))
    assert [(x["window_start"], x["window_end"], x["value"], x["evidence"]) for x in rows] == [
        (base + MIN, base + 2 * MIN, 10, [e1.event_id])]
    assert rows[0]["event"] == str(e1.event_id)


def test_explain_shows_sql_and_parameters() -> None:
    r = rule({"type": "event_count", "group-by": ["actor_id"], "timespan": "5m",
              "condition": {"gt": "$n"}}, params={"n": 4})
    text = compile_rule(r, 0, 60_000_000, 60).explain()
    assert "SELECT" in text and "-- parameters:" in text and "= 4" in text


def test_step_must_divide_the_timespan() -> None:
    with pytest.raises(ConfigError, match="multiple of the step"):
        rule({"type": "event_count", "timespan": "5m", "step": "2m"})
