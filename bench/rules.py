"""Rule engine speed: one minute of traffic (``run_due``) and a one-day backfill of a large store.

    .venv/bin/python bench/rules.py                     # 10,000,000 events over 5 days
    .venv/bin/python bench/rules.py --events 1000000    # smaller, quicker
    .venv/bin/python bench/rules.py --keep /tmp/rules-store   # keep (and reuse) the store
    .venv/bin/python bench/rules.py --keep /tmp/rules-store --time-index add   # proposal

Builds an embedded store (migrations by the admin engine, encrypted disk) and fills it with
ClickHouse itself, in a child process with the admin engine (``INSERT ... SELECT ... FROM
numbers(N)``; one chDB engine per process):

* ``audit_events`` (80% of the events): 3,000 actors (physicians, nurses, billing clerks, a
  skewed activity), 200,000 patients as blind indexes (32 hex), each actor working on a pool
  of 40 patients; reads, searches, updates, logins (5% failed), logouts, disclosures, exports
  (rarely above the threshold), a break-glass now and then, and a few accesses outside the
  actor's patients; times inside working hours 07:00-19:00 UTC but for 0.05% of them; random
  bytes for the encrypted columns, hex trace and span ids;
* ``infra_events`` (20%): pgAudit reads of PHI tables sharing the trace id of an audit event
  (a few without any trace), non-PHI records;
* ``care_relationships``: every actor's pool of patients, over the whole period;
* a few hundred ``access_log`` rows (some refused).

Then, in this process, with the restricted engine and all built-in rules (thresholds and the
schedule set through ``RulesConfig``):

* (a) ``run_due`` for one minute of traffic (about ``events / days / 720`` events in the
  minute) on top of the history, several consecutive minutes, median; baseline: a plain
  ``SELECT actor_id, count() ... GROUP BY actor_id`` over the same minute;
* (b) ``backfill`` of one whole day (all built-in rules); baseline: the same plain query over
  that day.

On a reused store the alerts raised before are not raised again (the engine deduplicates):
the alert count is that of the first run. ``--time-index add`` (or ``drop``) first adds a
minmax skip index on the time columns of the source tables, a schema proposal: the tables are
ordered by (writer_id, seq), so without it every time-window query reads the whole time column.

Targets: (a) under 1 s, (b) under 60 s. The machine is shared and noisy: ratios to the
baselines are printed too. Never asserts. JSON in ``bench/results/rules.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results" / "rules.json"
DAY_US = 86_400_000_000
MIN_US = 60_000_000
#: the store's first day (00:00 UTC); the data covers ``days`` days from it
BASE_US = 1_763_942_400_000_000  # 2025-11-24 00:00 UTC (a Monday)
ACTORS = 3000
PATIENTS = 200_000
POOL = 40
EXPORT_THRESHOLD = 1000


def _generate(data_dir: Path, events: int, days: int) -> None:
    """Child process: fill the store with the admin engine."""
    from phiaudit.storage import admin_client

    client = admin_client(data_dir)
    n_audit = events * 4 // 5
    n_infra = events - n_audit
    # times follow the event number (rows arrive in time order, as the writer appends them):
    # day n // per_day, spread over 07:00-19:00 UTC with a little jitter; 0.05% at any hour
    per_day = -(-n_audit // days)
    t_audit = (
        f"{BASE_US} + intDiv(n, {per_day}) * {DAY_US} + if(cityHash64(n, 1) % 2000 = 0, "
        f"cityHash64(n, 2) % {DAY_US}, 25200000000 + intDiv((n % {per_day}) * 43200000000, "
        f"{per_day}) + cityHash64(n, 2) % 2000000)"
    )
    actor = f"toUInt32(floor({ACTORS} * pow((cityHash64(n, 3) % 1000000) / 1000000, 1.5)))"
    settings = {"max_insert_threads": 2, "max_block_size": 65536, "max_threads": 2}
    steps = [
        ("audit_events", f"""
INSERT INTO phiaudit.audit_events
SELECT
    generateUUIDv4(n) AS event_id,
    fromUnixTimestamp64Micro(toInt64(t), 'UTC') AS event_time,
    fromUnixTimestamp64Micro(toInt64(t + 200000 + cityHash64(n, 4) % 800000), 'UTC'),
    'span', 'span', action,
    if(action = 'login' AND cityHash64(n, 5) % 20 = 0, 'failure', 'success') AS outcome,
    if(outcome = 'failure', 'explicit', ''),
    'u' || toString(a) AS actor_id, 'user',
    [multiIf(a % 10 < 4, 'physician', a % 10 < 8, 'nurse', 'billing')],
    'ehr-api', 'ehr-' || toString(n % 3 + 1),
    if(has_patient, ['Patient', 'Observation', 'MedicationRequest', 'Encounter'][n % 4 + 1], ''),
    if(has_patient, randomString(44), ''),
    if(has_patient,
       lower(hex(substring(MD5('r' || toString(cityHash64(n, 6) % 5000000)), 1, 16))), ''),
    if(has_patient, randomString(40), ''),
    if(has_patient, lower(hex(substring(MD5('p' || toString(pid)), 1, 16))), ''),
    multiIf(action = 'export', if(cityHash64(n, 7) % 500 = 0, 5000, 20 + cityHash64(n, 7) % 400),
            has_patient, 1, 0),
    '', if(has_patient, 'TREAT', ''), '',
    randomString(40), lower(hex(substring(MD5('c' || toString(a)), 1, 16))),
    'Mozilla/5.0 EHRClient/7.4', '',
    if(action IN ('read', 'search'), 'GET', 'POST'), '/fhir/{{type}}/{{id}}',
    if(outcome = 'failure', 401, 200),
    lower(hex(MD5(toString(n)))), lower(hex(substring(MD5(toString(n)), 1, 8))),
    'ehr-api', '', 1,
    'bench', n + 1, randomString(32), randomString(32)
FROM (
    SELECT number AS n, {t_audit} AS t, {actor} AS a,
        multiIf(cityHash64(n, 8) % 10000 < 5500, 'read', cityHash64(n, 8) % 10000 < 6700,
                'search', cityHash64(n, 8) % 10000 < 8500, 'update', cityHash64(n, 8) % 10000
                < 9200, 'login', cityHash64(n, 8) % 10000 < 9800, 'logout', cityHash64(n, 8)
                % 10000 < 9900, 'disclose', cityHash64(n, 8) % 10000 < 9950, 'export',
                cityHash64(n, 8) % 10000 < 9999, 'create', 'break_glass') AS action,
        action IN ('read', 'search', 'update', 'disclose', 'create', 'break_glass')
            AS has_patient,
        if(cityHash64(n, 9) % 20000 = 0, cityHash64(n, 10) % {PATIENTS},
           (a * 65 + cityHash64(n, 9) % {POOL}) % {PATIENTS}) AS pid
    FROM numbers({n_audit})
)"""),
        ("infra_events", f"""
INSERT INTO phiaudit.infra_events
SELECT
    generateUUIDv4(j) AS event_id,
    fromUnixTimestamp64Micro(toInt64(t + 3000), 'UTC'),
    fromUnixTimestamp64Micro(toInt64(t + 1500000), 'UTC'),
    if(phi, 'pgaudit', ['vpcflow', 'cloudtrail'][j % 2 + 1]), 'ok',
    if(phi, 'pg-ehr-1', 'vpc'), if(phi, if(bypass, 'dba_admin', 'ehr_app'), ''),
    randomString(24), lower(hex(substring(MD5('c' || toString(j % 50)), 1, 16))),
    if(phi, 'SELECT', 'ACCEPT'), if(phi, 'table', 'endpoint'), randomString(40),
    lower(hex(substring(MD5('o' || toString(j % 20)), 1, 16))),
    phi, if(phi, 'public.patients', ''), 'success', 1,
    if(phi AND NOT bypass, lower(hex(MD5(toString(n)))), ''),
    if(phi AND NOT bypass, lower(hex(substring(MD5(toString(n)), 1, 8))), ''),
    'otel-collector', randomString(160), 1,
    'bench', j + 1, randomString(32), randomString(32)
FROM (
    SELECT number AS j, j * 4 AS n, {t_audit} AS t,
        j % 10 < 8 AS phi, cityHash64(j, 11) % 200000 = 0 AS bypass
    FROM numbers({n_infra})
)"""),
        ("care_relationships", f"""
INSERT INTO phiaudit.care_relationships
SELECT 'u' || toString(intDiv(number, {POOL})),
    lower(hex(substring(MD5('p' || toString((intDiv(number, {POOL}) * 65 + number % {POOL})
        % {PATIENTS})), 1, 16))),
    fromUnixTimestamp64Micro(toInt64({BASE_US - DAY_US}), 'UTC'),
    fromUnixTimestamp64Micro(toInt64({BASE_US + (days + 1) * DAY_US}), 'UTC'),
    'encounter', 'bench-care-1', fromUnixTimestamp64Micro(toInt64({BASE_US - DAY_US}), 'UTC'),
    'bench'
FROM numbers({ACTORS * POOL})"""),
        ("access_log", f"""
INSERT INTO phiaudit.access_log
SELECT generateUUIDv4(number),
    fromUnixTimestamp64Micro(toInt64({BASE_US} + (number % {days}) * {DAY_US} + 32400000000
        + cityHash64(number) % 28800000000), 'UTC'),
    if(number % 50 = 0, '(unauthenticated)', 'compliance-' || toString(number % 3)),
    if(number % 50 = 0, '', 'compliance'), 'service', randomString(80),
    lower(hex(substring(MD5(toString(number % 40)), 1, 16))), 0, number % 100,
    if(number % 50 = 0, 'denied', 'ok'), if(number % 50 = 0, 'invalid credentials', ''), 1,
    'bench', number + 1, randomString(32), randomString(32)
FROM numbers({100 * days})"""),
    ]
    for table, sql in steps:
        t0 = time.perf_counter()
        client.command(sql, settings=settings)
        print(f"  {table}: {time.perf_counter() - t0:.1f} s", flush=True)
    client.command("OPTIMIZE TABLE phiaudit.audit_events FINAL", settings={"max_threads": 2})
    _write_sizes(client, data_dir)
    client.close()


def _write_sizes(client: Any, data_dir: Path) -> None:
    """The active parts' bytes on disk per table (the directory also holds parts merged
    away and not yet removed)."""
    rows = client.query("SELECT table, sum(rows), sum(bytes_on_disk) FROM system.parts "
                        "WHERE database = 'phiaudit' AND active GROUP BY table").result_rows
    sizes = {str(t): {"rows": int(r), "bytes": int(b)} for t, r, b in rows}
    (data_dir / "bench-sizes.json").write_text(json.dumps(sizes))


def _time_index(data_dir: Path, add: bool) -> None:
    """Child process: add (or drop) a minmax skip index on the time column of the rules'
    source tables (a schema proposal, measured here)."""
    from phiaudit.storage import admin_client

    client = admin_client(data_dir)
    for table, column in (("audit_events", "event_time"), ("infra_events", "event_time"),
                          ("access_log", "time")):
        if not add:
            client.command(f"ALTER TABLE phiaudit.{table} DROP INDEX IF EXISTS idx_time",
                           settings={"mutations_sync": 2})
            continue
        client.command(f"ALTER TABLE phiaudit.{table} ADD INDEX IF NOT EXISTS idx_time "
                       f"{column} TYPE minmax GRANULARITY 1")
        client.command(f"ALTER TABLE phiaudit.{table} MATERIALIZE INDEX idx_time",
                       settings={"mutations_sync": 2})
    _write_sizes(client, data_dir)
    client.close()


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _rules_config(days: int) -> Any:
    from phiaudit.rules import RulesConfig

    return RulesConfig.from_mapping({
        "settings": {
            "off-hours": {"schedule": {"timezone": "UTC", "days": "all", "hours": [7, 19]}},
            "large-export": {"max_records": EXPORT_THRESHOLD},
        },
    })


def _timed(fn: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _measure(data_dir: Path, events: int, days: int, minutes: int) -> dict[str, Any]:
    from phiaudit.rules import RuleEngine, load_rules
    from phiaudit.storage import (
        ALERT_COLUMNS,
        RULE_RUN_COLUMNS,
        BatchWriter,
        KeyRing,
        RecordEncoder,
        Store,
        StoreLocation,
        TableSpec,
    )

    store = Store.open(StoreLocation(data_dir=data_dir))
    ring = KeyRing.open(data_dir)
    encoder = RecordEncoder.for_ring(ring)
    writer = BatchWriter(store, "bench-rules", [
        TableSpec("alerts", ALERT_COLUMNS, chained=True, dedup_column="alert_id"),
        TableSpec("rule_runs", RULE_RUN_COLUMNS, chained=False),
    ])
    writer.start()

    def submit(tables: dict[str, list[list[Any]]]) -> None:
        # a unique request key (with None the unchained rule_runs inserts may be deduplicated)
        writer.submit(uuid.uuid4().bytes, tables).result(timeout=300)

    config = _rules_config(days)
    rules = load_rules(config)
    out: dict[str, Any] = {"events": events, "days": days, "rules": len(rules)}
    _, rows = store.query("SELECT count() FROM audit_events")
    _, irows = store.query("SELECT count() FROM infra_events")
    out["audit_events"], out["infra_events"] = int(rows[0][0]), int(irows[0][0])
    print(f"store: {out['audit_events']:,} audit events, {out['infra_events']:,} infra events, "
          f"{len(rules)} rules")

    def plain(lo: int, hi: int) -> float:
        t, _ = _timed(lambda: store.query(
            "SELECT actor_id, count() FROM audit_events WHERE event_time >= "
            "fromUnixTimestamp64Micro({lo:Int64}, 'UTC') AND event_time < "
            "fromUnixTimestamp64Micro({hi:Int64}, 'UTC') GROUP BY actor_id",
            {"lo": lo, "hi": hi}))
        return t

    # (b) backfill of one whole day (the second to last: history before and after it)
    day = days - 2 if days >= 2 else 0
    lo, hi = BASE_US + day * DAY_US, BASE_US + (day + 1) * DAY_US
    engine = RuleEngine(store, submit, encoder, rules, config)
    base_day = min(plain(lo, hi) for _ in range(3))
    run_from = time.time_ns() // 1000 - 1_000_000  # this run's rule_runs rows (time >= it)
    t_day, alerts = _timed(lambda: engine.backfill(lo, hi))
    _, n_day = store.query(
        "SELECT count() FROM audit_events WHERE event_time >= "
        "fromUnixTimestamp64Micro({lo:Int64}, 'UTC') AND event_time < "
        "fromUnixTimestamp64Micro({hi:Int64}, 'UTC')", {"lo": lo, "hi": hi})
    out["backfill_day"] = {"seconds": round(t_day, 2), "alerts": len(alerts),
                           "events_in_day": int(n_day[0][0]),
                           "baseline_seconds": round(base_day, 3),
                           "ratio": round(t_day / base_day, 1) if base_day else None}
    _, per_rule = store.query(
        "SELECT rule_id, sum(duration_us) / 1e6 AS s FROM rule_runs WHERE mode = 'backfill' "
        "AND window_from >= fromUnixTimestamp64Micro({lo:Int64}, 'UTC') "
        "AND window_to <= fromUnixTimestamp64Micro({hi:Int64}, 'UTC') "
        "AND time >= fromUnixTimestamp64Micro({run:Int64}, 'UTC') GROUP BY rule_id "
        "ORDER BY s DESC", {"lo": lo, "hi": hi, "run": run_from})
    out["backfill_day"]["per_rule_seconds"] = {str(r): round(float(v), 2) for r, v in per_rule}
    print(f"(b) backfill one day ({int(n_day[0][0]):,} audit events): {t_day:.2f} s, "
          f"{len(alerts)} alerts; baseline GROUP BY {base_day:.3f} s; "
          f"ratio {t_day / base_day:.0f}x; target < 60 s: "
          f"{'PASS' if t_day < 60 else 'MISS'}")
    print("    per rule: " + ", ".join(f"{r} {v:.1f} s" for r, v in
                                       out["backfill_day"]["per_rule_seconds"].items()))

    # (a) one minute of traffic: the engine is caught up to 17:00 of the last day, then each
    # run_due evaluates the next minute
    last = BASE_US + (days - 1) * DAY_US
    start = last + 16 * 3600 * 1_000_000
    _, marks = store.query("SELECT toUnixTimestamp64Micro(max(window_to)) FROM rule_runs "
                           "WHERE mode = 'scheduled'")
    if marks and marks[0][0] and int(marks[0][0]) >= start - 3600 * 1_000_000:
        # a reused store: measure minutes after the ones measured before
        start = (int(marks[0][0]) // MIN_US + 5) * MIN_US
    lateness_us = config.lateness_s * 1_000_000
    engine = RuleEngine(store, submit, encoder, rules, config)
    engine.backfill(start - 3600 * 1_000_000, start)
    engine.run_due(start + lateness_us)  # catches up to the watermark, not timed
    runs, bases, minute_events = [], [], []
    for k in range(1, minutes + 1):
        now = start + k * MIN_US + lateness_us
        t, _ = _timed(lambda now=now: engine.run_due(now))
        runs.append(t)
        m_lo = start + (k - 1) * MIN_US
        bases.append(plain(m_lo, m_lo + MIN_US))
        _, c = store.query(
            "SELECT count() FROM audit_events WHERE event_time >= "
            "fromUnixTimestamp64Micro({lo:Int64}, 'UTC') AND event_time < "
            "fromUnixTimestamp64Micro({hi:Int64}, 'UTC')", {"lo": m_lo, "hi": m_lo + MIN_US})
        minute_events.append(int(c[0][0]))
    _, per_rule = store.query(
        "SELECT rule_id, quantileExact(0.5)(duration_us) / 1e6 AS s FROM rule_runs "
        "WHERE mode = 'scheduled' AND window_from >= fromUnixTimestamp64Micro({lo:Int64}, 'UTC') "
        "GROUP BY rule_id ORDER BY s DESC", {"lo": start})
    med, base = statistics.median(runs), statistics.median(bases)
    out["run_due_minute"] = {"median_seconds": round(med, 3),
                             "runs": [round(r, 3) for r in runs],
                             "events_per_minute": int(statistics.median(minute_events)),
                             "baseline_seconds": round(base, 4),
                             "ratio": round(med / base, 1) if base else None,
                             "per_rule_median_seconds": {str(r): round(float(v), 3)
                                                         for r, v in per_rule}}
    print(f"(a) run_due, one minute ({int(statistics.median(minute_events)):,} audit events): "
          f"median {med:.3f} s over {minutes} minutes (min {min(runs):.3f}, max "
          f"{max(runs):.3f}); baseline GROUP BY {base:.4f} s; ratio {med / base:.0f}x; "
          f"target < 1 s: {'PASS' if med < 1 else 'MISS'}")
    print("    per rule (median): " + ", ".join(
        f"{r} {v:.3f} s" for r, v in out["run_due_minute"]["per_rule_median_seconds"].items()))
    writer.shutdown()
    store.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=10_000_000)
    ap.add_argument("--days", type=int, default=5)
    ap.add_argument("--minutes", type=int, default=5, help="minutes of run_due measured")
    ap.add_argument("--keep", type=Path, help="build the store here (or reuse it) and keep it")
    ap.add_argument("--time-index", choices=("add", "drop"),
                    help="first add (or drop) a minmax index on the time columns (a schema "
                         "proposal; the schema has none)")
    ap.add_argument("--generate", type=Path, help=argparse.SUPPRESS)  # child processes
    ap.add_argument("--index-child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.generate:
        _generate(args.generate, args.events, args.days)
        return
    if args.index_child:
        _time_index(args.index_child, args.time_index == "add")
        return
    if args.days < 2 or args.events < 10_000:
        ap.error("at least 2 days and 10,000 events")

    from phiaudit.storage import KeyRing, StoreLocation, migrate

    tmp = None
    if args.keep:
        data_dir = args.keep.resolve()
        reuse = (data_dir / "bench-rules.json").exists()
    else:
        tmp = tempfile.mkdtemp(prefix="phiaudit-bench-rules-")
        data_dir, reuse = Path(tmp), False
    try:
        if reuse:
            meta = json.loads((data_dir / "bench-rules.json").read_text())
            args.events, args.days = meta["events"], meta["days"]
            print(f"reusing {data_dir}: {args.events:,} events over {args.days} days")
            gen_s = meta["generate_seconds"]
        else:
            data_dir.mkdir(parents=True, exist_ok=True)
            KeyRing.open(data_dir)
            migrate(StoreLocation(data_dir=data_dir))
            print(f"generating {args.events:,} events over {args.days} days ...", flush=True)
            t0 = time.perf_counter()
            subprocess.run([sys.executable, __file__, "--generate", str(data_dir),
                            "--events", str(args.events), "--days", str(args.days)],
                           check=True, env=dict(os.environ))
            gen_s = time.perf_counter() - t0
            (data_dir / "bench-rules.json").write_text(json.dumps(
                {"events": args.events, "days": args.days, "generate_seconds": gen_s}))
        if args.time_index:
            t0 = time.perf_counter()
            subprocess.run([sys.executable, __file__, "--index-child", str(data_dir),
                            "--time-index", args.time_index], check=True, env=dict(os.environ))
            print(f"time index: {args.time_index} ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
        size = _dir_bytes(data_dir)
        sizes_file = data_dir / "bench-sizes.json"
        sizes = json.loads(sizes_file.read_text()) if sizes_file.exists() else {}
        active = sum(v["bytes"] for v in sizes.values())
        print(f"generated in {gen_s:.0f} s; store size {active / 2**20:,.0f} MiB in active "
              f"parts (" + ", ".join(f"{t} {v['bytes'] / 2**20:,.0f} MiB" for t, v in
                                     sorted(sizes.items()) if v["bytes"] > 2**20)
              + f"); {size / 2**20:,.0f} MiB in the directory", flush=True)
        out = _measure(data_dir, args.events, args.days, args.minutes)
        out["generate_seconds"] = round(gen_s, 1)
        out["time_index"] = args.time_index == "add"  # ("drop" and no option: none)
        out["store_mib"] = round(active / 2**20, 1)
        out["directory_mib"] = round(size / 2**20, 1)
        out["tables"] = sizes
        out["load"] = os.getloadavg()
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(json.dumps(out, indent=2) + "\n")
        print(f"results in {RESULTS}")
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(tmp + ".keys", ignore_errors=True)  # the generated KEK, beside it


if __name__ == "__main__":
    main()
