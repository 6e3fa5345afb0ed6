"""Hash chains: every stored audit row links to its writer's previous row.

Each writer (one receiver process identity) numbers its rows 1, 2, 3, ... without gaps and
links them::

    leaf(row n) = SHA-256( canonical(row n) )
    hash(row n) = SHA-256( prev_hash || ns(writer_id) || ns(seq) || leaf(row n) )
    prev_hash(row 1) = 32 zero bytes

``canonical(row)`` concatenates every column except ``writer_id``, ``seq``, ``prev_hash`` and
``hash``, in table order, each as a netstring (``ns(b) = b"<decimal length>:" + b``), with
these encodings:

=====================  =====================================================================
UUID                   the 36-character text form (``toString(event_id)`` in ClickHouse)
DateTime64(6)          decimal microseconds since the epoch (``toUnixTimestamp64Micro``)
integers, Bool         decimal text (``toString``); Bool as ``1``/``0``
String, FixedString    the bytes as stored (ciphertexts included)
Array(String)          the netstrings of the items, concatenated, as one netstring
=====================  =====================================================================

The encoding is chosen so that ClickHouse SQL can recompute it (``SHA256``, ``concat``,
``length``) for a verification pushed into the database. The leaf does not depend on the
writer's position, so it is computed where the row is built (in the receiver's worker
processes); only the cheap link is sequential, on the writer thread.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from ._schema import Column

__all__ = ["GENESIS", "ChainState", "canonical_encoder", "link_rows"]

GENESIS = b"\x00" * 32

_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.UTC)


def _ns(b: bytes) -> bytes:
    return str(len(b)).encode() + b":" + b


def _enc_str(v: Any) -> bytes:
    if isinstance(v, bytes):
        return _ns(v)
    return _ns(str(v).encode("utf-8", "surrogatepass"))


def _enc_uuid(v: Any) -> bytes:
    return _ns(str(v).encode() if isinstance(v, uuid.UUID) else str(uuid.UUID(str(v))).encode())


def _enc_int(v: Any) -> bytes:
    return _ns(str(int(v)).encode())


def _enc_bool(v: Any) -> bytes:
    return _ns(b"1" if v else b"0")


def _enc_time_us(v: Any) -> bytes:
    if isinstance(v, _dt.datetime):
        if v.tzinfo is None:
            v = v.replace(tzinfo=_dt.UTC)
        delta = v - _EPOCH
        micros = (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds
        return _ns(str(micros).encode())
    return _ns(str(int(v)).encode())


def _enc_array(v: Any) -> bytes:
    return _ns(b"".join(_enc_str(x) for x in v))


def _encoder_for(col: Column) -> Callable[[Any], bytes]:
    t = col.type
    if t == "UUID":
        return _enc_uuid
    if t.startswith("DateTime64(6"):
        return _enc_time_us
    if t == "Bool":
        return _enc_bool
    if t.startswith(("UInt", "Int")):
        return _enc_int
    if t.startswith("Array("):
        return _enc_array
    return _enc_str


_POSITION = ("writer_id", "seq", "prev_hash", "hash")


def leaf_digest(encode: Callable[[Sequence[Any]], bytes], row: Sequence[Any]) -> bytes:
    """SHA-256 of the row's canonical encoding: what the chain links."""
    return hashlib.sha256(encode(row)).digest()


def _field_expr(col: Column, i: int) -> str:
    """Source of an expression giving the field's bytes (before the netstring prefix)."""
    t = col.type
    v = f"r[{i}]"
    if t == "UUID":
        return f"str({v}).encode()"
    if t.startswith("DateTime64(6"):
        return f"(b'%d' % {v} if {v}.__class__ is int else _tus({v}))"
    if t == "Bool":
        return f"(b'1' if {v} else b'0')"
    if t.startswith(("UInt", "Int")):
        return f"b'%d' % {v}"
    if t.startswith("Array("):
        return f"_arr({v})"
    return f"({v} if {v}.__class__ is bytes else _s({v}))"


def _s(v: Any) -> bytes:
    if isinstance(v, bytes | bytearray):
        return bytes(v)
    return str(v).encode("utf-8", "surrogatepass")


def _tus(v: Any) -> bytes:
    return _enc_time_us(v).split(b":", 1)[1]


def _arr(v: Any) -> bytes:
    return b"".join(_enc_str(x) for x in v)


def canonical_encoder(columns: Sequence[Column]) -> Callable[[Sequence[Any]], bytes]:
    """Return ``f(row) -> bytes`` for rows given in ``columns`` order (the chain columns
    ``writer_id``, ``seq``, ``prev_hash`` and ``hash`` are not part of the encoding).

    The function is generated once per table so that a row costs one call, not one per field.
    """
    fields = [(i, c) for i, c in enumerate(columns) if c.name not in _POSITION]
    lines = ["def encode(r):"]
    names = []
    for n, (i, c) in enumerate(fields):
        lines.append(f"    f{n} = {_field_expr(c, i)}")
        names.append(f"f{n}")
    fmt = "b'" + "%d:%b" * len(names) + "'"
    args = ", ".join(f"len({n}), {n}" for n in names)
    lines.append(f"    return {fmt} % ({args},)")
    namespace: dict[str, Any] = {"_tus": _tus, "_arr": _arr, "_s": _s}
    exec(compile("\n".join(lines), "<canonical_encoder>", "exec"), namespace)  # noqa: S102
    encode: Callable[[Sequence[Any]], bytes] = namespace["encode"]
    return encode


class ChainState:
    """A writer's position: the last committed sequence number and hash."""

    __slots__ = ("head", "seq", "writer_id")

    def __init__(self, writer_id: str, seq: int = 0, head: bytes = GENESIS) -> None:
        self.writer_id = writer_id
        self.seq = seq
        self.head = head

    def __repr__(self) -> str:
        return f"ChainState({self.writer_id!r}, seq={self.seq}, head={self.head.hex()[:16]}...)"


def link_rows(
    state: ChainState,
    columns: Sequence[Column],
    rows: list[list[Any]],
    encode: Callable[[Sequence[Any]], bytes] | None = None,
    leaves: Sequence[bytes] | None = None,
) -> tuple[int, bytes]:
    """Fill writer_id, seq, prev_hash and hash of ``rows`` (in place) continuing ``state``.

    ``leaves`` (one per row) are the rows' leaf digests when they were computed where the rows
    were built (the record encoder does); otherwise they are computed here.
    Returns the new (seq, head) without changing ``state``: the caller commits it only after
    the rows are stored.
    """
    names = [c.name for c in columns]
    i_w, i_s, i_p, i_h = (names.index(n) for n in _POSITION)
    enc = encode or canonical_encoder(columns)
    seq, head = state.seq, state.head
    sha = hashlib.sha256
    writer = _ns(state.writer_id.encode())
    for n, row in enumerate(rows):
        seq += 1
        leaf = leaves[n] if leaves is not None else sha(enc(row)).digest()
        row[i_w] = state.writer_id
        row[i_s] = seq
        row[i_p] = head
        s = b"%d" % seq
        head = sha(b"%b%b%d:%b%b" % (head, writer, len(s), s, leaf)).digest()
        row[i_h] = head
    return seq, head
