"""The service's engine gives the memory its allocator holds freed back to the system
(``Store.release_memory``, used by the receiver's ``MemoryGuard``), with the service's own
restricted user, and that user still cannot change data (test_append_only.py)."""

from __future__ import annotations

import re

import pytest

from phiaudit.storage import Store
from phiaudit.storage._errors import PermanentError

_STATS = re.compile(rb"Allocated: (\d+), active: (\d+),.*?resident: (\d+),")


def _dirty(store: Store) -> int:
    """Pages jemalloc holds freed: resident but not active (the engine's own statistics)."""
    text = store.query_raw("SELECT * FROM system.jemalloc_stats", fmt="TSVRaw")
    m = _STATS.search(text)
    assert m, "jemalloc's statistics have no totals line"
    _, active, resident = (int(v) for v in m.groups())
    return resident - active


def test_release_memory_returns_the_engines_freed_pages(store: Store) -> None:
    # a query that allocates and frees ~100 MB inside the engine
    store.query("SELECT length(groupArray(randomString(500))) FROM numbers(200000)")
    before = _dirty(store)
    assert before > 16 << 20, "the engine should hold freed pages after a large query"
    assert store.release_memory() is True
    after = _dirty(store)
    assert after < before / 2, (before, after)


def test_the_grant_reaches_the_allocator_only(store: Store) -> None:
    # the grant is the allocator's commands only: data stays append-only
    store.release_memory()
    with pytest.raises(PermanentError):
        store.command("ALTER TABLE audit_events DELETE WHERE 1")
    with pytest.raises(PermanentError):
        store.command("SYSTEM STOP MERGES audit_events")


def test_a_long_query_does_not_hold_up_the_release(store: Store) -> None:
    # the freed pages pile up while a long rule or staff query runs: the release goes through
    # the inserts' handle, not the query lock that query holds
    import threading
    import time

    done: list[str] = []
    started = threading.Event()

    def long_query() -> None:
        started.set()
        store.query("SELECT sum(sleepEachRow(0.5)) FROM numbers(4)")  # ~2 s
        done.append("query")

    t = threading.Thread(target=long_query)
    t.start()
    started.wait()
    while not store._lock.locked():  # the query holds it
        time.sleep(0.001)
    assert store.release_memory() is True
    done.append("release")
    t.join()
    assert done == ["release", "query"]
