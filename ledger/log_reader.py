"""Reading the Merkle log back: raw entries, signed checkpoints, and proofs from stored nodes.

Every perfect subtree is stored when the sequencer completes it (``ledger_tree``, and the leaf
hashes in ``ledger_entries``), so any inclusion or consistency proof is one query for
O(log n) nodes, whatever the size of the log.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

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


class LogRangeError(ValueError):
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
        await self._check_size(size)
        if not 0 <= index < size:
            raise LogRangeError(f"index {index} is not in a tree of size {size}")
        return await self._assemble(inclusion_proof_nodes(index, size))

    async def consistency_proof(self, old_size: int, new_size: int) -> list[bytes]:
        await self._check_size(new_size)
        if not 0 <= old_size <= new_size:
            raise LogRangeError(f"no consistency proof from size {old_size} to {new_size}")
        return await self._assemble(consistency_proof_nodes(old_size, new_size))

    async def root_at(self, size: int) -> bytes:
        """The Merkle root the log had at ``size`` (from stored perfect subtrees)."""
        await self._check_size(size)
        nodes = range_nodes(0, size)
        hashes = await self._fetch(nodes)
        return CompactRange.from_hashes(size, [hashes[node] for node in nodes]).root()

    async def _check_size(self, size: int) -> None:
        head = await self.head()
        if not 0 <= size <= head.size:
            raise LogRangeError(f"size {size} is beyond the log ({head.size} entries)")

    async def _assemble(self, refs: Sequence[NodeRef]) -> list[bytes]:
        nodes = [node for ref in refs for node in (ref if isinstance(ref, tuple) else (ref,))]
        hashes = await self._fetch(nodes)
        return proof_from_nodes(refs, lambda level, index: hashes[Node(level, index)])

    async def _fetch(self, nodes: Sequence[Node]) -> dict[Node, bytes]:
        leaves = [node.index for node in nodes if node.level == 0]
        inner = [node for node in nodes if node.level > 0]
        found: dict[Node, bytes] = {}
        async with self._pool.acquire() as conn:
            if leaves:
                for row in await conn.fetch(
                    "SELECT seq, leaf_hash FROM ledger_entries WHERE seq = ANY($1::bigint[])",
                    leaves,
                ):
                    found[Node(0, row["seq"])] = row["leaf_hash"]
            if inner:
                for row in await conn.fetch(
                    "SELECT level, idx, hash FROM ledger_tree"
                    " WHERE (level, idx) IN (SELECT * FROM unnest($1::smallint[], $2::bigint[]))",
                    [node.level for node in inner],
                    [node.index for node in inner],
                ):
                    found[Node(row["level"], row["idx"])] = row["hash"]
        missing = [node for node in nodes if node not in found]
        if missing:
            raise LogRangeError(f"the log is missing tree nodes {missing[:3]}")
        return found
