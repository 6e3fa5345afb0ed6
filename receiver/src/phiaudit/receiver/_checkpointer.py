"""The checkpointer: a service extension that signs Merkle checkpoints of the hash chains.

For every chained table and every writer found in it, the checkpointer follows the writer's
committed, gap-free run of rows (sequence numbers 1, 2, 3, ... each linked to the previous
row's hash) in an RFC 6962 tree kept as a compact range, and signs a checkpoint of it:

* after ``checkpoint_events`` new rows from this service's writer, or
* every ``checkpoint_interval_ms`` when there are new rows (from any writer), or
* as a heartbeat every ``checkpoint_heartbeat_ms`` when a chain is idle, and
* once more at shutdown, after the receiver has drained (so every acknowledged row is covered).

Each checkpoint goes first to the anchor (write-once, fsynced), then to the ``checkpoints``
table; a checkpoint whose table insert failed is retried. At start-up, a newest anchored
checkpoint missing from the table (the service died between the two writes) is stored again.
The thread never dies and never logs a row's content: only table, writer and sizes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from phiaudit.storage import (
    BLOCK_LEAVES,
    CHAIN_ROW_BYTES,
    CHAINED_TABLES,
    GENESIS,
    Anchor,
    Checkpoint,
    CompactRange,
    PhiAuditError,
    SigningKey,
    block_roots,
    chain_rows,
    leaf_hash,
    load_checkpoints,
    origin_for,
    store_checkpoint,
)

from ._fast import native_chain_fold

__all__ = ["Checkpointer", "for_service"]

_log = logging.getLogger("phiaudit.checkpointer")

_CHUNK = 100_000

#: the compiled fold (``_native.chain_fold``): (rows, start, head, block) -> (roots, last head),
#: or None when the rows are not exactly the chain's next run
Fold: TypeAlias = Callable[[bytes, int, bytes, int], "tuple[bytes, bytes] | None"]


@dataclass
class _Chain:
    table: str
    writer_id: str
    tree: CompactRange = field(default_factory=CompactRange)
    head: bytes = GENESIS
    broken_at: int = 0  # first sequence number that does not continue the run
    checkpointed_size: int = -1
    checkpointed_at: float = 0.0


class Checkpointer:
    """Start after the writer, shut down before it."""

    def __init__(
        self,
        store: Any,
        key: SigningKey,
        anchor: Anchor,
        *,
        interval_s: float = 60.0,
        events: int = 100_000,
        heartbeat_s: float = 3600.0,
        committed_rows: Any = None,
        tables: tuple[str, ...] = tuple(CHAINED_TABLES),
        fold: Fold | None = None,
        own_writer: str = "",
        own_stored: Callable[[str], int | None] | None = None,
    ) -> None:
        self._store = store
        self._key = key
        self._anchor = anchor
        self._interval = interval_s
        self._events = events
        self._heartbeat = heartbeat_s
        self._committed_rows = committed_rows  # () -> rows this service's writer committed
        self._tables = tables
        #: the compiled check-and-fold of whole blocks (the receiver's ``chain_fold``), or
        #: None: ClickHouse checks and folds them (``block_roots``, ~3x the CPU)
        self._fold = fold
        #: this service's writer, and its highest stored sequence number per table (the
        #: writer's ``stored_seq``): that chain's head without a query
        self._own_writer = own_writer
        self._own_stored = own_stored
        self._chains: dict[tuple[str, str], _Chain] = {}
        self._pending: list[Checkpoint] = []
        self._known_sizes: dict[tuple[str, str], int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._started = False
        self.checkpoints_written = 0
        self.failures = 0

    def start(self) -> None:
        if self._thread is not None:
            return
        self._anchor.put_public_key(self._key.key_id, self._key.public)
        self._started = True
        self._thread = threading.Thread(target=self._run, name="phiaudit-checkpointer",
                                        daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 60.0) -> None:
        """Stop, after one last checkpoint of whatever is new. Idempotent."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout)
        self._thread = None
        try:
            self._round(force=True)
        except Exception as exc:  # never raise from shutdown
            _log.error("checkpointer: final checkpoint failed (%s)", type(exc).__name__)

    # -- the thread ----------------------------------------------------------------------
    def _run(self) -> None:
        recovered = self._try_recover()
        last_round = last_full = time.monotonic()
        base = self._rows_committed()
        tick = min(0.25, self._interval, self._heartbeat)
        every = min(self._interval, self._heartbeat)
        while not self._stop.wait(tick):
            if not recovered:  # the store was down at start: keep trying, then go on
                recovered = self._try_recover()
                if not recovered:
                    continue
            now = time.monotonic()
            rows = self._rows_committed()
            due = now - last_round >= every
            if rows - base < self._events and not due:
                continue
            force = rows - base >= self._events
            # a round for this writer's new rows follows its chains only; every writer of
            # every table (found through the key, ~40-60 ms a round here) at least this often
            everyone = self._own_stored is None or now - last_full >= every
            base, last_round = rows, now
            if everyone:
                last_full = now
            try:
                self._round(force=force, everyone=everyone)
            except Exception as exc:  # the thread must never die; retried next round
                self.failures += 1
                _log.warning("checkpointer: round failed (%s); retrying", type(exc).__name__)

    def _rows_committed(self) -> int:
        if self._committed_rows is None:
            return 0
        return int(self._committed_rows())

    def _try_recover(self) -> bool:
        try:
            self._recover()
            return True
        except Exception as exc:
            _log.warning("checkpointer: recovery failed (%s); retrying", type(exc).__name__)
            return False

    def _recover(self) -> None:
        """Store every anchored checkpoint the table lacks (the service stopped, or the store
        was down, between writing the anchor and the table): the anchor is written first."""
        stored = {(c.origin, c.writer_id, c.tree_size, c.time_us) for c in
                  load_checkpoints(self._store)}
        for o, w, s, _ in stored:
            self._known_sizes[(o, w)] = max(self._known_sizes.get((o, w), 0), s)
        pending = {(c.origin, c.writer_id, c.tree_size, c.time_us) for c in self._pending}
        missing = sorted(
            (cp for cp in self._anchor.checkpoints()
             if (cp.origin, cp.writer_id, cp.tree_size, cp.time_us) not in stored | pending),
            key=lambda cp: (cp.origin, cp.writer_id, cp.tree_size, cp.time_us))
        for cp in missing:
            _log.warning("checkpointer: storing anchored checkpoint %s/%d in the table (it "
                         "was anchored but not stored before a stop or an outage)",
                         cp.writer_id, cp.tree_size)
            self._pending.append(cp)
        self._retry_pending()

    # -- one round -----------------------------------------------------------------------
    def _round(self, force: bool, everyone: bool = True) -> None:
        """Follow the chains and checkpoint those due: every writer's of every table, or
        (``everyone`` false) only this service's writer's, whose heads need no query."""
        with self._lock:
            self._retry_pending()
            now = time.monotonic()
            for table in self._tables:
                heads = self._heads(table) if everyone else self._own_heads(table)
                for writer, top in heads:
                    chain = self._chains.get((table, str(writer)))
                    if chain is None:
                        chain = self._chains[(table, str(writer))] = _Chain(table, str(writer))
                        chain.checkpointed_at = now
                        chain.checkpointed_size = self._known_sizes.get(
                            (origin_for(self._store.database, table), str(writer)), -1)
                    self._follow(chain, int(top))
                    grown = chain.tree.size != chain.checkpointed_size
                    idle_due = now - chain.checkpointed_at >= self._heartbeat
                    interval_due = now - chain.checkpointed_at >= self._interval
                    if (grown and (force or interval_due or self._stop.is_set())) or idle_due:
                        if chain.tree.size == 0:
                            continue
                        self._checkpoint(chain)
                        chain.checkpointed_at = now

    def _own_top(self, table: str) -> int | None:
        """This service's writer's highest stored seq in ``table`` (None: not known)."""
        return self._own_stored(table) if self._own_stored is not None else None

    def _own_heads(self, table: str) -> list[tuple[str, int]]:
        top = self._own_top(table)
        return [(self._own_writer, top)] if top else []

    def _heads(self, table: str) -> list[tuple[str, int]]:
        """Every writer of ``table`` with its highest sequence number, found through the
        primary key (writer_id, seq): two short ordered reads per writer (~4 ms each here),
        which touch a granule or so of each part whatever the table's size. (A GROUP BY
        writer_id read every row of every chained table at each round: 116 ms at 6 million
        rows, a core's worth of a busy service after some weeks of data.)"""
        heads: list[tuple[str, int]] = []
        writer: str | None = None
        while True:
            if writer is None:
                _, rows = self._store.query(
                    f"SELECT writer_id FROM {table} ORDER BY writer_id LIMIT 1")
            else:
                _, rows = self._store.query(
                    f"SELECT writer_id FROM {table} WHERE writer_id > {{w:String}} "
                    "ORDER BY writer_id LIMIT 1", {"w": writer})
            if not rows:
                return heads
            found = str(rows[0][0])
            if writer is not None and found <= writer:  # cannot happen; never loop on it
                _log.error("checkpointer: writers of %s not in key order; stopping at %d",
                           table, len(heads))
                return heads
            writer = found
            known = self._own_top(table) if writer == self._own_writer else None
            if known is not None:
                # the rows up to it are committed; _follow still reads and checks them all
                heads.append((writer, known))
                continue
            _, top = self._store.query(
                f"SELECT seq FROM {table} WHERE writer_id = {{w:String}} "
                "ORDER BY seq DESC LIMIT 1", {"w": writer})
            if top:
                heads.append((writer, int(top[0][0])))

    def _follow_blocks(self, chain: _Chain, end: int) -> bool:
        """Extend the tree by whole blocks of BLOCK_LEAVES rows (size .. end, both multiples
        of it) checked and folded in ClickHouse: the rows are exactly seq size+1 .. end, each
        linked to the one before (the first to the tree's head). False when anything is off:
        the row-by-row path then finds where."""
        start = chain.tree.size
        levels = BLOCK_LEAVES.bit_length() - 1
        if self._fold is not None:
            blob = chain_rows(self._store, chain.table, chain.writer_id, start, end)
            if len(blob) != CHAIN_ROW_BYTES * (end - start):
                return False
            folded = self._fold(blob, start, chain.head, BLOCK_LEAVES)
            if folded is None:
                return False
            joined, head = folded
            for k in range(0, len(joined), 32):
                chain.tree.append_subtree(levels, joined[k:k + 32])
            chain.head = head
            return True
        _, rows = self._store.query(
            f"SELECT count(), min(seq), max(seq), "
            f"countIf(seq > {{a:UInt64}} + 1 AND (seq != ps + 1 OR prev_hash != p)), "
            f"argMin(prev_hash, seq), argMax(hash, seq) FROM (SELECT seq, prev_hash, hash, "
            f"lagInFrame(hash) OVER w AS p, lagInFrame(seq) OVER w AS ps FROM {chain.table} "
            f"WHERE writer_id = {{w:String}} AND seq > {{a:UInt64}} AND seq <= {{b:UInt64}} "
            f"WINDOW w AS (ORDER BY seq ROWS BETWEEN 1 PRECEDING AND CURRENT ROW))",
            {"w": chain.writer_id, "a": start, "b": end}, binary=True)
        n, lo, hi, unlinked, first_prev, last = rows[0]
        # the first row has no predecessor in the window: its link is checked against the head
        if (int(n) != end - start or int(lo) != start + 1 or int(hi) != end
                or int(unlinked) != 0 or bytes(first_prev) != chain.head):
            return False
        roots = block_roots(self._store, chain.table, chain.writer_id, start, end)
        nodes = [r for r in roots if r is not None]
        if len(nodes) != len(roots):
            return False
        for node in nodes:
            chain.tree.append_subtree(levels, node)
        chain.head = bytes(last)
        return True

    def _follow(self, chain: _Chain, top: int) -> None:
        """Extend the chain's tree with its new committed, gap-free rows."""
        while not chain.broken_at and chain.tree.size < top:
            start = chain.tree.size
            if start % BLOCK_LEAVES == 0 and top - start >= BLOCK_LEAVES:
                end = start + min(top - start, _CHUNK) // BLOCK_LEAVES * BLOCK_LEAVES
                if self._follow_blocks(chain, end):
                    continue
            _, rows = self._store.query(
                f"SELECT seq, prev_hash, hash FROM {chain.table} WHERE writer_id = {{w:String}} "
                "AND seq > {a:UInt64} AND seq <= {b:UInt64} ORDER BY seq",
                {"w": chain.writer_id, "a": start, "b": start + _CHUNK}, binary=True)
            if not rows:
                chain.broken_at = start + 1
            for seq, prev, h in rows:
                if int(seq) != chain.tree.size + 1 or bytes(prev) != chain.head:
                    chain.broken_at = chain.tree.size + 1
                    _log.error("checkpointer: the chain of writer %s in %s does not continue "
                               "at seq %d; checkpoints stop before it (run phiaudit verify)",
                               chain.writer_id, chain.table, chain.broken_at)
                    break
                chain.head = bytes(h)
                chain.tree.append(leaf_hash(chain.head))

    def _checkpoint(self, chain: _Chain) -> None:
        cp = self._key.sign(Checkpoint(
            origin_for(self._store.database, chain.table), chain.writer_id, chain.tree.size,
            chain.tree.root(), time.time_ns() // 1000))
        self._anchor.put(cp)  # first: what the anchor holds is what counts
        chain.checkpointed_size = chain.tree.size
        self.checkpoints_written += 1
        try:
            store_checkpoint(self._store, cp)
        except PhiAuditError:
            self._pending.append(cp)

    def _retry_pending(self) -> None:
        while self._pending:
            store_checkpoint(self._store, self._pending[0])
            self._pending.pop(0)


def for_service(config: Any, local: Any) -> Checkpointer:
    """The service's checkpointer: its signing key, its anchor, its writer's row count."""
    from pathlib import Path

    from phiaudit.storage import DirectoryAnchor, default_anchor_dir

    data_dir = Path(local.data_dir)
    anchor_dir = Path(config.anchor_dir) if config.anchor_dir else default_anchor_dir(data_dir)
    writer = local.writer

    def committed() -> int:
        return sum(writer.stats.rows.get(t, 0) for t in CHAINED_TABLES)

    return Checkpointer(
        local.store, SigningKey.open(data_dir), DirectoryAnchor(anchor_dir, data_dir),
        interval_s=config.checkpoint_interval_ms / 1000, events=config.checkpoint_events,
        heartbeat_s=config.checkpoint_heartbeat_ms / 1000, committed_rows=committed,
        fold=native_chain_fold(), own_writer=writer.writer_id, own_stored=writer.stored_seq)
