"""Retention: nothing is deleted before its six years are up, and never silently.

HIPAA 164.316(b)(2)(i) asks for six years from creation or from the date last in effect.
No table has a TTL; phiaudit enforces retention itself:

* a partition (one month of one table) may be purged only when its NEWEST row is at least
  ``RETENTION_YEARS`` old, measured from both the event time and the time phiaudit received it;
* never when an active legal hold overlaps the partition's time range (holds are rows of the
  append-only ``legal_holds`` table: placing and releasing are both appended);
* only whole partitions are dropped, by an administrator engine (the service's own connection
  cannot drop anything), and each purge is itself recorded as an audit event.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from typing import Any

from ._schema import HOLD_COLUMNS

__all__ = [
    "HOLD_COLUMNS",
    "RETENTION_YEARS",
    "TIME_COLUMNS",
    "Hold",
    "Partition",
    "active_holds",
    "lawful_purge_date",
    "list_partitions",
    "plan_purge",
]

RETENTION_YEARS = 6

#: The time that starts each table's retention clock (the newest of these, per partition).
TIME_COLUMNS: dict[str, str] = {
    "audit_events": "greatest(event_time, received_time)",
    "access_log": "time",
    "otel_traces": "toDateTime64(Timestamp, 6, 'UTC')",
    "checkpoints": "time",
    "legal_holds": "time",
}


def lawful_purge_date(newest: _dt.datetime) -> _dt.datetime:
    """The first moment a row created at ``newest`` may lawfully be purged."""
    try:
        return newest.replace(year=newest.year + RETENTION_YEARS)
    except ValueError:  # 29 February
        return newest.replace(year=newest.year + RETENTION_YEARS, month=3, day=1)


@dataclass(frozen=True)
class Partition:
    table: str
    partition_id: str
    oldest: _dt.datetime
    newest: _dt.datetime
    rows: int

    @property
    def purge_after(self) -> _dt.datetime:
        return lawful_purge_date(self.newest)


@dataclass(frozen=True)
class Hold:
    hold_id: str
    start: _dt.datetime
    end: _dt.datetime
    reason: str
    principal: str


def _utc(v: Any) -> _dt.datetime:
    if isinstance(v, _dt.datetime):
        return v if v.tzinfo else v.replace(tzinfo=_dt.UTC)
    raise TypeError("expected a datetime")


def list_partitions(store: Any, tables: list[str] | None = None) -> list[Partition]:
    out: list[Partition] = []
    for table in tables or list(TIME_COLUMNS):
        expr = TIME_COLUMNS[table]
        _, rows = store.query(
            f"SELECT _partition_id, min({expr}), max({expr}), count() FROM {table} "
            "GROUP BY _partition_id ORDER BY _partition_id")
        out += [Partition(table, str(p), _utc(lo), _utc(hi), int(n)) for p, lo, hi, n in rows]
    return out


def active_holds(store: Any) -> list[Hold]:
    _, rows = store.query(
        "SELECT hold_id, argMax(action, time) AS last, any(start), any(end), any(reason), "
        "any(principal) FROM legal_holds GROUP BY hold_id HAVING last = 'place'")
    return [Hold(str(h), _utc(s), _utc(e), str(r), str(p)) for h, _, s, e, r, p in rows]


def plan_purge(partitions: list[Partition], holds: list[Hold], before: _dt.datetime,
               now: _dt.datetime) -> tuple[list[Partition], list[tuple[Partition, str]]]:
    """Which partitions older than ``before`` may be dropped now, and why the others may not."""
    allowed: list[Partition] = []
    refused: list[tuple[Partition, str]] = []
    for part in partitions:
        if part.newest >= before:
            continue
        if now < part.purge_after:
            refused.append((part, f"younger than {RETENTION_YEARS} years until "
                                  f"{part.purge_after.date().isoformat()}"))
            continue
        hold = next((h for h in holds if h.start <= part.newest and part.oldest <= h.end), None)
        if hold is not None:
            refused.append((part, f"under legal hold {hold.hold_id}"))
            continue
        allowed.append(part)
    return allowed, refused
