"""``phiaudit retention`` and ``phiaudit keys``: retention report, legal holds, lawful purge,
and key status and rotation. All of them need a credential; changes need the security role.

Retention works on the embedded store directly (the service must be stopped): dropping a
partition needs the administrator engine, which cannot run beside the service's own.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import secrets
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from phiaudit.storage import (
    AccessDenied,
    AccessRecord,
    AuditEvent,
    Credentials,
    KeyRing,
    StorageUnavailable,
)
from phiaudit.storage._retention import (
    HOLD_COLUMNS as _HOLD_COLUMNS,
)
from phiaudit.storage._retention import (
    RETENTION_YEARS,
    active_holds,
    list_partitions,
    plan_purge,
)
from phiaudit.storage._store import disk_key_env

__all__ = ["add_parsers", "run_keys", "run_retention"]


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    r = sub.add_parser("retention", parents=[common],
                       help="retention report, legal holds and lawful purge")
    r.add_argument("--token-file", help="file holding the credential (default $PHIAUDIT_TOKEN)")
    rs = r.add_subparsers(dest="retention_command")
    rs.add_parser("report", help="oldest data and earliest lawful purge date (the default)")
    h = rs.add_parser("hold", help="place a legal hold over a time range (security role)")
    h.add_argument("--from", dest="start", required=True, help="YYYY-MM-DD")
    h.add_argument("--to", dest="end", required=True, help="YYYY-MM-DD (inclusive)")
    h.add_argument("--reason", required=True, help="case reference; no PHI")
    rel = rs.add_parser("release", help="release a legal hold (security role)")
    rel.add_argument("hold_id")
    p = rs.add_parser("purge", help="drop whole partitions older than a date (security role)")
    p.add_argument("--before", required=True, help="YYYY-MM-DD")
    k = sub.add_parser("keys", parents=[common], help="key ring status and rotation")
    k.add_argument("--token-file", help="file holding the credential (default $PHIAUDIT_TOKEN)")
    ks = k.add_subparsers(dest="keys_command", required=True)
    ks.add_parser("status", help="key ids, purposes, creation dates (no material)")
    ks.add_parser("rotate", help="new data key for new rows; old keys are kept (security role)")


def _date(text: str, what: str) -> _dt.datetime:
    try:
        return _dt.datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=_dt.UTC)
    except ValueError:
        raise AccessDenied(f"{what}: expected YYYY-MM-DD") from None


def run_keys(args: argparse.Namespace, data_dir: Path, token: str) -> int:
    who = Credentials(data_dir).authenticate(token)
    ring = KeyRing.open(data_dir, create=False)
    if args.keys_command == "rotate":
        if who.role != "security":
            raise AccessDenied("only the security role may rotate keys")
        key_id = ring.rotate("data")
        print(f"phiaudit: new data key {key_id}; new rows use it from the service's next start,"
              " old keys stay for reading")
        return 0
    for entry in ring.status():
        active = "active" if entry["active"] else "kept"
        print(f"key {entry['id']:>3}  {entry['purpose']:<6} {active:<7} created {entry['created']}")
    return 0


def _event(who: Any, action_outcome: str, table: str, partition: str, rows: int,
           extra: dict[str, Any]) -> AuditEvent:
    now = time.time_ns() // 1000
    return AuditEvent(
        event_id=uuid.uuid4(), event_time_us=now, received_time_us=now, action="delete",
        outcome=action_outcome, source="cli", outcome_reason="explicit", actor_id=who.name,
        actor_type="user", actor_roles=[who.role], service_name="phiaudit",
        resource_type="AuditPartition", resource_id=f"{table}/{partition}", record_count=rows,
        purpose="retention", extra=extra)


def run_retention(args: argparse.Namespace, local_factory: Any, token: str) -> int:
    command = args.retention_command or "report"
    local = local_factory()
    try:
        who = local.credentials.authenticate(token)
        if command != "report" and who.role != "security":
            local._record_access(AccessRecord(who.name, who.role, "direct",
                                              f"retention {command}", False, 0, "denied",
                                              "security role required"))
            raise AccessDenied(f"only the security role may {command}")
        if command == "report":
            return _report(local, who)
        if command == "hold":
            return _hold(local, who, args)
        if command == "release":
            return _release(local, who, args.hold_id)
        return _purge(local, local_factory, who, args)
    finally:
        local.close()


def _report(local: Any, who: Any) -> int:
    parts = list_partitions(local.store)
    holds = active_holds(local.store)
    local._record_access(AccessRecord(who.name, who.role, "direct", "retention report", False,
                                      len(parts), "ok", ""))
    print(f"retention: {RETENTION_YEARS} years from the newest row of each monthly partition")
    for table in sorted({p.table for p in parts}):
        mine = [p for p in parts if p.table == table]
        oldest = min(p.oldest for p in mine)
        first = min(p.purge_after for p in mine)
        print(f"  {table:<14} {sum(p.rows for p in mine):>12,} rows  oldest "
              f"{oldest.date().isoformat()}  earliest lawful purge {first.date().isoformat()}")
    for h in holds:
        print(f"  legal hold {h.hold_id}: {h.start.date().isoformat()} .. "
              f"{h.end.date().isoformat()} ({h.reason}) by {h.principal}")
    return 0


def _append_hold(local: Any, hold_id: str, action: str, start: _dt.datetime,
                 end: _dt.datetime, reason: str, principal: str) -> None:
    now = time.time_ns() // 1000
    kept = local.store.insert_rows(
        "legal_holds", _HOLD_COLUMNS,
        [[hold_id, action, int(start.timestamp() * 1e6), int(end.timestamp() * 1e6), reason,
          principal, now]], f"hold:{hold_id}:{action}:{now}")
    if not kept:  # its token has the time in it: never a duplicate, so the row is lost
        raise StorageUnavailable(f"the store did not keep the legal hold's {action} (is its "
                                 "disk full?): nothing was recorded")


def _hold(local: Any, who: Any, args: argparse.Namespace) -> int:
    start = _date(args.start, "--from")
    end = _date(args.end, "--to") + _dt.timedelta(days=1) - _dt.timedelta(microseconds=1)
    if end < start:
        raise AccessDenied("--to is before --from")
    hold_id = "hold-" + secrets.token_hex(4)
    _append_hold(local, hold_id, "place", start, end, args.reason[:500], who.name)
    print(hold_id)
    return 0


def _release(local: Any, who: Any, hold_id: str) -> int:
    hold = next((h for h in active_holds(local.store) if h.hold_id == hold_id), None)
    if hold is None:
        raise AccessDenied(f"no active legal hold {hold_id}")
    _append_hold(local, hold_id, "release", hold.start, hold.end, hold.reason, who.name)
    print(f"released {hold_id}")
    return 0


def _purge(local: Any, local_factory: Any, who: Any, args: argparse.Namespace) -> int:
    before = _date(args.before, "--before")
    now = _dt.datetime.now(_dt.UTC)
    allowed, refused = plan_purge(list_partitions(local.store), active_holds(local.store),
                                  before, now)
    encoder, writer = local.encoder, local.writer
    rows = [encoder.audit_row(_event(who, "failure", p.table, p.partition_id, p.rows,
                                     {"phase": "refused", "reason": why}))
            for p, why in refused]
    rows += [encoder.audit_row(_event(who, "success", p.table, p.partition_id, p.rows,
                                      {"phase": "authorized", "newest": p.newest.isoformat()}))
             for p in allowed]
    if rows:  # recorded before anything is dropped
        writer.submit(None, {"audit_events": rows}).result(timeout=60)
    for p, why in refused:
        print(f"refused  {p.table}/{p.partition_id}: {why}")
    if not allowed:
        print("phiaudit: nothing may be purged before " + before.date().isoformat())
        return 2 if refused else 0
    data_dir, database = str(local.data_dir), local.config.database
    local.close()
    env = dict(os.environ)
    env.update(disk_key_env(Path(data_dir)))  # the engine's disk key, for that process only
    proc = subprocess.run(  # noqa: S603 - our interpreter, our module, validated names
        [sys.executable, "-m", "phiaudit.storage._purge", data_dir, database,
         *(f"{p.table}:{p.partition_id}" for p in allowed)],
        capture_output=True, text=True, timeout=600, check=False, env=env)
    dropped = set(json.loads(proc.stdout).get("dropped", [])) if proc.returncode == 0 else set()
    after = local_factory()
    try:
        done = [after.encoder.audit_row(_event(
            who, "success" if f"{p.table}:{p.partition_id}" in dropped else "failure",
            p.table, p.partition_id, p.rows, {"phase": "purged"})) for p in allowed]
        after.writer.submit(None, {"audit_events": done}).result(timeout=60)
    finally:
        after.close()
    for p in allowed:
        state = "purged " if f"{p.table}:{p.partition_id}" in dropped else "FAILED "
        print(f"{state} {p.table}/{p.partition_id}: {p.rows} rows, newest "
              f"{p.newest.date().isoformat()}")
    return 0 if len(dropped) == len(allowed) else 1

