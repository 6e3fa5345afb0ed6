"""Keep the service's resident memory down: when it passes ``memory_release_mb``, give back to
the system the memory the allocators hold freed.

Two allocators keep freed memory resident in this process, and at full speed that is most of
what passes the 1 GiB the issue allows (bench/README.md, session 10):

- the embedded engine's jemalloc keeps freed pages up to 5 s (``dirty_decay_ms: 5000``, built
  into chDB; ``MALLOC_CONF`` does not reach it): 100-290 MiB while merges and inserts churn.
  ``SYSTEM JEMALLOC PURGE`` (``Store.release_memory``) returns them;
- glibc's malloc (Python's large objects, gRPC, the compiled extractor) keeps freed chunks in
  its arenas: ~140 MiB held for ~70 in use. ``malloc_trim(0)`` returns the free pages.

Releasing costs CPU (a purged page is faulted in again when the allocator reuses it), so it is
done only above the mark, at most every ``interval`` seconds. The engine's own working memory
is not touched here: merges are bounded by the table settings (at most 16 parts a merge,
``storage._schema``) and the engine's merge budget (``storage._store.MERGE_MEMORY_BYTES``),
rule and staff queries by ``query_memory_mb``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

_log = logging.getLogger("phiaudit.receiver")

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int:
    """This process's resident set (``/proc/self/statm``), or 0 where it cannot be read."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


def _malloc_trim() -> Callable[[], Any] | None:
    """glibc's ``malloc_trim(0)``, or None on a C library without it (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: trim(0)


class MemoryGuard:
    """A daemon thread: every ``interval`` s, when the resident set is above ``limit_bytes``,
    releases the engine's freed memory (``release``, e.g. ``Store.release_memory``) and glibc's.
    ``count`` is called once per release (a metric)."""

    def __init__(self, limit_bytes: int, release: Callable[[], Any], *,
                 interval: float = 0.25, count: Callable[[], None] | None = None,
                 resident: Callable[[], int] = resident_bytes) -> None:
        self.limit = limit_bytes
        self._release = release
        self._trim = _malloc_trim()
        self._interval = interval
        self._count = count
        self._resident = resident
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.releases = 0
        self.failures = 0

    def check(self) -> bool:
        """One look: release when above the mark. True when it released."""
        if self._resident() <= self.limit:
            return False
        try:
            self._release()
        except Exception as exc:  # the store's error names the action only, no data
            self.failures += 1
            if self.failures == 1:
                _log.warning("could not release the engine's freed memory (%s)", exc)
        if self._trim is not None:
            self._trim()
        self.releases += 1
        if self.releases == 1:
            _log.info("resident memory passed %d MiB: releasing freed memory to the system "
                      "when it does (memory_release_mb)", self.limit >> 20)
        if self._count is not None:
            self._count()
        return True

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.check()

    def start(self) -> None:
        if self.limit <= 0 or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="phiaudit-memory", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
