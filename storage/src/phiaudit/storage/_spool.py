"""The service's local spool: where committed-to-disk batches wait while the store is down.

When an insert fails because the store is unreachable or failing, the writer appends the
batch, already encrypted and linked into its chain, to this spool and fsyncs it before the
requests are acknowledged. The writer drains the spool in order, with the same deduplication
tokens, once the store answers again; a restart drains it first and resumes each chain from
the newest of what was committed and what was spooled. Nothing acknowledged is lost, and the
chain never forks.

One file per table block: ``DATA_DIR/spool/<12-digit number>-<table>.arrow``, an Arrow IPC
stream (mode 0600) whose schema metadata carries the table, the token and, for chained
tables, the block's last sequence number and chain head. The files hold exactly what the
table would (PHI fields are ciphertexts). The spool is size-capped: past the cap the writer
keeps the batch in memory and requests get UNAVAILABLE with RetryInfo.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from ._arrow import arrow_table
from ._durable import fsync_dir
from ._errors import StorageUnavailable
from ._schema import Column

__all__ = ["BatchSpool", "SpoolEntry", "SpoolFull"]


class SpoolFull(StorageUnavailable):
    """The spool has reached its size cap."""


@dataclass(frozen=True)
class SpoolEntry:
    path: Path
    table: str
    token: str
    last_seq: int
    head: bytes
    size: int

    def read(self) -> pa.Table:
        with pa.OSFile(str(self.path), "rb") as fh:
            return pa.ipc.open_stream(fh).read_all()


class BatchSpool:
    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.dir = Path(directory)
        self.max_bytes = max_bytes
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.dir, 0o700)
        self._lock = threading.Lock()
        for stale in self.dir.glob(".tmp-*"):
            stale.unlink()  # a write that never completed was never acknowledged
        self._entries = [self._load(p) for p in sorted(self.dir.glob("*.arrow"))]
        self._next = 1 + max((int(e.path.name.split("-", 1)[0]) for e in self._entries),
                             default=0)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size_bytes(self) -> int:
        return sum(e.size for e in self._entries)

    def entries(self) -> list[SpoolEntry]:
        with self._lock:
            return list(self._entries)

    @staticmethod
    def _load(path: Path) -> SpoolEntry:
        with pa.OSFile(str(path), "rb") as fh:
            meta = pa.ipc.open_stream(fh).schema.metadata or {}
        return SpoolEntry(path, meta[b"table"].decode(), meta[b"token"].decode(),
                          int(meta.get(b"last_seq", b"0")), bytes.fromhex(
                              meta.get(b"head", b"").decode()), path.stat().st_size)

    def append(self, table: str, columns: Sequence[Column],
               rows: Sequence[Sequence[Any]] | pa.Table, token: str, last_seq: int = 0,
               head: bytes = b"") -> None:
        """Write one block durably: ``rows`` is an Arrow table (of ``arrow_schema(columns)``)
        or a list of rows in ``columns`` order."""
        data = rows if isinstance(rows, pa.Table) else arrow_table(columns, rows)
        meta = {b"table": table.encode(), b"token": token.encode(),
                b"last_seq": str(last_seq).encode(), b"head": head.hex().encode()}
        data = data.replace_schema_metadata(meta)
        with self._lock:
            if self.max_bytes and self.size_bytes + data.nbytes > self.max_bytes:
                raise SpoolFull("the local spool is full")
            number = self._next
            self._next += 1
            final = self.dir / f"{number:012d}-{table}.arrow"
            tmp = self.dir / f".tmp-{number:012d}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                with pa.OSFile(str(tmp), "wb") as sink, \
                        pa.ipc.new_stream(sink, data.schema) as writer:
                    writer.write_table(data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
            fsync_dir(self.dir)
            self._entries.append(SpoolEntry(final, table, token, last_seq, head,
                                            final.stat().st_size))

    def quarantine(self, entry: SpoolEntry) -> Path:
        """Move a block the store refuses for good to ``rejected/`` (kept for an operator,
        out of the drain's way); returns its new path."""
        with self._lock:
            rejected = self.dir / "rejected"
            rejected.mkdir(exist_ok=True, mode=0o700)
            target = rejected / entry.path.name
            os.replace(entry.path, target)
            fsync_dir(self.dir)
            self._entries = [e for e in self._entries if e.path != entry.path]
            return target

    def remove(self, entry: SpoolEntry) -> None:
        with self._lock:
            entry.path.unlink(missing_ok=True)
            self._entries = [e for e in self._entries if e.path != entry.path]
