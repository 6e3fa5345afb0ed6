"""The batch writer: group commit on a writer thread, acknowledgement only after commit.

Callers ``submit()`` the rows of one request (for one or several tables) with a request key
and get a ``concurrent.futures.Future`` that completes only when every one of those rows is
committed to ClickHouse. The writer thread takes everything queued the moment the previous
insert finishes (up to ``max_rows``), links the chained tables' rows to their writer's hash
chain, and inserts each table's rows as one block. The flush interval is a maximum wait, not
a pause.

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

import hashlib
import logging
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from ._chain import ChainState, canonical_encoder, link_rows
from ._errors import PermanentError, StorageUnavailable
from ._schema import Column
from ._spool import BatchSpool, SpoolFull

__all__ = ["BatchWriter", "Overloaded", "TableSpec", "WriterStats"]

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
    shed_requests: int = 0
    last_batch_rows: int = 0
    last_commit_seconds: float = 0.0


class _Item:
    __slots__ = ("done", "future", "key", "nrows", "tables", "uid")

    def __init__(self, key: bytes | None, tables: dict[str, list[list[Any]]]) -> None:
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
        spool: BatchSpool | None = None,
    ) -> None:
        self._store = store
        self.writer_id = writer_id
        self._specs = {t.name: t for t in tables}
        self._encoders = {t.name: canonical_encoder(t.columns) for t in tables if t.chained}
        self._seq_index = {t.name: [c.name for c in t.columns].index("seq")
                           for t in tables if t.chained}
        self._states: dict[str, ChainState] = {}
        self._max_rows = max_rows
        self._max_wait = max_wait
        self._max_queue_rows = max_queue_rows
        self._backoff = retry_backoff
        self._remember = remember_keys
        self._on_commit = on_commit
        self._spool = spool
        self._next_drain = 0.0
        self._queue: deque[_Item] = deque()
        self._queued_rows = 0
        self._pending: dict[bytes, _Item] = {}
        self._committed: OrderedDict[bytes, None] = OrderedDict()
        self._remember_rows = remember_rows
        self._recent_ids: dict[str, OrderedDict[Any, None]] = {
            t.name: OrderedDict() for t in tables if t.dedup_column}
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
            if spec.dedup_column:
                # remember what this writer committed last, so a restart keeps deduplicating
                _, rows = self._store.query(
                    f"SELECT {spec.dedup_column} FROM {spec.name} WHERE writer_id = {{w:String}} "
                    f"ORDER BY seq DESC LIMIT {int(self._remember_rows)}", {"w": self.writer_id})
                recent = self._recent_ids[spec.name]
                for (row_id,) in reversed(rows):
                    recent[row_id] = None
        if self._spool is not None:
            self._resume_from_spool()
        self._thread = threading.Thread(target=self._run, name="phiaudit-writer", daemon=True)
        self._thread.start()

    def _resume_from_spool(self) -> None:
        """After a restart: the chain continues after what was spooled, and the spool drains
        first when the store answers."""
        assert self._spool is not None
        for entry in self._spool.entries():
            state = self._states.get(entry.table)
            if state is not None and entry.last_seq > state.seq:
                state.seq, state.head = entry.last_seq, entry.head
            recent = self._recent_ids.get(entry.table)
            if recent is not None:
                for raw in entry.read().column(0).to_pylist():
                    recent[uuid.UUID(bytes=raw)] = None
        if len(self._spool):
            _log.warning("the local spool holds %d blocks from before the restart; draining",
                         len(self._spool))
            try:
                self._drain()
            except StorageUnavailable:
                self._healthy = False

    def _drain(self) -> None:
        """Insert spooled blocks in order, with their own tokens; raises while the store is
        still failing."""
        assert self._spool is not None
        for entry in self._spool.entries():
            self._store.insert_arrow(entry.table, entry.read(), entry.token)
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
    def submit(self, key: bytes | None, tables: dict[str, list[list[Any]]]) -> Future[None]:
        """Queue the rows of one request. ``key`` identifies the request across retries."""
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
                # group commit: no pause when there is nothing more to take
                if rows >= self._max_rows or not self._queue or self._stopping:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
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
        started = time.monotonic()
        spooling = to_spool or (self._spool is not None and len(self._spool) > 0)
        new_states: dict[str, tuple[int, bytes]] = {}
        keys_digest = hashlib.sha256()
        for item in batch:
            keys_digest.update(item.uid)
        for name, spec in self._specs.items():
            rows = [r for item in batch if name not in item.done
                    for r in item.tables.get(name, ())]
            recent = self._recent_ids.get(name)
            if recent is not None and rows:
                rows = self._fresh(rows, recent)
            if not rows:
                continue
            if spec.chained:
                state = self._states[name]
                first = state.seq + 1
                # a row not linked yet (seq 0) carries its leaf in the hash slot, computed
                # where it was built; a retried row was linked before: its leaf is recomputed
                enc = self._encoders[name]
                i_s = self._seq_index[name]
                leaves = [r[-1] if r[i_s] == 0 and len(r[-1]) == 32
                          else hashlib.sha256(enc(r)).digest() for r in rows]
                seq, head = link_rows(state, spec.columns, rows, enc, leaves)
                token = f"{self.writer_id}:{name}:{first}:{head.hex()}"
                new_states[name] = (seq, head)
            else:
                digest = hashlib.sha256(keys_digest.digest() + str(len(rows)).encode())
                token = f"{self.writer_id}:{name}:{digest.hexdigest()}"
            if spooling:
                assert self._spool is not None
                seq_head = new_states.get(name, (0, b""))
                self._spool.append(name, spec.columns, rows, token, *seq_head)
            else:
                self._store.insert_rows(name, spec.columns, rows, token)
            # committed: whatever happens to the batch's other tables, these rows are never
            # linked or inserted again (re-linking them from the old head forked the chain)
            for item in batch:
                item.done.add(name)
            if name in new_states:
                self._states[name].seq, self._states[name].head = new_states[name]
            if recent is not None:
                for row in rows:
                    recent[row[0]] = None
                while len(recent) > self._remember_rows:
                    recent.popitem(last=False)
            self.stats.rows[name] = self.stats.rows.get(name, 0) + len(rows)
        self.stats.batches += 1
        self.stats.last_batch_rows = sum(i.nrows for i in batch)
        self.stats.last_commit_seconds = time.monotonic() - started
        if self._on_commit is not None:
            self._on_commit(self.stats.last_batch_rows)

    def _fresh(self, rows: list[list[Any]], recent: OrderedDict[Any, None]) -> list[list[Any]]:
        """Rows whose id is neither committed recently nor earlier in this batch."""
        seen: set[Any] = set()
        fresh = []
        for row in rows:
            row_id = row[0]
            if row_id in recent or row_id in seen:
                continue
            seen.add(row_id)
            fresh.append(row)
        dropped = len(rows) - len(fresh)
        if dropped:
            self.stats.duplicate_rows += dropped
        return fresh

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
