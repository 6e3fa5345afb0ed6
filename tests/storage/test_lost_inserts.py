"""An insert the engine reports done but does not keep is never acknowledged.

chDB's streaming insert (chdb-core 26.9) returns without an error when writing its part fails:
a full disk, a violated constraint (bench/README.md, session 9). Here the failure is a real
engine-side one: a CHECK constraint, added by the administrator engine in a child process before
the store opens, that refuses every insert into ``audit_events`` until a moment a few seconds
after the store opened: an outage of the part writes that ends on its own, which is what a disk
filling up and then freed looks like to the writer. No test double: the real engine drops the
rows, and the writer must find out."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from phiaudit.storage import (
    AUDIT_COLUMNS,
    AuditEvent,
    BatchWriter,
    RecordEncoder,
    Store,
    StoreLocation,
    TableSpec,
    migrate,
)
from phiaudit.storage._arrow import arrow_table
from phiaudit.storage._store import disk_key_env

OUTAGE_SECONDS = 8.0
SPEC = TableSpec("audit_events", AUDIT_COLUMNS, chained=True, dedup_column="event_id")

_ADMIN_DDL = """
import sys
from pathlib import Path
from phiaudit.storage._store import open_admin_engine
client = open_admin_engine(Path(sys.argv[1]), sys.argv[2])
client.command(sys.argv[3])
client.close()
"""


@pytest.fixture(scope="module")
def outage(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Store, Path, float]]:
    """A store whose audit_events refuses every part written before ``until``."""
    data_dir = tmp_path_factory.mktemp("lost") / "data"
    loc = StoreLocation(data_dir=data_dir)
    migrate(loc)
    until = time.time() + OUTAGE_SECONDS + 5.0  # the store opens in the meantime
    check = (f"ALTER TABLE `{loc.database}`.audit_events ADD CONSTRAINT outage "
             f"CHECK now64(3) > fromUnixTimestamp64Milli(toInt64({int(until * 1000)}))")
    env = dict(os.environ) | disk_key_env(data_dir)
    done = subprocess.run([sys.executable, "-c", _ADMIN_DDL, str(data_dir), loc.database, check],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-500:]
    store = Store.open(loc)
    yield store, data_dir, until
    store.close()


def _rows(encoder: RecordEncoder, n: int, tag: str) -> list[list[Any]]:
    return [encoder.audit_row(AuditEvent(
        event_id=uuid.uuid4(), event_time_us=1_764_000_000_000_000 + i,
        received_time_us=1_764_000_000_000_000 + i, action="read", outcome="success",
        patient_id=f"{tag}-{i}", actor_id="u")) for i in range(n)]


def _linked(rows: list[list[Any]]) -> Any:
    """Rows with placeholder chain columns, for inserting directly (no writer)."""
    return arrow_table(AUDIT_COLUMNS, [[*r[:-4], "w-direct", 1, bytes(32), b"\1" * 32]
                                       for r in rows])


def test_an_insert_the_engine_drops_is_retried_not_acknowledged(
        outage: tuple[Store, Path, float]) -> None:
    store, data_dir, until = outage
    assert time.time() < until - 3, "the store took too long to open for this test"
    from phiaudit.storage import KeyRing

    encoder = RecordEncoder.for_ring(KeyRing.open(data_dir))

    # the store's own answer: no new part, so not known to be written
    table = _linked(_rows(encoder, 3, "direct"))
    assert store.insert_arrow("audit_events", table, "direct-1",
                              types=[c.type for c in AUDIT_COLUMNS]) is False
    _, got = store.query("SELECT count() FROM audit_events")
    assert got[0][0] == 0, "the engine kept rows despite the constraint"

    # the writer: the batch is not acknowledged while the engine drops it, and is stored
    # exactly once, linked, when the outage ends
    w = BatchWriter(store, "w-lost", [SPEC], retry_backoff=(0.05, 0.5))
    w.start()
    try:
        future = w.submit(b"request-1", {"audit_events": _rows(encoder, 5, "lost")})
        deadline = time.monotonic() + 5
        while w.stats.lost_inserts == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert w.stats.lost_inserts >= 1, "the dropped insert was not noticed"
        assert not future.done(), "a batch the store did not keep was acknowledged"
        future.result(timeout=until - time.time() + 30)
        assert time.time() >= until, "acknowledged before the store could keep it"
    finally:
        assert w.shutdown()
    _, got = store.query("SELECT seq FROM audit_events WHERE writer_id = 'w-lost' ORDER BY seq")
    assert [r[0] for r in got] == [1, 2, 3, 4, 5]
    assert w.chain_state("audit_events")[0] == 5

    # after the outage, an insert that writes its part is confirmed, and the same token
    # again (ClickHouse drops it as a duplicate) is not
    again = _linked(_rows(encoder, 2, "after"))
    types = [c.type for c in AUDIT_COLUMNS]
    assert store.insert_arrow("audit_events", again, "direct-2", types=types) is True
    assert store.insert_arrow("audit_events", again, "direct-2", types=types) is False


def test_a_batch_over_a_month_boundary_expects_a_part_per_month() -> None:
    """The check counts one new part per partition: a batch across a month boundary (written
    as two parts) is confirmed only when both are there."""
    import datetime as dt

    import pyarrow as pa

    def times(*days: dt.datetime) -> Any:
        return pa.table({"event_time": pa.array(list(days), pa.timestamp("us", tz="UTC"))})

    end, start = dt.datetime(2026, 10, 31, 23, 59, 59), dt.datetime(2026, 11, 1)
    assert Store._partitions(times(end, start, start), "toYYYYMM(event_time)") == 2
    assert Store._partitions(times(start, start), "toYYYYMM(event_time)") == 1
    assert Store._partitions(times(end, start), "toDate(event_time)") == 2
    assert Store._partitions(times(end, start), "") == 1
    assert Store._partitions(times(end, start), "toYYYYMM(received_time)") == 1


class _AnswerLost:
    """A test double for what the embedded engine cannot do but a server connection can: the
    first insert is written, then its answer is lost (the writer sees an error and retries).
    Everything else, and the insert itself, is the real store's."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.lost = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def insert_arrow(self, *args: Any, **kwargs: Any) -> bool:
        landed = self._store.insert_arrow(*args, **kwargs)
        if not self.lost:
            self.lost += 1
            from phiaudit.storage import StorageUnavailable

            raise StorageUnavailable("the answer was lost (test double)")
        return landed


def test_a_retry_dropped_as_a_duplicate_of_a_stored_batch_is_acknowledged(
        outage: tuple[Store, Path, float]) -> None:
    """The retry of a batch whose first insert was stored leaves no new part (ClickHouse drops
    it as a duplicate of its token): the batch's rows are in the store, so it is acknowledged,
    stored once, and not counted as lost."""
    store, data_dir, until = outage
    time.sleep(max(0.0, until - time.time()))  # after the outage of the first test
    from phiaudit.storage import KeyRing

    encoder = RecordEncoder.for_ring(KeyRing.open(data_dir))
    flaky = _AnswerLost(store)
    w = BatchWriter(flaky, "w-dup", [SPEC], retry_backoff=(0.05, 0.5))
    w.start()
    try:
        w.submit(b"request-dup", {"audit_events": _rows(encoder, 4, "dup")}).result(timeout=60)
    finally:
        assert w.shutdown()
    assert flaky.lost == 1 and w.stats.insert_failures == 1
    assert w.stats.lost_inserts == 0
    _, got = store.query("SELECT seq FROM audit_events WHERE writer_id = 'w-dup' ORDER BY seq")
    assert [r[0] for r in got] == [1, 2, 3, 4]
