"""RFC 6962 / RFC 9162 Merkle trees: the certificate-transparency reference vectors, and
property tests of inclusion and consistency proofs against an independent brute force."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phiaudit.storage import (
    CompactRange,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    root_hash,
    verify_consistency,
    verify_inclusion,
)

# certificate-transparency merkle_tree_test.cc
LEAVES = [bytes.fromhex(x) for x in (
    "", "00", "10", "2021", "3031", "40414243", "5051525354555657",
    "606162636465666768696a6b6c6d6e6f")]
ROOTS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
INCLUSION = [  # (leaf index, tree size, path)
    (0, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (0, 1, []),
]
CONSISTENCY = [  # (old size, new size, proof)
    (1, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (6, 8, ["0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
    (2, 5, ["5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
]
HASHES = [leaf_hash(x) for x in LEAVES]


# -- an independent implementation: the RFC's recursive definitions, written out ------------
def _h(b: bytes) -> bytes:
    return hashlib.sha256(b).digest()


def mth(d: list[bytes]) -> bytes:
    n = len(d)
    if n == 0:
        return _h(b"")
    if n == 1:
        return _h(b"\x00" + d[0])
    k = 1
    while k * 2 < n:
        k *= 2
    return _h(b"\x01" + mth(d[:k]) + mth(d[k:]))


def path(m: int, d: list[bytes]) -> list[bytes]:
    n = len(d)
    if n == 1:
        return []
    k = 1
    while k * 2 < n:
        k *= 2
    if m < k:
        return [*path(m, d[:k]), mth(d[k:])]
    return [*path(m - k, d[k:]), mth(d[:k])]


def subproof(m: int, d: list[bytes], b: bool) -> list[bytes]:
    n = len(d)
    if m == n:
        return [] if b else [mth(d)]
    k = 1
    while k * 2 < n:
        k *= 2
    if m <= k:
        return [*subproof(m, d[:k], b), mth(d[k:])]
    return [*subproof(m - k, d[k:], False), mth(d[:k])]


def test_empty_tree_root() -> None:
    assert root_hash([]).hex() == (
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")


@pytest.mark.parametrize("size", range(1, 9))
def test_roots_match_reference_vectors(size: int) -> None:
    assert root_hash(HASHES[:size]).hex() == ROOTS[size - 1]
    assert mth(LEAVES[:size]).hex() == ROOTS[size - 1]  # the brute force agrees too
    tree = CompactRange()
    tree.extend(HASHES[:size])
    assert tree.root().hex() == ROOTS[size - 1] and tree.size == size


@pytest.mark.parametrize(("index", "size", "expected"), INCLUSION)
def test_inclusion_matches_reference_vectors(index: int, size: int, expected: list[str]) -> None:
    proof = inclusion_proof(index, HASHES[:size])
    assert [p.hex() for p in proof] == expected
    assert verify_inclusion(HASHES[index], index, size, proof, bytes.fromhex(ROOTS[size - 1]))


@pytest.mark.parametrize(("old", "new", "expected"), CONSISTENCY)
def test_consistency_matches_reference_vectors(old: int, new: int, expected: list[str]) -> None:
    proof = consistency_proof(old, HASHES[:new])
    assert [p.hex() for p in proof] == expected
    assert verify_consistency(old, new, bytes.fromhex(ROOTS[old - 1]),
                              bytes.fromhex(ROOTS[new - 1]), proof)
    assert not verify_consistency(old, new, bytes.fromhex(ROOTS[new - 1]),
                                  bytes.fromhex(ROOTS[new - 1]), proof)


def test_every_proof_in_the_eight_leaf_tree_verifies_and_breaks() -> None:
    for n in range(1, 9):
        root = bytes.fromhex(ROOTS[n - 1])
        for i in range(n):
            p = inclusion_proof(i, HASHES[:n])
            assert p == path(i, LEAVES[:n])
            assert verify_inclusion(HASHES[i], i, n, p, root)
            wrong_leaf = HASHES[(i + 1) % 8]
            assert not verify_inclusion(wrong_leaf, i, n, p, root) or wrong_leaf == HASHES[i]
            if n > 1:
                assert not verify_inclusion(HASHES[i], (i + 1) % n, n, p, root)
        for m in range(1, n + 1):
            c = consistency_proof(m, HASHES[:n])
            assert c == (subproof(m, LEAVES[:n], True) if m < n else [])
            assert verify_consistency(m, n, bytes.fromhex(ROOTS[m - 1]), root, c)


leaves_st = st.lists(st.binary(max_size=8), min_size=1, max_size=70)


@settings(max_examples=300, deadline=None)
@given(leaves_st, st.data())
def test_inclusion_property(leaves: list[bytes], data: st.DataObject) -> None:
    hashes = [leaf_hash(x) for x in leaves]
    n = len(leaves)
    i = data.draw(st.integers(0, n - 1))
    root = mth(leaves)
    assert root_hash(hashes) == root
    proof = inclusion_proof(i, hashes)
    assert proof == path(i, leaves)
    assert verify_inclusion(hashes[i], i, n, proof, root)
    # any change to the leaf, the index, the size, the root or a path element fails
    assert not verify_inclusion(leaf_hash(leaves[i] + b"x"), i, n, proof, root)
    assert not verify_inclusion(hashes[i], i, n, proof, _h(root))
    if proof:
        j = data.draw(st.integers(0, len(proof) - 1))
        bad = list(proof)
        bad[j] = _h(bad[j])
        assert not verify_inclusion(hashes[i], i, n, bad, root)
        assert not verify_inclusion(hashes[i], i, n, proof[:-1], root)
        assert not verify_inclusion(hashes[i], i, n, [*proof, proof[0]], root)


@settings(max_examples=300, deadline=None)
@given(leaves_st, st.data())
def test_consistency_property(leaves: list[bytes], data: st.DataObject) -> None:
    hashes = [leaf_hash(x) for x in leaves]
    n = len(leaves)
    m = data.draw(st.integers(1, n))
    old, new = mth(leaves[:m]), mth(leaves)
    proof = consistency_proof(m, hashes)
    assert proof == (subproof(m, leaves, True) if m < n else [])
    assert verify_consistency(m, n, old, new, proof)
    # the compact range agrees at both sizes
    tree = CompactRange()
    tree.extend(hashes[:m])
    assert tree.root() == old
    tree.extend(hashes[m:])
    assert tree.root() == new
    if m < n:
        # a forked history (one old leaf changed) is not consistent
        k = data.draw(st.integers(0, m - 1))
        forked = list(leaves)
        forked[k] += b"!"
        assert not verify_consistency(m, n, mth(forked[:m]), new, proof)
        assert not verify_consistency(m, n, old, mth(forked), proof)
        assert not verify_consistency(m, n, old, new, proof[:-1])
        j = data.draw(st.integers(0, len(proof) - 1))
        bad = list(proof)
        bad[j] = _h(bad[j])
        assert not verify_consistency(m, n, old, new, bad)
