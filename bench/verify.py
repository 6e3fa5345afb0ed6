"""`phiaudit verify` speed: rows verified per second on a store of at least a million events.

    .venv/bin/python bench/verify.py                 # 1,000,000 rows (about a minute to build)
    .venv/bin/python bench/verify.py --rows 2000000

Builds an embedded store in a temporary directory the way the service does (migrations by the
admin engine in a child process, then the restricted engine here), fills ``audit_events`` with
synthetic rows that carry a correct hash chain (real encrypted rows used as templates, new
event ids and times, linked by ``link_rows`` and inserted in 50k-row Arrow blocks), signs
checkpoints at a quarter, half and all of the chain into the table and a directory anchor,
then times ``verify()`` over everything: row hashes and links in SQL, Merkle roots, signatures,
anchor. The baseline, measured in the same run, is the Python fallback over a 100k-row writer.
Target: at least 200,000 rows/s. Prints PASS or MISS, never asserts; JSON in
``bench/results/verify.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from phiaudit.storage import (
    AUDIT_COLUMNS,
    AuditEvent,
    ChainState,
    Checkpoint,
    CompactRange,
    DirectoryAnchor,
    KeyRing,
    RecordEncoder,
    SigningKey,
    Store,
    StoreLocation,
    canonical_encoder,
    leaf_hash,
    link_rows,
    migrate,
    origin_for,
    public_keys,
    store_checkpoint,
    verify,
)

TARGET = 200_000
BATCH = 50_000
RESULTS = Path(__file__).resolve().parent / "results" / "verify.json"


def _templates(encoder: RecordEncoder, n: int = 512) -> list[list[Any]]:
    actions = ["read", "search", "update", "disclose"]
    return [encoder.audit_row(AuditEvent(
        event_id=uuid.uuid4(), event_time_us=1_764_000_000_000_000 + i,
        received_time_us=1_764_000_000_000_000 + i, action=actions[i % 4],
        outcome="success" if i % 31 else "failure", actor_id=f"user-{i % 97}",
        actor_type="user", actor_roles=["physician"], service_name="ehr-api",
        host_name="app-1", resource_type="Observation", resource_id=f"obs-{i}",
        patient_id=f"pat-{i:06d}", purpose="TREAT", client_address="10.0.0.1",
        user_agent="Mozilla/5.0", http_method="GET", http_route="/fhir/Observation/{id}",
        http_status=200, trace_id=f"{i:032x}", span_id=f"{i:016x}", sender="bench"))
        for i in range(n)]


def fill(store: Store, templates: list[list[Any]], writer: str, rows: int,
         key: SigningKey, anchor: DirectoryAnchor, sizes: list[int]) -> None:
    enc = canonical_encoder(AUDIT_COLUMNS)
    state = ChainState(writer)
    tree = CompactRange()
    t0 = 1_764_000_000_000_000
    i_hash = [c.name for c in AUDIT_COLUMNS].index("hash")
    done = 0
    while done < rows:
        n = min(BATCH, rows - done)
        batch = []
        for j in range(done, done + n):
            row = list(templates[j % len(templates)])
            row[0] = uuid.uuid4()
            row[1] = row[2] = t0 + j * 1000
            batch.append(row)
        seq, head = link_rows(state, AUDIT_COLUMNS, batch, enc)
        store.insert_rows("audit_events", AUDIT_COLUMNS, batch, f"bench:{writer}:{seq}")
        state.seq, state.head = seq, head
        for row in batch:
            tree.append(leaf_hash(row[i_hash]))
            if tree.size in sizes:
                cp = key.sign(Checkpoint(origin_for(store.database, "audit_events"), writer,
                                         tree.size, tree.root(), time.time_ns() // 1000))
                anchor.put(cp)
                store_checkpoint(store, cp)
        done += n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--baseline-rows", type=int, default=100_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="phiaudit-bench-verify-") as tmp:
        data_dir = Path(tmp) / "data"
        loc = StoreLocation(data_dir=data_dir)
        migrate(loc)
        store = Store.open(loc)
        ring = KeyRing.open(data_dir)
        encoder = RecordEncoder.for_ring(ring)
        key = SigningKey.open(data_dir)
        anchor = DirectoryAnchor(Path(tmp) / "data.anchor", data_dir)
        anchor.put_public_key(key.key_id, key.public)
        templates = _templates(encoder)
        t = time.perf_counter()
        n = args.rows
        fill(store, templates, "bench-main", n, key, anchor, [n // 4, n // 2, n])
        fill(store, templates, "bench-small", args.baseline_rows, key, anchor,
             [args.baseline_rows])
        build_s = time.perf_counter() - t
        print(f"built {n + args.baseline_rows:,} rows in {build_s:.1f} s")
        keys = public_keys(data_dir)

        t = time.perf_counter()
        base = verify(store, keys=keys, anchor=anchor, mode="python", writers=["bench-small"])
        base_s = time.perf_counter() - t
        t = time.perf_counter()
        report = verify(store, keys=keys, anchor=anchor, mode="sql", writers=["bench-main"])
        sql_s = time.perf_counter() - t
        t = time.perf_counter()
        full = verify(store, keys=keys, anchor=anchor)
        full_s = time.perf_counter() - t
        store.close()
    rate = report.rows / sql_s
    base_rate = base.rows / base_s
    result = {
        "rows": report.rows, "seconds": round(sql_s, 3), "rows_per_s": round(rate),
        "ok": report.ok and base.ok and full.ok, "findings": len(report.findings),
        "checkpoints": report.checkpoints,
        "baseline_python_rows": base.rows, "baseline_python_rows_per_s": round(base_rate),
        "ratio_vs_python": round(rate / base_rate, 2),
        "whole_store_rows": full.rows, "whole_store_seconds": round(full_s, 3),
        "whole_store_rows_per_s": round(full.rows / full_s),
        "target_rows_per_s": TARGET, "build_seconds": round(build_s, 1),
        "verdict": "PASS" if rate >= TARGET and report.ok else "MISS",
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(f"verify (SQL): {report.rows:,} rows in {sql_s:.2f} s = {rate:,.0f} rows/s "
          f"(Python fallback {base_rate:,.0f} rows/s, x{rate / base_rate:.1f}); "
          f"whole store {full.rows:,} rows {full.rows / full_s:,.0f} rows/s; "
          f"clean={result['ok']}")
    print(f"{result['verdict']}: target {TARGET:,} rows/s")


if __name__ == "__main__":
    main()
