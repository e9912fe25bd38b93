"""Reading the Merkle log back: raw entries, signed checkpoints, and proofs from stored nodes.

Every perfect subtree is stored when the sequencer completes it (``ledger_tree``, and the leaf
hashes in ``ledger_entries``), so any inclusion or consistency proof is one query for
O(log n) nodes, whatever the size of the log; ``inclusion_proofs`` fetches the nodes of many
proofs in that one query too, which is what a round of credit receipts needs.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import NoReturn

import asyncpg

from ledger.interface import LedgerError
from ledger.merkle import (
    CompactRange,
    Node,
    NodeRef,
    consistency_proof_nodes,
    inclusion_proof_nodes,
    proof_from_nodes,
    range_nodes,
)

MAX_PAGE = 10_000


class LogRangeError(LedgerError, ValueError):
    """A requested index or size lies outside the log."""


@dataclass(frozen=True)
class Head:
    size: int  # entries in the log
    root: bytes  # Merkle root of all of them


@dataclass(frozen=True)
class StoredCheckpoint:
    size: int  # tree size it commits to
    root: bytes  # Merkle root at that size
    note: bytes  # the signed note, exactly as signed


class LogReader:
    def __init__(self, pool: asyncpg.Pool[asyncpg.Record]) -> None:
        self._pool = pool

    async def head(self) -> Head:
        row = await self._pool.fetchrow("SELECT size, frontier FROM ledger_head")
        if row is None:
            raise LogRangeError("the ledger has no log head (schema not created)")
        return Head(row["size"], CompactRange.from_bytes(row["frontier"]).root())

    async def entries(self, start: int, limit: int) -> list[bytes]:
        """Raw entry bytes for seq in [start, start + limit), in order."""
        if start < 0 or not 1 <= limit <= MAX_PAGE:
            raise LogRangeError(f"start must be >= 0 and limit in [1, {MAX_PAGE}]")
        rows = await self._pool.fetch(
            "SELECT leaf FROM ledger_entries WHERE seq >= $1 AND seq < $2 ORDER BY seq",
            start,
            start + limit,
        )
        return [row["leaf"] for row in rows]

    async def latest_checkpoint(self) -> StoredCheckpoint | None:
        row = await self._pool.fetchrow(
            "SELECT size, root, note FROM ledger_checkpoints ORDER BY size DESC LIMIT 1"
        )
        return StoredCheckpoint(row["size"], row["root"], row["note"]) if row else None

    async def checkpoints(self, start: int, limit: int) -> list[StoredCheckpoint]:
        """Signed checkpoints with size >= ``start``, smallest first."""
        if start < 0 or not 1 <= limit <= MAX_PAGE:
            raise LogRangeError(f"start must be >= 0 and limit in [1, {MAX_PAGE}]")
        rows = await self._pool.fetch(
            "SELECT size, root, note FROM ledger_checkpoints WHERE size >= $1"
            " ORDER BY size LIMIT $2",
            start,
            limit,
        )
        return [StoredCheckpoint(row["size"], row["root"], row["note"]) for row in rows]

    async def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        return (await self.inclusion_proofs([index], size))[index]

    async def inclusion_proofs(self, indices: Iterable[int], size: int) -> dict[int, list[bytes]]:
        """The inclusion proof of each leaf in ``indices`` in the tree of ``size``, by index.

        One query whatever the number of proofs, for every node they need (shared ones once).
        Raises ``LogRangeError`` as ``inclusion_proof`` does, for the whole batch if any one
        index is outside the tree.
        """
        wanted = dict.fromkeys(indices)  # in the caller's order, each once
        bad = next((index for index in wanted if not 0 <= index < size), None)
        if bad is not None:
            await self._refuse(size, f"index {bad} is not in a tree of size {size}")
        refs = {index: inclusion_proof_nodes(index, size) for index in wanted}
        hashes = await self._fetch(size, _nodes_of(r for proof in refs.values() for r in proof))
        return {
            index: proof_from_nodes(proof, lambda level, i: hashes[level, i])
            for index, proof in refs.items()
        }

    async def consistency_proof(self, old_size: int, new_size: int) -> list[bytes]:
        if not 0 <= old_size <= new_size:
            await self._refuse(new_size, f"no consistency proof from size {old_size} to {new_size}")
        refs = consistency_proof_nodes(old_size, new_size)
        hashes = await self._fetch(new_size, _nodes_of(refs))
        return proof_from_nodes(refs, lambda level, index: hashes[level, index])

    async def root_at(self, size: int) -> bytes:
        """The Merkle root the log had at ``size`` (from stored perfect subtrees)."""
        nodes = range_nodes(0, max(size, 0))  # a negative size fails _fetch's check of it
        hashes = await self._fetch(size, set(nodes))
        return CompactRange.from_hashes(size, [hashes[n.level, n.index] for n in nodes]).root()

    async def _refuse(self, size: int, error: str) -> NoReturn:
        """Raises for out-of-range input: that ``size`` is beyond the log if it is, else ``error``.

        The size is checked first, as it always was, so a batch fails as a single proof does.
        """
        _check_size(size, (await self.head()).size)
        raise LogRangeError(error)

    async def _fetch(self, size: int, nodes: Collection[Node]) -> dict[tuple[int, int], bytes]:
        """The hashes of ``nodes`` by (level, index); raises unless ``size`` is within the log.

        Keyed by tuples, not ``Node``s: a round of receipts makes thousands of lookups, and a
        tuple is over ten times cheaper to build than a frozen dataclass.
        """
        leaves = [node.index for node in nodes if node.level == 0]
        inner = [node for node in nodes if node.level > 0]
        # One round trip for the log's size and both tables of nodes (leaf hashes live with
        # the entries): a batch of proofs costs what one does. Level -1 is not a node.
        rows = await self._pool.fetch(
            "SELECT -1::smallint AS level, size AS idx, NULL::bytea AS hash FROM ledger_head"
            " UNION ALL"
            " SELECT 0::smallint, seq, leaf_hash FROM ledger_entries"
            " WHERE seq = ANY($1::bigint[])"
            " UNION ALL"
            " SELECT level, idx, hash FROM ledger_tree"
            " WHERE (level, idx) IN (SELECT * FROM unnest($2::smallint[], $3::bigint[]))",
            leaves,
            [node.level for node in inner],
            [node.index for node in inner],
        )
        heads = [row["idx"] for row in rows if row["level"] < 0]
        if not heads:
            raise LogRangeError("the ledger has no log head (schema not created)")
        _check_size(size, heads[0])
        found = {(row["level"], row["idx"]): row["hash"] for row in rows if row["level"] >= 0}
        missing = sorted(node for node in nodes if (node.level, node.index) not in found)
        if missing:
            raise LogRangeError(f"the log is missing tree nodes {missing[:3]}")
        return found


def _check_size(size: int, log_size: int) -> None:
    if not 0 <= size <= log_size:
        raise LogRangeError(f"size {size} is beyond the log ({log_size} entries)")


def _nodes_of(refs: Iterable[NodeRef]) -> set[Node]:
    """Every stored node that ``refs`` name, each once (proofs of nearby leaves share most)."""
    return {node for ref in refs for node in (ref if isinstance(ref, tuple) else (ref,))}
