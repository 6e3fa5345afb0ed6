"""The rule format: built-ins load, bad rules get precise errors (rule id and key path, all at
once), and nothing in a rule file can reach the SQL text except whitelisted column names."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest

from phiaudit.rules import (
    BUILTIN_RULE_IDS,
    RulesConfig,
    builtin_rules,
    compile_rule,
    load_rule_file,
    load_rules,
    parse_rule,
)
from phiaudit.storage import ConfigError

GOOD: dict[str, Any] = {
    "id": "my-rule",
    "title": "Many reads",
    "severity": "high",
    "source": "audit_events",
    "params": {"threshold": 10},
    "detection": {"reads": {"action": ["read", "search"]}, "condition": "reads"},
    "correlation": {"type": "value_count", "field": "patient_bidx", "group-by": ["actor_id"],
                    "timespan": "15m", "condition": {"gt": "$threshold"}},
    "summary": "{actor_id} read {value} patients",
}


def variant(**changes: Any) -> dict[str, Any]:
    doc = copy.deepcopy(GOOD)
    for path, value in changes.items():
        node = doc
        keys = path.split("__")
        for k in keys[:-1]:
            node = node[k.replace("_", "-") if k == "group_by" else k]
        last = keys[-1].replace("group_by", "group-by")
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return doc


def errors_of(doc: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_rule(doc)
    return info.value.errors


def test_builtin_rules_load_with_their_stable_ids() -> None:
    rules = builtin_rules()
    assert sorted(r.id for r in rules) == sorted(BUILTIN_RULE_IDS)
    assert all(r.enabled and r.origin == "builtin" for r in rules)
    loaded = load_rules(RulesConfig())
    assert {r.id for r in loaded} == set(BUILTIN_RULE_IDS)


def test_a_good_rule_parses() -> None:
    r = parse_rule(GOOD)
    assert r.id == "my-rule" and r.correlation.timespan_s == 900
    assert r.correlation.group_by == ("actor_id",) and r.params == {"threshold": 10}


@pytest.mark.parametrize(("changes", "expected"), [
    ({"severity": "urgent"}, "rule my-rule.severity"),
    ({"source": "otel_traces"}, "rule my-rule.source"),
    ({"detection__reads": {"patient_id": "x"}}, "rule my-rule.detection.reads.patient_id: "
                                                "patient_id is encrypted"),
    ({"detection__reads": {"nosuch": "x"}}, "rule my-rule.detection.reads.nosuch"),
    ({"detection__reads": {"action|gt": 3}}, "needs a numeric column"),
    ({"detection__reads": {"record_count|contains": "3"}}, "needs a string column"),
    ({"detection__reads": {"action|sounds_like": "x"}}, "unknown modifier"),
    ({"detection__reads": {"record_count": "many"}}, "integer values only"),
    ({"detection__reads": {"action|re": "(unclosed"}}, "not a valid regular expression"),
    ({"detection__condition": "reads and writes"}, "unknown selection 'writes'"),
    ({"detection__condition": "(reads"}, "parenthesis is not closed"),
    ({"detection__condition": "reads and"}, "ends too early"),
    ({"correlation__type": "sometimes"}, "rule my-rule.correlation.type"),
    ({"correlation__timespan": "15 minutes"}, "rule my-rule.correlation.timespan"),
    ({"correlation__timespan": None}, "correlation.timespan: required"),
    ({"correlation__group_by": ["client_address"]}, "client_address is encrypted"),
    ({"correlation__group_by": ["event_time"]}, "time column"),
    ({"correlation__field": "query"}, "query is encrypted"),
    ({"correlation__condition": {"gt": "$nope"}}, "unknown parameter '$nope'"),
    ({"correlation__condition": {"between": 3}}, "correlation.condition"),
    ({"summary": "{patient_id} was read"}, "encrypted (PHI) column"),
    ({"summary": "{recipient}"}, "encrypted (PHI) column"),
    ({"summary": "{actor_id!r}"}, "without format or conversion"),
    ({"summary": "{actor_id:>20}"}, "without format or conversion"),
    ({"summary": "{actor_id.__class__}"}, "neither a group-by column"),
    ({"summary": "{0}"}, "placeholders are plain {name}s"),
    ({"summary": None}, "summary: required"),
    ({"unexpected": 1}, "unknown key 'unexpected'"),
    ({"params": {"threshold": None}}, "params.threshold"),
])
def test_validation_errors_name_the_rule_and_the_key(changes: dict[str, Any], expected: str,
                                                     ) -> None:
    errs = errors_of(variant(**changes))
    assert any(expected in e for e in errs), errs
    assert all(e.startswith(("rule my-rule", "rule")) for e in errs), errs


def test_bidx_and_group_values_in_summaries() -> None:
    doc = variant(correlation__group_by=["client_bidx"], summary="{client_bidx} failed")
    assert any("leave it in the group key" in e for e in errors_of(doc))
    doc = variant(summary="{actor_id} {value} {evidence_count} {timespan} {params.threshold}")
    assert parse_rule(doc).summary.startswith("{actor_id}")


def test_every_error_is_reported_at_once() -> None:
    doc = variant(severity="urgent", source="nope", correlation__timespan="eventually",
                  summary="{patient_id}")
    errs = errors_of(doc)
    assert len(errs) >= 4, errs


def test_temporal_and_lookup_and_absent_validation() -> None:
    base = variant(correlation={"type": "temporal_ordered", "group-by": ["actor_id"],
                                "timespan": "10m", "steps": ["reads"]})
    assert any("2 to 10 selections" in e for e in errors_of(base))
    base["correlation"]["steps"] = ["reads", {"selection": "nope", "min": 0}]
    errs = errors_of(base)
    assert any("unknown selection 'nope'" in e for e in errs)
    assert any("steps[1].min" in e for e in errs)
    look = variant(correlation={"type": "lookup", "group-by": ["actor_id"], "timespan": "1h",
                                "lookup": {"table": "users", "match": {"actor_id": "actor_id"}}})
    assert any("lookup.table" in e for e in errors_of(look))
    look["correlation"]["lookup"] = {"table": "care_relationships",
                                     "match": {"actor_id": "actor_id"},
                                     "period": ["start", "batch_id"]}
    assert any("lookup.period" in e for e in errors_of(look))
    absent = variant(correlation={"type": "absent", "timespan": "5m",
                                  "absent": {"source": "audit_events",
                                             "match": {"trace_id": "record_count"}}})
    assert any("not of the same kind" in e for e in errors_of(absent))


# -- injection through a rule file ------------------------------------------------------------

INJECTIONS = [
    "actor_id = '' OR 1=1 --",
    "actor_id); DROP TABLE audit_events; --",
    "actor_id`",
    "audit_events.actor_id",
    "toString(patient_id)",
    "actor_id\n",
]


@pytest.mark.parametrize("name", INJECTIONS)
def test_identifiers_from_a_rule_file_are_whitelisted(name: str) -> None:
    for doc in (
        variant(detection={"reads": {name: "x"}, "condition": "reads"}),
        variant(correlation__group_by=[name]),
        variant(correlation__field=name),
        variant(detection={"reads": {f"action|{name}": "x"}, "condition": "reads"}),
        variant(correlation={"type": "lookup", "group-by": ["actor_id"], "timespan": "1h",
                             "lookup": {"table": "care_relationships",
                                        "match": {"actor_id": name}, "period": ["start", "end"]}}),
        variant(correlation={"type": "lookup", "group-by": ["actor_id"], "timespan": "1h",
                             "lookup": {"table": name, "match": {"actor_id": "actor_id"}}}),
        variant(correlation={"type": "absent", "timespan": "5m",
                             "absent": {"source": name, "match": {"trace_id": "trace_id"}}}),
    ):
        errs = errors_of(doc)
        assert any(word in e for e in errs
                   for word in ("no column rules may use", "unknown modifier", "must be one of",
                                "is encrypted")), errs


@pytest.mark.parametrize("condition", [
    "reads; DROP TABLE alerts", "reads or 1=1", "reads' OR '1", "reads -- x", "reads /* */",
    "sleep(3)", "reads and (SELECT 1)",
])
def test_conditions_are_only_selection_names(condition: str) -> None:
    assert errors_of(variant(detection__condition=condition))


@pytest.mark.parametrize("name", ["a b", "x;y", "not", "outside_schedule", "1abc"])
def test_selection_names_are_plain(name: str) -> None:
    assert errors_of(variant(detection={name: {"action": "read"}, "condition": "x"}))


def test_values_never_reach_the_sql_text() -> None:
    evil = "x'); DROP TABLE audit_events; --{p0:String}\\"
    doc = variant(detection={"reads": {"actor_id": [evil, "ok"], "user_agent|contains": evil,
                                       "action|re": "^re(ad)$"},
                             "condition": "reads"},
                  params={"threshold": 10, "evil": evil})
    r = parse_rule(doc)
    c = compile_rule(r, 0, 3_600_000_000)
    assert "DROP" not in c.sql and "'x'" not in c.sql and "^re" not in c.sql
    assert evil in [v for v in c.params.values() if isinstance(v, str)]
    assert ["x'); DROP TABLE audit_events; --{p0:String}\\", "ok"] in c.params.values()
    # the only quoted literals in the SQL are our own constants
    assert set(re.findall(r"'[^']*'", c.sql)) <= {"'UTC'", "''", "'Array(Int64)'"}


def test_settings_override_parameters_with_checked_types() -> None:
    cfg = RulesConfig.from_mapping({"settings": {"bulk-access": {"threshold": 7},
                                                 "large-export": {"enabled": False}},
                                    "disabled": ["off-hours"]})
    rules = {r.id: r for r in load_rules(cfg)}
    assert rules["bulk-access"].params["threshold"] == 7
    assert not rules["large-export"].enabled and not rules["off-hours"].enabled
    for bad, expected in (
        ({"settings": {"bulk-access": {"threshold": "many"}}},
         "rules.settings.bulk-access.threshold"),
        ({"settings": {"bulk-access": {"nosuch": 1}}}, "rules.settings.bulk-access.nosuch"),
        ({"settings": {"no-such-rule": {}}}, "rules.settings.no-such-rule"),
        ({"disabled": ["no-such-rule"]}, "rules.disabled"),
        ({"settings": {"off-hours": {"schedule": {"timezone": "Mars/Olympus"}}}},
         "timezone"),
        ({"settings": {"off-hours": {"schedule": {"hours": [7, 25]}}}}, "hours"),
        ({"settings": {"large-export": {"actions": [1, 2]}}}, "holds text"),
    ):
        with pytest.raises(ConfigError) as info:
            load_rules(RulesConfig.from_mapping(bad))
        assert any(expected in e for e in info.value.errors), info.value.errors


def test_rules_config_errors_have_key_paths() -> None:
    with pytest.raises(ConfigError) as info:
        RulesConfig.from_mapping({"interval_s": 0, "lateness_s": "2m", "rule_files": 3,
                                  "sinks": [{"type": "email"}], "bogus": 1})
    errs = info.value.errors
    for path in ("rules.interval_s", "rules.lateness_s", "rules.rule_files",
                 "rules.sinks[0].type", "rules: unknown key 'bogus'"):
        assert any(path in e for e in errs), errs
    assert "REDACTED" in repr(RulesConfig.from_mapping(
        {"sinks": [{"type": "webhook", "url": "https://u:secret@h/x"}]}))
    assert "secret" not in repr(RulesConfig.from_mapping(
        {"sinks": [{"type": "webhook", "url": "https://u:secret@h/x"}]}))


def test_rule_files_load_and_replace_builtins(tmp_path: Path) -> None:
    f = tmp_path / "mine.yaml"
    f.write_text("""
id: my-rule
title: Many reads
source: audit_events
detection: {reads: {action: read}, condition: reads}
correlation: {type: event_count, group-by: [actor_id], timespan: 5m, condition: {gt: 100}}
summary: "{actor_id} read {value} records"
---
id: break-glass
title: Break glass, my way
source: audit_events
severity: critical
detection: {bg: {action: break_glass}, condition: bg}
summary: "break glass by {actor_id}"
correlation: {type: none, group-by: [actor_id]}
""")
    rules = {r.id: r for r in load_rules(RulesConfig.from_mapping({"rule_files": [str(tmp_path)]}))}
    assert rules["my-rule"].origin == str(f)
    assert rules["break-glass"].severity == "critical"
    bad = tmp_path / "bad.yaml"
    bad.write_text("id: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line \d+: not valid YAML"):
        load_rule_file(bad)
    with pytest.raises(ConfigError, match="no such file"):
        load_rules(RulesConfig.from_mapping({"rule_files": [str(tmp_path / "none.yaml")]}))


def test_sigma_quantifiers_in_conditions() -> None:
    doc = variant(detection={"sel_a": {"action": "read"}, "sel_b": {"action": "search"},
                             "f": {"outcome": "failure"}, "condition": "1 of sel_* and not f"})
    assert parse_rule(doc).condition == (
        "and", ("or", ("sel", "sel_a"), ("sel", "sel_b")), ("not", ("sel", "f")))
    doc["detection"]["condition"] = "all of them"
    assert parse_rule(doc).condition[0] == "and"
    for bad, expected in (("1 of none*", "no selection matches"), ("sel_a*", "unknown selection"),
                          ("1 of", "needs a selection pattern"), ("sel_a sel_b", "unexpected")):
        doc["detection"]["condition"] = bad
        assert any(expected in e for e in errors_of(doc)), bad
