"""The batch writer with Arrow input, against the real embedded engine: Arrow tables and lists
of rows for the same chained table share one gap-free chain, byte-identical to what the row
path links; retries, deduplication (also across a restart) and the local spool work on Arrow
as on rows; the caller's input is never changed."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from phiaudit.storage import (
    ACCESS_LOG_COLUMNS,
    ALERT_COLUMNS,
    AUDIT_COLUMNS,
    CARE_COLUMNS,
    GENESIS,
    INFRA_COLUMNS,
    ROLLUP_COLUMNS,
    RULE_RUN_COLUMNS,
    TRACE_COLUMNS,
    AccessRecord,
    AuditEvent,
    BatchSpool,
    BatchWriter,
    ChainState,
    PermanentError,
    RecordEncoder,
    StorageUnavailable,
    Store,
    TableSpec,
    link_rows,
    verify,
)
from phiaudit.storage._arrow import arrow_schema, arrow_table
from phiaudit.storage._writer import link_arrow

SPEC = TableSpec("audit_events", AUDIT_COLUMNS, chained=True, dedup_column="event_id")
T0 = 1_764_000_000_000_000


def _rows(encoder: RecordEncoder, n: int, tag: str) -> list[list[Any]]:
    return [encoder.audit_row(AuditEvent(
        event_id=uuid.uuid4(), event_time_us=T0 + i, received_time_us=T0 + i, action="read",
        outcome="success", patient_id=f"{tag}-{i}", actor_id="u", actor_roles=["nurse"],
        http_status=200, record_count=i)) for i in range(n)]


def _arrow(rows: list[list[Any]], placeholder: bool = False) -> pa.Table:
    """The rows as the Arrow input of the writer: the leaf in ``hash``; the other chain
    columns are placeholders (anything)."""
    copies = [list(r) for r in rows]
    for r in copies:
        r[-4:] = (["x-writer", 0, os.urandom(32), r[-1]] if placeholder
                  else ["", 0, GENESIS, r[-1]])
    return arrow_table(AUDIT_COLUMNS, copies)


def _expected(writer: str, rows: list[list[Any]], seq: int = 0,
              head: bytes = GENESIS) -> list[tuple[int, bytes, bytes]]:
    """What the row path (``link_rows``, leaves recomputed from the rows) links."""
    copies = [list(r) for r in rows]
    link_rows(ChainState(writer, seq, head), AUDIT_COLUMNS, copies)
    return [(r[-3], r[-2], r[-1]) for r in copies]


def _stored(store: Store, writer: str) -> list[tuple[int, bytes, bytes]]:
    _, rows = store.query("SELECT seq, prev_hash, hash FROM audit_events "
                          "WHERE writer_id = {w:String} ORDER BY seq", {"w": writer},
                          binary=True)
    return [(int(s), bytes(p), bytes(h)) for s, p, h in rows]


def _ids(store: Store, writer: str) -> list[uuid.UUID]:
    _, rows = store.query("SELECT event_id FROM audit_events WHERE writer_id = {w:String} "
                          "ORDER BY seq", {"w": writer})
    return [r[0] for r in rows]


def _verified(store: Store, writer: str, rows: int) -> None:
    for mode in ("sql", "python"):
        report = verify(store, keys={}, mode=mode, writers=[writer])
        assert report.ok, [str(f) for f in report.findings]
        assert report.rows == rows


class _FailingStore:
    """The real store; ``insert_arrow`` raises StorageUnavailable ``fail`` times (for
    ``table`` only, when given) or while ``down`` is set, and records every call."""

    def __init__(self, store: Store, fail: int = 0, table: str | None = None) -> None:
        self._store = store
        self.fail = fail
        self.table = table
        self.down = False
        self.calls: list[tuple[str, pa.Table, str, bool]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def insert_rows(self, *args: Any) -> None:
        raise AssertionError("the writer inserts Arrow")

    def insert_arrow(self, table: str, data: pa.Table, token: str,
                     types: list[str] | None = None) -> None:
        failing = self.down or (self.fail > 0 and self.table in (None, table))
        self.calls.append((table, data, token, failing))
        if failing:
            if not self.down:
                self.fail -= 1
            raise StorageUnavailable(f"insert into {table}: injected failure")
        self._store.insert_arrow(table, data, token, types=types)


def _run_one_batch(w: BatchWriter, items: list[tuple[bytes | None, dict[str, Any]]],
                   timeout: float = 60) -> list[Any]:
    """Submit before start: the writer thread takes every item as one batch."""
    futures = [w.submit(key, tables) for key, tables in items]
    w.start()
    results: list[Any] = []
    for f in futures:
        try:
            results.append(f.result(timeout))
        except Exception as exc:  # the test inspects it
            results.append(exc)
    assert w.shutdown()
    return results


def test_arrow_schema_is_the_schema_of_arrow_table(encoder: RecordEncoder) -> None:
    for columns in (AUDIT_COLUMNS, ACCESS_LOG_COLUMNS, ALERT_COLUMNS, INFRA_COLUMNS,
                    TRACE_COLUMNS, CARE_COLUMNS, ROLLUP_COLUMNS, RULE_RUN_COLUMNS):
        schema = arrow_schema(columns)
        assert schema.names == [c.name for c in columns]
        assert arrow_schema(list(columns)) is schema  # cached per column list
        assert not schema.metadata
    assert _arrow(_rows(encoder, 3, "schema")).schema == arrow_schema(AUDIT_COLUMNS)
    access = encoder.access_row(AccessRecord("alice", "security", "direct", "SELECT 1", True,
                                             3, "ok"), T0)
    access[-4:] = ["w", 1, GENESIS, GENESIS]
    assert arrow_table(ACCESS_LOG_COLUMNS, [access]).schema == arrow_schema(ACCESS_LOG_COLUMNS)
    assert arrow_table(AUDIT_COLUMNS, []).schema == arrow_schema(AUDIT_COLUMNS)


@pytest.mark.parametrize("start", [0, 8, 99, 12_345])
def test_link_arrow_links_as_link_rows(encoder: RecordEncoder, start: int) -> None:
    rows = _rows(encoder, 25, "link")
    head = GENESIS if start == 0 else os.urandom(32)
    table = _arrow(rows, placeholder=True)
    before = table.column("hash").to_pylist()
    linked, seq, last = link_arrow(ChainState("w%d-1", start, head), table)
    expected = _expected("w%d-1", rows, start, head)
    assert seq == start + 25 and last == expected[-1][2]
    assert linked.schema == arrow_schema(AUDIT_COLUMNS)
    assert list(zip(linked.column("seq").to_pylist(), linked.column("prev_hash").to_pylist(),
                    linked.column("hash").to_pylist(), strict=True)) == expected
    assert set(linked.column("writer_id").to_pylist()) == {b"w%d-1"}
    assert table.column("hash").to_pylist() == before  # the input is unchanged


def test_arrow_and_row_items_share_one_chain(store: Store, encoder: RecordEncoder) -> None:
    writer = "arrow-mix"
    a, b, c, d = (_rows(encoder, n, f"mix{n}") for n in (7, 5, 9, 3))
    copies = [[list(r) for r in part] for part in (a, c)]
    arrow_b, arrow_d = _arrow(b, placeholder=True), _arrow(d)
    before = arrow_b.to_pylist()
    w = BatchWriter(store, writer, [SPEC])
    results = _run_one_batch(w, [
        (b"mix-a", {"audit_events": a}), (b"mix-b", {"audit_events": arrow_b}),
        (None, {"audit_events": c}), (b"mix-d", {"audit_events": arrow_d})])
    assert results == [None] * 4
    assert w.stats.batches == 1 and w.stats.rows == {"audit_events": 24}
    # the stored chain is exactly what the row path links for the same rows, in item order
    assert _stored(store, writer) == _expected(writer, a + b + c + d)
    assert _ids(store, writer) == [r[0] for r in a + b + c + d]
    _verified(store, writer, 24)
    # the caller's input is unchanged: rows keep their leaf, Arrow tables their placeholders
    assert [[list(r) for r in part] for part in (a, c)] == copies
    assert arrow_b.to_pylist() == before
    assert arrow_d.equals(_arrow(d))
    # a new writer resumes the chain after what the Arrow items linked
    w2 = BatchWriter(store, writer, [SPEC])
    e = _rows(encoder, 2, "mix-late")
    _run_one_batch(w2, [(None, {"audit_events": _arrow(e)})])
    assert _stored(store, writer) == _expected(writer, a + b + c + d + e)


def test_retried_insert_stores_the_same_rows_once(store: Store, encoder: RecordEncoder) -> None:
    rows_a, rows_b = _rows(encoder, 6, "retry-a"), _rows(encoder, 4, "retry-b")
    flaky = _FailingStore(store, fail=2)
    w = BatchWriter(flaky, "arrow-retry", [SPEC], retry_backoff=(0.01, 0.05))
    arrow_a = _arrow(rows_a)
    assert _run_one_batch(w, [(b"retry-a", {"audit_events": arrow_a}),
                              (b"retry-b", {"audit_events": rows_b})]) == [None, None]
    assert w.stats.insert_failures == 2
    # every attempt inserted the same block with the same token: no fork, nothing twice
    assert len(flaky.calls) == 3 and [c[3] for c in flaky.calls] == [True, True, False]
    assert len({c[2] for c in flaky.calls}) == 1
    assert all(c[1].equals(flaky.calls[0][1]) for c in flaky.calls)
    assert _stored(store, "arrow-retry") == _expected("arrow-retry", rows_a + rows_b)
    _verified(store, "arrow-retry", 10)
    assert arrow_a.equals(_arrow(rows_a))


def test_a_table_committed_before_a_failure_is_not_linked_again(
        store: Store, encoder: RecordEncoder) -> None:
    """The batch's audit rows commit, its access_log insert fails once: the retry inserts only
    the access rows, and the audit chain has each row once."""
    writer = "arrow-partial"
    specs = [SPEC, TableSpec("access_log", ACCESS_LOG_COLUMNS, chained=True)]
    flaky = _FailingStore(store, fail=1, table="access_log")
    rows = _rows(encoder, 5, "partial")
    access = [encoder.access_row(AccessRecord("bob", "security", "direct", "SELECT 2", False,
                                              1, "ok"), T0)]
    w = BatchWriter(flaky, writer, specs, retry_backoff=(0.01, 0.05))
    assert _run_one_batch(w, [(None, {"audit_events": _arrow(rows),
                                      "access_log": access})]) == [None]
    assert [c[0] for c in flaky.calls] == ["audit_events", "access_log", "access_log"]
    assert _stored(store, writer) == _expected(writer, rows)
    assert w.chain_state("access_log")[0] == 1
    _verified(store, writer, 6)


def test_resent_events_are_stored_once_across_kinds_and_restart(
        store: Store, encoder: RecordEncoder) -> None:
    writer = "arrow-dedup"
    rows = _rows(encoder, 6, "dedup")
    new = _rows(encoder, 2, "dedup-new")
    w = BatchWriter(store, writer, [SPEC])
    w.start()
    w.submit(b"d1", {"audit_events": _arrow(rows)}).result(30)
    w.submit(b"d2", {"audit_events": _arrow(rows[:3])}).result(30)  # again, as Arrow
    w.submit(b"d3", {"audit_events": [list(r) for r in rows[2:]] + new}).result(30)  # as rows
    assert w.shutdown()
    assert _ids(store, writer) == [r[0] for r in rows + new]
    assert w.stats.duplicate_rows == 3 + 4
    # in one batch: an Arrow item and a row item with the same ids, and a repeat inside one
    more = _rows(encoder, 3, "dedup-batch")
    w2 = BatchWriter(store, writer, [SPEC])
    assert _run_one_batch(w2, [
        (b"d4", {"audit_events": _arrow(more + more[:1])}),
        (b"d5", {"audit_events": [list(r) for r in more[1:]] + [list(rows[0])]})]) == [None] * 2
    assert w2.stats.duplicate_rows == 1 + 2 + 1  # (rows[0]: remembered across the restart)
    assert _ids(store, writer) == [r[0] for r in rows + new + more]
    # a restarted writer still knows what it committed, whatever form it came in
    w3 = BatchWriter(store, writer, [SPEC])
    w3.start()
    w3.submit(b"d6", {"audit_events": _arrow(rows + more)}).result(30)
    w3.submit(b"d7", {"audit_events": [list(r) for r in new]}).result(30)
    assert w3.shutdown()
    assert w3.stats.duplicate_rows == 11 and w3.stats.rows == {}
    assert _stored(store, writer) == _expected(writer, rows + new + more)
    _verified(store, writer, 11)


def test_unchained_arrow_rows_and_schema_check(store: Store) -> None:
    spec = TableSpec("rule_runs", RULE_RUN_COLUMNS, chained=False)
    rows = [["arrow-probe", "scheduled", T0, T0, T0, i, 1, "h"] for i in range(4)]
    table = arrow_table(RULE_RUN_COLUMNS, rows[2:])
    w = BatchWriter(store, "arrow-unchained", [spec])
    # a castable table (text as utf8, schema metadata) is accepted; another is refused
    as_text = table.cast(pa.schema([pa.field(f.name, pa.string() if f.type == pa.binary()
                                             else f.type) for f in table.schema]))
    as_text = as_text.replace_schema_metadata({b"from": b"chdb"})
    with pytest.raises(TypeError):
        w.submit(None, {"rule_runs": table.drop_columns(["mode"])})
    assert _run_one_batch(w, [(None, {"rule_runs": rows[:2]}),
                              (None, {"rule_runs": as_text})]) == [None, None]
    _, stored = store.query("SELECT count() FROM rule_runs WHERE rule_id = 'arrow-probe'")
    assert stored[0][0] == 4


def test_a_row_that_does_not_fit_fails_only_its_request(store: Store,
                                                        encoder: RecordEncoder) -> None:
    writer = "arrow-permanent"
    good, bad = _rows(encoder, 4, "perm"), _rows(encoder, 2, "perm-bad")
    bad[1][[c.name for c in AUDIT_COLUMNS].index("http_status")] = 70_000  # not a UInt16
    w = BatchWriter(store, writer, [SPEC])
    results = _run_one_batch(w, [(b"p1", {"audit_events": _arrow(good[:2])}),
                                 (b"p2", {"audit_events": bad}),
                                 (b"p3", {"audit_events": good[2:]})])
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], PermanentError)
    assert _stored(store, writer) == _expected(writer, good)
    _verified(store, writer, 4)


def test_outage_spools_arrow_and_a_restart_drains_it_once(store: Store, encoder: RecordEncoder,
                                                          tmp_path: Path) -> None:
    writer = "arrow-spool"
    a, b = _rows(encoder, 5, "spool-a"), _rows(encoder, 3, "spool-b")
    flaky = _FailingStore(store)
    flaky.down = True
    spool = BatchSpool(tmp_path / "spool", 0)
    w = BatchWriter(flaky, writer, [SPEC], retry_backoff=(0.01, 0.05), spool=spool)
    w.start()
    w.submit(b"s1", {"audit_events": _arrow(a)}).result(30)  # acknowledged: on local disk
    w.submit(b"s2", {"audit_events": [list(r) for r in b]}).result(30)
    assert w.shutdown()
    assert len(spool) == 2 and w.stats.spooled_blocks >= 1 and not _stored(store, writer)
    assert w.chain_state("audit_events")[0] == 8
    # restart with the store back: the spool drains first, in order, with its tokens
    flaky.down = False
    w2 = BatchWriter(flaky, writer, [SPEC], spool=BatchSpool(tmp_path / "spool", 0))
    w2.start()
    assert w2.stats.drained_blocks == 2
    # what was spooled is remembered: re-sent events (both kinds) add nothing
    w2.submit(b"s3", {"audit_events": _arrow(a[:2] + b[:1])}).result(30)
    w2.submit(b"s4", {"audit_events": [list(r) for r in a[4:]]}).result(30)
    c = _rows(encoder, 2, "spool-c")
    w2.submit(b"s5", {"audit_events": _arrow(c)}).result(30)
    assert w2.shutdown()
    assert w2.stats.duplicate_rows == 4
    assert _stored(store, writer) == _expected(writer, a + b + c)
    _verified(store, writer, 10)


def test_spool_drains_while_running(store: Store, encoder: RecordEncoder,
                                    tmp_path: Path) -> None:
    writer = "arrow-spool-live"
    a, b = _rows(encoder, 4, "live-a"), _rows(encoder, 4, "live-b")
    flaky = _FailingStore(store)
    flaky.down = True
    w = BatchWriter(flaky, writer, [SPEC], retry_backoff=(0.01, 0.05),
                    spool=BatchSpool(tmp_path / "spool", 0))
    w.start()
    w.submit(None, {"audit_events": _arrow(a)}).result(30)
    flaky.down = False
    w.submit(None, {"audit_events": _arrow(b)}).result(30)  # after the spooled block
    deadline = time.monotonic() + 30
    while w.spool_bytes and time.monotonic() < deadline:
        time.sleep(0.05)
    assert w.shutdown()
    assert w.spool_bytes == 0
    assert _stored(store, writer) == _expected(writer, a + b)
    _verified(store, writer, 8)


def _spooled_while_down(store: Store, writer: str, rows: list[list[Any]],
                        spool_dir: Path) -> BatchSpool:
    """One acknowledged block in the spool of a writer whose store was down."""
    flaky = _FailingStore(store)
    flaky.down = True
    spool = BatchSpool(spool_dir, 0)
    w = BatchWriter(flaky, writer, [SPEC], retry_backoff=(0.01, 0.05), spool=spool)
    w.start()
    w.submit(b"k", {"audit_events": _arrow(rows)}).result(30)
    assert w.shutdown()
    assert len(spool) == 1 and not _stored(store, writer)
    return spool


def test_a_spooled_block_already_stored_is_not_inserted_again(
        store: Store, encoder: RecordEncoder, tmp_path: Path) -> None:
    """A crash between a spooled block's insert and its removal: the restart finds the block
    in the store by the chain head and drops it from the spool, even where ClickHouse's
    deduplication log would not catch the second insert (here: it went in under another
    token)."""
    writer = "spool-stored"
    a = _rows(encoder, 5, "stored-a")
    spool = _spooled_while_down(store, writer, a, tmp_path / "spool")
    entry = spool.entries()[0]
    store.insert_arrow("audit_events", entry.read(), "inserted-before-the-crash")
    w = BatchWriter(store, writer, [SPEC], spool=BatchSpool(tmp_path / "spool", 0))
    w.start()
    assert (w.stats.skipped_blocks, w.stats.drained_blocks) == (1, 0)
    b = _rows(encoder, 2, "stored-b")
    w.submit(b"k2", {"audit_events": _arrow(b)}).result(30)
    assert w.shutdown()
    assert w.spool_bytes == 0
    assert _stored(store, writer) == _expected(writer, a + b)
    _verified(store, writer, 7)


def test_a_spooled_block_dropped_as_a_duplicate_is_inserted_again(
        store: Store, encoder: RecordEncoder, tmp_path: Path) -> None:
    """ClickHouse writes an insert's deduplication entry before its part: a crash in between
    leaves an entry for a block it never stored, and the spooled block's insert under that
    token is silently dropped. The drain sees that the chain head did not move and inserts
    the block again, once."""
    writer = "spool-phantom"
    a = _rows(encoder, 4, "phantom-a")
    spool = _spooled_while_down(store, writer, a, tmp_path / "spool")
    entry = spool.entries()[0]
    # the leftover entry: another block (another writer's own chain) under the same token
    other, _, _ = link_arrow(ChainState("phantom-holder"),
                             _arrow(_rows(encoder, 3, "phantom-other")))
    store.insert_arrow("audit_events", other, entry.token)
    store.insert_arrow("audit_events", entry.read(), entry.token)
    assert not _stored(store, writer)  # what the drain's first insert meets: dropped
    w = BatchWriter(store, writer, [SPEC], spool=BatchSpool(tmp_path / "spool", 0))
    w.start()
    assert (w.stats.reinserted_blocks, w.stats.drained_blocks) == (1, 1)
    assert w.shutdown()
    assert _stored(store, writer) == _expected(writer, a)
    _verified(store, writer, 4)


class _RejectingStore(_FailingStore):
    """The real store; ``insert_arrow`` of the rows of ``writer_id`` is refused for good."""

    def __init__(self, store: Store, writer_id: str) -> None:
        super().__init__(store)
        self.writer_id = writer_id

    def insert_arrow(self, table: str, data: pa.Table, token: str,
                     types: list[str] | None = None) -> None:
        writers = {w.decode() if isinstance(w, bytes) else w  # binary, as Arrow types it
                   for w in data.column("writer_id").to_pylist()}
        if self.writer_id in writers:
            raise PermanentError(f"insert into {table}: injected rejection")
        super().insert_arrow(table, data, token, types)


def test_a_spooled_block_the_store_refuses_is_kept_aside(
        store: Store, encoder: RecordEncoder, tmp_path: Path) -> None:
    """A spooled block the store refuses for good neither kills the writer nor blocks the
    spool: it moves to ``rejected/`` (acknowledged rows are never dropped) and the writer
    goes on."""
    writer = "spool-refused"
    a = _rows(encoder, 3, "refused-a")
    _spooled_while_down(store, writer, a, tmp_path / "spool")
    w = BatchWriter(_RejectingStore(store, writer), writer, [SPEC],
                    spool=BatchSpool(tmp_path / "spool", 0))
    w.start()
    assert (w.stats.rejected_blocks, w.spool_bytes) == (1, 0)
    kept = list((tmp_path / "spool" / "rejected").glob("*.arrow"))
    assert len(kept) == 1
    assert BatchSpool._load(kept[0]).read().num_rows == 3
    other = "spool-refused-next"
    w2 = BatchWriter(store, other, [SPEC])
    w2.start()
    w2.submit(None, {"audit_events": _arrow(_rows(encoder, 2, "refused-b"))}).result(30)
    assert w2.shutdown() and w.shutdown()
    assert len(_stored(store, other)) == 2 and not _stored(store, writer)


def _chdb_shaped(table: pa.Table) -> pa.Table:
    """The table as chDB's Arrow output types it: UUID as the arrow.uuid extension, String as
    utf8 (not validated: ciphertexts are not UTF-8), fields not null, field metadata."""
    arrays, fields = [], []
    for f, col in zip(table.schema, table.columns, strict=True):
        arr = col.combine_chunks()
        if f.type == pa.binary(16):
            arr = pa.ExtensionArray.from_storage(pa.uuid(), arr)
        elif f.type == pa.binary():
            arr = arr.view(pa.string())
        elif pa.types.is_list(f.type):
            arr = pa.ListArray.from_arrays(arr.offsets, arr.values.view(pa.string()),
                                           type=pa.list_(pa.field("item", pa.string(), False)))
        arrays.append(arr)
        fields.append(pa.field(f.name, arr.type, nullable=False,
                               metadata={b"PARQUET:logical_type": b"x"}))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields, metadata={b"k": b"v"}))


def test_chdb_shaped_arrow_is_cast_to_the_schema(store: Store, encoder: RecordEncoder) -> None:
    writer = "arrow-chdb-shaped"
    rows = _rows(encoder, 6, "shaped")
    shaped = _chdb_shaped(_arrow(rows[:4]))
    assert shaped.schema.field("event_id").type == pa.uuid()
    w = BatchWriter(store, writer, [SPEC])
    # the same ids again as rows: the UUID bytes of both kinds are one key
    assert _run_one_batch(w, [(b"c1", {"audit_events": shaped}),
                              (b"c2", {"audit_events": [list(r) for r in rows[2:]]})]) == [None] * 2
    assert w.stats.duplicate_rows == 2
    assert _ids(store, writer) == [r[0] for r in rows]
    assert _stored(store, writer) == _expected(writer, rows)
    _verified(store, writer, 6)


def test_an_insert_does_not_wait_for_a_long_query(store: Store, encoder: RecordEncoder) -> None:
    """The embedded store's streaming inserts have their own connection and lock: a slow
    query (a checkpoint folding 100,000 rows takes up to ~270 ms under load) must not hold
    up the insert that acknowledgements wait for."""
    import threading

    rows = _rows(encoder, 3, "while-querying")
    table = _arrow(rows)
    linked, _, _ = link_arrow(ChainState("while-querying"), table)
    started = threading.Event()
    took: list[float] = []

    def slow_query() -> None:
        started.set()
        t0 = time.monotonic()
        store.query("SELECT sum(sleepEachRow(0.5)) FROM numbers(6)")  # ~3 s
        took.append(time.monotonic() - t0)

    q = threading.Thread(target=slow_query)
    q.start()
    started.wait()
    time.sleep(0.3)  # the query holds the query lock by now
    store.insert_arrow("audit_events", linked, "while-querying-1",
                       types=[c.type for c in AUDIT_COLUMNS])
    query_still_running = q.is_alive()
    q.join()
    assert took and took[0] >= 2.5  # the query did hold its lock that long
    assert query_still_running  # the insert did not wait for it
    assert _stored(store, "while-querying") == _expected("while-querying", rows)
