"""RFC 6962 / RFC 9162 Merkle tree hashing, proofs and verification (SHA-256).

Standalone: only the standard library, no I/O; third parties (miners, auditors, witnesses) can
copy this file and check meshmint's ledger without the rest of meshmint.

Definitions (RFC 9162 §2.1.1, identical to RFC 6962 §2.1 and c2sp.org/tlog-checkpoint):

- ``leaf_hash(d) = SHA-256(0x00 ‖ d)`` and ``node_hash(l, r) = SHA-256(0x01 ‖ l ‖ r)``; the
  prefixes keep a leaf from ever being passed off as an interior node.
- The tree hash of n leaves is ``MTH({}) = SHA-256("")`` (``EMPTY_ROOT``),
  ``MTH({d0}) = leaf_hash(d0)``, and for n > 1, with k the largest power of two < n,
  ``MTH(D[0:n]) = node_hash(MTH(D[0:k]), MTH(D[k:n]))``: the tree is left-balanced and grows
  only at its right edge, so every perfect subtree, once complete, never changes.
- Inclusion proofs are RFC 9162 §2.1.3 (PATH, verified per §2.1.3.2); consistency proofs are
  §2.1.4 (SUBPROOF, verified per §2.1.4.2). Proof elements are ordered from the leaf upward.

A *node* ``Node(level, index)`` is the perfect subtree over leaves
``[index·2^level, (index+1)·2^level)``; level 0 holds the leaf hashes. A store that keeps the hash
of every complete node (``CompactRange.append_nodes`` hands each one over as it is formed) answers
any proof for any earlier tree size with O(log n) lookups: ``inclusion_proof_nodes`` /
``consistency_proof_nodes`` name what to fetch and ``proof_from_nodes`` assembles the proof.

Example::

    leaves = [leaf_hash(b"entry %d" % i) for i in range(6)]
    head = root(leaves)
    proof = inclusion_proof(leaves, 4)
    assert verify_inclusion(leaves[4], 4, 6, proof, head)
    old = root(leaves[:3])
    assert verify_consistency(3, 6, consistency_proof(leaves, 3), old, head)

    frontier = CompactRange()          # what a sequencer keeps instead of all leaves
    for h in leaves:
        frontier.append(h)
    assert frontier.root() == head
    saved = frontier.to_bytes()        # O(log n) bytes; CompactRange.from_bytes(saved) resumes
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeAlias

HASH_SIZE = 32  # SHA-256 digest length
MAX_TREE_SIZE = 2**64 - 1  # RFC 9162 tree sizes are uint64
EMPTY_ROOT = hashlib.sha256(b"").digest()  # MTH of the empty tree (RFC 9162 §2.1.1)

_LEAF_PREFIX = b"\x00"
_NODE_PREFIX = b"\x01"
_COMPACT_VERSION = b"\x01"  # first byte of CompactRange.to_bytes(), bumped if the layout changes
# A valid proof in a tree of at most 2^64 leaves has at most 64 (inclusion) or 65 (consistency)
# elements; anything longer is rejected before hashing so junk input costs nothing.
_MAX_PROOF_LEN = 66


def leaf_hash(data: bytes) -> bytes:
    """SHA-256(0x00 ‖ data): the hash of one log entry."""
    return hashlib.sha256(_LEAF_PREFIX + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """SHA-256(0x01 ‖ left ‖ right): the hash of an interior node."""
    return hashlib.sha256(_NODE_PREFIX + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two strictly below n (n >= 2): where MTH splits D[0:n]."""
    return 1 << ((n - 1).bit_length() - 1)


def _range_root(leaves: Sequence[bytes], lo: int, hi: int) -> bytes:
    """MTH(leaves[lo:hi]) with hi - lo - 1 hashes and O(log n) memory, no slicing."""
    if lo >= hi:
        return EMPTY_ROOT
    stack: list[bytes] = []
    for count in range(1, hi - lo + 1):
        h = leaves[lo + count - 1]
        # Each trailing zero of the new count is one pair of equal-sized subtrees to merge.
        c = count
        while not c & 1:
            h = node_hash(stack.pop(), h)
            c >>= 1
        stack.append(h)
    h = stack.pop()
    while stack:
        h = node_hash(stack.pop(), h)
    return h


def root(leaf_hashes: Sequence[bytes]) -> bytes:
    """MTH of the given leaf hashes; ``EMPTY_ROOT`` for none. n - 1 hashes."""
    return _range_root(leaf_hashes, 0, len(leaf_hashes))


def inclusion_proof(leaf_hashes: Sequence[bytes], index: int) -> list[bytes]:
    """PATH(index, D[0:n]) of RFC 9162 §2.1.3.1; raises IndexError unless 0 <= index < n.

    Each sibling subtree is hashed once and they are disjoint: at most n hashes in all.
    """
    n = len(leaf_hashes)
    if not 0 <= index < n:
        raise IndexError(f"leaf index {index} outside a tree of {n} leaves")
    top_down: list[bytes] = []
    lo, hi = 0, n
    while hi - lo > 1:
        k = _split(hi - lo)
        if index < lo + k:
            top_down.append(_range_root(leaf_hashes, lo + k, hi))
            hi = lo + k
        else:
            top_down.append(_range_root(leaf_hashes, lo, lo + k))
            lo += k
    return top_down[::-1]


def consistency_proof(leaf_hashes: Sequence[bytes], old_size: int) -> list[bytes]:
    """PROOF(old_size, D[0:n]) of RFC 9162 §2.1.4.1; [] when old_size is 0 or n.

    Raises ValueError unless 0 <= old_size <= n. At most n hashes.
    """
    n = len(leaf_hashes)
    if not 0 <= old_size <= n:
        raise ValueError(f"old size {old_size} outside 0..{n}")
    if old_size in (0, n):
        return []
    top_down: list[bytes] = []
    lo, hi, m = 0, n, old_size  # SUBPROOF(m, D[lo:hi], b), m relative to lo
    whole_old_subtree = True  # RFC's b: the old tree is a complete subtree the verifier knows
    while m != hi - lo:
        k = _split(hi - lo)
        if m <= k:
            top_down.append(_range_root(leaf_hashes, lo + k, hi))
            hi = lo + k
        else:
            top_down.append(_range_root(leaf_hashes, lo, lo + k))
            lo, m, whole_old_subtree = lo + k, m - k, False
    if not whole_old_subtree:
        top_down.append(_range_root(leaf_hashes, lo, hi))
    return top_down[::-1]


def _is_hash(value: object) -> bool:
    return isinstance(value, bytes) and len(value) == HASH_SIZE


def _is_size(value: object) -> bool:
    # type() rather than isinstance(): True/False are ints but never a tree size.
    return type(value) is int and 0 <= value <= MAX_TREE_SIZE


def _proof_hashes(proof: object) -> list[bytes] | None:
    """The proof as a list of 32-byte hashes, or None if it is anything else."""
    if isinstance(proof, (str, bytes, bytearray, memoryview)) or not isinstance(proof, Sequence):
        return None
    try:
        # A caller's own Sequence type may misbehave; the verifiers promise a bool, not a raise.
        if len(proof) > _MAX_PROOF_LEN:
            return None
        items = list(proof)
    except Exception:
        return None
    return items if all(_is_hash(item) for item in items) else None


def verify_inclusion(
    leaf_hash: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> bool:
    """RFC 9162 §2.1.3.2: is ``leaf_hash`` at ``index`` of the tree of ``size`` with ``root``?

    False, never an exception, for any malformed input. Only meaningful when (size, root) is
    authentic, e.g. from a verified checkpoint: the hash path alone does not bind the size.
    """
    hashes = _proof_hashes(proof)
    if hashes is None or not (_is_hash(leaf_hash) and _is_hash(root) and _is_size(size)):
        return False
    if type(index) is not int or not 0 <= index < size:
        return False
    fn, sn, r = index, size - 1, leaf_hash
    for p in hashes:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


def verify_consistency(
    old_size: int, new_size: int, proof: Sequence[bytes], old_root: bytes, new_root: bytes
) -> bool:
    """RFC 9162 §2.1.4.2: is the tree (old_size, old_root) a prefix of (new_size, new_root)?

    False, never an exception, for any malformed input. Stricter than the RFC at the edges:
    old_size == 0 needs old_root == EMPTY_ROOT and an empty proof; old_size == new_size needs
    equal roots and an empty proof.
    """
    hashes = _proof_hashes(proof)
    if hashes is None or not (_is_hash(old_root) and _is_hash(new_root)):
        return False
    if not (_is_size(old_size) and _is_size(new_size)) or old_size > new_size:
        return False
    if old_size == 0 or old_size == new_size:
        expected_old = EMPTY_ROOT if old_size == 0 else new_root
        empty_new_ok = new_size != 0 or new_root == EMPTY_ROOT
        return not hashes and old_root == expected_old and empty_new_ok
    if not hashes:
        return False
    if old_size & (old_size - 1) == 0:
        # The old tree is a complete left subtree of the new one; the proof omits its root.
        hashes = [old_root, *hashes]
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = hashes[0]
    for c in hashes[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return sn == 0 and fr == old_root and sr == new_root


@dataclass(frozen=True, order=True, slots=True)
class Node:
    """The perfect subtree over leaves [index·2^level, (index+1)·2^level)."""

    level: int  # 0 for a leaf hash, h for a subtree of 2^h leaves
    index: int  # position among the nodes of this level, from the left

    @property
    def begin(self) -> int:
        return self.index << self.level

    @property
    def end(self) -> int:
        return (self.index + 1) << self.level


# One proof element: a stored perfect subtree, or -- for the ragged right edge of a tree whose
# size is not a power of two -- a tuple of two or more perfect subtrees, left to right with
# strictly decreasing levels, that covers a partial subtree. Its hash is formed right to left:
# h = get(last); then for each earlier node n, h = node_hash(get(n), h) (see proof_from_nodes).
NodeRef: TypeAlias = Node | tuple[Node, ...]


def range_nodes(begin: int, end: int) -> list[Node]:
    """The fewest perfect subtrees covering leaves [begin, end), left to right.

    ``range_nodes(0, size)`` is the right frontier that a ``CompactRange`` of that size holds.
    """
    if not 0 <= begin <= end:
        raise ValueError(f"bad leaf range [{begin}, {end})")
    nodes: list[Node] = []
    while begin < end:
        # The biggest node that starts at `begin` (alignment) and still fits before `end`.
        level = (end - begin).bit_length() - 1
        if begin:
            level = min(level, (begin & -begin).bit_length() - 1)
        nodes.append(Node(level, begin >> level))
        begin += 1 << level
    return nodes


def _path_nodes(level: int, index: int, size: int) -> list[NodeRef]:
    """What proves node (level, index) is in the tree of `size`, bottom-up (RFC PATH order)."""
    # The fork is the highest ancestor that is still a complete subtree: above it, the path
    # from the node to the root meets the tree's ragged right edge.
    inner = (index ^ (size >> level)).bit_length() - 1
    fork_level = level + inner
    fork_begin = (index >> inner) << fork_level
    fork_end = fork_begin + (1 << fork_level)
    refs: list[NodeRef] = [Node(lv, (index >> (lv - level)) ^ 1) for lv in range(level, fork_level)]
    ragged = range_nodes(fork_end, size)
    if len(ragged) == 1:
        refs.append(ragged[0])
    elif ragged:
        refs.append(tuple(ragged))
    refs.extend(reversed(range_nodes(0, fork_begin)))
    return refs


def inclusion_proof_nodes(index: int, size: int) -> list[NodeRef]:
    """The nodes whose hashes make ``inclusion_proof`` of leaf ``index`` in a tree of ``size``.

    Every node lies entirely within [0, size). Raises IndexError unless 0 <= index < size.
    """
    if not 0 <= index < size:
        raise IndexError(f"leaf index {index} outside a tree of {size} leaves")
    return _path_nodes(0, index, size)


def consistency_proof_nodes(old_size: int, new_size: int) -> list[NodeRef]:
    """The nodes whose hashes make ``consistency_proof`` from ``old_size`` to ``new_size``.

    [] when old_size is 0 or new_size. Raises ValueError unless 0 <= old_size <= new_size.
    """
    if not 0 <= old_size <= new_size:
        raise ValueError(f"old size {old_size} outside 0..{new_size}")
    if old_size in (0, new_size):
        return []
    # The proof starts from the largest complete subtree that ends exactly at old_size.
    level = (old_size & -old_size).bit_length() - 1
    index = (old_size - 1) >> level
    path = _path_nodes(level, index, new_size)
    # When old_size is a power of two that subtree is the old root itself, which the verifier
    # already holds, so RFC 9162 leaves it out.
    return path if index == 0 else [Node(level, index), *path]


def proof_from_nodes(refs: Sequence[NodeRef], get: Callable[[int, int], bytes]) -> list[bytes]:
    """Assemble a proof from ``get(level, index) -> hash`` lookups of the nodes ``refs`` names."""
    proof: list[bytes] = []
    for ref in refs:
        if isinstance(ref, Node):
            proof.append(get(ref.level, ref.index))
            continue
        h = get(ref[-1].level, ref[-1].index)
        for node in reversed(ref[:-1]):
            h = node_hash(get(node.level, node.index), h)
        proof.append(h)
    return proof


class CompactRange:
    """The right frontier of a growing tree: one hash per set bit of its size, O(log n) memory.

    ``hashes`` are the roots of ``range_nodes(0, size)``, biggest (leftmost) first. A sequencer
    keeps this instead of the leaves, saves ``to_bytes()`` with each commit and resumes from
    ``from_bytes()``; ``append_nodes`` also yields every completed subtree for a node store.
    """

    __slots__ = ("_hashes", "_size")

    def __init__(self) -> None:
        self._size = 0
        self._hashes: list[bytes] = []

    @classmethod
    def from_hashes(cls, size: int, hashes: Sequence[bytes]) -> CompactRange:
        """Rebuild from the hashes of ``range_nodes(0, size)``, e.g. read from a node store."""
        if not _is_size(size):
            raise ValueError(f"tree size {size!r} is not an integer in 0..2^64-1")
        hashes = list(hashes)
        if len(hashes) != size.bit_count():
            raise ValueError(f"a tree of {size} leaves has {size.bit_count()} frontier hashes")
        if not all(_is_hash(h) for h in hashes):
            raise ValueError("frontier hashes must be 32-byte bytes")
        compact = cls()
        compact._size, compact._hashes = size, hashes
        return compact

    @classmethod
    def from_bytes(cls, data: bytes) -> CompactRange:
        """Inverse of ``to_bytes``; raises ValueError for anything else."""
        if len(data) < 9 or data[:1] != _COMPACT_VERSION or (len(data) - 9) % HASH_SIZE:
            raise ValueError("not a serialized CompactRange")
        size = int.from_bytes(data[1:9], "big")
        hashes = [bytes(data[i : i + HASH_SIZE]) for i in range(9, len(data), HASH_SIZE)]
        return cls.from_hashes(size, hashes)

    def to_bytes(self) -> bytes:
        """Version byte 0x01, the size as uint64 big-endian, then the frontier hashes."""
        return _COMPACT_VERSION + self._size.to_bytes(8, "big") + b"".join(self._hashes)

    @property
    def size(self) -> int:
        """How many leaves have been appended."""
        return self._size

    @property
    def hashes(self) -> tuple[bytes, ...]:
        """The frontier: hashes of ``range_nodes(0, size)``, left to right."""
        return tuple(self._hashes)

    def append(self, leaf_hash: bytes) -> None:
        """Add the next leaf hash (``leaf_hash(entry)``, not the entry itself)."""
        if not _is_hash(leaf_hash):
            raise ValueError("a leaf hash is 32 bytes")
        if self._size >= MAX_TREE_SIZE:
            raise OverflowError("the tree is full")
        h, carry = leaf_hash, self._size
        while carry & 1:  # same merges as append_nodes, without building the node list
            h = node_hash(self._hashes.pop(), h)
            carry >>= 1
        self._hashes.append(h)
        self._size += 1

    def append_nodes(self, leaf_hash: bytes) -> list[tuple[Node, bytes]]:
        """``append``, returning every node this leaf completes: the leaf first, then upward.

        Storing them all gives the node store that ``proof_from_nodes`` reads. Amortized two
        nodes per leaf.
        """
        if not _is_hash(leaf_hash):
            raise ValueError("a leaf hash is 32 bytes")
        if self._size >= MAX_TREE_SIZE:
            raise OverflowError("the tree is full")
        index, level, h = self._size, 0, leaf_hash
        completed = [(Node(0, index), h)]
        # Each trailing one bit of the old size is a same-sized subtree waiting on its left.
        carry = self._size
        while carry & 1:
            h = node_hash(self._hashes.pop(), h)
            carry >>= 1
            level += 1
            completed.append((Node(level, index >> level), h))
        self._hashes.append(h)
        self._size += 1
        return completed

    def root(self) -> bytes:
        """MTH of all appended leaves: folds the frontier right to left (log n hashes)."""
        if not self._hashes:
            return EMPTY_ROOT
        h = self._hashes[-1]
        for left in reversed(self._hashes[:-1]):
            h = node_hash(left, h)
        return h

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CompactRange):
            return NotImplemented
        return self._size == other._size and self._hashes == other._hashes

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"CompactRange(size={self._size}, root={self.root().hex()})"
