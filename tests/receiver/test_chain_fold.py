"""The checkpointer's compiled check-and-fold (``_native.chain_fold``) against Python's RFC 6962
tree: the same subtree roots, and None for every way the stored rows can fail to be exactly
the writer's next run (a row missing, repeated, out of order or unlinked)."""

from __future__ import annotations

import hashlib
import random
import struct

import pytest

from phiaudit.storage import CHAIN_ROW_BYTES, CompactRange, leaf_hash
from tests.receiver import native_build

BLOCK = 256


Row = tuple[int, bytes, bytes]


def _rows(start: int, n: int, head: bytes, seed: int = 3) -> tuple[list[Row], bytes]:
    rng = random.Random(seed)
    rows = []
    prev = head
    for i in range(n):
        h = hashlib.sha256(prev + rng.randbytes(8)).digest()
        rows.append((start + 1 + i, prev, h))
        prev = h
    return rows, prev


def _blob(rows: list[Row]) -> bytes:
    return b"".join(struct.pack("<Q", s) + p + h for s, p, h in rows)


def _python_roots(rows: list[Row], block: int) -> bytes:
    out = []
    for k in range(0, len(rows), block):
        tree = CompactRange()
        for _, _, h in rows[k:k + block]:
            tree.append(leaf_hash(h))
        out.append(tree.root())
    return b"".join(out)


@pytest.mark.parametrize("start, blocks, block", [(0, 3, BLOCK), (512, 1, BLOCK), (0, 5, 1),
                                                  (256, 2, 4), (0, 0, BLOCK)])
def test_the_roots_are_pythons(start: int, blocks: int, block: int) -> None:
    _native = native_build.require_native()
    head = b"\x00" * 32 if start == 0 else hashlib.sha256(b"earlier").digest()
    rows, last = _rows(start, blocks * block, head)
    assert CHAIN_ROW_BYTES == 72
    got = _native.chain_fold(_blob(rows), start, head, block)
    assert got is not None
    roots, got_last = got
    assert roots == _python_roots(rows, block)
    assert got_last == last


def _broken(kind: str) -> tuple[bytes, int, bytes]:
    rows, _ = _rows(0, 2 * BLOCK, b"\x00" * 32)
    head = b"\x00" * 32
    if kind == "gap":
        rows[300] = (rows[300][0] + 1, *rows[300][1:])
    elif kind == "repeat":
        rows[301] = rows[300]
    elif kind == "swap":
        rows[10], rows[11] = rows[11], rows[10]
    elif kind == "unlinked":
        rows[400] = (rows[400][0], b"\x09" * 32, rows[400][2])
    elif kind == "head":
        head = b"\x01" * 32
    elif kind == "start":
        return _blob(rows), 1, head
    return _blob(rows), 0, head


@pytest.mark.parametrize("kind", ["gap", "repeat", "swap", "unlinked", "head", "start"])
def test_rows_that_are_not_the_next_run_fold_to_none(kind: str) -> None:
    _native = native_build.require_native()
    blob, start, head = _broken(kind)
    assert _native.chain_fold(blob, start, head, BLOCK) is None
    # the same call on the unbroken rows folds: the test above is not vacuous
    rows, _ = _rows(0, 2 * BLOCK, b"\x00" * 32)
    assert _native.chain_fold(_blob(rows), 0, b"\x00" * 32, BLOCK) is not None


@pytest.mark.parametrize("blob, head, block", [
    (b"\x00" * 71, b"\x00" * 32, 1),          # not whole rows
    (b"\x00" * 72 * 3, b"\x00" * 32, 2),      # not whole blocks
    (b"\x00" * 72 * 3, b"\x00" * 32, 3),      # a block that is not a power of two
    (b"\x00" * 72 * 2, b"\x00" * 32, 0),
    (b"\x00" * 72 * 2, b"\x00" * 31, 2),      # a head that is not a hash
])
def test_bad_shapes_raise(blob: bytes, head: bytes, block: int) -> None:
    _native = native_build.require_native()
    with pytest.raises(ValueError):
        _native.chain_fold(blob, 0, head, block)
