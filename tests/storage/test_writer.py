"""The batch writer against the real embedded engine: chain links, gap-free sequences,
deduplication tokens, and request-key deduplication across retries."""

from __future__ import annotations

import hashlib
import time
import uuid
from typing import Any

from phiaudit.storage import (
    AUDIT_COLUMNS,
    AuditEvent,
    BatchWriter,
    RecordEncoder,
    Store,
    TableSpec,
    canonical_encoder,
)

SPEC = TableSpec("audit_events", AUDIT_COLUMNS, chained=True)


def _rows(encoder: RecordEncoder, n: int, tag: str) -> list[list[Any]]:
    return [encoder.audit_row(AuditEvent(
        event_id=uuid.uuid4(), event_time_us=1_764_000_000_000_000 + i,
        received_time_us=1_764_000_000_000_000 + i, action="read", outcome="success",
        patient_id=f"{tag}-{i}", actor_id="u")) for i in range(n)]


def _count(store: Store, writer: str) -> int:
    _, rows = store.query("SELECT count() FROM audit_events WHERE writer_id = {w:String}",
                          {"w": writer})
    return int(rows[0][0])


def test_chain_is_gap_free_and_links(store: Store, encoder: RecordEncoder) -> None:
    w = BatchWriter(store, "test-chain", [SPEC])
    w.start()
    futures = [w.submit(None, {"audit_events": _rows(encoder, 5, f"b{i}")}) for i in range(6)]
    for f in futures:
        f.result(timeout=30)
    assert w.shutdown()
    names = [c.name for c in AUDIT_COLUMNS]
    _, rows = store.query(f"SELECT {', '.join(names)} FROM audit_events "
                          "WHERE writer_id = 'test-chain' ORDER BY seq", binary=True)
    assert [r[names.index("seq")] for r in rows] == list(range(1, 31))
    enc = canonical_encoder(AUDIT_COLUMNS)
    prev = b"\x00" * 32
    for r in rows:
        row = list(r)
        assert row[names.index("prev_hash")] == prev
        # the documented definition, written out independently of link_rows
        leaf = hashlib.sha256(enc(row)).digest()
        seq = str(row[names.index("seq")]).encode()
        digest = hashlib.sha256(prev + b"10:test-chain" + str(len(seq)).encode() + b":" + seq
                                + leaf).digest()
        assert row[names.index("hash")] == digest
        prev = digest
    # a new writer instance resumes the chain from what was committed
    w2 = BatchWriter(store, "test-chain", [SPEC])
    w2.start()
    w2.submit(None, {"audit_events": _rows(encoder, 1, "late")}).result(timeout=30)
    w2.shutdown()
    assert w2.chain_state("audit_events")[0] == 31


def test_same_token_twice_is_stored_once(store: Store, encoder: RecordEncoder) -> None:
    rows = _rows(encoder, 3, "tok")
    for r in rows:
        r[-4:] = ["test-token", 1, b"\x00" * 32, b"\x11" * 32]
    cols = [c.name for c in AUDIT_COLUMNS]
    data = [list(c) for c in zip(*rows, strict=True)]
    store.insert("audit_events", cols, data, "tok-1")
    store.insert("audit_events", cols, data, "tok-1")
    assert _count(store, "test-token") == 3


def test_retried_request_key_adds_nothing(store: Store, encoder: RecordEncoder) -> None:
    w = BatchWriter(store, "test-key", [SPEC])
    w.start()
    key = b"request-digest-1"
    w.submit(key, {"audit_events": _rows(encoder, 4, "k")}).result(timeout=30)
    # the client's retry of the same request (new ciphertexts, same key) is acknowledged
    # without adding rows
    w.submit(key, {"audit_events": _rows(encoder, 4, "k")}).result(timeout=30)
    w.shutdown()
    assert _count(store, "test-key") == 4
    assert w.stats.duplicate_requests == 1


def test_resent_events_are_stored_once_even_after_restart(store: Store,
                                                         encoder: RecordEncoder) -> None:
    spec = TableSpec("audit_events", AUDIT_COLUMNS, chained=True, dedup_column="event_id")
    rows = _rows(encoder, 5, "dup")
    w = BatchWriter(store, "test-dedup", [spec])
    w.start()
    w.submit(b"first", {"audit_events": [list(r) for r in rows]}).result(timeout=30)
    # the application re-sends two of them inside a different request (spool replay)
    w.submit(b"second", {"audit_events": [list(r) for r in rows[1:3]]
                         + _rows(encoder, 1, "new")}).result(timeout=30)
    w.shutdown()
    assert _count(store, "test-dedup") == 6
    assert w.stats.duplicate_rows == 2
    # a new writer (service restart) still knows what it committed
    w2 = BatchWriter(store, "test-dedup", [spec])
    w2.start()
    w2.submit(b"third", {"audit_events": [list(r) for r in rows]}).result(timeout=30)
    w2.shutdown()
    assert _count(store, "test-dedup") == 6
    _, seqs = store.query("SELECT seq FROM audit_events WHERE writer_id = 'test-dedup' "
                          "ORDER BY seq")
    assert [s for (s,) in seqs] == list(range(1, 7))


def test_unkeyed_submits_to_an_unchained_table_are_never_merged(store: Store) -> None:
    """Each submit without a request key is its own insert: its deduplication token must not
    repeat (it once came from id(), which Python reuses, and ClickHouse dropped the second of
    two same-sized inserts)."""
    from phiaudit.storage import RULE_RUN_COLUMNS

    w = BatchWriter(store, "test-unkeyed", [TableSpec("rule_runs", RULE_RUN_COLUMNS, False)])
    w.start()
    t = 1_764_000_000_000_000
    for _ in range(6):  # one after the other: each item is freed before the next is made
        w.submit(None, {"rule_runs": [["unkeyed-probe", "scheduled", t, t, t, 0, 1, "h"]]}
                 ).result(30)
    w.shutdown()
    _, rows = store.query("SELECT count() FROM rule_runs WHERE rule_id = 'unkeyed-probe'")
    assert rows[0][0] == 6


def test_a_batch_waits_for_requests_still_being_processed(store: Store,
                                                          encoder: RecordEncoder) -> None:
    """Group commit: while the caller reports requests on their way, the writer waits for
    them (up to max_wait) instead of inserting the first one alone; with none reported it
    inserts at once."""
    processing = {"n": 0}
    w = BatchWriter(store, "test-linger", [SPEC], max_wait=5.0,
                    expecting=lambda: processing["n"])
    w.start()
    try:
        processing["n"] = 2
        first = w.submit(None, {"audit_events": _rows(encoder, 3, "l1")})
        time.sleep(0.3)
        assert not first.done(), "the batch did not wait for the request being processed"
        processing["n"] = 1
        second = w.submit(None, {"audit_events": _rows(encoder, 4, "l2")})
        processing["n"] = 0
        second.result(timeout=30)
        first.result(timeout=30)
        assert w.stats.batches == 1 and w.stats.last_batch_rows == 7

        # nothing on its way: no wait
        started = time.monotonic()
        w.submit(None, {"audit_events": _rows(encoder, 2, "l3")}).result(timeout=30)
        assert w.stats.batches == 2
        assert time.monotonic() - started < 4.0, "waited for max_wait with nothing coming"
    finally:
        assert w.shutdown()
