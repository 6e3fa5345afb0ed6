"""The on-disk spool: audit spans the exporter has not acknowledged yet.

A spool is a directory (mode 0700) of segment files (mode 0600), one per batch, one JSON
span per line. A segment is written under a temporary name and renamed into place, so a
crash never leaves half a segment; it is deleted only after the exporter acknowledged it.
Segments are replayed oldest first, also by the next run of the application. Several
processes may share one directory: a process claims a segment by renaming it, and claims
left behind by a process that died are released when the spool is opened.

The spool is capped in bytes; a batch that does not fit is refused (the caller counts it
as dropped). Nothing already stored is ever discarded to make room.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from opentelemetry.sdk.trace import ReadableSpan

from phiaudit.instrumentation._serialize import span_from_dict, span_to_dict

_SUFFIX = ".jsonl"
_CLAIM = ".inflight-"
_TMP = ".tmp-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SpoolCorrupt(Exception):
    """A segment could not be read back (it is moved aside, never deleted)."""


class Spool:
    """A size-capped directory of unacknowledged audit span batches."""

    def __init__(
        self, directory: str | os.PathLike[str], max_bytes: int, *, fsync: bool = True
    ) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self._fsync = fsync
        self._lock = threading.Lock()
        self._seq = 0
        self._pid = os.getpid()
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(OSError):  # not ours to change, e.g. a shared mount
            os.chmod(self.directory, 0o700)
        self._release_stale_claims()

    # -- writing ---------------------------------------------------------------------------
    def append(self, spans: Sequence[ReadableSpan]) -> bool:
        """Store a batch; False when it would exceed the cap (nothing is written then)."""
        if not spans:
            return True
        return self._write(spans, claimed=False) is not None

    def append_claimed(self, spans: Sequence[ReadableSpan]) -> Path | None:
        """Store a batch already claimed by this process (a safety copy of a batch whose
        export is in flight: no other process replays it, :meth:`acknowledge` deletes it,
        and this process replays it first if the export fails); None when refused (cap)."""
        return self._write(spans, claimed=True)

    def _write(self, spans: Sequence[ReadableSpan], *, claimed: bool) -> Path | None:
        payload = "".join(
            json.dumps(span_to_dict(s), separators=(",", ":")) + "\n" for s in spans
        ).encode("utf-8")
        with self._lock:
            if self.size_bytes() + len(payload) > self.max_bytes:
                return None
            self._seq += 1
            name = f"{time.time_ns():020d}-{self._pid}-{self._seq:08d}{_SUFFIX}"
            tmp = self.directory / f".tmp-{name}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(payload)
                    if self._fsync:
                        fh.flush()
                        os.fsync(fh.fileno())
                final = self.directory / (name + (f"{_CLAIM}{self._pid}" if claimed else ""))
                os.rename(tmp, final)
            except BaseException:
                with contextlib.suppress(OSError):
                    tmp.unlink()
                raise
            return final

    # -- reading -----------------------------------------------------------------------------
    def size_bytes(self) -> int:
        """Bytes held by segments (claimed or not)."""
        total = 0
        for entry in os.scandir(self.directory):
            if _SUFFIX in entry.name and not entry.name.startswith(".tmp-"):
                with contextlib.suppress(OSError):
                    total += entry.stat().st_size
        return total

    def pending(self) -> int:
        """Segments waiting for delivery (including this process's claimed one)."""
        return sum(
            1
            for e in os.scandir(self.directory)
            if not e.name.startswith(_TMP)
            and (e.name.endswith(_SUFFIX) or e.name.endswith(f"{_CLAIM}{self._pid}"))
        )

    def claim_oldest(self) -> Path | None:
        """Claim the oldest segment for delivery (this process's own claim first)."""
        # never a segment still being written: its ".tmp-" name matches the globs too
        own = sorted(self.directory.glob(f"[!.]*{_SUFFIX}{_CLAIM}{self._pid}"))
        if own:
            return own[0]
        for path in sorted(self.directory.glob(f"[!.]*{_SUFFIX}")):
            claimed = path.with_name(path.name + f"{_CLAIM}{self._pid}")
            try:
                os.rename(path, claimed)
            except FileNotFoundError:
                continue  # another process claimed it first
            return claimed
        return None

    @staticmethod
    def read(segment: Path) -> list[ReadableSpan]:
        """The spans of a segment; raises :class:`SpoolCorrupt` if it cannot be parsed."""
        try:
            with open(segment, encoding="utf-8") as fh:
                return [span_from_dict(json.loads(line)) for line in fh if line.strip()]
        except (ValueError, KeyError, TypeError) as exc:
            raise SpoolCorrupt(segment.name) from exc

    def acknowledge(self, segment: Path) -> None:
        """The exporter has the segment's spans: delete it."""
        with contextlib.suppress(FileNotFoundError):
            segment.unlink()

    def quarantine(self, segment: Path) -> None:
        """Move an unreadable segment aside (kept for investigation, out of the cap)."""
        with contextlib.suppress(OSError):
            os.rename(segment, segment.with_name(segment.name.split(_CLAIM)[0] + ".corrupt"))

    def release_claims(self) -> None:
        """Give this process's claims back (at shutdown), for the next run to replay."""
        for path in self.directory.glob(f"*{_SUFFIX}{_CLAIM}{self._pid}"):
            with contextlib.suppress(OSError):
                os.rename(path, path.with_name(path.name.split(_CLAIM)[0]))

    def _release_stale_claims(self) -> None:
        for path in self.directory.glob(f"*{_SUFFIX}{_CLAIM}*"):
            pid_text = path.name.rsplit(_CLAIM, 1)[1]
            pid = int(pid_text) if pid_text.isdigit() else -1
            # our own pid cannot hold a claim yet: a previous run that had our pid did
            if pid == self._pid or pid < 0 or not _alive(pid):
                with contextlib.suppress(OSError):
                    os.rename(path, path.with_name(path.name.split(_CLAIM)[0]))
        for path in self.directory.glob(".tmp-*"):
            parts = path.name.split("-")  # .tmp-<ns>-<pid>-<seq>.jsonl
            pid = int(parts[2]) if len(parts) > 3 and parts[2].isdigit() else -1
            if pid == self._pid or pid < 0 or not _alive(pid):
                with contextlib.suppress(OSError):
                    path.unlink()  # an interrupted write: incomplete, never acknowledged
