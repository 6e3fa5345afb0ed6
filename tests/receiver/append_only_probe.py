"""Tries to rewrite history through the service's own store connection; prints what happened.

``python -m tests.receiver.append_only_probe DATA_DIR`` (no service may be running on
DATA_DIR: one engine per process and per data directory). It opens the store exactly as the
service does (``migrate`` then ``Store.open(StoreLocation(data_dir=...))``), runs every
destructive statement the test names against ``audit_events`` and ``access_log`` (through
the query connection and through the second engine handle the store streams inserts to),
checks that
INSERT and SELECT still work, and prints one JSON document on stdout:

``{"attacks": [{"table", "sql", "ok", "error", "message"}], "before": {...}, "after": {...},
"insert": {...}, "create": {table: SHOW CREATE TABLE text}}``

It is a separate process because the engine is per process (FACTS.md); it uses no test double.
"""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path
from typing import Any

from phiaudit.storage import PhiAuditError, Store, StoreLocation, migrate
from phiaudit.storage._store import _map_error

TABLES = ("audit_events", "access_log")
ALL_TABLES = ("audit_events", "access_log", "otel_traces", "otel_traces_trace_id_ts",
              "schema_migrations")


def attacks(table: str) -> list[str]:
    return [
        f"ALTER TABLE {table} DELETE WHERE 1",
        f"ALTER TABLE {table} UPDATE outcome = 'x' WHERE 1",
        f"DELETE FROM {table} WHERE 1",
        f"TRUNCATE TABLE {table}",
        f"DROP TABLE {table}",
        f"OPTIMIZE TABLE {table} FINAL",
        f"RENAME TABLE {table} TO {table}_old",
        f"DETACH TABLE {table}",
        f"ALTER TABLE {table} MODIFY TTL toDateTime(received_time) + INTERVAL 1 DAY"
        if table == "audit_events" else
        f"ALTER TABLE {table} MODIFY TTL toDateTime(time) + INTERVAL 1 DAY",
        f"ALTER TABLE {table} DROP PARTITION tuple()",
        f"ALTER TABLE {table} DROP PARTITION ID 'all'",
        f"ALTER TABLE {table} DETACH PARTITION ID 'all'",
        f"ALTER TABLE {table} ADD COLUMN evil String",
        f"ALTER TABLE {table} DROP COLUMN key_id",
        f"ALTER TABLE {table} MODIFY SETTING non_replicated_deduplication_window = 0",
        "SELECT * FROM file('/etc/passwd', 'LineAsString')",
        "INSERT INTO FUNCTION file('probe-out.csv', 'CSV', 'a String') SELECT 'x'",
        f"INSERT INTO FUNCTION file('probe-out2.csv', 'CSV') SELECT * FROM {table}",
    ]


def _counts(store: Store) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for table in TABLES:
        _, rows = store.query(f"SELECT count(), groupArraySorted(100000)(toString(event_id)) "
                              f"FROM {table}")
        out[table] = {"count": int(rows[0][0]), "ids": list(rows[0][1])}
    return out


def main(argv: list[str]) -> int:
    data_dir = Path(argv[0]).resolve()
    location = StoreLocation(data_dir=data_dir)
    migrate(location)
    store = Store.open(location)
    report: dict[str, Any] = {"attacks": [], "create": {}}
    try:
        report["before"] = _counts(store)
        seen: set[str] = set()
        targets = [(table, sql) for table in TABLES for sql in attacks(table)]
        targets += [("*", "DROP DATABASE phiaudit"), ("*", "CREATE TABLE evil (a String) "
                                                           "ENGINE = Memory")]
        for table, sql in targets:
            if sql in seen:
                continue
            seen.add(sql)
            entry: dict[str, Any] = {"table": table, "sql": sql, "ok": True}
            try:
                store.command(sql)
            except PhiAuditError as exc:
                entry.update(ok=False, error=type(exc).__name__, message=str(exc))
            report["attacks"].append(entry)
            # the second handle on the engine, which the store streams inserts through
            entry = {"table": table, "sql": sql, "ok": True, "via": "insert handle"}
            try:
                store._engine.query(sql, "CSV")
            except Exception as exc:
                mapped = _map_error(exc, "probe")
                entry.update(ok=False, error=type(mapped).__name__, message=str(mapped))
            report["attacks"].append(entry)
        report["after"] = _counts(store)
        # INSERT and SELECT still work through the same connection
        new_id = str(uuid.uuid4())
        store.insert("access_log", ["event_id", "principal", "outcome", "interface"],
                     [[uuid.UUID(new_id)], ["append-only-probe"], ["ok"], ["direct"]],
                     token=f"probe-{new_id}")
        _, rows = store.query("SELECT count() FROM access_log WHERE event_id = {i:UUID}",
                              {"i": new_id})
        report["insert"] = {"event_id": new_id, "found": int(rows[0][0])}
        _, listed = store.query(
            "SELECT name FROM system.tables "
            "WHERE database = currentDatabase() AND engine != 'MaterializedView'")
        for table in sorted({str(name) for (name,) in listed} | set(ALL_TABLES)):
            try:
                _, rows = store.query(f"SHOW CREATE TABLE {table}")
                report["create"][table] = str(rows[0][0])
            except PhiAuditError as exc:
                report["create"][table] = f"ERROR {exc}"
    finally:
        store.close()
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
