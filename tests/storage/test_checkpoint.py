"""Checkpoints, signing keys and anchors; the SQL leaf against Python's; the checkpointer's
schedule and heartbeat - against the session's real embedded store."""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from phiaudit.storage import (
    ACCESS_LOG_COLUMNS,
    AUDIT_COLUMNS,
    AccessRecord,
    AuditEvent,
    BatchWriter,
    Checkpoint,
    CompactRange,
    ConfigError,
    DirectoryAnchor,
    IntegrityError,
    RecordEncoder,
    SigningKey,
    Store,
    TableSpec,
    canonical_encoder,
    leaf_hash,
    leaf_sql,
    load_checkpoints,
    public_keys,
    verify,
)


def _cp(size: int = 3, t: int = 1_764_000_000_000_000) -> Checkpoint:
    return Checkpoint("phiaudit/phiaudit/audit_events", "host-1", size, b"\x07" * 32, t)


def test_signing_key_is_wrapped_beside_the_key_ring(data_dir: Path,
                                                    encoder: RecordEncoder) -> None:
    key = SigningKey.open(data_dir)
    again = SigningKey.open(data_dir)
    assert again.key_id == key.key_id and again.public == key.public
    doc = json.loads(SigningKey.path(data_dir).read_text())
    raw_private = key._private.private_bytes_raw()
    assert raw_private.hex() not in json.dumps(doc)
    assert "[REDACTED]" in repr(key)
    assert oct(os.stat(SigningKey.path(data_dir)).st_mode & 0o777) == "0o600"
    assert public_keys(data_dir) == {key.key_id: key.public}
    signed = key.sign(_cp())
    assert signed.verify({key.key_id: key.public}) is True
    assert signed.verify({}) is None
    for forged in (Checkpoint(**{**signed.__dict__, "tree_size": 4}),
                   Checkpoint(**{**signed.__dict__, "root_hash": b"\x08" * 32}),
                   Checkpoint(**{**signed.__dict__, "writer_id": "host-2"})):
        assert forged.verify({key.key_id: key.public}) is False


def test_signing_key_needs_the_kek(data_dir: Path, encoder: RecordEncoder,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    SigningKey.open(data_dir)
    monkeypatch.setenv("PHIAUDIT_KEK", "11" * 32)
    with pytest.raises(ConfigError, match="does not open"):
        SigningKey.open(data_dir)


def test_note_round_trip_and_canonical_form() -> None:
    cp = _cp()
    cp = Checkpoint(**{**cp.__dict__, "key_id": "abcd", "signature": b"\x01" * 64})
    note = cp.note()
    assert note.startswith("phiaudit-checkpoint/1\norigin phiaudit/phiaudit/audit_events\n"
                           "writer host-1\nsize 3\nroot " + "07" * 32 + "\ntime ")
    assert Checkpoint.parse(note) == cp
    with pytest.raises(IntegrityError):
        Checkpoint.parse(note.replace("size 3", "size 03"))
    with pytest.raises(IntegrityError):
        Checkpoint.parse(note.replace("\u2014 ", ""))
    with pytest.raises(ValueError):
        Checkpoint("o", "two words", 1, b"\x00" * 32, 1).body()


def test_directory_anchor_is_write_once_and_outside_the_data_dir(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        DirectoryAnchor(tmp_path / "data" / "anchor", tmp_path / "data")
    anchor = DirectoryAnchor(tmp_path / "data.anchor", tmp_path / "data")
    cp = Checkpoint(**{**_cp().__dict__, "key_id": "k1", "signature": b"s" * 64})
    anchor.put(cp)
    anchor.put(cp)  # the same checkpoint again: a retry, fine
    files = list((tmp_path / "data.anchor").rglob("*.checkpoint"))
    assert len(files) == 1 and oct(files[0].stat().st_mode & 0o777) == "0o444"
    other = Checkpoint(**{**cp.__dict__, "root_hash": b"\x09" * 32})
    with pytest.raises(IntegrityError, match="exists"):
        anchor.put(other)  # same chain, size and time: never overwritten
    assert Checkpoint.parse(files[0].read_text()) == cp
    assert anchor.checkpoints() == [cp]
    anchor.put_public_key("k1", b"p" * 32)
    assert anchor.public_keys() == {"k1": b"p" * 32}


def _audit_rows(encoder: RecordEncoder, n: int) -> list[list[Any]]:
    rows = []
    for i in range(n):
        rows.append(encoder.audit_row(AuditEvent(
            event_id=uuid.uuid4(), event_time_us=1_764_000_000_123_456 + i,
            received_time_us=1_764_000_001_000_001 + i, action="search", outcome="success",
            actor_id="dr.\u00e9l\u00e8ve \U0001f600" if i % 2 else "",
            actor_roles=["physician", "", "a:b"] if i % 3 else [],
            patient_id=f"p-{i}", query="name=smith" if i % 2 else "",
            record_count=2**63 + i, http_status=404 if i % 2 else 0,
            extra={"k": i} if i % 2 else {})))
    return rows


def test_sql_leaf_is_byte_identical_to_python(store: Store, encoder: RecordEncoder,
                                              data_dir: Path) -> None:
    w = BatchWriter(store, "leaf-kat", [TableSpec("audit_events", AUDIT_COLUMNS, True),
                                        TableSpec("access_log", ACCESS_LOG_COLUMNS, True)])
    w.start()
    w.submit(None, {"audit_events": _audit_rows(encoder, 12), "access_log": [
        encoder.access_row(AccessRecord("alice", "security", "direct", "SELECT 1", flag, 3,
                                        "ok"), 1_764_000_000_000_001) for flag in (True, False)
    ]}).result(timeout=60)
    assert w.shutdown()
    for table, columns in (("audit_events", AUDIT_COLUMNS), ("access_log", ACCESS_LOG_COLUMNS)):
        names = ", ".join(f"`{c.name}`" for c in columns)
        _, rows = store.query(f"SELECT {names}, {leaf_sql(columns)} FROM {table} "
                              "WHERE writer_id = 'leaf-kat' ORDER BY seq", binary=True)
        assert rows
        enc = canonical_encoder(columns)
        import hashlib

        for r in rows:
            assert bytes(r[-1]) == hashlib.sha256(enc(list(r[:-1]))).digest()
    for mode in ("sql", "python"):
        # (a checkpointer test may have signed this chain too: its key is the session's)
        report = verify(store, keys=public_keys(data_dir), mode=mode, writers=["leaf-kat"])
        assert report.ok, report.findings
        assert report.rows == 14 and report.writers == 1 and report.mode == mode


def test_checkpointer_signs_on_events_and_heartbeats_when_idle(
        store: Store, encoder: RecordEncoder, data_dir: Path, tmp_path: Path) -> None:
    from phiaudit.receiver._checkpointer import Checkpointer

    w = BatchWriter(store, "cp-sched", [TableSpec("audit_events", AUDIT_COLUMNS, True)])
    w.start()
    w.submit(None, {"audit_events": _audit_rows(encoder, 7)}).result(timeout=60)
    anchor = DirectoryAnchor(tmp_path / "anchor")
    key = SigningKey.open(data_dir)
    cpr = Checkpointer(store, key, anchor, interval_s=3600, events=5, heartbeat_s=0.5,
                       committed_rows=lambda: w.stats.rows.get("audit_events", 0))

    def mine() -> list[Checkpoint]:
        return sorted((c for c in anchor.checkpoints() if c.writer_id == "cp-sched"),
                      key=lambda c: c.time_us)

    cpr.start()
    try:
        w.submit(None, {"audit_events": _audit_rows(encoder, 5)}).result(timeout=60)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any(c.tree_size == 12 for c in mine()):
            time.sleep(0.05)
        # 5 events since start: a checkpoint long before the hour-long interval
        assert any(c.tree_size == 12 for c in mine())
        # idle: heartbeats of the same size, at new times
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len([c for c in mine() if c.tree_size == 12]) < 3:
            time.sleep(0.05)
        beats = [c for c in mine() if c.tree_size == 12]
        assert len(beats) >= 3 and len({c.time_us for c in beats}) == len(beats)
        w.submit(None, {"audit_events": _audit_rows(encoder, 1)}).result(timeout=60)
    finally:
        cpr.shutdown()
        assert w.shutdown()
    cps = mine()
    assert cps[-1].tree_size == 13  # the final checkpoint at shutdown covers every row
    assert all(c.verify({key.key_id: key.public}) for c in cps)
    # every anchored checkpoint is in the table, and the roots are the rows' tree hashes
    stored = {c for c in load_checkpoints(store) if c.writer_id == "cp-sched"}
    assert stored == set(cps)
    _, hashes = store.query("SELECT hash FROM audit_events WHERE writer_id = 'cp-sched' "
                            "ORDER BY seq", binary=True)
    tree = CompactRange()
    roots = {}
    for (h,) in hashes:
        tree.append(leaf_hash(bytes(h)))
        roots[tree.size] = tree.root()
    assert all(roots[c.tree_size] == c.root_hash for c in cps)
    report = verify(store, keys={key.key_id: key.public}, anchor=anchor, writers=["cp-sched"])
    assert report.ok, report.findings
    assert report.checkpoints == report.anchored == len(cps)


def test_roots_folded_in_sql_match_python_across_block_boundaries(
        store: Store, encoder: RecordEncoder) -> None:
    from phiaudit.storage._verify import _chain_roots

    w = BatchWriter(store, "roots-sql", [TableSpec("audit_events", AUDIT_COLUMNS, True)])
    w.start()
    w.submit(None, {"audit_events": _audit_rows(encoder, 700)}).result(timeout=60)
    assert w.shutdown()
    _, hashes = store.query("SELECT hash FROM audit_events WHERE writer_id = 'roots-sql' "
                            "ORDER BY seq", binary=True)
    tree = CompactRange()
    expected = {}
    for (h,) in hashes:
        tree.append(leaf_hash(bytes(h)))
        expected[tree.size] = tree.root()
    sizes = [1, 2, 255, 256, 257, 511, 512, 513, 699, 700]
    max_seq, roots = _chain_roots(store, "audit_events", "roots-sql", [*sizes, 701])
    assert max_seq == 700
    assert roots == {n: expected[n] for n in sizes}


def test_checkpointer_restores_a_newest_anchored_checkpoint_missing_from_the_table(
        store: Store, encoder: RecordEncoder, data_dir: Path, tmp_path: Path) -> None:
    """The service died between the anchor write and the table insert."""
    from phiaudit.receiver._checkpointer import Checkpointer

    key = SigningKey.open(data_dir)
    anchor = DirectoryAnchor(tmp_path / "anchor")
    lost = key.sign(Checkpoint("phiaudit/phiaudit/audit_events", "crashed-writer", 3,
                               b"\x05" * 32, time.time_ns() // 1000))
    anchor.put(lost)
    cpr = Checkpointer(store, key, anchor, interval_s=3600, heartbeat_s=3600)
    cpr.start()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and lost not in load_checkpoints(store):
            time.sleep(0.05)
    finally:
        cpr.shutdown()
    assert lost in load_checkpoints(store)


@pytest.mark.parametrize("how", ["sql", "compiled"])
def test_checkpointer_follows_whole_blocks_in_sql_and_finds_a_break_inside_one(
        store: Store, encoder: RecordEncoder, data_dir: Path, tmp_path: Path, how: str) -> None:
    """Blocks of BLOCK_LEAVES rows are checked and folded in ClickHouse (``block_roots``) or,
    in the service, by the compiled ``chain_fold`` over ``chain_rows``: the tree and head
    equal Python's row by row; a bad link inside a block sends that block down the row path,
    which stops the run exactly before the bad row."""
    from phiaudit.receiver._checkpointer import Checkpointer, _Chain
    from phiaudit.receiver._fast import native_chain_fold
    from phiaudit.storage import BLOCK_LEAVES, GENESIS, ChainState, link_rows

    fold = None
    if how == "compiled":
        fold = native_chain_fold()
        if fold is None:
            from tests.receiver import native_build

            native_build.require_native()
    cpr = Checkpointer(store, SigningKey.open(data_dir), DirectoryAnchor(tmp_path / "a"),
                       fold=fold)
    writer_id = f"cp-blocks-{how}"
    w = BatchWriter(store, writer_id, [TableSpec("audit_events", AUDIT_COLUMNS, True)])
    w.start()
    for n in (300, 400, 21):  # 721 rows: two whole blocks and a partial one
        w.submit(None, {"audit_events": _audit_rows(encoder, n)}).result(timeout=60)
    assert w.shutdown()
    _, hashes = store.query("SELECT hash FROM audit_events WHERE writer_id = {w:String} "
                            "ORDER BY seq", {"w": writer_id}, binary=True)
    expected = CompactRange()
    for (h,) in hashes:
        expected.append(leaf_hash(bytes(h)))
    folded: list[bool] = []
    real = cpr._follow_blocks

    def spy(c: Any, end: int) -> bool:
        folded.append(real(c, end))
        return folded[-1]

    cpr._follow_blocks = spy  # type: ignore[method-assign]
    chain = _Chain("audit_events", writer_id)
    cpr._follow(chain, 721)  # two whole blocks at once, the last 209 rows one by one
    assert folded == [True]
    assert chain.tree.size == 721 and not chain.broken_at
    assert chain.tree.root() == expected.root() and chain.head == bytes(hashes[-1][0])
    assert 2 * BLOCK_LEAVES < 721

    # a chain whose row 300 does not link to row 299 (inserted as is: INSERT is allowed)
    rows = _audit_rows(encoder, 600)
    for r in rows:
        r[-1] = b""  # leaves recomputed by link_rows
    link_rows(ChainState(f"cp-broken-{how}"), AUDIT_COLUMNS, rows)
    names = [c.name for c in AUDIT_COLUMNS]
    rows[299][names.index("prev_hash")] = b"\x09" * 32
    store.insert_rows("audit_events", AUDIT_COLUMNS, rows, f"cp-broken-{uuid.uuid4()}")
    broken = _Chain("audit_events", f"cp-broken-{how}")
    folded.clear()
    cpr._follow(broken, 600)
    assert folded == [False]  # the block check sees the bad link; the row path finds it
    assert broken.broken_at == 300 and broken.tree.size == 299
    assert broken.head == rows[298][names.index("hash")]
    assert GENESIS == b"\x00" * 32


def test_checkpointer_finds_every_writer_and_its_head_through_the_key(
        store: Store, encoder: RecordEncoder, data_dir: Path, tmp_path: Path) -> None:
    """The writers of a table and their highest seq, found by walking the primary key
    (writer_id, seq) a writer at a time, are exactly what a GROUP BY over every row says:
    writer ids that sort between others, share prefixes, or are not ASCII included."""
    from phiaudit.receiver._checkpointer import Checkpointer

    names = ["hd-b", "hd-a", "hd-ab", "hd-ä", "hd-a-very-long-writer-identity" * 3]
    for i, name in enumerate(names):
        w = BatchWriter(store, name, [TableSpec("audit_events", AUDIT_COLUMNS, True)])
        w.start()
        for _ in range(2):  # two parts per writer
            w.submit(None, {"audit_events": _audit_rows(encoder, i + 1)}).result(timeout=60)
        assert w.shutdown()
    cpr = Checkpointer(store, SigningKey.open(data_dir), DirectoryAnchor(tmp_path / "a"))
    _, expected = store.query(
        "SELECT writer_id, max(seq) FROM audit_events GROUP BY writer_id ORDER BY writer_id")
    heads = cpr._heads("audit_events")
    assert heads == [(str(w), int(s)) for w, s in expected]
    mine = {w: s for w, s in heads if w.startswith("hd-")}
    assert mine == {name: 2 * (i + 1) for i, name in enumerate(names)}
    assert cpr._heads("infra_events") == [
        (str(w), int(s)) for w, s in store.query(
            "SELECT writer_id, max(seq) FROM infra_events GROUP BY writer_id "
            "ORDER BY writer_id")[1]]


def test_own_writers_head_comes_from_the_writer_and_counts_stored_rows_only(
        store: Store, encoder: RecordEncoder, data_dir: Path, tmp_path: Path) -> None:
    """The service's checkpointer takes its own writer's head from ``stored_seq`` instead of
    an ``ORDER BY seq DESC`` read of every part; another writer's head still comes from the
    store. Rows the writer spooled while the store failed are not in ``stored_seq`` until they
    are drained, so the checkpointer never looks for rows the store does not hold yet (it
    would take their absence for a break in the chain and stop checkpointing)."""
    from phiaudit.receiver._checkpointer import Checkpointer
    from phiaudit.storage import BatchSpool
    from tests.receiver.flaky_service import FlakyStore

    spec = [TableSpec("audit_events", AUDIT_COLUMNS, True)]
    other = BatchWriter(store, "own-other", spec)
    other.start()
    other.submit(None, {"audit_events": _audit_rows(encoder, 3)}).result(timeout=60)
    assert other.shutdown()

    flag = tmp_path / "fail-inserts"
    flaky = FlakyStore(store, flag)
    w = BatchWriter(flaky, "own-me", spec, spool=BatchSpool(tmp_path / "spool", 1 << 26),
                    retry_backoff=(0.05, 0.2))
    assert w.stored_seq("audit_events") is None  # not started
    w.start()
    asked: list[dict[str, Any]] = []
    enumerations: list[str] = []

    class Recording:  # the real store; records its head and writer queries
        def __getattr__(self, name: str) -> Any:
            return getattr(store, name)

        def query(self, sql: str, params: dict[str, Any] | None = None, **kw: Any) -> Any:
            if "ORDER BY seq DESC" in sql:
                asked.append(dict(params or {}))
            if "ORDER BY writer_id" in sql:
                enumerations.append(sql)
            return store.query(sql, params, **kw)

    cpr = Checkpointer(Recording(), SigningKey.open(data_dir), DirectoryAnchor(tmp_path / "a"),
                       own_writer="own-me", own_stored=w.stored_seq)
    try:
        w.submit(None, {"audit_events": _audit_rows(encoder, 4)}).result(timeout=60)
        assert w.stored_seq("audit_events") == 4 and w.stored_seq("access_log") is None
        heads = dict(cpr._heads("audit_events"))
        assert heads["own-me"] == 4 and heads["own-other"] == 3
        assert {"w": "own-other"} in asked and all(p.get("w") != "own-me" for p in asked)

        flag.touch()  # the store fails: the next batch is spooled and acknowledged
        w.submit(None, {"audit_events": _audit_rows(encoder, 2)}).result(timeout=60)
        assert w.stats.spooled_blocks == 1 and w.stored_seq("audit_events") == 4
        cpr._round(force=True)
        chain = cpr._chains[("audit_events", "own-me")]
        assert chain.tree.size == 4 and not chain.broken_at

        flag.unlink()  # back: the spool drains, and the head follows
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and w.stored_seq("audit_events") != 6:
            time.sleep(0.05)
        assert w.stored_seq("audit_events") == 6
        # a round for this writer's new rows alone asks the store for no writer or head
        asked.clear()
        queries_before = len(enumerations)
        cpr._round(force=True, everyone=False)
        assert chain.tree.size == 6 and not chain.broken_at
        assert asked == [] and len(enumerations) == queries_before
        assert cpr._chains[("audit_events", "own-other")].tree.size == 3  # from the full round
    finally:
        assert w.shutdown()


def test_rounds_for_own_rows_still_find_every_other_writer_each_interval(
        store: Store, encoder: RecordEncoder, data_dir: Path, tmp_path: Path) -> None:
    """Rounds that this writer's new rows trigger follow its own chains only; the rounds that
    find every writer of every table still come at least once an interval, however busy the
    service is, so another writer's rows get their checkpoints."""
    from phiaudit.receiver._checkpointer import Checkpointer

    spec = [TableSpec("audit_events", AUDIT_COLUMNS, True)]
    me = BatchWriter(store, "iv-me", spec)
    me.start()
    anchor = DirectoryAnchor(tmp_path / "anchor")
    cpr = Checkpointer(store, SigningKey.open(data_dir), anchor, interval_s=1.0, events=1,
                       heartbeat_s=3600,
                       committed_rows=lambda: me.stats.rows.get("audit_events", 0),
                       own_writer="iv-me", own_stored=me.stored_seq)
    cpr.start()
    try:
        other = BatchWriter(store, "iv-other", spec)
        other.start()
        other.submit(None, {"audit_events": _audit_rows(encoder, 2)}).result(timeout=60)
        assert other.shutdown()

        def theirs() -> bool:
            return any(c.writer_id == "iv-other" and c.tree_size == 2
                       for c in anchor.checkpoints())

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not theirs():
            # a row of our own every 0.1 s: a round for our rows at every tick
            me.submit(None, {"audit_events": _audit_rows(encoder, 1)}).result(timeout=60)
            time.sleep(0.1)
        assert theirs()
        assert any(c.writer_id == "iv-me" for c in anchor.checkpoints())
    finally:
        cpr.shutdown()
        assert me.shutdown()
