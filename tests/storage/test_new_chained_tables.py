"""The chained tables of schema 2 (infra_events, alerts): their rows are encrypted where they
carry PHI, chained by the writer, and `verify` recomputes every hash both in SQL and in Python
(which would disagree if the SQL canonical encoding of a new column type, such as the
alerts' Array(UUID) of evidence, differed from the writer's)."""

from __future__ import annotations

import uuid

import pytest

from phiaudit.storage import (
    ALERT_COLUMNS,
    INFRA_COLUMNS,
    Alert,
    BatchWriter,
    InfraEvent,
    RecordEncoder,
    Store,
    TableSpec,
    verify,
)

T0 = 1_764_000_000_000_000
SPECS = [TableSpec("infra_events", INFRA_COLUMNS, chained=True, dedup_column="event_id"),
         TableSpec("alerts", ALERT_COLUMNS, chained=True, dedup_column="alert_id")]


def _write(store: Store, encoder: RecordEncoder, writer: str) -> tuple[InfraEvent, Alert]:
    infra = [InfraEvent(uuid.uuid4(), T0 + i, T0 + i, "pgaudit", actor_id="analyst",
                        client_address=f"10.9.8.{i}", operation="SELECT", object_type="table",
                        object="public.patients", phi_touch=True, phi_object="public.patients",
                        outcome="success", raw=f"AUDIT: SESSION,{i},1,READ,SELECT,TABLE,"
                                               "public.patients,select,<not logged>")
             for i in range(5)]
    alert = Alert(uuid.uuid4(), T0 + 10, "app-bypass", "high", T0, T0 + 60_000_000,
                  '{"actor_id":"analyst"}', "PHI table read outside the application", 5,
                  [e.event_id for e in infra], 5, ["0af7651916cd43dd8448eb211c80319c", ""])
    w = BatchWriter(store, writer, SPECS)
    w.start()
    w.submit(None, {"infra_events": [encoder.infra_row(e) for e in infra],
                    "alerts": [encoder.alert_row(alert)]}).result(60)
    w.shutdown()
    return infra[0], alert


@pytest.mark.parametrize("mode", ["sql", "python"])
def test_verify_recomputes_infra_and_alert_chains(store: Store, encoder: RecordEncoder,
                                                  mode: str) -> None:
    writer = f"new-tables-{mode}"
    _write(store, encoder, writer)
    report = verify(store, keys={}, mode=mode, writers=[writer])
    assert report.ok, [str(f) for f in report.findings]
    assert report.rows == 6


def test_infra_phi_fields_are_encrypted_and_bound_to_the_row(store: Store,
                                                             encoder: RecordEncoder) -> None:
    first, alert = _write(store, encoder, "new-tables-enc")
    _, rows = store.query(
        "SELECT object, client_address, raw, object_bidx, phi_touch FROM infra_events "
        "WHERE event_id = {e:UUID}", {"e": str(first.event_id)}, binary=True)
    (obj, client, raw, bidx, touch), = rows
    for blob in (obj, client, raw):
        assert b"patients" not in bytes(blob) and b"10.9.8" not in bytes(blob)
    cipher = encoder.cipher
    assert cipher.decrypt_text("object", bytes(obj), first.event_id.bytes) == "public.patients"
    assert cipher.decrypt_text("client_address", bytes(client),
                               first.event_id.bytes) == "10.9.8.0"
    assert bytes(bidx).decode() == encoder.index("object", "public.patients")
    assert touch is True
    _, rows = store.query("SELECT evidence, evidence_count FROM alerts WHERE alert_id = {a:UUID}",
                          {"a": str(alert.alert_id)})
    evidence, count = rows[0]
    assert [str(e) for e in evidence] == [str(e) for e in alert.evidence]
    assert count == 5
