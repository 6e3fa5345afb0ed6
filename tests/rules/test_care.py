"""Care relationships from CSV and FHIR R4 NDJSON: rows of care_relationships, the patient id
only as its blind index, bad input refused with line numbers and no values."""

from __future__ import annotations

import datetime as _dt
import json
import uuid
from pathlib import Path

import pytest

from phiaudit.rules import OPEN_END_US, CareFileError, care_rows
from phiaudit.storage import (
    CARE_COLUMNS,
    BatchWriter,
    BlindIndex,
    KeyRing,
    Store,
    StoreLocation,
    TableSpec,
    migrate,
)


def us(s: str) -> int:
    return int(_dt.datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp() * 1_000_000)


@pytest.fixture
def index(tmp_path: Path) -> BlindIndex:
    return BlindIndex(KeyRing.open(tmp_path / "keys"))


def test_csv(tmp_path: Path, index: BlindIndex) -> None:
    f = tmp_path / "care.csv"
    f.write_text("actor_id,patient_id,start,end,relationship\n"
                 "dr-house,pat-1001,2026-03-01T08:00:00Z,2026-03-02T08:00:00Z,encounter\n"
                 "\n"
                 "nurse-7,pat-1002,2026-03-01,,\n"
                 "dr-wilson,pat-1001,2026-03-01T10:00:00+02:00,2026-03,careteam\n")
    rows = care_rows(f, "csv", index, "sec-officer", batch_id="b1", loaded_us=123)
    assert len(rows) == 3
    assert all(len(r) == len(CARE_COLUMNS) for r in rows)
    assert rows[0] == ["dr-house", index("patient", "pat-1001"), us("2026-03-01T08:00:00Z"),
                       us("2026-03-02T08:00:00Z"), "encounter", "b1", 123, "sec-officer"]
    # a date alone is the whole day; an empty end is open; relationship defaults to care
    assert rows[1][2] == us("2026-03-01T00:00:00Z")
    assert rows[1][3] == OPEN_END_US and rows[1][4] == "care"
    # time zones are converted to UTC; a month as the end lasts to its end
    assert rows[2][2] == us("2026-03-01T08:00:00Z")
    assert rows[2][3] == us("2026-04-01T00:00:00Z")
    flat = json.dumps(rows, default=str)
    assert "pat-100" not in flat  # the patient id never in clear


def test_csv_bad_rows(tmp_path: Path, index: BlindIndex) -> None:
    f = tmp_path / "care.csv"
    f.write_text("actor_id,patient_id,start,end\n"
                 "dr-a,pat-secret-1,2026-03-01T08:00:00Z,2026-03-01T07:00:00Z\n"
                 "dr-b,pat-secret-2,yesterday,\n"
                 ",pat-secret-3,2026-03-01,\n"
                 "dr-c,pat-secret-4\n"
                 "dr-d,pat-secret-5,2026-03-01,2026-13-45\n"
                 "dr-e,pat-ok,2026-03-01,\n")
    with pytest.raises(CareFileError) as err:
        care_rows(f, "csv", index, "me", batch_id="b")
    assert err.value.errors == [
        "line 2: end is not after start",
        "line 3: start is not an ISO 8601 time",
        "line 4: actor_id is empty",
        "line 5: expected 4 fields, found 2",
        "line 6: end is not an ISO 8601 time",
    ]
    assert "secret" not in str(err.value) and "dr-" not in str(err.value)
    bad_header = tmp_path / "h.csv"
    bad_header.write_text("user,patient,from,to\nx,y,2026-01-01,\n")
    with pytest.raises(CareFileError, match="line 1: the header must be"):
        care_rows(bad_header, "csv", index, "me", batch_id="b")
    empty = tmp_path / "e.csv"
    empty.write_text("actor_id,patient_id,start,end\n")
    with pytest.raises(CareFileError, match="no care relationship found"):
        care_rows(empty, "csv", index, "me", batch_id="b")


FHIR = [
    {"resourceType": "Encounter", "id": "enc-1", "status": "finished",
     "subject": {"reference": "Patient/pat-2001"},
     "period": {"start": "2026-03-05T09:00:00Z", "end": "2026-03-05T17:00:00Z"},
     "participant": [
         {"individual": {"reference": "Practitioner/dr-grey"}},
         {"individual": {"reference": "RelatedPerson/rp-1"}},
         {"individual": {"reference": "https://ehr.example/fhir/Practitioner/dr-yang"},
          "period": {"start": "2026-03-05T10:00:00Z"}}]},
    {"resourceType": "CareTeam", "id": "ct-1", "subject": {"reference": "Patient/pat-2002"},
     "period": {"start": "2026-01-01"},
     "participant": [{"member": {"reference": "Practitioner/nurse-3"}},
                     {"member": {"reference": "Organization/org-1"}},
                     {"member": {"reference": "Practitioner/dr-bailey"},
                      "period": {"start": "2026-02-01", "end": "2026-02-28"}}]},
    {"resourceType": "EpisodeOfCare", "id": "eoc-1", "status": "active",
     "patient": {"reference": "Patient/pat-2003"},
     "careManager": {"reference": "Practitioner/dr-webber"},
     "period": {"start": "2025-12-01T00:00:00Z"}},
    {"resourceType": "Observation", "id": "obs-1", "subject": {"reference": "Patient/x"}},
]


def test_fhir(tmp_path: Path, index: BlindIndex) -> None:
    f = tmp_path / "care.ndjson"
    f.write_text("\n".join(json.dumps(r) for r in FHIR) + "\n")
    rows = care_rows(f, "fhir", index, "me", batch_id="b2", loaded_us=1)
    got = [(r[0], r[1], r[2], r[3], r[4]) for r in rows]
    p1, p2, p3 = (index("patient", p) for p in ("pat-2001", "pat-2002", "pat-2003"))
    assert got == [
        ("dr-grey", p1, us("2026-03-05T09:00:00Z"), us("2026-03-05T17:00:00Z"), "encounter"),
        ("dr-yang", p1, us("2026-03-05T10:00:00Z"), us("2026-03-05T17:00:00Z"), "encounter"),
        ("nurse-3", p2, us("2026-01-01T00:00:00Z"), OPEN_END_US, "careteam"),
        ("dr-bailey", p2, us("2026-02-01T00:00:00Z"), us("2026-03-01T00:00:00Z"), "careteam"),
        ("dr-webber", p3, us("2025-12-01T00:00:00Z"), OPEN_END_US, "episodeofcare"),
    ]
    assert "pat-200" not in json.dumps(rows, default=str)


def test_fhir_bad_lines(tmp_path: Path, index: BlindIndex) -> None:
    f = tmp_path / "care.ndjson"
    lines = [
        json.dumps(FHIR[0]),
        "{not json",
        json.dumps({"id": "x"}),
        json.dumps({"resourceType": "Encounter", "subject": {"reference": "Group/g-secret"},
                    "participant": [{"individual": {"reference": "Practitioner/a"}}],
                    "period": {"start": "2026-01-01"}}),
        json.dumps({"resourceType": "EpisodeOfCare", "patient": {"reference": "Patient/p-secret"},
                    "careManager": {"reference": "Practitioner/b"}}),
    ]
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(CareFileError) as err:
        care_rows(f, "fhir", index, "me", batch_id="b")
    assert err.value.errors == [
        "line 2: not a JSON object",
        "line 3: not a FHIR resource (no resourceType)",
        "line 4: Encounter.subject is not a Patient reference",
        "line 5: the start time is missing",
    ]
    assert "secret" not in str(err.value)


def test_rows_load_and_match_audit_blind_index(tmp_path: Path) -> None:
    """The rows go into care_relationships as they are, and their blind index is the one the
    encoder puts into audit_events.patient_bidx (so the care rule can join on it)."""
    from phiaudit.storage import AuditEvent, FieldCipher, RecordEncoder

    d = tmp_path / "data"
    d.mkdir()
    ring = KeyRing.open(d)
    index = BlindIndex(ring)
    loc = StoreLocation(data_dir=d, url=None, database="phiaudit", ca_file=None,
                        disk_encryption=False)
    migrate(loc)
    store = Store.open(loc)
    try:
        f = tmp_path / "care.csv"
        f.write_text("actor_id,patient_id,start,end\ndr-a,pat-9,2026-03-01,\n")
        rows = care_rows(f, "csv", index, "me", batch_id=str(uuid.uuid4()))
        writer = BatchWriter(store, "w", [TableSpec("care_relationships", CARE_COLUMNS, False)])
        writer.start()
        try:
            writer.submit(None, {"care_relationships": rows}).result(30)
        finally:
            writer.shutdown()
        _, got = store.query("SELECT actor_id, patient_bidx, end FROM care_relationships")
        ev = AuditEvent(uuid.uuid4(), 1, 1, "read", "success", patient_id="pat-9")
        audit = RecordEncoder(FieldCipher(ring), index).audit_row(ev)
        assert got[0][0] == "dr-a" and got[0][1] in audit
        assert got[0][2].year == 2299
    finally:
        store.close()
