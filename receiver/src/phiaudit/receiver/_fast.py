"""The compiled extractor (``_native.c``) behind a Python face: OTLP trace bytes -> the Arrow
rows of the request's eligible audit spans, encrypted and leaf-hashed as stored.

The Python path (``_extract`` + ``RecordEncoder``) costs ~60 us of CPU per audit span here,
almost all of it per-attribute protobuf access and per-field AES/HMAC calls; the compiled one
walks the wire format once and calls libcrypto directly, and hands back Arrow buffers (no
Python object per row). Only spans it maps exactly as the Python code does are taken (see
``_native.c``); the caller runs the Python path on the rest of the request.

The extension is optional: built by ``make`` (``receiver/build_native.py``) where a C compiler
and OpenSSL's headers exist. Without it, or when ``native_extractor: false`` is configured,
every span takes the Python path.
"""

from __future__ import annotations

import logging
from typing import Any

import pyarrow as pa

from phiaudit.storage import AUDIT_COLUMNS, ColumnKeys, arrow_schema

__all__ = ["NativeTraces", "native_available", "native_linker"]

_log = logging.getLogger("phiaudit.receiver")

try:
    from . import _native  # type: ignore[attr-defined]
    _IMPORT_ERROR = ""
except ImportError as exc:  # not built here: the Python path does all the work
    _native = None
    _IMPORT_ERROR = type(exc).__name__


def native_available() -> tuple[bool, str]:
    """Whether the compiled extractor can run here, and why not."""
    if _native is None:
        return False, f"the compiled extractor is not built ({_IMPORT_ERROR})"
    names = tuple(c.name for c in AUDIT_COLUMNS)
    if tuple(_native.COLUMNS) != names:
        return False, "the compiled extractor was built for another audit_events schema"
    return True, ""


def native_linker() -> Any:
    """The compiled hash-chain linker for ``BatchWriter(linker=...)`` (~0.4 us a row against
    ~1.7 in Python), or None where the extension is not available."""
    return _native.link if native_available()[0] else None


def _array(typ: pa.DataType, layout: str, n: int, bufs: tuple[bytes, bytes, bytes]) -> pa.Array:
    data, offs, child = bufs
    if layout == "b":
        return pa.Array.from_buffers(typ, n, [None, pa.py_buffer(offs), pa.py_buffer(data)])
    if layout == "l":
        nchild = len(child) // 4 - 1
        values = pa.Array.from_buffers(typ.value_type, nchild,
                                       [None, pa.py_buffer(child), pa.py_buffer(data)])
        return pa.Array.from_buffers(typ, n, [None, pa.py_buffer(offs)], children=[values])
    return pa.Array.from_buffers(typ, n, [None, pa.py_buffer(data)])


class NativeTraces:
    """One per process that extracts (the service, or each worker)."""

    def __init__(self, keys: ColumnKeys) -> None:
        ok, why = native_available()
        if not ok:
            raise RuntimeError(why)
        self._keys = keys
        self._schema = arrow_schema(AUDIT_COLUMNS)
        self._layouts: list[str] = list(_native.LAYOUTS)

    def extract(self, raw: bytes, sender: str, now_us: int,
                max_rows: int = 0) -> tuple[pa.Table, set[int]] | None:
        """The audit rows (``audit_events`` schema; ``hash`` holds the leaf) of the eligible
        spans, and those spans' ordinals (1-based, request order) for the Python path to skip;
        None when the request is one the compiled walker does not take (all to Python), which
        includes one that would make more than ``max_rows`` rows (0: no limit)."""
        k = self._keys
        out: Any = _native.extract(raw, now_us, sender.encode("utf-8", "surrogatepass"),
                                   k.key_id, k.data_key, k.index_key, max_rows)
        if out is None:
            return None
        n, ords, columns = out
        arrays = [_array(field.type, layout, n, bufs) for field, layout, bufs in
                  zip(self._schema, self._layouts, columns, strict=True)]
        table = pa.Table.from_arrays(arrays, schema=self._schema)
        skip = set(memoryview(ords).cast("i").tolist()) if ords else set()
        return table, skip
