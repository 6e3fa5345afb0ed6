"""Keep the service's resident memory down: when it passes ``memory_release_mb``, give back to
the system the memory the allocators hold freed.

Two allocators keep freed memory resident in this process, and at full speed that is most of
what passes the 1 GiB the issue allows (bench/README.md, session 10):

- the embedded engine's jemalloc keeps freed pages up to 5 s (``dirty_decay_ms: 5000``, built
  into chDB; ``MALLOC_CONF`` does not reach it): 100-290 MiB while merges and inserts churn.
  ``SYSTEM JEMALLOC PURGE`` (``Store.release_memory``) returns them;
- glibc's malloc (Python's large objects, gRPC, the compiled extractor) keeps freed chunks in
  its arenas: ~140 MiB held for ~70 in use. ``malloc_trim(0)`` returns the free pages.

A third part of the resident set is not memory anybody freed: the engine's library (chDB's
``_chdb.abi3.so``, 530 MiB of code and constants): every page of it that ever ran stays
resident. Opening the engine touches ~170 MiB of it and a long run ~250 MiB, while a few
seconds of ingestion use 30-80 MiB (measured: bench/README.md, session 13). ``page_out`` asks the
kernel to reclaim those clean, file-backed pages (``madvise(MADV_PAGEOUT)``, Linux 5.4); the
ones still in use come back from the file on their next use. Above the mark, at most every
``code_interval`` seconds (2: the pages in use come back within a second, and the rest keeps
growing for tens of seconds).

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
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

_log = logging.getLogger("phiaudit.receiver")

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_MADV_PAGEOUT = 21  # linux/mman.h, Linux 5.4


def _statm(field: int) -> int:
    """A field of ``/proc/self/statm``, in bytes; 0 where it cannot be read."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[field]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


def resident_bytes() -> int:
    """This process's resident set (``/proc/self/statm``), or 0 where it cannot be read."""
    return _statm(1)


def file_resident_bytes() -> int:
    """This process's resident file-backed and shared memory (``/proc/self/statm``), or 0."""
    return _statm(2)


def _libc_function(name: str) -> Any:
    """A function of the C library (``errno`` kept for ``ctypes.get_errno``), or None where
    it has no such function (``malloc_trim`` on musl or macOS)."""
    path = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(path, use_errno=True) if path
                       else ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None


def _malloc_trim() -> Callable[[], Any] | None:
    """glibc's ``malloc_trim(0)``, or None on a C library without it (musl, macOS)."""
    trim = _libc_function("malloc_trim")
    if trim is None:
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: trim(0)


def code_mappings(directories: Sequence[str], smaps: str = "/proc/self/smaps"
                  ) -> list[tuple[int, int]]:
    """The address ranges of the read-only file mappings (code, constants) of the files under
    ``directories``: ``(start, length)``. Left out: writable mappings, and read-only ones with
    anonymous pages (relocations written at load, then protected: ``RELRO``). Those pages are
    the process's own data, which the kernel would write to swap where there is swap."""
    roots = tuple(os.path.join(os.path.realpath(d), "") for d in directories)
    ranges = []
    current: tuple[int, int] | None = None
    try:
        with open(smaps, encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                if not fields:
                    continue
                if not fields[0].endswith(":"):  # a mapping's header line
                    current = None
                    if len(fields) == 6 and "w" not in fields[1] \
                            and fields[5].rstrip("\n").startswith(roots):
                        start, end = (int(v, 16) for v in fields[0].split("-"))
                        current = (start, end - start)
                        ranges.append(current)
                elif fields[0] == "Anonymous:" and current is not None and fields[1] != "0":
                    ranges.remove(current)
                    current = None
    except (OSError, ValueError):
        return []
    return ranges


class CodePager:
    """Pages out the code of libraries (``page_out``): ``madvise(MADV_PAGEOUT)`` over their
    read-only mappings, found once (a loaded library does not move). ``available`` turns
    false, with one log line, where the kernel or the C library cannot do it."""

    def __init__(self, directories: Sequence[str]) -> None:
        self._directories = tuple(directories)
        self._ranges: list[tuple[int, int]] | None = None
        self._madvise: Any = None
        self.page_outs = 0
        self.available = bool(self._directories) and sys.platform.startswith("linux")

    def _setup(self) -> bool:
        self._ranges = code_mappings(self._directories)
        madvise = _libc_function("madvise")
        if madvise is None:
            return False
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        madvise.restype = ctypes.c_int
        self._madvise = madvise
        return bool(self._ranges)

    def page_out(self) -> int:
        """Asks the kernel to reclaim the libraries' resident pages; returns the bytes of
        file-backed memory this process no longer holds after it (0 when not available).

        The kernel pages out a file's pages only for a process that owns the file or may
        write it (``can_do_file_pageout``), and silently skips them otherwise: the first
        page-out that frees nothing says so in the log."""
        if not self.available:
            return 0
        if self._ranges is None and not self._setup():
            self.available = False
            _log.info("no library code to page out (not loaded, or no madvise)")
            return 0
        before = file_resident_bytes()
        for start, length in self._ranges or ():
            if self._madvise(start, length, _MADV_PAGEOUT) != 0:
                err = ctypes.get_errno()
                self.available = False
                # EINVAL: a kernel before 5.4
                _log.info("cannot page out the engine's code: %s", os.strerror(err))
                break
        freed = max(0, before - file_resident_bytes())
        if self.page_outs == 0:
            if freed:
                _log.info("paged out %d MiB of the engine's code not in use (again while "
                          "above memory_release_mb)", freed >> 20)
            else:
                _log.info("the kernel paged out none of the engine's code: the service's "
                          "user must own its library files, or be able to write them")
        self.page_outs += 1
        return freed


class MemoryGuard:
    """A daemon thread: every ``interval`` s, when the resident set is above ``limit_bytes``,
    releases the engine's freed memory (``release``, e.g. ``Store.release_memory``) and glibc's,
    and, at most every ``code_interval`` s, pages out the code under ``code`` (the engine's
    library: ``Store.engine_code``). ``count`` is called once per release, ``count_code`` once
    per page-out (metrics)."""

    def __init__(self, limit_bytes: int, release: Callable[[], Any], *,
                 interval: float = 0.25, count: Callable[[], None] | None = None,
                 resident: Callable[[], int] = resident_bytes,
                 code: Sequence[str] = (), code_interval: float = 2.0,
                 count_code: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit_bytes
        self._release = release
        self._trim = _malloc_trim()
        self._interval = interval
        self._count = count
        self._resident = resident
        self._pager = CodePager(code)
        self._code_interval = code_interval
        self._count_code = count_code
        self._clock = clock
        self._paged_at: float | None = None
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
        self._page_out_code()
        return True

    def _page_out_code(self) -> None:
        now = self._clock()
        if (self._paged_at is not None and now - self._paged_at < self._code_interval) \
                or not self._pager.available:
            return
        self._paged_at = now
        self._pager.page_out()
        if self._count_code is not None:
            self._count_code()

    @property
    def page_outs(self) -> int:
        """Page-outs of the engine's code so far."""
        return self._pager.page_outs

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
