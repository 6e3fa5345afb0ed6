"""The compiled Native-format encoder (``_native.native_block``) against the engine's own
Arrow reader.

The embedded store inserts the writer's batches as one block of ClickHouse's Native format
when the receiver's compiled encoder is available (``Store.block_encoder``), and as an Arrow
stream otherwise. Both must store exactly the same values: the same table is inserted both
ways into a real embedded store and read back. The encoder reads pyarrow's buffers directly,
so a chunk description that does not fit its buffers must raise, never read past them.
"""

from __future__ import annotations

import itertools
import random
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from phiaudit.receiver._fast import native_available, native_block, native_block_encoder
from phiaudit.storage import (
    AUDIT_COLUMNS,
    BatchWriter,
    PermanentError,
    Store,
    StoreLocation,
    TableSpec,
    migrate,
)
from phiaudit.storage._arrow import arrow_table
from tests.receiver import native_build

TYPES = [c.type for c in AUDIT_COLUMNS]
NAMES = [c.name for c in AUDIT_COLUMNS]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    native_build.require_native()
    loc = StoreLocation(data_dir=tmp_path_factory.mktemp("native-block") / "data")
    migrate(loc)
    s = Store.open(loc)
    yield s
    s.close()


def _value(rng: random.Random, ch_type: str, row: int) -> Any:
    if ch_type == "UUID":
        return uuid.UUID(int=rng.getrandbits(128))
    if ch_type.startswith("DateTime64"):
        return rng.choice([0, 1, 946684800_000000, 1_790_000_000_123456, 4_102_444_800_000000])
    if ch_type.startswith("FixedString"):
        return rng.randbytes(int(ch_type[len("FixedString("):-1]))
    if ch_type == "UInt64":
        return rng.choice([0, 1, 127, 128, 2**32, 2**64 - 1, row])
    if ch_type == "UInt32":
        return rng.choice([0, 1, 2**32 - 1])
    if ch_type == "UInt16":
        return rng.choice([0, 200, 404, 65535])
    if ch_type.startswith("Array("):
        return [rng.choice(["clinician", "nurse", "", "é" * 70]) for _ in range(rng.randrange(4))]
    if ch_type.startswith("LowCardinality"):
        return rng.choice(["read", "search", "", "ünïcode", "x" * 130])
    # String: empty, short, one- and two-byte varint lengths, any bytes
    return rng.choice([b"", b"a", rng.randbytes(127), rng.randbytes(128), rng.randbytes(300),
                       "pätient".encode()])


def _rows(n: int, seed: int, writer: str) -> list[list[Any]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        row = [_value(rng, t, i) for t in TYPES]
        row[NAMES.index("writer_id")] = writer
        row[NAMES.index("seq")] = i + 1
        rows.append(row)
    return rows


def _stored(store: Store, writer: str) -> list[tuple[Any, ...]]:
    _, rows = store.query(
        "SELECT * EXCEPT (writer_id) FROM audit_events WHERE writer_id = {w:String} "
        "ORDER BY seq", {"w": writer})
    return [tuple(r) for r in rows]


def _chunked(table: pa.Table) -> pa.Table:
    """The same rows in three chunks, two of them slices with an offset (as the writer's
    concatenated batches are)."""
    n = table.num_rows
    return pa.concat_tables([table.slice(0, n // 3), table.slice(n // 3, n // 3),
                             table.slice(2 * (n // 3))])


def test_native_block_stores_what_the_arrow_stream_stores(store: Store) -> None:
    rows_a = _rows(600, 7, "nb-arrow")
    rows_n = _rows(600, 7, "nb-native")
    table_a = _chunked(arrow_table(AUDIT_COLUMNS, rows_a))
    table_n = _chunked(arrow_table(AUDIT_COLUMNS, rows_n))
    assert table_n.column("actor_roles").num_chunks == 3
    store.block_encoder = None
    store.insert_arrow("audit_events", table_a, "nb-arrow-1", types=TYPES)
    calls: list[bool] = []

    def spy(data: pa.Table, types: list[str]) -> bytes | None:
        out = native_block(data, types)
        calls.append(out is not None)
        return out

    store.block_encoder = spy
    try:
        store.insert_arrow("audit_events", table_n, "nb-native-1", types=TYPES)
    finally:
        store.block_encoder = None
    assert calls == [True]  # sent as Native, not the Arrow fallback
    stored_a, stored_n = _stored(store, "nb-arrow"), _stored(store, "nb-native")
    assert len(stored_a) == 600
    assert stored_n == stored_a


def test_the_encoder_declines_what_it_does_not_take() -> None:
    native_build.require_native()
    table = arrow_table(AUDIT_COLUMNS, _rows(3, 1, "w"))
    assert native_block(table, TYPES) is not None
    # a null anywhere: the Arrow stream says it, Native has no nulls for these types
    i = NAMES.index("query")
    with_null = table.set_column(i, table.schema.field(i),
                                 pa.array([b"x", None, b"y"], pa.binary()))
    assert native_block(with_null, TYPES) is None
    # a type it has no mapping for, and a column count that does not match
    flags = pa.table({"decrypt": pa.array([True, False])})
    assert native_block(flags, ["Bool"]) is None
    assert native_block(table, TYPES[:-1]) is None
    assert native_block_encoder() is native_block


def test_the_block_layout_is_clickhouse_native() -> None:
    """Byte for byte what the engine itself writes for the same values (its SELECT ... FORMAT
    Native): header, names, types, UUID halves, varint lengths, Array offsets."""
    native_build.require_native()
    table = pa.table({
        "u": pa.array([uuid.UUID("00112233-4455-6677-8899-aabbccddeeff").bytes],
                      pa.binary(16)),
        "s": pa.array([b"ab"], pa.binary()),
        "a": pa.array([["x", "yz"]], pa.list_(pa.binary())),
        "n": pa.array([7], pa.uint16()),
    })
    got = native_block(table, ["UUID", "String", "Array(String)", "UInt16"])
    expected = bytes.fromhex(
        "04 01"                                   # 4 columns, 1 row
        "01 75 04 55554944"                       # u UUID
        "77 66 55 44 33 22 11 00 ff ee dd cc bb aa 99 88"
        "01 73 06 537472696e67 02 6162"           # s String "ab"
        "01 61 0d 41727261792853747269 6e6729"    # a Array(String)
        "02 00 00 00 00 00 00 00 01 78 02 79 7a"  # end offset 2, "x", "yz"
        "01 6e 06 55496e743136 07 00")            # n UInt16 7
    assert got == expected


def test_low_cardinality_columns_go_dictionary_encoded_as_the_engine_writes_them() -> None:
    """Byte for byte the engine's own ``SELECT toLowCardinality(...) FORMAT Native``: the key
    version, the index width and flags, the keys (the default "" first, then in order of first
    appearance), the row count and one index per value; an Array's end offsets come between
    the key version and its values. The engine then hashes each distinct value once, not every
    row of a String column."""
    native_build.require_native()
    table = pa.table({
        "c": pa.array([b"ab", b"ab", b"c", b""], pa.binary()),
        "a": pa.array([[b"ab", b"c"], [], [b"c"], []], pa.list_(pa.binary())),
    })
    got = native_block(table, ["LowCardinality(String)", "Array(LowCardinality(String))"])
    expected = bytes.fromhex(
        "02 04"                                               # 2 columns, 4 rows
        "01 63 16 4c6f7743617264696e616c69747928537472696e6729"   # c LowCardinality(String)
        "01 00 00 00 00 00 00 00"                             # keys version 1
        "00 06 00 00 00 00 00 00"                             # UInt8 indexes, new keys
        "03 00 00 00 00 00 00 00 00 02 6162 01 63"            # 3 keys: "", "ab", "c"
        "04 00 00 00 00 00 00 00 01 01 02 00"                 # 4 indexes
        "01 61 1d 4172726179284c6f7743617264696e616c69747928537472696e672929"
        "01 00 00 00 00 00 00 00"                             # keys version 1
        "02 00 00 00 00 00 00 00 02 00 00 00 00 00 00 00"     # end offsets 2, 2,
        "03 00 00 00 00 00 00 00 03 00 00 00 00 00 00 00"     # 3, 3
        "00 06 00 00 00 00 00 00"
        "03 00 00 00 00 00 00 00 00 02 6162 01 63"
        "03 00 00 00 00 00 00 00 01 02 02")                   # 3 values
    assert got == expected


def test_arrays_all_empty_carry_no_dictionary() -> None:
    """Arrays of LowCardinality with no value at all (one span without roles, the common
    small request): the engine writes the key version and the offsets, and nothing else; a
    dictionary there would be read as the next column."""
    native_build.require_native()
    table = pa.table({"a": pa.array([[], []], pa.list_(pa.binary())),
                      "n": pa.array([7, 8], pa.uint16())})
    got = native_block(table, ["Array(LowCardinality(String))", "UInt16"])
    expected = bytes.fromhex(
        "02 02"
        "01 61 1d 4172726179284c6f7743617264696e616c69747928537472696e672929"
        "01 00 00 00 00 00 00 00"                             # keys version 1
        "00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00"     # end offsets 0, 0
        "01 6e 06 55496e743136 07 00 08 00")
    assert got == expected


@pytest.mark.parametrize("rows", [1, 3])
def test_a_small_block_without_roles_is_stored(store: Store, rows: int) -> None:
    """The service's smallest requests: a row or three, no roles, every LowCardinality
    column one value; sent as Native, read back as sent as Arrow."""
    table = arrow_table(AUDIT_COLUMNS, _rows(rows, 5, "w"))
    i_roles, i_writer = NAMES.index("actor_roles"), NAMES.index("writer_id")
    table = table.set_column(i_roles, table.schema.field(i_roles),
                             pa.array([[]] * rows, table.schema.field(i_roles).type))
    stored = {}
    for how, encoder in (("arrow", None), ("native", native_block)):
        writer = f"nb-small-{rows}-{how}"
        t = table.set_column(i_writer, table.schema.field(i_writer),
                             pa.array([writer] * rows, pa.binary()))
        store.block_encoder = encoder
        try:
            store.insert_arrow("audit_events", t, f"nb-small-{rows}-{how}", types=TYPES)
        finally:
            store.block_encoder = None
        stored[how] = _stored(store, writer)
    assert len(stored["arrow"]) == rows
    assert stored["native"] == stored["arrow"]


@pytest.mark.parametrize("distinct", [1, 255, 256, 300, 65_600])
def test_dictionaries_of_every_index_width_store_what_the_arrow_stream_stores(
        store: Store, distinct: int) -> None:
    """Up to 256 keys (the default "" included) the indexes are one byte wide, up to 65,536
    two, beyond that four: each width round-trips through a real insert, against the same
    rows sent as Arrow. The values are spread over the chunks, repeat and come back."""
    n = max(distinct, 600)
    base = arrow_table(AUDIT_COLUMNS, _rows(600, 11, "w"))
    table = pa.concat_tables([base] * (n // 600 + 1)).slice(0, n)
    values = [f"reason-{i % distinct}-é".encode() if i % 7 else b"" for i in range(n)]
    if distinct == 1:
        values = [b"same"] * n
    roles = [[values[i], values[(i * 7919) % n]] if i % 5 else [] for i in range(n)]
    i_reason, i_roles = NAMES.index("outcome_reason"), NAMES.index("actor_roles")
    table = table.set_column(i_reason, table.schema.field(i_reason), pa.array(values, pa.binary()))
    table = table.set_column(i_roles, table.schema.field(i_roles),
                             pa.array(roles, table.schema.field(i_roles).type))
    i_seq = NAMES.index("seq")
    table = table.set_column(i_seq, table.schema.field(i_seq),
                             pa.array(range(1, n + 1), pa.uint64()))
    i_writer = NAMES.index("writer_id")
    tables = {}
    for how in ("arrow", "native"):
        writer = f"nb-width-{distinct}-{how}"
        tables[how] = _chunked(table.set_column(
            i_writer, table.schema.field(i_writer), pa.array([writer] * n, pa.binary())))
    store.block_encoder = None
    store.insert_arrow("audit_events", tables["arrow"], f"nb-w{distinct}-a", types=TYPES)
    assert native_block(tables["native"], TYPES) is not None
    store.block_encoder = native_block
    try:
        store.insert_arrow("audit_events", tables["native"], f"nb-w{distinct}-n", types=TYPES)
    finally:
        store.block_encoder = None
    stored_a = _stored(store, f"nb-width-{distinct}-arrow")
    stored_n = _stored(store, f"nb-width-{distinct}-native")
    assert len(stored_a) == n
    assert stored_n == stored_a
    _, got = store.query("SELECT uniqExact(outcome_reason) FROM audit_events "
                         "WHERE writer_id = {w:String}", {"w": f"nb-width-{distinct}-native"})
    assert got[0][0] == len(set(values))


def _i32(*values: int) -> bytes:
    return b"".join(v.to_bytes(4, "little", signed=True) for v in values)


@pytest.mark.parametrize("nrows, spec", [
    # fixed width: offset + length beyond the buffer, a negative offset, a UUID not 16 wide
    (3, [(b"n", b"UInt64", "F", [(0, 3, 8, b"\0" * 16)])]),
    (1, [(b"n", b"UInt64", "F", [(2, 1, 8, b"\0" * 16)])]),
    (1, [(b"n", b"UInt64", "F", [(-1, 1, 8, b"\0" * 16)])]),
    (1, [(b"u", b"UUID", "U", [(0, 1, 8, b"\0" * 16)])]),
    # binary: an offset past the data, decreasing offsets, fewer offsets than rows, negative
    (1, [(b"s", b"String", "S", [(0, 1, _i32(0, 9), b"abc")])]),
    (2, [(b"s", b"String", "S", [(0, 2, _i32(0, 2, 1), b"abc")])]),
    (3, [(b"s", b"String", "S", [(0, 3, _i32(0, 1), b"abc")])]),
    (1, [(b"s", b"String", "S", [(0, 1, _i32(-4, 1), b"abc")])]),
    # list: a child offset past the child data, a list offset past the child offsets
    (1, [(b"a", b"Array(String)", "A", [(0, 1, _i32(0, 2), 0, _i32(0, 1, 50), b"ab")])]),
    (1, [(b"a", b"Array(String)", "A", [(0, 1, _i32(0, 9), 0, _i32(0, 1), b"ab")])]),
    (1, [(b"a", b"Array(String)", "A", [(0, 1, _i32(0, 1), 5, _i32(0, 1), b"ab")])]),
    # the same checks before a LowCardinality column's dictionary reads a value
    (1, [(b"s", b"LowCardinality(String)", "L", [(0, 1, _i32(0, 9), b"abc")])]),
    (2, [(b"s", b"LowCardinality(String)", "L", [(0, 2, _i32(0, 2, 1), b"abc")])]),
    (1, [(b"a", b"Array(LowCardinality(String))", "M",
          [(0, 1, _i32(0, 2), 0, _i32(0, 1, 50), b"ab")])]),
    (1, [(b"a", b"Array(LowCardinality(String))", "M",
          [(0, 1, _i32(0, 1), 5, _i32(0, 1), b"ab")])]),
    # the chunks hold another number of rows than the block says
    (2, [(b"n", b"UInt64", "F", [(0, 1, 8, b"\0" * 16)])]),
    (2, [(b"s", b"LowCardinality(String)", "L", [(0, 1, _i32(0, 1), b"a")])]),
])
def test_chunks_that_do_not_fit_their_buffers_raise(nrows: int, spec: list[Any]) -> None:
    native_build.require_native()
    _native = native_build.require_native()
    with pytest.raises(ValueError):
        _native.native_block(nrows, spec)
    # the same call with a block that fits is accepted: the test above is not vacuous
    assert _native.native_block(1, [(b"n", b"UInt64", "F", [(1, 1, 8, b"\0" * 16)])])


def test_the_writer_sends_native_blocks_and_the_rows_are_stored(store: Store,
                                                               tmp_path: Path) -> None:
    """The service's path: BatchWriter links a batch of two requests and the store sends it
    as one Native block (a spy on the encoder); every row is stored, the chain as linked."""
    sent: list[int] = []

    def spy(data: pa.Table, types: list[str]) -> bytes | None:
        out = native_block(data, types)
        if out is not None:
            sent.append(data.num_rows)
        return out

    store.block_encoder = spy
    spec = TableSpec("audit_events", AUDIT_COLUMNS, chained=True, dedup_column="event_id")
    writer = BatchWriter(store, "nb-writer", [spec], max_wait=0.5)
    writer.start()
    try:
        first = _rows(50, 11, "ignored")
        second = _rows(70, 12, "ignored")
        for rows in (first, second):
            for r in rows:
                r[NAMES.index("seq")] = 0
        futures = [writer.submit(bytes([k]) * 32, {"audit_events": rows})
                   for k, rows in enumerate((first, second))]
        for f in futures:
            f.result(timeout=60)
    finally:
        writer.shutdown()
        store.block_encoder = None
    assert sum(sent) == 120
    _, rows = store.query("SELECT count(), min(seq), max(seq) FROM audit_events "
                          "WHERE writer_id = 'nb-writer'")
    assert tuple(rows[0]) == (120, 1, 120)
    _, linked = store.query("SELECT seq, prev_hash, hash FROM audit_events "
                            "WHERE writer_id = 'nb-writer' ORDER BY seq")
    for (_, _, prev), (_, prev_hash, _) in itertools.pairwise(linked):
        assert prev_hash == prev


def test_native_available_here_in_ci() -> None:
    """The receiver bench and the service rely on it: CI builds the extension."""
    native_build.require_native()
    assert native_available()[0]


@pytest.mark.parametrize("arrow_type, ch_type, taken", [
    (pa.binary(), "String", True),
    (pa.binary(), "LowCardinality(String)", True),
    (pa.binary(), "Nullable(String)", False),  # Native writes a null map first
    (pa.binary(32), "FixedString(32)", True),
    (pa.binary(32), "FixedString(16)", False),
    (pa.binary(16), "UUID", True),
    (pa.uint16(), "UInt16", True),
    (pa.uint32(), "UInt16", False),
    (pa.int64(), "UInt64", False),
    (pa.timestamp("us", tz="UTC"), "DateTime64(6, 'UTC')", True),
    (pa.timestamp("ns", tz="UTC"), "DateTime64(6, 'UTC')", False),
    (pa.timestamp("ns"), "DateTime64(9)", True),
    (pa.list_(pa.binary()), "Array(LowCardinality(String))", True),
    (pa.list_(pa.binary()), "Array(Map(LowCardinality(String), String))", False),
    (pa.map_(pa.string(), pa.string()), "Map(LowCardinality(String), String)", False),
    (pa.bool_(), "Bool", False),
])
def test_only_exact_type_pairs_are_encoded(arrow_type: pa.DataType, ch_type: str,
                                           taken: bool) -> None:
    """A column whose Arrow and ClickHouse types the encoder does not map exactly is never
    guessed at: the whole table goes as Arrow (None)."""
    native_build.require_native()
    column = pa.array([], arrow_type)
    assert (native_block(pa.table({"c": column}), [ch_type]) is not None) is taken


def test_a_block_naming_a_column_the_table_lacks_is_refused(store: Store) -> None:
    """Native inserts carry no column list (the engine matches the block's names): a name
    the table does not have must fail the insert, never be dropped while the rest is stored
    (``input_format_skip_unknown_fields = 0``)."""
    table = arrow_table(AUDIT_COLUMNS, _rows(5, 3, "nb-renamed"))
    renamed = table.rename_columns(["querry" if n == "query" else n for n in table.column_names])
    store.block_encoder = lambda data, types: native_block(renamed, types)
    try:
        with pytest.raises(PermanentError):
            store.insert_arrow("audit_events", table, "nb-renamed-1", types=TYPES)
    finally:
        store.block_encoder = None
    assert _stored(store, "nb-renamed") == []


def test_an_encoder_failure_falls_back_to_the_arrow_stream(store: Store) -> None:
    """The Native block is an optimisation: if the encoder fails, the rows still go in (as
    Arrow), once."""
    rows = _rows(4, 5, "nb-fallback")
    table = arrow_table(AUDIT_COLUMNS, rows)

    def broken(data: pa.Table, types: list[str]) -> bytes | None:
        raise RuntimeError("encoder failed")

    store.block_encoder = broken
    try:
        store.insert_arrow("audit_events", table, "nb-fallback-1", types=TYPES)
    finally:
        store.block_encoder = None
    store.insert_arrow("audit_events", arrow_table(AUDIT_COLUMNS, _rows(4, 5, "nb-fb-ref")),
                       "nb-fb-ref-1", types=TYPES)
    assert len(_stored(store, "nb-fallback")) == 4
    assert _stored(store, "nb-fallback") == _stored(store, "nb-fb-ref")
