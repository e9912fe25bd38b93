"""ledger.merkle against published RFC 6962 vectors, the RFC's own recursive definitions, and
properties over random trees (tampered proofs never verify; verifiers never raise)."""

from __future__ import annotations

import hashlib
import itertools
import random
from collections.abc import Callable, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger import merkle
from ledger.merkle import (
    EMPTY_ROOT,
    CompactRange,
    Node,
    consistency_proof,
    consistency_proof_nodes,
    inclusion_proof,
    inclusion_proof_nodes,
    leaf_hash,
    node_hash,
    proof_from_nodes,
    range_nodes,
    root,
    verify_consistency,
    verify_inclusion,
)

# Known answers from github.com/transparency-dev/merkle, proof/verify_test.go (the RFC 6962 test
# data shared with certificate-transparency-go and Trillian). Their leaf numbers are 1-based.
RFC_LEAVES = [
    bytes.fromhex(h)
    for h in (
        *("", "00", "10", "2021", "3031", "40414243", "5051525354555657"),
        "606162636465666768696a6b6c6d6e6f",
    )
]
RFC_ROOTS = [  # RFC_ROOTS[n - 1] is the root of the first n leaves
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
_A = "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7"
_B = "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"
_C = "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"
_D = "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"
_E = "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0"
_F = "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a"
_G = "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f"
RFC_INCLUSION = [  # (0-based index, size, proof)
    (0, 8, [_A, _B, _C]),
    (5, 8, [_D, _E, RFC_ROOTS[3]]),
    (2, 3, [RFC_ROOTS[1]]),
    (1, 5, [RFC_ROOTS[0], _B, _D]),
]
RFC_CONSISTENCY = [  # (old size, new size, proof)
    (1, 8, [_A, _B, _C]),
    (6, 8, [_F, _E, RFC_ROOTS[3]]),
    (2, 5, [_B, _D]),
    (6, 7, [_F, _G, RFC_ROOTS[3]]),
]
RFC_HASHES = [leaf_hash(d) for d in RFC_LEAVES]
SOME_HASH = bytes.fromhex("abacaba000000000000000000000000000000000000000000060061e00123456")


def hashes(hex_list: Sequence[str]) -> list[bytes]:
    return [bytes.fromhex(h) for h in hex_list]


def leaves(n: int, seed: int = 0) -> list[bytes]:
    return [leaf_hash(b"%d/%d" % (seed, i)) for i in range(n)]


def subtree(leaf_list: Sequence[bytes], level: int, index: int) -> bytes:
    return root(leaf_list[index << level : (index + 1) << level])


# The RFC 9162 §2.1 definitions, transcribed literally (slicing recursion): the reference the
# linear-time implementations must agree with.
def ref_mth(d: Sequence[bytes]) -> bytes:
    if not d:
        return hashlib.sha256(b"").digest()
    if len(d) == 1:
        return d[0]
    k = 1 << ((len(d) - 1).bit_length() - 1)
    return node_hash(ref_mth(d[:k]), ref_mth(d[k:]))


def ref_path(m: int, d: Sequence[bytes]) -> list[bytes]:
    if len(d) == 1:
        return []
    k = 1 << ((len(d) - 1).bit_length() - 1)
    if m < k:
        return [*ref_path(m, d[:k]), ref_mth(d[k:])]
    return [*ref_path(m - k, d[k:]), ref_mth(d[:k])]


def ref_subproof(m: int, d: Sequence[bytes], b: bool) -> list[bytes]:
    if m == len(d):
        return [] if b else [ref_mth(d)]
    k = 1 << ((len(d) - 1).bit_length() - 1)
    if m <= k:
        return [*ref_subproof(m, d[:k], b), ref_mth(d[k:])]
    return [*ref_subproof(m - k, d[k:], False), ref_mth(d[:k])]


def test_hash_prefixes_and_empty_root() -> None:
    assert EMPTY_ROOT.hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert root([]) == EMPTY_ROOT
    assert leaf_hash(b"x") == hashlib.sha256(b"\x00x").digest()
    assert node_hash(b"l", b"r") == hashlib.sha256(b"\x01lr").digest()


def test_rfc6962_roots_for_every_size() -> None:
    for n in range(1, 9):
        assert root(RFC_HASHES[:n]).hex() == RFC_ROOTS[n - 1]
        compact = CompactRange()
        for h in RFC_HASHES[:n]:
            compact.append(h)
        assert compact.root().hex() == RFC_ROOTS[n - 1]


@pytest.mark.parametrize(("index", "size", "proof"), RFC_INCLUSION)
def test_rfc6962_inclusion_proofs(index: int, size: int, proof: list[str]) -> None:
    tree = RFC_HASHES[:size]
    head = bytes.fromhex(RFC_ROOTS[size - 1])
    assert inclusion_proof(tree, index) == hashes(proof)
    assert proof_from_nodes(inclusion_proof_nodes(index, size), _getter(tree)) == hashes(proof)
    assert verify_inclusion(tree[index], index, size, hashes(proof), head)
    # The probes of the reference test: none of these may verify.
    good = hashes(proof)
    bad_calls = [
        (tree[index], index - 1, size, good, head),
        (tree[index], index + 1, size, good, head),
        (tree[index], index ^ 2, size, good, head),
        (tree[index], index, size * 2, good, head),
        (tree[index], index, size // 2, good, head),
        (b"WrongLeaf", index, size, good, head),
        (tree[index], index, size, good, EMPTY_ROOT),
        (tree[index], index, size, good, SOME_HASH),
        (tree[index], index, size, [*good, b""], head),
        (tree[index], index, size, [*good, head], head),
        (tree[index], index, size, [b"", *good], head),
        (tree[index], index, size, [head, *good], head),
        (tree[index], index, size, good[:-1], head),
        (tree[index], index, size, [good[0], SOME_HASH, *good[1:]], head),
    ]
    for i in range(len(good)):
        flipped = list(good)
        flipped[i] = bytes([flipped[i][0] ^ 8]) + flipped[i][1:]
        bad_calls.append((tree[index], index, size, flipped, head))
    for call in bad_calls:
        assert not verify_inclusion(*call), call


@pytest.mark.parametrize(("old", "new", "proof"), RFC_CONSISTENCY)
def test_rfc6962_consistency_proofs(old: int, new: int, proof: list[str]) -> None:
    tree = RFC_HASHES[:new]
    r1, r2 = bytes.fromhex(RFC_ROOTS[old - 1]), bytes.fromhex(RFC_ROOTS[new - 1])
    good = hashes(proof)
    assert consistency_proof(tree, old) == good
    assert proof_from_nodes(consistency_proof_nodes(old, new), _getter(tree)) == good
    assert verify_consistency(old, new, good, r1, r2)
    bad_calls = [
        (old - 1, new, good, r1, r2),
        (old + 1, new, good, r1, r2),
        (old ^ 2, new, good, r1, r2),
        (old, new * 2, good, r1, r2),
        (old, new // 2, good, r1, r2),
        (old, new, good, b"WrongRoot", r2),
        (old, new, good, r1, b"WrongRoot"),
        (old, new, good, r2, r1),
        (old, new, [], r1, r2),
        (old, new, [*good, b""], r1, r2),
        (old, new, [*good, r1], r1, r2),
        (old, new, [*good, r2], r1, r2),
        (old, new, [b"", *good], r1, r2),
        (old, new, [r1, *good], r1, r2),
        (old, new, [r2, *good], r1, r2),
        (old, new, [good[0], *good], r1, r2),
        (old, new, good[:-1], r1, r2),
    ]
    for i in range(len(good)):
        flipped = list(good)
        flipped[i] = bytes([flipped[i][0] ^ 16]) + flipped[i][1:]
        bad_calls.append((old, new, flipped, r1, r2))
    for call in bad_calls:
        assert not verify_consistency(*call), call


def test_trivial_consistency_edges() -> None:
    r = bytes.fromhex(RFC_ROOTS[0])
    assert verify_consistency(0, 0, [], EMPTY_ROOT, EMPTY_ROOT)
    assert verify_consistency(0, 1, [], EMPTY_ROOT, r)
    assert verify_consistency(1, 1, [], r, r)
    assert not verify_consistency(1, 1, [], r, SOME_HASH)  # same size, different roots
    assert not verify_consistency(0, 1, [], SOME_HASH, r)  # a size-0 root is always EMPTY_ROOT
    assert not verify_consistency(0, 0, [], EMPTY_ROOT, SOME_HASH)
    assert not verify_consistency(1, 1, [EMPTY_ROOT], r, r)  # a proof where none is due
    assert not verify_consistency(0, 1, [EMPTY_ROOT], EMPTY_ROOT, r)
    assert not verify_consistency(2, 1, [], r, r)  # time travel
    assert not verify_inclusion(r, 0, 0, [], r)
    assert not verify_inclusion(r, 1, 1, [], r)
    assert verify_inclusion(r, 0, 1, [], r)


def test_linear_versions_match_rfc_definitions() -> None:
    for n in range(0, 41):
        tree = leaves(n, seed=n)
        assert root(tree) == ref_mth(tree)
        for m in range(n):
            assert inclusion_proof(tree, m) == ref_path(m, tree)
        for m in range(1, n):
            assert consistency_proof(tree, m) == ref_subproof(m, tree, True)
        assert consistency_proof(tree, 0) == [] and consistency_proof(tree, n) == []


def test_producers_reject_out_of_range_arguments() -> None:
    tree = leaves(5)
    for bad in (-1, 5, 6):
        with pytest.raises(IndexError):
            inclusion_proof(tree, bad)
        with pytest.raises(IndexError):
            inclusion_proof_nodes(bad, 5)
    for bad in (-1, 6):
        with pytest.raises(ValueError):
            consistency_proof(tree, bad)
        with pytest.raises(ValueError):
            consistency_proof_nodes(bad, 5)


def _getter(tree: Sequence[bytes]) -> Callable[[int, int], bytes]:
    return lambda level, index: subtree(tree, level, index)


def _check_nodes(tree: Sequence[bytes], size: int, index_or_old: int, *, inclusion: bool) -> None:
    if inclusion:
        refs = inclusion_proof_nodes(index_or_old, size)
        want = inclusion_proof(tree[:size], index_or_old)
    else:
        refs = consistency_proof_nodes(index_or_old, size)
        want = consistency_proof(tree[:size], index_or_old)
    for ref in refs:  # only complete subtrees inside the tree; ragged parts really are ragged
        group = (ref,) if isinstance(ref, Node) else ref
        assert isinstance(ref, Node) or len(ref) >= 2
        assert all(node.end <= size for node in group)
        assert [n.level for n in group] == sorted({n.level for n in group}, reverse=True)
        assert all(a.end == b.begin for a, b in itertools.pairwise(group))
    assert proof_from_nodes(refs, _getter(tree)) == want


def test_node_refs_assemble_the_same_proofs() -> None:
    tree = leaves(70)
    for size in range(1, 71):
        for i in range(size):
            _check_nodes(tree, size, i, inclusion=True)
        for old in range(0, size + 1):
            _check_nodes(tree, size, old, inclusion=False)
    rng = random.Random(6962)
    big = leaves(5000, seed=1)
    for _ in range(20):
        size = rng.randrange(71, 5001)
        _check_nodes(big, size, rng.randrange(size), inclusion=True)
        _check_nodes(big, size, rng.randrange(size + 1), inclusion=False)


def test_node_store_filled_by_append_nodes_answers_every_proof() -> None:
    # What a database does: store each completed node once; answer proofs for older sizes.
    tree = leaves(300, seed=2)
    store: dict[tuple[int, int], bytes] = {}
    compact = CompactRange()
    for h in tree:
        for node, value in compact.append_nodes(h):
            assert (node.level, node.index) not in store
            assert value == subtree(tree, node.level, node.index)
            store[node.level, node.index] = value
    assert len(store) == 2 * 300 - (300).bit_count()
    rng = random.Random(9162)
    for _ in range(200):
        size = rng.randrange(1, 301)
        index, old = rng.randrange(size), rng.randrange(size + 1)
        proof = proof_from_nodes(inclusion_proof_nodes(index, size), lambda lv, i: store[lv, i])
        assert verify_inclusion(tree[index], index, size, proof, root(tree[:size]))
        proof = proof_from_nodes(consistency_proof_nodes(old, size), lambda lv, i: store[lv, i])
        assert verify_consistency(old, size, proof, root(tree[:old]), root(tree[:size]))
        frontier = [store[n.level, n.index] for n in range_nodes(0, size)]
        assert CompactRange.from_hashes(size, frontier).root() == root(tree[:size])


def test_range_nodes_cover_exactly() -> None:
    for begin in range(0, 40):
        for end in range(begin, 80):
            nodes = range_nodes(begin, end)
            covered = [leaf for n in nodes for leaf in range(n.begin, n.end)]
            assert covered == list(range(begin, end))
            assert len(nodes) <= 2 * max(1, (end - begin).bit_length())
    with pytest.raises(ValueError):
        range_nodes(3, 2)


def test_compact_range_tracks_root_and_survives_restart() -> None:
    tree = leaves(300, seed=3)
    compact = CompactRange()
    assert compact.root() == EMPTY_ROOT and compact.size == 0
    for n, h in enumerate(tree, start=1):
        compact.append(h)
        assert compact.size == n
        assert compact.root() == root(tree[:n])
        assert len(compact.hashes) == n.bit_count()
        if n % 37 == 0:  # a sequencer restart: persist, reload, carry on with the copy
            saved = compact.to_bytes()
            assert len(saved) == 9 + 32 * n.bit_count()
            compact = CompactRange.from_bytes(saved)
            assert compact.to_bytes() == saved
    assert compact == CompactRange.from_bytes(compact.to_bytes())
    assert compact != CompactRange()


@pytest.mark.parametrize(
    "junk",
    [
        b"",
        b"\x01",
        b"\x02" + bytes(8),  # unknown version
        b"\x01" + (3).to_bytes(8, "big") + bytes(32),  # size 3 needs two hashes
        b"\x01" + (1).to_bytes(8, "big") + bytes(31),  # truncated hash
        b"\x01" + bytes(8) + bytes(32),  # size 0 has no hashes
    ],
)
def test_compact_range_rejects_bad_serializations(junk: bytes) -> None:
    with pytest.raises(ValueError):
        CompactRange.from_bytes(junk)


def test_compact_range_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        CompactRange().append(b"short")
    with pytest.raises(ValueError):
        CompactRange.from_hashes(-1, [])
    with pytest.raises(ValueError):
        CompactRange.from_hashes(3, [bytes(32)])
    full = CompactRange.from_hashes(merkle.MAX_TREE_SIZE, [bytes(32)] * 64)
    with pytest.raises(OverflowError):
        full.append(bytes(32))


@st.composite
def tree_and_position(draw: st.DrawFn) -> tuple[list[bytes], int, int, int]:
    """A random tree with 16 spare leaves past `size` (for authentic other-size roots)."""
    size = draw(st.integers(1, 300))
    tree = leaves(size + 16, seed=draw(st.integers(0, 2**32)))
    return tree, size, draw(st.integers(0, size - 1)), draw(st.integers(0, size))


def _mutations(proof: list[bytes], extra: bytes) -> list[list[bytes]]:
    out = [proof[:-1], [*proof, extra], [extra, *proof], [*proof, bytes(32)], proof[1:]]
    for i in range(len(proof)):
        out.append([*proof[:i], bytes([proof[i][0] ^ 1]) + proof[i][1:], *proof[i + 1 :]])
        out.append([*proof[:i], proof[i][:31], *proof[i + 1 :]])
    if len(proof) > 1:
        out.append([proof[1], proof[0], *proof[2:]])
    return [m for m in out if m != proof]


@settings(max_examples=150, deadline=None)
@given(tree_and_position(), st.integers(1, 16))
def test_inclusion_proofs_verify_and_tampering_fails(
    case: tuple[list[bytes], int, int, int], delta: int
) -> None:
    tree, size, index, _ = case
    head = root(tree[:size])
    proof = inclusion_proof(tree[:size], index)
    assert verify_inclusion(tree[index], index, size, proof, head)
    for bad in _mutations(proof, head):
        assert not verify_inclusion(tree[index], index, size, bad, head)
    for other in {index - delta, index + delta, index ^ delta} - {index}:
        assert not verify_inclusion(tree[index], other, size, proof, head)
    for other in {size - delta, size + delta} - {size}:
        # Paired with the true root of that size: RFC 6962 binds the size only through the
        # (authenticated) root, so a foreign size with the original root is not a forgery.
        other_root = root(tree[: max(other, 0)])
        assert not verify_inclusion(tree[index], index, other, proof, other_root)
    assert not verify_inclusion(tree[index], index, size, proof, SOME_HASH)
    assert not verify_inclusion(tree[(index + 1) % len(tree)], index, size, proof, head)


@settings(max_examples=150, deadline=None)
@given(tree_and_position(), st.integers(1, 16))
def test_consistency_proofs_verify_and_tampering_fails(
    case: tuple[list[bytes], int, int, int], delta: int
) -> None:
    tree, size, _, old = case
    r_old, r_new = root(tree[:old]), root(tree[:size])
    proof = consistency_proof(tree[:size], old)
    assert verify_consistency(old, size, proof, r_old, r_new)
    for bad in _mutations(proof, r_new) if proof else [[r_old], [r_new]]:
        assert not verify_consistency(old, size, bad, r_old, r_new)
    if not proof:
        return  # old is 0 or size: the empty proof is valid for every pair of sizes it fits
    for other in {old - delta, old + delta} - {old}:
        assert not verify_consistency(other, size, proof, root(tree[: max(other, 0)]), r_new)
    for other in {size - delta, size + delta} - {size}:
        assert not verify_consistency(old, other, proof, r_old, root(tree[: max(other, 0)]))
    if r_old != r_new:
        assert not verify_consistency(old, size, proof, r_new, r_old)
    assert not verify_consistency(old, size, proof, r_old, SOME_HASH)


JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.integers(-2, 70),
    st.floats(),
    st.text(max_size=40),
    st.binary(max_size=40),
    st.binary(min_size=32, max_size=32),
    st.lists(st.one_of(st.binary(max_size=40), st.binary(min_size=32, max_size=32)), max_size=5),
    st.lists(st.one_of(st.none(), st.integers(), st.text(max_size=3)), max_size=3),
    st.tuples(st.binary(min_size=32, max_size=32)),
    st.dictionaries(st.integers(), st.binary(), max_size=2),
    st.from_type(type),
)


@settings(max_examples=400, deadline=None)
@given(JUNK, JUNK, JUNK, JUNK, JUNK)
def test_verifiers_never_raise(a: object, b: object, c: object, d: object, e: object) -> None:
    assert verify_inclusion(a, b, c, d, e) in (True, False)  # type: ignore[arg-type]
    assert verify_consistency(a, b, c, d, e) in (True, False)  # type: ignore[arg-type]
    assert verify_inclusion(RFC_HASHES[0], a, b, c, d) in (True, False)  # type: ignore[arg-type]
    assert verify_consistency(3, 8, a, b, c) in (True, False)  # type: ignore[arg-type]


def test_verifiers_reject_wrong_types_that_would_otherwise_verify() -> None:
    tree = RFC_HASHES[:8]
    head = root(tree)
    proof = inclusion_proof(tree, 1)
    assert verify_inclusion(tree[1], 1, 8, proof, head)
    assert verify_inclusion(tree[1], 1, 8, tuple(proof), head)
    assert not verify_inclusion(tree[1], True, 8, proof, head)  # bool is not an index
    assert not verify_inclusion(tree[1], 1, 8.0, proof, head)  # type: ignore[arg-type]
    assert not verify_inclusion(tree[1], 1, 8, [bytearray(p) for p in proof], head)  # type: ignore[misc]
    assert not verify_inclusion(tree[1], 1, 8, b"".join(proof), head)  # type: ignore[arg-type]
    assert not verify_inclusion(tree[1], 1, 8, iter(proof), head)  # type: ignore[arg-type]
    assert not verify_inclusion(tree[1], 1, 2**64 + 8, proof, head)
    assert not verify_consistency(1, 8, [bytes(32)] * 1000, tree[0], head)
