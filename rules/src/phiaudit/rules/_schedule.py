"""Working-hour schedules of the ``off-hours`` rule: the ``outside_schedule`` selection.

A rule whose parameters hold a ``schedule`` may use ``outside_schedule`` in its detection
condition. The schedule gives working days and hours in a time zone, by default and per role
or per user (a user's own schedule wins over their roles'; with several roles, any one
role's schedule allows the access)::

    schedule:
      timezone: America/New_York
      days: [mon, tue, wed, thu, fri]     # or ISO numbers 1-7
      hours: [7, 19]                      # from 07:00 to 19:00; [22, 6] spans midnight
      roles: {nurse: {days: all, hours: [0, 24]}}
      users: {dr-night: {hours: [19, 8]}}
    baseline: schedule                    # or history: each actor's own usual hours
    history_days: 14                      # history: the previous N days ...
    history_min_events: 3                 # ... an hour-of-day with fewer events is unusual
"""

from __future__ import annotations

import zoneinfo
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["check_schedule", "schedule_sql"]

_DAYS = {"mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6, "sun": 7}
_ENTRY_KEYS = {"timezone", "days", "hours"}

Bind = Callable[[Any, str], str]


def _days(raw: Any) -> list[int] | None:
    if raw == "all":
        return list(range(1, 8))
    if not isinstance(raw, list) or not raw:
        return None
    out = []
    for d in raw:
        if isinstance(d, str) and d.lower()[:3] in _DAYS:
            out.append(_DAYS[d.lower()[:3]])
        elif isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= 7:
            out.append(d)
        else:
            return None
    return sorted(set(out))


def _check_entry(raw: Any, path: str, errors: list[str], default: bool) -> None:
    if not isinstance(raw, dict):
        errors.append(f"{path}: a mapping with timezone, days and hours")
        return
    for key in raw:
        if key not in _ENTRY_KEYS and not (default and key in ("roles", "users")):
            errors.append(f"{path}: unknown key {key!r}" if isinstance(key, str)
                          and len(key) < 40 else f"{path}: unknown key")
    if "timezone" in raw:
        tz = raw["timezone"]
        try:
            if not isinstance(tz, str) or not tz or ".." in tz:
                raise ValueError
            zoneinfo.ZoneInfo(tz)
        except (ValueError, zoneinfo.ZoneInfoNotFoundError):
            errors.append(f"{path}.timezone: not a known time zone (e.g. UTC, Europe/Paris)")
    if "days" in raw and _days(raw["days"]) is None:
        errors.append(f"{path}.days: a list of mon..sun (or 1-7), or 'all'")
    if "hours" in raw:
        h = raw["hours"]
        if (not isinstance(h, list) or len(h) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= 24
                           for x in h) or h[0] == h[1]):
            errors.append(f"{path}.hours: [start, end] hours from 0 to 24, e.g. [7, 19]")


def check_schedule(params: Mapping[str, Any], path: str, errors: list[str]) -> None:
    sched = params["schedule"]
    _check_entry(sched, f"{path}.schedule", errors, default=True)
    if not isinstance(sched, dict):
        return
    for group in ("roles", "users"):
        entries = sched.get(group, {})
        if not isinstance(entries, dict):
            errors.append(f"{path}.schedule.{group}: a mapping of name: schedule")
            continue
        for name, entry in entries.items():
            if not isinstance(name, str) or not name or len(name) > 200:
                errors.append(f"{path}.schedule.{group}: names are non-empty strings")
                continue
            _check_entry(entry, f"{path}.schedule.{group}.(entry)", errors, default=False)
    baseline = params.get("baseline", "schedule")
    if baseline not in ("schedule", "history"):
        errors.append(f"{path}.baseline: schedule or history")
    for key, lo, hi in (("history_days", 1, 365), ("history_min_events", 1, 1_000_000)):
        v = params.get(key, lo)
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            errors.append(f"{path}.{key}: an integer from {lo} to {hi}")


def _entry(base: Mapping[str, Any], over: Mapping[str, Any]) -> tuple[str, list[int], int, int]:
    tz = str(over.get("timezone", base.get("timezone", "UTC")))
    days = _days(over.get("days", base.get("days", [1, 2, 3, 4, 5]))) or []
    start, end = over.get("hours", base.get("hours", [7, 19]))
    return tz, days, int(start), int(end)


def _inside(entry: tuple[str, list[int], int, int], time_col: str, bind: Bind) -> str:
    tz, days, start, end = entry
    tzp = bind(tz, "String")
    hour = f"toHour({time_col}, {tzp})"
    if start < end:
        hours = f"({hour} >= {bind(start, 'UInt8')} AND {hour} < {bind(end, 'UInt8')})"
    else:
        hours = f"({hour} >= {bind(start, 'UInt8')} OR {hour} < {bind(end, 'UInt8')})"
    dow = f"toDayOfWeek({time_col}, 0, {tzp})"
    return f"({dow} IN {bind(days, 'Array(UInt8)')} AND {hours})"


def schedule_sql(params: Mapping[str, Any], time_col: str, bind: Bind,
                 history: Callable[[str], str]) -> str:
    """The SQL of ``outside_schedule`` for one row of audit_events. ``history(tz)`` gives the
    (actor_id, hour) set of usual hours for the history baseline."""
    sched: Mapping[str, Any] = params["schedule"]
    if params.get("baseline", "schedule") == "history":
        tz = str(sched.get("timezone", "UTC"))
        return (f"((actor_id, toHour({time_col}, {bind(tz, 'String')})) "
                f"NOT IN ({history(tz)}))")
    users: Mapping[str, Any] = sched.get("users", {}) or {}
    roles: Mapping[str, Any] = sched.get("roles", {}) or {}
    default = _inside(_entry(sched, {}), time_col, bind)
    branches: list[str] = []
    if users:
        per_user = " OR ".join(
            f"(actor_id = {bind(u, 'String')} AND {_inside(_entry(sched, e), time_col, bind)})"
            for u, e in users.items())
        branches += [f"actor_id IN {bind(list(users), 'Array(String)')}", f"({per_user})"]
    if roles:
        per_role = " OR ".join(
            f"(has(actor_roles, {bind(r, 'String')}) AND "
            f"{_inside(_entry(sched, e), time_col, bind)})" for r, e in roles.items())
        branches += [f"hasAny(actor_roles, {bind(list(roles), 'Array(String)')})",
                     f"({per_role})"]
    allowed = f"multiIf({', '.join([*branches, default])})" if branches else default
    return f"(NOT {allowed})"
