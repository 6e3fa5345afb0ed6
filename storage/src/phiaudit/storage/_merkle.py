"""Merkle trees as RFC 6962 / RFC 9162 (Certificate Transparency) define them.

A checkpoint commits to a writer's chain with the Merkle tree hash of its rows::

    MTH({})       = SHA-256()
    MTH({d0})     = SHA-256(0x00 || d0)                      (leaf hash)
    MTH(D[n])     = SHA-256(0x01 || MTH(D[0:k]) || MTH(D[k:n]))
                    where k is the largest power of two smaller than n

The leaf data ``d(i)`` of a phiaudit tree is the 32-byte chain ``hash`` of the row with sequence
number ``i + 1`` (which covers the row's content, its writer, its sequence number and, through
``prev_hash``, every earlier row).

Functions here take *leaf hashes* (``leaf_hash(d)``), so that a caller may compute them
elsewhere (ClickHouse: ``SHA256(concat(unhex('00'), hash))``). Inclusion and consistency
proofs are generated as RFC 6962 section 2.1.1/2.1.2 define them and verified with the
algorithms of RFC 9162 sections 2.1.3.2 and 2.1.4.2, which is what a third party implements.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

__all__ = [
    "EMPTY_ROOT",
    "CompactRange",
    "consistency_proof",
    "inclusion_proof",
    "leaf_hash",
    "node_hash",
    "root_hash",
    "verify_consistency",
    "verify_inclusion",
]

_sha = hashlib.sha256

#: MTH of the empty tree.
EMPTY_ROOT = _sha(b"").digest()


def leaf_hash(data: bytes) -> bytes:
    """SHA-256(0x00 || data)."""
    return _sha(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """SHA-256(0x01 || left || right)."""
    return _sha(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two strictly smaller than ``n`` (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def root_hash(leaves: Sequence[bytes]) -> bytes:
    """MTH over ``leaves`` (leaf hashes). Level by level, an odd last node moving up
    unchanged: the same tree as the RFC's recursive split."""
    if not leaves:
        return EMPTY_ROOT
    level = list(leaves)
    sha = _sha
    while len(level) > 1:
        nxt = [sha(b"\x01" + level[i] + level[i + 1]).digest()
               for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def inclusion_proof(index: int, leaves: Sequence[bytes]) -> list[bytes]:
    """PATH(index, D[n]) of RFC 6962 2.1.1: the audit path of leaf ``index``."""
    n = len(leaves)
    if not 0 <= index < n:
        raise ValueError("leaf index outside the tree")
    path: list[bytes] = []
    lo, hi, m = 0, n, index
    stack: list[bytes] = []
    while hi - lo > 1:
        k = _split(hi - lo)
        if m < k:
            stack.append(root_hash(leaves[lo + k:hi]))
            hi = lo + k
        else:
            stack.append(root_hash(leaves[lo:lo + k]))
            lo, m = lo + k, m - k
    path.extend(reversed(stack))
    return path


def consistency_proof(old_size: int, leaves: Sequence[bytes]) -> list[bytes]:
    """PROOF(m, D[n]) of RFC 6962 2.1.2, for 0 < m <= n (empty when m == n)."""
    n = len(leaves)
    if not 0 < old_size <= n:
        raise ValueError("old tree size must be in 1..new tree size")
    stack: list[bytes] = []
    lo, hi, m, complete = 0, n, old_size, True
    while True:
        if m == hi - lo:
            if not complete:
                stack.append(root_hash(leaves[lo:hi]))
            break
        k = _split(hi - lo)
        if m <= k:
            stack.append(root_hash(leaves[lo + k:hi]))
            hi = lo + k
        else:
            stack.append(root_hash(leaves[lo:lo + k]))
            lo, m, complete = lo + k, m - k, False
    return list(reversed(stack))


def verify_inclusion(
    leaf: bytes, index: int, tree_size: int, path: Sequence[bytes], root: bytes,
) -> bool:
    """RFC 9162 2.1.3.2: does ``path`` prove leaf hash ``leaf`` at ``index`` under ``root``?"""
    if not 0 <= index < tree_size:
        return False
    fn, sn, r = index, tree_size - 1, leaf
    for p in path:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, path: Sequence[bytes],
) -> bool:
    """RFC 9162 2.1.4.2: does ``path`` prove the tree of ``old_size`` is a prefix of the
    tree of ``new_size``?"""
    if old_size < 0 or old_size > new_size:
        return False
    if old_size == new_size:
        return not path and old_root == new_root
    if old_size == 0:
        return not path and old_root == EMPTY_ROOT
    proof = list(path)
    if old_size & (old_size - 1) == 0:  # an exact power of two
        proof.insert(0, old_root)
    if not proof:
        return False
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = proof[0]
    for c in proof[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return sn == 0 and fr == old_root and sr == new_root


class CompactRange:
    """A growing tree kept as its perfect subtrees (at most log2(n) hashes): append leaf
    hashes, read the root at any size. What the checkpointer and ``verify`` stream rows into."""

    __slots__ = ("_nodes", "size")

    def __init__(self) -> None:
        self._nodes: list[tuple[int, bytes]] = []  # (height, hash), heights decreasing
        self.size = 0

    def append(self, leaf: bytes) -> None:
        self.append_subtree(0, leaf)

    def append_subtree(self, height: int, node: bytes) -> None:
        """Append the root of a perfect subtree of 2**height leaves; the current size must
        be a multiple of 2**height."""
        if self.size % (1 << height):
            raise ValueError("a subtree of this height cannot start at this size")
        nodes = self._nodes
        h = height
        while nodes and nodes[-1][0] == h:
            node = _sha(b"\x01" + nodes.pop()[1] + node).digest()
            h += 1
        nodes.append((h, node))
        self.size += 1 << height

    def copy(self) -> CompactRange:
        other = CompactRange()
        other._nodes = list(self._nodes)
        other.size = self.size
        return other

    def extend(self, leaves: Sequence[bytes]) -> None:
        for leaf in leaves:
            self.append(leaf)

    def root(self) -> bytes:
        if not self._nodes:
            return EMPTY_ROOT
        it = reversed(self._nodes)
        r = next(it)[1]
        for _, node in it:
            r = node_hash(node, r)
        return r
