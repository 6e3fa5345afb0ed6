"""The store's tables as created: random content (ciphertexts, digests, blind indexes, random
ids) is stored without compression, and the merge settings are in effect. Both were chosen by
measurement (bench/store.py): LZ4 cannot shrink random bytes, and recompressing them at every
merge was a third of the store's CPU per row."""

from __future__ import annotations

from phiaudit.storage import AUDIT_COLUMNS, ENCRYPTED_COLUMNS, INFRA_COLUMNS, Store
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
