"""The compiled extractor (``_native.c``) behind a Python face: OTLP trace bytes -> the Arrow
rows of the request's eligible audit spans, encrypted and leaf-hashed as stored.

The Python path (``_extract`` + ``RecordEncoder``) costs ~60 us of CPU per audit span here,
almost all of it per-attribute protobuf access and per-field AES/HMAC calls; the compiled one
walks the wire format once and calls libcrypto directly, and hands back Arrow buffers (no
Python object per row). Only spans it maps exactly as the Python code does are taken (see
``_native.c``); the caller runs the Python path on the rest of the request.

It also validates the request as protobuf (upb) would (``_native.c``, ``validate``), so that
the service need not parse a request with protobuf only to refuse a malformed one: where the
compiled validator's schema matches the installed ``opentelemetry-proto`` and the runtime is
upb with its default depth limit (``validation_available``), ``extract(..., validate=True)``
raises ``MalformedTraces`` for the bytes protobuf refuses.

The extension is optional: built by ``make`` (``receiver/build_native.py``) where a C compiler
and OpenSSL's headers exist. Without it, or when ``native_extractor: false`` is configured,
every span takes the Python path.
"""

from __future__ import annotations

import functools
import logging
import sys
from typing import Any, NamedTuple

import pyarrow as pa
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.internal import api_implementation
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from phiaudit.storage import AUDIT_COLUMNS, ColumnKeys, arrow_schema

__all__ = ["MalformedTraces", "NativeResult", "NativeTraces", "native_available",
           "native_block_encoder", "native_linker", "validation_available"]

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


# the wire kind of each field type, as the compiled validator names it
_VARINT = {FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT32,
           FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SINT64,
           FieldDescriptor.TYPE_BOOL, FieldDescriptor.TYPE_ENUM}
_FIXED64 = {FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64,
            FieldDescriptor.TYPE_DOUBLE}
_FIXED32 = {FieldDescriptor.TYPE_FIXED32, FieldDescriptor.TYPE_SFIXED32,
            FieldDescriptor.TYPE_FLOAT}


def _wire_kind(f: FieldDescriptor, proto3: bool) -> str:
    """What the compiled validator must know of a field. What it does not handle (repeated
    numbers, which may come packed; groups; strings outside proto3, which upb does not check
    for UTF-8) gets a name the validator never uses, so that the schemas differ."""
    if f.type == FieldDescriptor.TYPE_MESSAGE:
        return "message"
    if f.type == FieldDescriptor.TYPE_STRING:
        return "string" if proto3 else "string (not proto3)"
    if f.type == FieldDescriptor.TYPE_BYTES:
        return "bytes"
    if _repeated(f):
        return "repeated number (packed)"
    if f.type in _VARINT:
        return "varint"
    if f.type in _FIXED64:
        return "fixed64"
    if f.type in _FIXED32:
        return "fixed32"
    return f"type {f.type}"


def _repeated(f: FieldDescriptor) -> bool:
    flag = getattr(f, "is_repeated", None)
    if flag is not None:
        return bool(flag)
    return bool(f.label == FieldDescriptor.LABEL_REPEATED)


def trace_schema(root: Descriptor | None = None) -> tuple[tuple[str, tuple[tuple[int, str, str],
                                                                           ...]], ...]:
    """Every message reachable from ExportTraceServiceRequest in the installed descriptors, in
    the shape of ``_native.TRACE_SCHEMA`` (sorted by name, fields by number)."""
    seen: dict[str, tuple[tuple[int, str, str], ...]] = {}

    def walk(d: Descriptor) -> None:
        if d.full_name in seen:
            return
        proto3 = _syntax(d.file.name) == "proto3"  # editions: not handled, refused
        if d.GetOptions().message_set_wire_format or d.extension_ranges:
            # neither is in OTLP: refuse to agree rather than guess
            seen[d.full_name] = ((0, "extensions or message set", ""),)
            return
        seen[d.full_name] = tuple(sorted(
            (f.number, _wire_kind(f, proto3),
             f.message_type.full_name if f.type == FieldDescriptor.TYPE_MESSAGE else "")
            for f in d.fields))
        for f in d.fields:
            if f.type == FieldDescriptor.TYPE_MESSAGE:
                walk(f.message_type)

    walk(root or trace_service_pb2.ExportTraceServiceRequest.DESCRIPTOR)
    return tuple(sorted(seen.items()))


@functools.cache
def _syntax(file_name: str) -> str:
    proto = descriptor_pb2.FileDescriptorProto()
    trace_service_pb2.DESCRIPTOR.pool.FindFileByName(file_name).CopyToProto(proto)
    return str(proto.syntax)


def _upb_accepts(raw: bytes) -> bool:
    try:
        trace_service_pb2.ExportTraceServiceRequest.FromString(raw)
    except (DecodeError, RuntimeError, ValueError):
        return False
    return True


@functools.cache
def validation_available() -> tuple[bool, str]:
    """Whether the compiled validator gives protobuf's verdict here, and why not: the
    extension is built, the protobuf runtime is upb, the validator's schema is that of the
    installed descriptors, and upb's depth limit is the one the validator applies."""
    ok, why = native_available()
    if not ok:
        return False, why
    if api_implementation.Type() != "upb":
        return False, f"the protobuf runtime is {api_implementation.Type()}, not upb"
    native = tuple(sorted((name, tuple(sorted(fields))) for name, fields in
                          _native.TRACE_SCHEMA))
    if native != trace_schema():
        return False, "the compiled validator was built for another opentelemetry-proto"
    depth = int(_native.MAX_DEPTH)  # nested groups: each one level
    for n in (depth, depth + 1):
        raw = b"\x0b" * n + b"\x0c" * n
        if _upb_accepts(raw) != (n == depth) or _native.validate_traces(raw)[0] != (n == depth):
            return False, "protobuf's depth limit is not the compiled validator's"
    return True, ""


def native_linker() -> Any:
    """The compiled hash-chain linker for ``BatchWriter(linker=...)`` (~0.3 us a row against
    ~1.7 in Python), or None where the extension is not available."""
    return _native.link if native_available()[0] else None


def native_chain_fold() -> Any:
    """The compiled check-and-fold of a writer's stored rows for the checkpointer
    (``_native.chain_fold`` over ``storage.chain_rows``), or None where the extension is not
    available (the checkpointer then folds in SQL)."""
    return _native.chain_fold if native_available()[0] else None


_NATIVE_INTS = {"UInt8": pa.uint8(), "UInt16": pa.uint16(), "UInt32": pa.uint32(),
                "UInt64": pa.uint64(), "Int8": pa.int8(), "Int16": pa.int16(),
                "Int32": pa.int32(), "Int64": pa.int64()}
#: binary columns: 'S' as they are, 'L' dictionary-encoded (as the table keeps them)
_NATIVE_STRINGS = {"String": "S", "LowCardinality(String)": "L"}
_NATIVE_LISTS = {"Array(String)": "A", "Array(LowCardinality(String))": "M"}
_TIME_UNITS = {"s": 0, "ms": 3, "us": 6, "ns": 9}


def _binary(typ: pa.DataType) -> bool:
    return bool(pa.types.is_binary(typ) or pa.types.is_string(typ))


def _column_kind(typ: pa.DataType, ch_type: str) -> tuple[str, int] | None:
    """How ``_native.native_block`` reads an Arrow column of type ``typ`` stored as
    ``ch_type`` (kind, value width), or None unless both types are ones it maps exactly (any
    other type, Nullable included, goes as Arrow)."""
    if ch_type in _NATIVE_STRINGS:
        return (_NATIVE_STRINGS[ch_type], 0) if _binary(typ) else None
    if ch_type in _NATIVE_LISTS:
        list_of_binary = pa.types.is_list(typ) and _binary(typ.value_type)
        return (_NATIVE_LISTS[ch_type], 0) if list_of_binary else None
    if ch_type == "UUID":
        return ("U", 16) if typ == pa.binary(16) else None
    if ch_type.startswith("FixedString("):
        width = int(ch_type[len("FixedString("):-1])
        return ("F", width) if typ == pa.binary(width) else None
    if ch_type in _NATIVE_INTS:
        return ("F", typ.bit_width // 8) if typ == _NATIVE_INTS[ch_type] else None
    if ch_type.startswith("DateTime64(") and pa.types.is_timestamp(typ):
        precision = ch_type[len("DateTime64("):].split(",")[0].rstrip(")").strip()
        return ("F", 8) if precision == str(_TIME_UNITS[typ.unit]) else None
    return None


def _buf(b: Any) -> Any:
    return b if b is not None else b""


def _chunks(kind: str, width: int, column: Any) -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = []
    for chunk in column.chunks:
        bufs = chunk.buffers()
        if kind in "FU":
            out.append((chunk.offset, len(chunk), width, _buf(bufs[1])))
        elif kind in "SL":
            out.append((chunk.offset, len(chunk), _buf(bufs[1]), _buf(bufs[2])))
        else:
            values = chunk.values
            if values.null_count:
                raise ValueError("a null in a list")
            vbufs = values.buffers()
            out.append((chunk.offset, len(chunk), _buf(bufs[1]), values.offset,
                        _buf(vbufs[1]), _buf(vbufs[2])))
    return out


def native_block(table: pa.Table, ch_types: list[str]) -> bytes | None:
    """``table`` (columns in the order of ``ch_types``, their ClickHouse types) as one block
    of ClickHouse's Native format, or None when a column has nulls or a type the compiled
    encoder does not take (the caller then sends the Arrow stream)."""
    if len(ch_types) != table.num_columns or sys.byteorder != "little":
        return None
    spec = []
    for field, ch_type, column in zip(table.schema, ch_types, table.columns, strict=True):
        how = _column_kind(field.type, ch_type)
        if how is None or column.null_count:
            return None
        kind, width = how
        spec.append((field.name.encode("utf-8"), ch_type.encode("ascii"), kind,
                     _chunks(kind, width, column)))
    block: bytes = _native.native_block(table.num_rows, spec)
    return block


def native_block_encoder() -> Any:
    """The compiled Native-format encoder for ``Store.block_encoder`` (the embedded engine
    parses a Native block of audit rows in ~5 ms less than the same Arrow stream per 4,096
    rows), or None where the extension is not available."""
    return native_block if native_available()[0] else None


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


class MalformedTraces(Exception):
    """protobuf would refuse these bytes as an ExportTraceServiceRequest (the compiled
    validator's verdict; the reason carries no data)."""


class NativeResult(NamedTuple):
    #: the audit rows of the spans taken (``audit_events`` schema; ``hash`` holds the leaf)
    table: pa.Table
    #: the ordinals (1-based, request order) of the spans taken, for the Python path to skip
    skip: set[int]
    #: the request's spans, all of them (as protobuf counts them)
    spans: int


class NativeTraces:
    """One per process that extracts (the service, or each worker)."""

    def __init__(self, keys: ColumnKeys) -> None:
        ok, why = native_available()
        if not ok:
            raise RuntimeError(why)
        self._keys = keys
        self._schema = arrow_schema(AUDIT_COLUMNS)
        self._layouts: list[str] = list(_native.LAYOUTS)
        #: whether ``extract(..., validate=True)`` gives protobuf's verdict here
        self.validates, why = validation_available()
        if not self.validates:
            _log.warning("%s: every trace request is parsed with protobuf to validate it", why)

    def extract(self, raw: bytes, sender: str, now_us: int, max_rows: int = 0,
                validate: bool = False) -> NativeResult | None:
        """The audit rows of the eligible spans, their ordinals and the request's span count;
        None when the request is one the compiled walker does not take (all to Python), which
        includes one that would make more than ``max_rows`` rows (0: no limit). With
        ``validate`` (only where ``self.validates``), raises ``MalformedTraces`` when protobuf
        would refuse the bytes; a request it returns is one protobuf accepts."""
        if validate and not self.validates:
            raise RuntimeError("the compiled validator does not match protobuf here")
        k = self._keys
        out: Any = _native.extract(raw, now_us, sender.encode("utf-8", "surrogatepass"),
                                   k.key_id, k.data_key, k.index_key, max_rows, validate)
        if out is False:
            raise MalformedTraces("not a valid protobuf message")
        if out is None:
            return None
        n, ords, columns, spans = out
        arrays = [_array(field.type, layout, n, bufs) for field, layout, bufs in
                  zip(self._schema, self._layouts, columns, strict=True)]
        table = pa.Table.from_arrays(arrays, schema=self._schema)
        skip = set(memoryview(ords).cast("i").tolist()) if ords else set()
        return NativeResult(table, skip, spans)
