"""The batch writer: group commit on a writer thread, acknowledgement only after commit.

Callers ``submit()`` the rows of one request (for one or several tables) with a request key
and get a ``concurrent.futures.Future`` that completes only when every one of those rows is
committed to ClickHouse. The rows of a table are a list of rows (in column order) or a
pyarrow Table of schema ``arrow_schema(columns)``; in a chained table's Arrow rows the ``hash``
column holds each row's leaf digest (the other chain columns are placeholders). The writer
thread takes everything queued the moment the previous insert finishes (up to ``max_rows``),
makes each table's rows one Arrow table, links the chained tables' rows to their writer's hash
chain (new chain columns; the caller's rows are never changed), and inserts each table as one
Arrow block. The flush interval is a maximum wait, not a pause: a batch waits only while the
caller reports requests still being processed (``expecting``), since their rows would otherwise
make a part of their own and their clients wait a whole insert longer.

Exactly once across client retries:

* Each insert carries an ``insert_deduplication_token`` that includes the batch's last chain
  hash (which covers every row of the batch) or, for unchained tables, a hash of the batch's
  request keys; a repeated insert of the same block is dropped by ClickHouse.
* When the store fails, the writer keeps the batch and retries it, unchanged, with the same
  tokens, until it commits: the chain never forks. Callers waiting on it time out on their own
  (and answer UNAVAILABLE); a client's retry of the same request (same key) attaches to the
  pending batch instead of adding rows, and gets OK once it is committed. Recently committed
  keys are remembered, so a late retry of a committed request adds nothing.
* Memory is bounded: beyond ``max_queue_rows`` queued rows ``submit`` raises ``Overloaded``.
"""

from __future__ import annotations

import array
import hashlib
import logging
import sys
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import pyarrow as pa

from ._arrow import arrow_schema, arrow_table
from ._chain import ChainState, canonical_encoder
from ._errors import PermanentError, StorageUnavailable
from ._schema import Column
from ._spool import BatchSpool, SpoolFull

__all__ = ["BatchWriter", "Linker", "Overloaded", "Rows", "TableSpec", "WriterStats",
           "link_arrow", "unlinked_table"]

#: The rows of one table in a ``submit``: a list of rows, or an Arrow table.
Rows: TypeAlias = "Sequence[Sequence[Any]] | pa.Table"

_CHAIN_ERRORS = (ValueError, TypeError, OverflowError, AttributeError, pa.ArrowException)
_NATIVE_U64 = sys.byteorder == "little" and array.array("Q").itemsize == 8

_log = logging.getLogger("phiaudit.storage.writer")


class Overloaded(StorageUnavailable):
    """The write queue is full: shed load, the client should retry later."""


@dataclass(frozen=True)
class TableSpec:
    """A table the writer appends to. ``dedup_column`` names a deterministic row id (the
    first column): a row whose id was committed recently is not written again, so a span
    that the application re-sends (at-least-once delivery from its spool) is stored once."""

    name: str
    columns: Sequence[Column]
    chained: bool
    dedup_column: str | None = None


@dataclass
class WriterStats:
    batches: int = 0
    rows: dict[str, int] = field(default_factory=dict)
    insert_failures: int = 0
    permanent_failures: int = 0
    duplicate_requests: int = 0
    duplicate_rows: int = 0
    spooled_blocks: int = 0
    drained_blocks: int = 0
    #: spooled blocks found already stored when draining (a crash between insert and removal)
    skipped_blocks: int = 0
    #: spooled blocks ClickHouse dropped as duplicates of blocks it never stored, inserted again
    reinserted_blocks: int = 0
    #: spooled blocks the store refuses for good, moved to the spool's ``rejected/``
    rejected_blocks: int = 0
    shed_requests: int = 0
    #: batches of a chained table the store reported inserted but did not keep (chDB's
    #: streaming insert drops a failure to write its part: a full disk); retried
    lost_inserts: int = 0
    #: inserts into an unchained table that left no new part: dropped as duplicates of an
    #: earlier insert of the same token, or lost (the store cannot tell which)
    unconfirmed_inserts: int = 0
    last_batch_rows: int = 0
    last_commit_seconds: float = 0.0
    #: time spent writing batches (their inserts or spooling), in total
    busy_seconds: float = 0.0


def _id_key(v: Any) -> Any:
    """The one key type of the recent-ids memory: the id's bytes (a UUID's 16 bytes)."""
    if isinstance(v, uuid.UUID):
        return v.bytes
    if isinstance(v, str):
        return v.encode("utf-8", "surrogatepass")
    return v


def _column_values(col: Any) -> list[Any]:
    """A column's values as ``bytes`` (fixed-size binary, without per-value Arrow objects:
    ``to_pylist`` costs ~0.4 us a value) or, for other types, their ``_id_key``."""
    typ = col.type
    if not pa.types.is_fixed_size_binary(typ):
        return [_id_key(v) for v in col.to_pylist()]
    w = typ.byte_width
    data = _fixed_bytes(col, w)
    return [data[i:i + w] for i in range(0, len(data), w)]


def _fixed32(data: bytes, n: int) -> Any:
    return pa.Array.from_buffers(pa.binary(32), n, [None, pa.py_buffer(data)])


#: A compiled chain linker: (leaves joined, writer id, seq, head) -> the hashes joined.
Linker: TypeAlias = Callable[[bytes, bytes, int, bytes], bytes]


def _fixed_bytes(col: Any, width: int) -> bytes:
    """A fixed-size binary column's values, joined (no object per value)."""
    out = []
    for chunk in col.chunks:
        n = len(chunk)
        if not n:
            continue
        if chunk.null_count:
            raise ValueError("a null in a column that identifies or links rows")
        start = chunk.offset * width
        out.append(memoryview(chunk.buffers()[1])[start:start + n * width].tobytes())
    return b"".join(out)


def link_arrow(state: ChainState, table: pa.Table,
               linker: Linker | None = None) -> tuple[pa.Table, int, bytes]:
    """Link the rows of ``table`` (schema ``arrow_schema(columns)`` of a chained table, whose
    ``hash`` column holds each row's leaf digest) continuing ``state``, as ``link_rows`` does.
    ``linker`` computes the chain in compiled code (the receiver's ``_native.link``); without
    it, a Python loop (~1.7 us a row) does.

    Returns a new table whose ``writer_id``, ``seq``, ``prev_hash`` and ``hash`` columns are
    filled, and the new (seq, head); neither ``table`` nor ``state`` changes (the caller
    commits the state only after the rows are stored).
    """
    if not pa.types.is_fixed_size_binary(table.schema.field("hash").type) or \
            table.schema.field("hash").type.byte_width != 32:
        raise TypeError("the hash column is not binary(32)")
    n = table.num_rows
    if not n:
        return table, state.seq, state.head
    wid = state.writer_id.encode()
    first = state.seq + 1
    if linker is not None:
        joined = linker(_fixed_bytes(table.column("hash"), 32), wid, state.seq, state.head)
        if len(joined) != 32 * n:
            raise ValueError("the linker returned the wrong number of hashes")
        return _with_chain(state, table, joined, first), state.seq + n, joined[-32:]
    leaves = _column_values(table.column("hash"))
    sha = hashlib.sha256
    # prev_hash || ns(writer_id) || ns(seq) || leaf, with ns(writer_id) in the format itself
    # and the number of digits of seq counted, not formatted (~15% of the loop)
    fmt = b"%%b%d:%b%%d:%%d%%b" % (len(wid), wid.replace(b"%", b"%%"))
    seq, head = state.seq, state.head
    digits = len(b"%d" % seq) if seq > 0 else 1
    more = 10 ** digits
    hashes: list[bytes] = []
    add = hashes.append
    for leaf in leaves:
        seq += 1
        if seq == more:
            digits += 1
            more *= 10
        head = sha(fmt % (head, digits, seq, leaf)).digest()
        add(head)
    return _with_chain(state, table, b"".join(hashes), first), seq, head


def _with_chain(state: ChainState, table: pa.Table, joined: bytes, first: int) -> pa.Table:
    """``table`` with its chain columns for rows ``first``.. and their hashes ``joined``."""
    n = table.num_rows
    seq = first + n - 1
    if _NATIVE_U64:
        seqs = pa.Array.from_buffers(pa.uint64(), n, [
            None, pa.py_buffer(array.array("Q", range(first, seq + 1)))])
    else:
        seqs = pa.array(range(first, seq + 1), pa.uint64())
    schema = table.schema
    columns = {
        "writer_id": pa.repeat(pa.scalar(state.writer_id, pa.string()).cast(
            schema.field("writer_id").type), n),
        "seq": seqs,
        "prev_hash": _fixed32(state.head + joined[:-32], n),
        "hash": _fixed32(joined, n),
    }
    for name, arr in columns.items():
        i = schema.get_field_index(name)
        f = schema.field(i)
        table = table.set_column(i, f, arr if arr.type == f.type else arr.cast(f.type))
    return table


_leaf_plans: dict[tuple[str, ...], tuple[Callable[[Sequence[Any]], bytes], int, int]] = {}


def unlinked_table(columns: Sequence[Column], rows: Sequence[Sequence[Any]]) -> pa.Table:
    """Rows of a chained table (in ``columns`` order) as the Arrow table ``submit`` takes: the
    ``hash`` column holds each row's leaf digest, the other chain columns are filled when the
    writer links them. A row not linked yet (seq 0) carries its leaf in the hash slot, computed
    where it was built (``RecordEncoder``); any other row's leaf is computed here."""
    key = tuple(c.name for c in columns)
    plan = _leaf_plans.get(key)
    if plan is None:
        plan = _leaf_plans[key] = (canonical_encoder(columns), key.index("seq"),
                                   key.index("hash"))
    enc, i_s, i_h = plan
    sha = hashlib.sha256
    leaves = b"".join([r[i_h] if r[i_s] == 0 and len(r[i_h]) == 32
                       else sha(enc(r)).digest() for r in rows])
    n = len(rows)
    if len(leaves) != 32 * n:
        raise ValueError("a leaf digest is not 32 bytes")
    schema = arrow_schema(columns)
    given = {name: pa.nulls(n, schema.field(name).type)  # filled by link_arrow
             for name in ("writer_id", "seq", "prev_hash")}
    given["hash"] = _fixed32(leaves, n)
    return arrow_table(columns, rows, given=given)


class _RecentIds:
    """The ids committed recently (bytes): at least the newest ``limit`` of them.

    Two generations of sets: a lookup is two set probes, remembering a batch one set update;
    when the newer generation holds ``limit`` ids it becomes the older one (an ordered dict
    trimmed one id at a time cost ~0.5 us a row)."""

    __slots__ = ("limit", "new", "old")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.new: set[Any] = set()
        self.old: set[Any] = set()

    def __contains__(self, key: Any) -> bool:
        return key in self.new or key in self.old

    def __len__(self) -> int:
        return len(self.new) + len(self.old)

    def isdisjoint(self, keys: Iterable[Any]) -> bool:
        return self.new.isdisjoint(keys) and self.old.isdisjoint(keys)

    def add_all(self, keys: Iterable[Any]) -> None:
        self.new.update(keys)
        if len(self.new) >= self.limit:
            self.old, self.new = self.new, set()


class _Item:
    __slots__ = ("done", "future", "key", "nrows", "tables", "uid")

    def __init__(self, key: bytes | None, tables: dict[str, Rows]) -> None:
        self.key = key
        # an item without a request key is unique: never id(), which Python reuses, and two
        # batches given the same deduplication token are one insert to ClickHouse
        self.uid = key if key is not None else uuid.uuid4().bytes
        self.tables = tables
        self.done: set[str] = set()  # tables whose rows of this item are committed
        self.nrows = sum(len(r) for r in tables.values())
        self.future: Future[None] = Future()


class BatchWriter:
    """Single writer thread; thread-safe ``submit``; ``shutdown`` flushes."""

    def __init__(
        self,
        store: Any,
        writer_id: str,
        tables: Sequence[TableSpec],
        *,
        max_rows: int = 10_000,
        max_wait: float = 0.2,
        max_queue_rows: int = 500_000,
        retry_backoff: tuple[float, float] = (0.05, 2.0),
        remember_keys: int = 200_000,
        remember_rows: int = 500_000,
        on_commit: Callable[[int], None] | None = None,
        expecting: Callable[[], int] | None = None,
        spool: BatchSpool | None = None,
        linker: Linker | None = None,
    ) -> None:
        self._store = store
        self.writer_id = writer_id
        self._specs = {t.name: t for t in tables}
        self._states: dict[str, ChainState] = {}
        #: per chained table: the highest sequence number of this writer known to be in the
        #: store (found there at start, or inserted since); spooled rows are not counted
        self._stored: dict[str, int] = {}
        self._max_rows = max_rows
        self._max_wait = max_wait
        self._max_queue_rows = max_queue_rows
        self._backoff = retry_backoff
        self._remember = remember_keys
        self._on_commit = on_commit
        # how many requests are being processed and will submit rows soon (the service's
        # count); while there are any, a batch waits for them (up to max_wait)
        self._expecting = expecting
        self._linker = linker
        self._spool = spool
        self._next_drain = 0.0
        self._queue: deque[_Item] = deque()
        self._queued_rows = 0
        self._pending: dict[bytes, _Item] = {}
        self._committed: OrderedDict[bytes, None] = OrderedDict()
        self._remember_rows = remember_rows
        self._recent_ids: dict[str, _RecentIds] = {
            t.name: _RecentIds(remember_rows) for t in tables if t.dedup_column}
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._healthy = True
        self.stats = WriterStats()

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        for spec in self._specs.values():
            if spec.chained:
                seq, head = self._store.chain_head(spec.name, self.writer_id)
                self._states[spec.name] = ChainState(self.writer_id, seq, head)
                self._stored[spec.name] = seq
            if spec.dedup_column:
                # remember what this writer committed last, so a restart keeps deduplicating
                _, rows = self._store.query(
                    f"SELECT {spec.dedup_column} FROM {spec.name} WHERE writer_id = {{w:String}} "
                    f"ORDER BY seq DESC LIMIT {int(self._remember_rows)}", {"w": self.writer_id})
                self._recent_ids[spec.name].add_all(_id_key(row_id) for (row_id,) in rows)
        if self._spool is not None:
            self._resume_from_spool()
        self._thread = threading.Thread(target=self._run, name="phiaudit-writer", daemon=True)
        self._thread.start()

    def stored_seq(self, table: str) -> int | None:
        """The highest sequence number of this writer's chain in ``table`` known to be in the
        store: found there at start, or inserted since (rows still in the local spool are not
        in the store yet). None for a table it does not chain, or before ``start``. A reader
        of the chain (the checkpointer) can stop there without asking the store for its head
        (an ``ORDER BY seq DESC LIMIT 1`` over every part: ~30-80 ms here)."""
        return self._stored.get(table)

    def _note_stored(self, table: str, seq: int) -> None:
        if seq > self._stored.get(table, 0):
            self._stored[table] = seq

    def _resume_from_spool(self) -> None:
        """After a restart: the chain continues after what was spooled, and the spool drains
        first when the store answers."""
        assert self._spool is not None
        for entry in self._spool.entries():
            state = self._states.get(entry.table)
            if state is not None and entry.last_seq > state.seq:
                state.seq, state.head = entry.last_seq, entry.head
            recent = self._recent_ids.get(entry.table)
            dedup = self._specs[entry.table].dedup_column if recent is not None else None
            if recent is not None and dedup:
                recent.add_all(_column_values(entry.read().column(dedup)))
        if len(self._spool):
            _log.warning("the local spool holds %d blocks from before the restart; draining",
                         len(self._spool))
            try:
                self._drain()
            except StorageUnavailable:
                self._healthy = False

    def _drain(self) -> None:
        """Insert spooled blocks in order, with their own tokens; raises while the store is
        still failing.

        A chained table's stored rows are always a prefix of its writer's chain (blocks are
        inserted in chain order, and while the spool holds any, new ones are spooled behind
        them), so the store's head decides exactly, without relying on ClickHouse's
        deduplication log: a block at or below it is stored already (a crash came between
        its insert and its removal from the spool) and is not inserted again; a block still
        above it after its insert was dropped by ClickHouse as a duplicate of one it never
        stored (the log entry is written before the part: a crash in between leaves one
        behind) and is inserted once more under a fresh token."""
        assert self._spool is not None
        stored: dict[str, int] = {}  # per chained table: the store's head, asked once a drain
        for entry in self._spool.entries():
            spec = self._specs.get(entry.table)
            chained = spec is not None and spec.chained and entry.last_seq > 0
            if chained and entry.table not in stored:
                stored[entry.table] = self._store.chain_head(entry.table, self.writer_id)[0]
            if chained and entry.last_seq <= stored[entry.table]:
                self._note_stored(entry.table, stored[entry.table])
                self._spool.remove(entry)
                self.stats.skipped_blocks += 1
                continue
            data = entry.read()
            try:
                landed = self._store.insert_arrow(entry.table, data, entry.token)
            except PermanentError:
                # acknowledged rows: never dropped; kept aside, so the rest can drain (a
                # chained table's verify then reports the gap where they belong)
                where = self._spool.quarantine(entry)
                self.stats.rejected_blocks += 1
                _log.error("the store refuses a spooled block of %s for good; kept in %s",
                           entry.table, where)
                continue
            if landed is False and not chained:
                self.stats.unconfirmed_inserts += 1
            if chained:
                # the block's own rows, not the chain's head: a block over a month boundary
                # is one part a month, and the later month's part alone is not the block
                first, n = entry.last_seq - data.num_rows + 1, data.num_rows
                if self._store.chain_rows(entry.table, self.writer_id, first,
                                          entry.last_seq) < n:
                    _log.warning("the store did not keep a spooled block (dropped as a "
                                 "duplicate of one it does not hold, or not written); "
                                 "inserting it again")
                    self._store.insert_arrow(entry.table, data,
                                             f"{entry.token}:{uuid.uuid4().hex}")
                    self.stats.reinserted_blocks += 1
                    if self._store.chain_rows(entry.table, self.writer_id, first,
                                              entry.last_seq) < n:
                        raise StorageUnavailable("a spooled block is not in the store after "
                                                 "its insert")
                stored[entry.table] = entry.last_seq
                self._note_stored(entry.table, entry.last_seq)
            self._spool.remove(entry)
            self.stats.drained_blocks += 1
        self._healthy = True

    @property
    def spool_bytes(self) -> int:
        return self._spool.size_bytes if self._spool is not None else 0

    def shutdown(self, timeout: float = 30.0) -> bool:
        """Stop taking rows, flush what is queued; True when everything was committed."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                return False
        return not self._queue

    @property
    def healthy(self) -> bool:
        return self._healthy

    def chain_state(self, table: str) -> tuple[int, bytes]:
        st = self._states[table]
        return st.seq, st.head

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    # -- submitting ----------------------------------------------------------------------
    def submit(self, key: bytes | None, tables: Mapping[str, Rows]) -> Future[None]:
        """Queue the rows of one request. ``key`` identifies the request across retries.

        Each table's rows are a list of rows or a pyarrow Table of schema
        ``arrow_schema(columns)`` (a table that casts to it is cast); a chained table's Arrow
        rows carry their leaf digest in ``hash``. Neither is changed by the writer.
        """
        tables = {name: self._checked(name, rows) for name, rows in tables.items()}
        with self._cond:
            if self._stopping:
                raise StorageUnavailable("the writer is shutting down")
            if key is not None:
                if key in self._committed:
                    self.stats.duplicate_requests += 1
                    done: Future[None] = Future()
                    done.set_result(None)
                    return done
                pending = self._pending.get(key)
                if pending is not None:
                    self.stats.duplicate_requests += 1
                    return pending.future
            item = _Item(key, tables)
            if self._queued_rows + item.nrows > self._max_queue_rows and self._queue:
                self.stats.shed_requests += 1
                raise Overloaded("write queue full")
            self._queue.append(item)
            self._queued_rows += item.nrows
            if key is not None:
                self._pending[key] = item
            self._cond.notify()
            return item.future

    def _checked(self, name: str, rows: Rows) -> Rows:
        if not isinstance(rows, pa.Table):
            return rows
        spec = self._specs.get(name)
        if spec is None:
            return rows
        schema = arrow_schema(spec.columns)
        if not rows.schema.equals(schema):
            try:
                rows = rows.select(schema.names).cast(schema)
            except (KeyError, ValueError, TypeError, pa.ArrowException) as exc:
                raise TypeError(f"rows for {name}: an Arrow table's schema must be "
                                "arrow_schema(columns)") from exc
        if rows.schema.metadata:
            rows = rows.replace_schema_metadata(None)
        for must in ("hash" if spec.chained else None, spec.dedup_column):
            if must and rows.column(must).null_count:
                raise ValueError(f"rows for {name}: nulls in {must}")
        return rows

    # -- the writer thread ---------------------------------------------------------------
    def _take(self, timeout: float | None = None) -> list[_Item] | None:
        """The next batch; [] when ``timeout`` passed with nothing queued; None to stop."""
        with self._cond:
            if not self._queue and not self._stopping:
                self._cond.wait(timeout)
            if not self._queue:
                return None if self._stopping else []
            deadline = time.monotonic() + self._max_wait
            batch: list[_Item] = []
            rows = 0
            while True:
                while self._queue and (rows < self._max_rows or not batch):
                    item = self._queue.popleft()
                    batch.append(item)
                    rows += item.nrows
                # group commit: no pause when there is nothing more to take and no request
                # on its way; with requests being processed, wait for them (each small insert
                # costs a part and its merges, and their clients would wait for the next one)
                if rows >= self._max_rows or self._stopping:
                    break
                if not self._queue and (self._expecting is None or self._expecting() <= 0):
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                if not self._queue:
                    self._cond.wait(min(remaining, 0.01))
            self._queued_rows -= rows
            return batch

    def _run(self) -> None:
        while True:
            spool = self._spool
            if spool is not None and len(spool) and time.monotonic() >= self._next_drain:
                try:
                    self._drain()
                except StorageUnavailable:
                    self._next_drain = time.monotonic() + self._backoff[1]
                except Exception as exc:  # the writer thread must never die
                    _log.error("writer: unexpected failure draining the spool (%s)",
                               type(exc).__name__)
                    self._next_drain = time.monotonic() + self._backoff[1]
            pending = spool is not None and len(spool) > 0
            batch = self._take(0.25 if pending else None)
            if batch is None:
                return
            if not batch:
                continue
            try:
                self._write_with_retry(batch)
            except Exception as exc:  # the writer thread must never die
                # the type only: an exception's message may quote a value
                _log.error("writer: unexpected failure (%s); failing the batch",
                           type(exc).__name__)
                self._finish(batch, StorageUnavailable("internal writer error"))

    def _write_with_retry(self, batch: list[_Item]) -> None:
        delay = self._backoff[0]
        while True:
            try:
                self._write(batch)
                self._healthy = True
                self._finish(batch, None)
                return
            except PermanentError:
                self.stats.permanent_failures += 1
                if len(batch) > 1:
                    # find the item that cannot be stored; the others go through
                    for item in batch:
                        self._write_with_retry([item])
                    return
                _log.error("writer: a request could not be stored (permanent store error)")
                self._finish(batch, PermanentError("the store rejected the request's rows"))
                return
            except StorageUnavailable as exc:
                self.stats.insert_failures += 1
                self._healthy = False
                if self._spool is not None and not isinstance(exc, SpoolFull):
                    try:  # durable on local disk: acknowledged; drained when the store is back
                        self._write(batch, to_spool=True)
                        self.stats.spooled_blocks += 1
                        self._next_drain = time.monotonic() + self._backoff[0]
                        self._finish(batch, None)
                        return
                    except SpoolFull:
                        _log.warning("writer: the local spool is full; holding the batch")
                if self._stopping and delay >= self._backoff[1]:
                    self._finish(batch, StorageUnavailable("store unavailable at shutdown"))
                    return
                time.sleep(delay)
                delay = min(delay * 2, self._backoff[1])

    def _write(self, batch: list[_Item], to_spool: bool = False) -> None:
        """Insert (or spool) each table's rows of ``batch``; a table committed earlier (by an
        attempt that failed on another table) is skipped. Everything is built afresh from the
        items and the committed chain states: a retry gives the same rows and tokens."""
        started = time.monotonic()
        spooling = to_spool or (self._spool is not None and len(self._spool) > 0)
        new_states: dict[str, tuple[int, bytes]] = {}
        keys_digest = hashlib.sha256()
        for item in batch:
            keys_digest.update(item.uid)
        for name, spec in self._specs.items():
            parts = [item.tables[name] for item in batch
                     if name not in item.done and name in item.tables]
            try:
                data = self._assemble(spec, parts)
                if data is None:
                    continue
                recent = self._recent_ids.get(name)
                ids: list[Any] | None = None
                dropped = 0
                if recent is not None:
                    data, ids, dropped = self._fresh(spec, data, recent)
                    if not data.num_rows:  # nothing new: these items' rows are all stored
                        for item in batch:
                            item.done.add(name)
                        self.stats.duplicate_rows += dropped
                        continue
                if spec.chained:
                    state = self._states[name]
                    first = state.seq + 1
                    data, seq, head = link_arrow(state, data, self._linker)
                    token = f"{self.writer_id}:{name}:{first}:{head.hex()}"
                    new_states[name] = (seq, head)
                else:
                    digest = hashlib.sha256(keys_digest.digest()
                                            + str(data.num_rows).encode())
                    token = f"{self.writer_id}:{name}:{digest.hexdigest()}"
            except _CHAIN_ERRORS as exc:
                raise PermanentError(f"rows for {name}: a value does not fit its column "
                                     f"({type(exc).__name__})") from exc
            if spooling:
                assert self._spool is not None
                seq_head = new_states.get(name, (0, b""))
                self._spool.append(name, spec.columns, data, token, *seq_head)
            else:
                landed = self._store.insert_arrow(name, data, token,
                                                  types=[c.type for c in spec.columns])
                if landed is False:
                    self._check_kept(name, new_states.get(name, (None,))[0], data.num_rows)
                if name in new_states:
                    self._note_stored(name, new_states[name][0])
            # committed: whatever happens to the batch's other tables, these rows are never
            # linked or inserted again (re-linking them from the old head forked the chain)
            for item in batch:
                item.done.add(name)
            if name in new_states:
                self._states[name].seq, self._states[name].head = new_states[name]
            if recent is not None and ids is not None:
                recent.add_all(ids)
            self.stats.duplicate_rows += dropped
            self.stats.rows[name] = self.stats.rows.get(name, 0) + data.num_rows
        self.stats.batches += 1
        self.stats.last_batch_rows = sum(i.nrows for i in batch)
        self.stats.last_commit_seconds = time.monotonic() - started
        self.stats.busy_seconds += self.stats.last_commit_seconds
        if self._on_commit is not None:
            self._on_commit(self.stats.last_batch_rows)

    def _check_kept(self, name: str, last: int | None, n: int) -> None:
        """After an insert of ``n`` rows the store reported done but that left a part
        missing (see ``Store.insert_arrow``): a chained table's rows of this batch (its
        sequence numbers, up to ``last``) say whether it is stored (an earlier attempt of it
        was, and ClickHouse dropped this one as a duplicate) or not, wholly or partly (a batch
        over a month boundary writes a part a month); one not stored is retried (the writer's
        usual retry: not acknowledged meanwhile; spooled where there is a spool). An
        unchained table's insert (``last`` None) cannot be told from a duplicate: counted."""
        if last is None:
            self.stats.unconfirmed_inserts += 1
            _log.warning("an insert into %s left no new part (a duplicate, or not stored)",
                         name)
            return
        if self._store.chain_rows(name, self.writer_id, last - n + 1, last) >= n:
            return
        self.stats.lost_inserts += 1
        _log.error("the store did not keep a batch of %s (is its disk full?); retrying", name)
        raise StorageUnavailable("the store did not keep the batch")

    def _assemble(self, spec: TableSpec, parts: list[Rows]) -> pa.Table | None:
        """The parts (in batch order) as one Arrow table; None when there are no rows. Runs
        of lists of rows become one Arrow table each; Arrow parts are not copied."""
        tables: list[pa.Table] = []
        rows: list[Sequence[Any]] = []
        for part in parts:
            if isinstance(part, pa.Table):
                if rows:
                    tables.append(self._rows_table(spec, rows))
                    rows = []
                if part.num_rows:
                    tables.append(part)
            else:
                rows.extend(part)
        if rows:
            tables.append(self._rows_table(spec, rows))
        if not tables:
            return None
        return tables[0] if len(tables) == 1 else pa.concat_tables(tables)

    def _rows_table(self, spec: TableSpec, rows: list[Sequence[Any]]) -> pa.Table:
        if not spec.chained:
            return arrow_table(spec.columns, rows)
        return unlinked_table(spec.columns, rows)

    def _fresh(self, spec: TableSpec, data: pa.Table,
               recent: _RecentIds) -> tuple[pa.Table, list[Any], int]:
        """The rows whose id is neither committed recently nor earlier in this batch, their
        ids, and how many were dropped."""
        assert spec.dedup_column is not None
        ids = _column_values(data.column(spec.dedup_column))
        unique = set(ids)
        if len(unique) == len(ids) and recent.isdisjoint(unique):
            return data, ids, 0
        seen: set[Any] = set()
        keep: list[bool] = []
        fresh: list[Any] = []
        for row_id in ids:
            if row_id in recent or row_id in seen:
                keep.append(False)
                continue
            seen.add(row_id)
            keep.append(True)
            fresh.append(row_id)
        return data.filter(pa.array(keep, pa.bool_())), fresh, len(ids) - len(fresh)

    def _finish(self, batch: list[_Item], error: BaseException | None) -> None:
        with self._cond:
            for item in batch:
                if item.key is not None:
                    self._pending.pop(item.key, None)
                    if error is None:
                        self._committed[item.key] = None
                        if len(self._committed) > self._remember:
                            self._committed.popitem(last=False)
        for item in batch:
            if item.future.done():
                continue
            if error is None:
                item.future.set_result(None)
            else:
                item.future.set_exception(error)
