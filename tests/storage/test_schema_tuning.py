"""The store's tables as created: random content (ciphertexts, digests, blind indexes, random
ids) is stored without compression, and the merge settings are in effect. Both were chosen by
measurement (bench/store.py): LZ4 cannot shrink random bytes, and recompressing them at every
merge was a third of the store's CPU per row. And an insert is synced to the disk before it
returns: what the service acknowledges survives a power loss."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from phiaudit.storage import (
    AUDIT_COLUMNS,
    ENCRYPTED_COLUMNS,
    INFRA_COLUMNS,
    AuditEvent,
    BatchWriter,
    RecordEncoder,
    Store,
    TableSpec,
    _store,
)
from phiaudit.storage._durable import fsync_dir
from phiaudit.storage._schema import _TUNED_TABLES, _tuning_statements


def test_random_content_is_stored_without_compression(store: Store) -> None:
    _, rows = store.query(
        "SELECT table, name, compression_codec FROM system.columns "
        "WHERE database = currentDatabase() AND table IN ('audit_events', 'infra_events', "
        "'access_log', 'alerts')")
    codec = {(t, n): c for t, n, c in rows}
    for table, names in ENCRYPTED_COLUMNS.items():
        for name in names:
            assert codec[(table, name)] == "CODEC(NONE)", (table, name)
    for table, columns in (("audit_events", AUDIT_COLUMNS), ("infra_events", INFRA_COLUMNS)):
        for c in columns:
            if c.name.endswith("_bidx") or c.name in ("hash", "prev_hash", "event_id"):
                assert codec[(table, c.name)] == "CODEC(NONE)", (table, c.name)
    # everything else keeps the default (LZ4): repeated values compress
    for name in ("actor_id", "trace_id", "user_agent", "event_time", "seq", "writer_id"):
        assert codec[("audit_events", name)] == "", name
    assert codec[("alerts", "hash")] == "CODEC(NONE)"


def test_merge_settings_are_in_effect(store: Store) -> None:
    _, rows = store.query(
        "SELECT name, engine_full FROM system.tables WHERE database = currentDatabase() "
        "AND engine = 'MergeTree' AND name != 'schema_migrations' "
        "AND name != 'otel_traces_trace_id_ts'")
    assert len(rows) >= 10
    for name, engine in rows:
        assert "merge_selector_base = 64" in engine, name
        assert "min_bytes_for_wide_part = 268435456" in engine, name
        assert "max_parts_to_merge_at_once = 16" in engine, name
        assert "non_replicated_deduplication_window = 10000" in engine, name
        assert "fsync_after_insert = 1" in engine, name
        assert "index_granularity_bytes = 2097152" in engine, name
    # stores made before the tuning get it by ALTER (``_tuning_statements``): that list must
    # name every table, or a table added later would keep LZ4 and the old merges on upgrade
    assert {name for name, _ in rows} == set(_TUNED_TABLES)
    assert len(_tuning_statements("db")) == len(_TUNED_TABLES)


def test_merges_share_a_memory_budget(store: Store) -> None:
    # the service's engine starts no merge while those running use MERGE_MEMORY_BYTES
    from phiaudit.storage._store import MERGE_MEMORY_BYTES

    _, rows = store.query(
        "SELECT value, changed FROM system.server_settings "
        "WHERE name = 'merges_mutations_memory_usage_soft_limit'")
    assert rows == [(str(MERGE_MEMORY_BYTES), 1)]


def _file_syncs(store: Store) -> int:
    _, rows = store.query("SELECT value FROM system.events WHERE event = 'FileSync'")
    return int(rows[0][0]) if rows else 0


def test_a_committed_batch_is_synced_to_the_disk(
        store: Store, encoder: RecordEncoder, monkeypatch: pytest.MonkeyPatch) -> None:
    # the writer's commit (what an acknowledgement waits for) returns after the engine has
    # fsynced the new part's files, and the store the part's directory and the table's
    synced: list[Path] = []

    def spy(path: Path) -> None:
        synced.append(Path(path))
        fsync_dir(path)

    monkeypatch.setattr(_store, "fsync_dir", spy)
    writer = BatchWriter(store, "test-fsync", [TableSpec("audit_events", AUDIT_COLUMNS,
                                                         chained=True)])
    writer.start()
    try:
        before = _file_syncs(store)
        rows = [encoder.audit_row(AuditEvent(
            event_id=uuid.uuid4(), event_time_us=1_764_000_000_000_000 + i,
            received_time_us=1_764_000_000_000_000 + i, action="read", outcome="success",
            patient_id=f"syn-fsync-{i}", actor_id="u")) for i in range(3)]
        writer.submit(None, {"audit_events": rows}).result(timeout=30)
        after = _file_syncs(store)
    finally:
        assert writer.shutdown()
    # a compact part: its data, marks, checksums, columns, count and index files
    assert after - before >= 5, (before, after)
    _, parts = store.query(
        "SELECT name, path FROM system.parts WHERE database = currentDatabase() "
        "AND table = 'audit_events' AND active AND level = 0")
    assert len(parts) == 1, parts
    part = Path(parts[0][1])
    assert part.name == parts[0][0] and part.is_dir()
    assert synced == [part, part.parent], synced


def test_a_granule_holds_at_most_2_mib(store: Store, encoder: RecordEncoder) -> None:
    # a merge reads one granule of each part it merges at a time: 8,000 audit rows of ~1 KiB
    # (7.4 MiB) are 3 granules (the engine sizes them by its estimate of the rows in memory),
    # where the default (10 MiB) made them one. After the test above, which expects a table
    # with one part
    writer = BatchWriter(store, "test-granules", [TableSpec("audit_events", AUDIT_COLUMNS,
                                                            chained=True)])
    writer.start()
    try:
        rows = [encoder.audit_row(AuditEvent(
            event_id=uuid.uuid4(), event_time_us=1_764_000_000_000_000 + i,
            received_time_us=1_764_000_000_000_000 + i, action="read", outcome="success",
            patient_id=f"syn-granule-{i}", actor_id="u", resource_type="Patient",
            resource_id=f"syn-granule-{i}", user_agent="x" * 600)) for i in range(8000)]
        writer.submit(None, {"audit_events": rows}).result(timeout=60)
    finally:
        assert writer.shutdown()
    _, parts = store.query(
        "SELECT marks, data_uncompressed_bytes FROM system.parts "
        "WHERE database = currentDatabase() AND table = 'audit_events' AND active "
        "AND rows = 8000")
    assert len(parts) == 1, parts
    marks, size = parts[0]
    assert 6 * 2**20 < size < 10 * 2**20, size  # one granule by default, several now
    granules = marks - 1  # a compact part ends with a final mark
    assert granules >= 3, (granules, size)
