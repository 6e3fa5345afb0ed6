"""Care relationships: who may see whom, and when (``phiaudit care load``).

Two input formats:

* ``csv``: a header line ``actor_id,patient_id,start,end[,relationship]``, then one
  relationship per line. Times are ISO 8601 (``2026-03-01T08:00:00Z``; a date alone is that
  whole day; no time zone means UTC); an empty ``end`` leaves the relationship open. The
  relationship defaults to ``care``.
* ``fhir``: FHIR R4 NDJSON, one resource per line, of

  - ``Encounter``: ``participant[].individual`` (R5: ``actor``) -> ``subject``, over the
    participant's ``period``, else the encounter's;
  - ``CareTeam``: ``participant[].member`` -> ``subject``, over the participant's ``period``,
    else the team's;
  - ``EpisodeOfCare``: ``careManager`` -> ``patient``, over ``period``.

  Only ``Practitioner/<id>`` references become actors (stored as ``<id>``, the user id the
  application reports); other participants (organisations, related persons, care teams) are
  skipped, as are other resource types. A resource without a start is an error.

The patient id is stored only as its blind index (``BlindIndex(ring)("patient", id)``), the
same one ``audit_events.patient_bidx`` holds, never in clear. An open end is stored as
``OPEN_END`` (the largest DateTime64 ClickHouse keeps), so that "covers the event time" is
``start <= event_time AND event_time < end`` in every case.

Bad input is refused whole, with every bad line's number and what is wrong (never a value).
"""

from __future__ import annotations

import calendar
import csv
import datetime as _dt
import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from phiaudit.storage import PermanentError

__all__ = ["OPEN_END", "OPEN_END_US", "CareFileError", "care_rows", "care_rows_from_bytes"]

OPEN_END = _dt.datetime(2299, 12, 31, 23, 59, 59, tzinfo=_dt.UTC)
OPEN_END_US = int(OPEN_END.timestamp()) * 1_000_000
_MAX_ERRORS = 20
_RELATIONSHIP = re.compile(r"[a-z0-9_-]{1,32}")


class CareFileError(PermanentError):
    """The file is not valid: ``errors`` lists each bad line (number and what, no values)."""

    def __init__(self, name: str, errors: list[str]) -> None:
        self.errors = errors
        shown = "; ".join(errors[:5])
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        super().__init__(f"{name}: {shown}{more}")


def _parse_time(value: str, *, end: bool) -> int:
    """ISO 8601 / FHIR dateTime -> UTC microseconds. A partial date (year, year-month, date)
    starts at its beginning; as an end, it lasts to its end."""
    v = value.strip()
    m = re.fullmatch(r"(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?", v)
    if m:
        y, mo, d = int(m.group(1)), int(m.group(2) or 1), int(m.group(3) or 1)
        start = _dt.datetime(y, mo, d, tzinfo=_dt.UTC)
        if not end:
            t = start
        elif m.group(3):
            t = start + _dt.timedelta(days=1)
        elif m.group(2):
            t = start + _dt.timedelta(days=calendar.monthrange(y, mo)[1])
        else:
            t = start.replace(year=y + 1)
    else:
        t = _dt.datetime.fromisoformat(v.replace("Z", "+00:00"))
        if t.tzinfo is None:
            t = t.replace(tzinfo=_dt.UTC)
    if not 1970 <= t.year <= 2299:
        raise ValueError("out of range")
    return min(int(t.timestamp() * 1_000_000), OPEN_END_US)


def _reference_id(ref: Any, kind: str) -> str:
    """``Practitioner/abc`` (or a full URL ending so) -> ``abc``; '' for another kind."""
    if not isinstance(ref, dict):
        return ""
    r = ref.get("reference")
    if not isinstance(r, str):
        return ""
    parts = r.rstrip("/").split("/")
    if "_history" in parts:
        parts = parts[:parts.index("_history")]
    if len(parts) >= 2 and parts[-2] == kind and parts[-1]:
        return parts[-1]
    return ""


def _period(p: Any) -> tuple[str, str]:
    if not isinstance(p, dict):
        return "", ""
    s, e = p.get("start", ""), p.get("end", "")
    return (s if isinstance(s, str) else ""), (e if isinstance(e, str) else "")


def _fhir(resource: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """(actor, patient, start, end, relationship) of one resource; raises ValueError(what)."""
    rtype = resource.get("resourceType")
    out: list[tuple[str, str, str, str, str]] = []
    #: the participants' reference fields (R4 Encounter: individual, R5: actor; CareTeam: member)
    members = {"Encounter": ("individual", "actor"), "CareTeam": ("member",)}.get(str(rtype))
    if members is not None:
        patient = _reference_id(resource.get("subject"), "Patient")
        s0, e0 = _period(resource.get("period"))
        for part in resource.get("participant") or []:
            if not isinstance(part, dict):
                continue
            ref = next((part[k] for k in members if part.get(k)), None)
            actor = _reference_id(ref, "Practitioner")
            s, e = _period(part.get("period"))
            if actor:
                out.append((actor, patient, s or s0, e or e0, str(rtype).lower()))
        what = "subject"
    elif rtype == "EpisodeOfCare":
        patient = _reference_id(resource.get("patient"), "Patient")
        s0, e0 = _period(resource.get("period"))
        actor = _reference_id(resource.get("careManager"), "Practitioner")
        if actor:
            out.append((actor, patient, s0, e0, "episodeofcare"))
        what = "patient"
    else:
        return []
    if out and not patient:
        raise ValueError(f"{rtype}.{what} is not a Patient reference")
    return out


def care_rows(path: str | Path, fmt: str, index: Callable[[str, str], str], loaded_by: str,
              *, batch_id: str, loaded_us: int | None = None) -> list[list[Any]]:
    """Rows of ``care_relationships`` (``CARE_COLUMNS`` order) from a CSV or FHIR NDJSON file.
    ``index`` is ``BlindIndex(ring)``. Raises ``CareFileError`` listing the bad lines."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise PermanentError(f"{p.name}: cannot read ({exc.strerror})") from None
    return care_rows_from_bytes(data, fmt, index, loaded_by, batch_id=batch_id,
                                loaded_us=loaded_us, name=p.name)


def care_rows_from_bytes(data: bytes, fmt: str, index: Callable[[str, str], str],
                         loaded_by: str, *, batch_id: str, loaded_us: int | None = None,
                         name: str = "care file") -> list[list[Any]]:
    """``care_rows`` of a file's content (what the service receives from the command line)."""
    if fmt not in ("csv", "fhir"):
        raise PermanentError("care: the format is csv or fhir")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise CareFileError(name, ["not UTF-8 text"]) from None
    now = time.time_ns() // 1000 if loaded_us is None else loaded_us
    entries: list[tuple[int, tuple[str, str, str, str, str]]] = []
    errors: list[str] = []
    if fmt == "csv":
        reader = csv.reader(text.splitlines())
        header = next(reader, None)
        cols = [c.strip().lower() for c in header or []]
        if cols[:4] != ["actor_id", "patient_id", "start", "end"] or len(cols) > 5 or (
                len(cols) == 5 and cols[4] != "relationship"):
            raise CareFileError(name, ["line 1: the header must be "
                                       "actor_id,patient_id,start,end[,relationship]"])
        for row in reader:
            line = reader.line_num
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != len(cols):
                errors.append(f"line {line}: expected {len(cols)} fields, found {len(row)}")
                continue
            rel = row[4].strip().lower() if len(cols) == 5 and row[4].strip() else "care"
            entries.append((line, (row[0].strip(), row[1].strip(), row[2].strip(),
                                   row[3].strip(), rel)))
    else:
        for line, raw in enumerate(text.splitlines(), 1):
            if not raw.strip():
                continue
            try:
                resource = json.loads(raw)
            except ValueError:
                errors.append(f"line {line}: not a JSON object")
                continue
            if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"),
                                                                str):
                errors.append(f"line {line}: not a FHIR resource (no resourceType)")
                continue
            try:
                entries += [(line, e) for e in _fhir(resource)]
            except ValueError as exc:
                errors.append(f"line {line}: {exc}")
    rows: list[list[Any]] = []
    for line, (actor, patient, start, end, rel) in entries:
        if len(errors) >= _MAX_ERRORS:
            break
        if not actor:
            errors.append(f"line {line}: actor_id is empty")
            continue
        if not patient:
            errors.append(f"line {line}: patient_id is empty")
            continue
        if not _RELATIONSHIP.fullmatch(rel):
            errors.append(f"line {line}: relationship: lower-case letters, digits, _ and -")
            continue
        if not start:
            errors.append(f"line {line}: the start time is missing")
            continue
        try:
            start_us = _parse_time(start, end=False)
        except (ValueError, OverflowError):
            errors.append(f"line {line}: start is not an ISO 8601 time")
            continue
        try:
            end_us = _parse_time(end, end=True) if end else OPEN_END_US
        except (ValueError, OverflowError):
            errors.append(f"line {line}: end is not an ISO 8601 time")
            continue
        if end_us <= start_us:
            errors.append(f"line {line}: end is not after start")
            continue
        rows.append([actor, index("patient", patient), start_us, end_us, rel, batch_id, now,
                     loaded_by])
    if errors:
        errors.sort(key=lambda e: int(e.split(":", 1)[0].split()[-1]))
        raise CareFileError(name, errors)
    if not rows:
        raise CareFileError(name, ["no care relationship found"])
    return rows
