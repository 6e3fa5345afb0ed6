"""Precision and recall of the built-in rules on a synthetic hospital (``phiaudit.rules.scenario``).

A seeded population of patients, practitioners and encounters, the normal traffic derived
from it and injected, labelled anomalies of every kind, written through the real encoder and
writer into a real embedded store; the care relationships loaded; the built-in rules (set up
through ``RulesConfig`` as a user would) backfilled over the period. Every rule must catch all
its cases (recall 1) and raise nothing on the clean traffic (precision 1); a scenario without
anomalies must raise no alert at all. ``pytest -s`` shows the table.
"""

from __future__ import annotations

import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime
from hashlib import sha256
from itertools import pairwise
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from phiaudit.rules.scenario import (
    OPEN_HOURS,
    ROLE_SCHEDULES,
    Scenario,
    ScenarioConfig,
    generate,
)
from phiaudit.storage import (
    ALERT_COLUMNS,
    RULE_RUN_COLUMNS,
    BatchWriter,
    BlindIndex,
    FieldCipher,
    KeyRing,
    RecordEncoder,
    Store,
    StoreLocation,
    TableSpec,
    migrate,
)

BUILTIN_RULES = (
    "bulk-access", "large-export", "off-hours", "failed-auth-user", "failed-auth-source",
    "success-after-failures", "no-care-relationship", "break-glass", "app-bypass",
    "audit-read-refused", "failed-auth-cloud",
)
CONFIG = ScenarioConfig(seed=11, start=date(2026, 11, 16), days=2, patients=300)
# the clean hospital: another seed, two weeks later, no anomalies (same store, its own period)
CLEAN = ScenarioConfig(seed=12, start=date(2026, 11, 30), days=2, patients=300,
                       anomalies=False)


# -- the generator alone: its clean traffic cannot trip a rule by chance ---------------------


def _clean_events(sc: Scenario) -> tuple[list[Any], list[Any], list[Any]]:
    labelled = set().union(*(lab.event_ids for lab in sc.labels)) if sc.labels else set()
    return ([e for e in sc.audit if e.event_id not in labelled],
            [e for e in sc.infra if e.event_id not in labelled],
            [e for e in sc.access if e.event_id not in labelled])


def test_generator_is_seeded_and_labels_every_rule() -> None:
    a, b = generate(CONFIG), generate(CONFIG)
    assert [e.event_id for e in a.audit] == [e.event_id for e in b.audit]
    assert [e.event_time_us for e in a.infra] == [e.event_time_us for e in b.infra]
    assert a.care == b.care and a.labels == b.labels
    other = generate(ScenarioConfig(seed=CONFIG.seed + 1))
    assert [e.event_id for e in other.audit] != [e.event_id for e in a.audit]
    assert {lab.rule_id for lab in a.labels} == set(BUILTIN_RULES)
    assert not generate(CLEAN).labels
    ids = [e.event_id for e in a.audit] + [e.event_id for e in a.infra]
    assert len(ids) == len(set(ids))
    for lab in a.labels:  # every label names events that exist, in its table
        pool: dict[str, list[Any]] = {"audit_events": a.audit, "infra_events": a.infra,
                                      "access_log": a.access}
        assert lab.event_ids <= {e.event_id for e in pool[lab.table]}, lab.case
    # a realistic hospital, not a handful of rows
    assert len(a.encounters) > 200 and len(a.practitioners) > 40 and len(a.audit) > 2000
    assert Counter(p.role for p in a.practitioners).keys() == {"physician", "nurse", "billing"}
    assert max(len(e.practitioners) for e in a.encounters) >= 3


@pytest.mark.parametrize("cfg", [CONFIG, CLEAN], ids=["anomalous", "clean"])
def test_clean_traffic_stays_inside_every_rule(cfg: ScenarioConfig) -> None:
    """Checked from the events themselves, not from the generator's bookkeeping."""
    sc = generate(cfg)
    audit, infra, access = _clean_events(sc)
    tz = ZoneInfo(sc.timezone)
    care: dict[tuple[str, str], list[tuple[int, int]]] = defaultdict(list)
    for actor, patient_bidx, start, end, *_ in sc.care:
        care[(actor, patient_bidx)].append((start, end))

    def bidx(patient: str) -> str:  # generate()'s stand-in index (no store here)
        return sha256(f"patient|{patient}".encode()).hexdigest()[:32]

    users = sc.user_schedules()
    patients: dict[str, set[str]] = defaultdict(set)
    failures_user: Counter[tuple[str, int]] = Counter()
    failures_source: Counter[tuple[str, int]] = Counter()
    for e in audit:
        local = datetime.fromtimestamp(e.event_time_us / 1e6, tz)
        sched = users.get(e.actor_id) or (ROLE_SCHEDULES[e.actor_roles[0]] if e.actor_roles
                                          else OPEN_HOURS)
        assert sched.covers(local), "clean event outside the actor's schedule"
        assert e.action != "break_glass"
        if e.patient_id:
            patients[e.actor_id].add(e.patient_id)
        if e.action in ("read", "search", "update"):
            assert any(s <= e.event_time_us <= t
                       for s, t in care[(e.actor_id, bidx(e.patient_id))]), "not covered"
        if e.action in ("export", "disclose"):
            assert e.record_count <= cfg.export_threshold // 3
        if e.action == "login" and e.outcome == "failure":
            day = e.event_time_us // 86_400_000_000
            failures_user[(e.actor_id, day)] += 1
            failures_source[(e.client_address, day)] += 1
    assert max(len(p) for p in patients.values()) <= cfg.bulk_threshold // 2
    assert max(failures_user.values(), default=0) <= 1
    assert max(failures_source.values(), default=0) <= 1
    console = sorted(e.event_time_us for e in infra
                     if e.operation == "ConsoleLogin" and e.outcome == "failure")
    assert console and all(b - a > 3_600_000_000 for a, b in pairwise(console))
    traces = {e.trace_id for e in audit}
    for ev in infra:
        if ev.phi_touch:
            assert ev.trace_id in traces, "PHI infra record outside any application trace"
    assert all(a.record.outcome != "denied" for a in access)


# -- the rules over a real store ---------------------------------------------------------------


@dataclass
class Loaded:
    store: Store
    encoder: RecordEncoder
    anomalous: Scenario
    clean: Scenario
    submit: Any


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loaded]:
    data_dir = tmp_path_factory.mktemp("scenario") / "data"
    data_dir.mkdir()
    ring = KeyRing.open(data_dir)
    index = BlindIndex(ring)
    encoder = RecordEncoder(FieldCipher(ring), index)
    loc = StoreLocation(data_dir=Path(data_dir))
    migrate(loc)
    store = Store.open(loc)
    anomalous, clean = generate(CONFIG, index), generate(CLEAN, index)
    anomalous.write(store, encoder, writer_id="scenario-a")
    clean.write(store, encoder, writer_id="scenario-c")
    writer = BatchWriter(store, "rules-test", [
        TableSpec("alerts", ALERT_COLUMNS, chained=True, dedup_column="alert_id"),
        TableSpec("rule_runs", RULE_RUN_COLUMNS, chained=False),
    ])
    writer.start()

    def submit(tables: dict[str, list[list[Any]]]) -> None:
        # a unique request key: with None, two equal-sized rule_runs inserts could share an
        # insert deduplication token and the second be dropped
        writer.submit(uuid.uuid4().bytes, tables).result(timeout=120)

    try:
        yield Loaded(store, encoder, anomalous, clean, submit)
    finally:
        writer.shutdown()
        store.close()


def rules_config(sc: Scenario) -> Any:
    """The hospital's rules section, as its security team would write it."""
    from phiaudit.rules import RulesConfig

    cfg = sc.config
    return RulesConfig.from_mapping({
        "settings": {
            "bulk-access": {"threshold": cfg.bulk_threshold},
            "large-export": {"max_records": cfg.export_threshold},
            "off-hours": {"schedule": sc.schedule_config()},
            "failed-auth-user": {"threshold": cfg.failed_login_threshold},
            "failed-auth-source": {"threshold": cfg.failed_login_threshold},
            "success-after-failures": {"failures": cfg.failed_login_threshold},
        },
    })


def _backfill(loaded: Loaded, sc: Scenario) -> list[Any]:
    from phiaudit.rules import BUILTIN_RULE_IDS, RuleEngine, load_rules

    config = rules_config(sc)
    rules = load_rules(config)
    assert {r.id for r in rules} == set(BUILTIN_RULES) == set(BUILTIN_RULE_IDS)
    engine = RuleEngine(loaded.store, loaded.submit, loaded.encoder, rules, config)
    return engine.backfill(sc.start_us, sc.end_us)


def score(sc: Scenario, alerts: list[Any]) -> dict[str, dict[str, Any]]:
    out = {}
    for rule in BUILTIN_RULES:
        labels = sc.labelled(rule)
        mine = [a for a in alerts if a.rule_id == rule]
        tp = [a for a in mine if any(set(a.evidence) & lab.event_ids for lab in labels)]
        fn = [lab for lab in labels if not any(set(a.evidence) & lab.event_ids for a in mine)]
        out[rule] = {
            "injected": len(labels), "alerts": len(mine), "tp": len(tp),
            "fp": len(mine) - len(tp), "fn": len(fn),
            "precision": len(tp) / len(mine) if mine else (1.0 if not labels else 0.0),
            "recall": (len(labels) - len(fn)) / len(labels) if labels else 1.0,
            "missed": [lab.case for lab in fn],
        }
    return out


def _table(title: str, scores: dict[str, dict[str, Any]]) -> str:
    lines = [title, f"{'rule':<24}{'injected':>9}{'alerts':>8}{'TP':>5}{'FP':>5}{'FN':>5}"
                    f"{'precision':>11}{'recall':>8}"]
    for rule, s in scores.items():
        lines.append(f"{rule:<24}{s['injected']:>9}{s['alerts']:>8}{s['tp']:>5}{s['fp']:>5}"
                     f"{s['fn']:>5}{s['precision']:>11.2f}{s['recall']:>8.2f}")
    return "\n".join(lines)


def test_every_builtin_rule_catches_its_cases_and_nothing_else(
        loaded: Loaded, capsys: pytest.CaptureFixture[str]) -> None:
    sc = loaded.anomalous
    alerts = _backfill(loaded, sc)
    scores = score(sc, alerts)
    with capsys.disabled():  # the table belongs in every run's output, CI's included
        print("\n" + _table(f"scenario seed {CONFIG.seed}: {len(sc.audit)} audit events, "
                            f"{len(sc.infra)} infra events, {len(sc.access)} trail reads, "
                            f"{len(sc.encounters)} encounters", scores))
    problems = {r: {"fp": s["fp"], "missed": s["missed"]} for r, s in scores.items()
                if s["recall"] < 1.0 or s["precision"] < 1.0}
    assert not problems
    # the alerts are stored (chained), with their evidence, and a second backfill adds none
    _, rows = loaded.store.query(
        "SELECT count() FROM alerts WHERE window_start >= fromUnixTimestamp64Micro({a:Int64}) "
        "AND window_start < fromUnixTimestamp64Micro({b:Int64})",
        {"a": sc.start_us - 86_400_000_000, "b": sc.end_us})
    assert rows[0][0] == len(alerts)
    assert not _backfill(loaded, sc)
    _, rows = loaded.store.query(
        "SELECT count() FROM alerts WHERE window_start >= fromUnixTimestamp64Micro({a:Int64}) "
        "AND window_start < fromUnixTimestamp64Micro({b:Int64})",
        {"a": sc.start_us - 86_400_000_000, "b": sc.end_us})
    assert rows[0][0] == len(alerts)


def test_clean_hospital_raises_no_alert(loaded: Loaded,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    sc = loaded.clean
    alerts = _backfill(loaded, sc)
    with capsys.disabled():
        print("\n" + _table(f"clean scenario seed {CLEAN.seed}: {len(sc.audit)} audit events",
                            score(sc, alerts)))
    assert Counter(a.rule_id for a in alerts) == Counter()
    assert {a.rule_id for a in alerts} <= set(BUILTIN_RULES)


def test_labels_use_real_event_ids(loaded: Loaded) -> None:
    """The labels' events are in the store, under the ids the scenario gave them."""
    sc = loaded.anomalous
    for lab in sc.labels:
        ids = [str(i) for i in lab.event_ids]
        _, rows = loaded.store.query(
            f"SELECT count() FROM {lab.table} WHERE toString(event_id) IN {{ids:Array(String)}}",
            {"ids": ids})
        assert rows[0][0] == len(ids), lab.case
    assert uuid.UUID(ids[0])
