"""LogReader's proofs from stored nodes against the in-memory reference (ledger.merkle), on a real
PostgreSQL log: batched inclusion proofs equal single ones, verify, and cost a fixed number of
queries however many there are."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeAlias

import asyncpg
import pytest

from ledger.interface import AccountKind, AccountRef
from ledger.log_reader import LogRangeError, LogReader
from ledger.merkle import (
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    root,
    verify_consistency,
    verify_inclusion,
)
from ledger.postgres import PostgresLedger

if TYPE_CHECKING:
    Pool: TypeAlias = asyncpg.Pool[asyncpg.Record]

BUYER = AccountRef(AccountKind.BUYER, "key-log-reader")
# Past two powers of two (32, 64), so sizes cover perfect trees and ragged right edges.
LOG_SIZE = 70


@dataclass
class QueryLog:
    """Every statement the pool's connections execute, in order."""

    statements: list[str] = field(default_factory=list)

    def record(self, logged: asyncpg.connection.LoggedQuery) -> None:
        self.statements.append(logged.query)

    async def count(self, work: Awaitable[object]) -> int:
        await asyncio.sleep(0)  # asyncpg logs each query from a call_soon callback
        before = len(self.statements)
        await work
        await asyncio.sleep(0)
        return len(self.statements) - before


@dataclass
class Log:
    reader: LogReader
    pool: Pool
    queries: QueryLog
    leaf_hashes: list[bytes]  # of every entry, computed here from the entry bytes

    def root(self, size: int) -> bytes:
        return root(self.leaf_hashes[:size])


@pytest.fixture
async def log(database_url: str) -> AsyncIterator[Log]:
    queries = QueryLog()

    async def init(conn: asyncpg.Connection[asyncpg.Record]) -> None:
        conn.add_query_logger(queries.record)

    # One connection: asyncpg introspects types on each connection's first use of them, and
    # those queries must not land, by chance, in the counts of one test.
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1, init=init)
    try:
        ledger = await PostgresLedger.create(pool)
        await ledger.open_account(BUYER)
        # Concurrent mints commit in a few batches: the tree grows in steps, as in production.
        await asyncio.gather(*(ledger.mint(BUYER, n + 1) for n in range(LOG_SIZE)))
        await ledger.aclose()
        reader = LogReader(pool)
        assert (await reader.head()).size == LOG_SIZE
        leaves = await reader.entries(0, LOG_SIZE)
        yield Log(reader, pool, queries, [leaf_hash(leaf) for leaf in leaves])
    finally:
        await pool.close()


def edges(size: int) -> list[int]:
    """First, last, middle, and the leaves either side of the largest power of two below."""
    split = 1 << ((size - 1).bit_length() - 1) if size > 1 else 0
    return sorted({0, size - 1, size // 2, *(i for i in (split - 1, split) if 0 <= i < size)})


async def test_batched_proofs_match_the_reference_and_the_single_ones_and_verify(
    log: Log,
) -> None:
    assert await log.reader.root_at(LOG_SIZE) == log.root(LOG_SIZE)
    for size in range(1, LOG_SIZE + 1):
        indices = list(range(size))
        random.Random(size).shuffle(indices)
        proofs = await log.reader.inclusion_proofs(indices, size)
        assert sorted(proofs) == list(range(size))
        tree_root = log.root(size)
        for index, proof in proofs.items():
            assert proof == inclusion_proof(log.leaf_hashes[:size], index)
            assert verify_inclusion(log.leaf_hashes[index], index, size, proof, tree_root)
            # A proof for one leaf must not prove its neighbour.
            other = (index + 1) % size
            if other != index:
                assert not verify_inclusion(log.leaf_hashes[other], index, size, proof, tree_root)
        for index in edges(size):
            assert await log.reader.inclusion_proof(index, size) == proofs[index]


async def test_a_batch_may_repeat_and_skip_indices(log: Log) -> None:
    size = 64
    proofs = await log.reader.inclusion_proofs([63, 5, 63, 0, 5], size)
    assert list(proofs) == [63, 5, 0]  # each once, in the caller's order
    for index, proof in proofs.items():
        assert proof == await log.reader.inclusion_proof(index, size)
    assert await log.reader.inclusion_proofs([], size) == {}
    assert await log.reader.inclusion_proofs(iter([0]), 1) == {0: []}


@pytest.mark.parametrize(
    ("indices", "size"),
    [
        ([0], LOG_SIZE + 1),
        ([], LOG_SIZE + 1),
        ([-1], 5),
        ([5], 5),
        ([0], 0),
        ([0, 3, 8], 8),
        ([LOG_SIZE], LOG_SIZE),
        ([-1], -1),
    ],
)
async def test_out_of_range_input_fails_as_for_a_single_proof(
    log: Log, indices: list[int], size: int
) -> None:
    with pytest.raises(LogRangeError) as batch:
        await log.reader.inclusion_proofs(indices, size)
    bad = [i for i in indices if not 0 <= i < size] or [0]
    with pytest.raises(LogRangeError) as single:
        await log.reader.inclusion_proof(bad[0], size)
    assert str(batch.value) == str(single.value)


async def test_a_missing_stored_node_is_an_error_not_a_wrong_proof(log: Log) -> None:
    await log.pool.execute("DELETE FROM ledger_tree WHERE level = 1 AND idx = 0")
    with pytest.raises(LogRangeError, match="missing tree nodes"):
        await log.reader.inclusion_proofs(range(10), 10)
    with pytest.raises(LogRangeError, match="missing tree nodes"):
        await log.reader.inclusion_proof(3, 10)
    # Proofs that do not need the node still work.
    assert await log.reader.inclusion_proof(0, 10) == inclusion_proof(log.leaf_hashes[:10], 0)


async def test_any_number_of_proofs_costs_the_same_queries_and_one_node_fetch(
    log: Log,
) -> None:
    def batch(indices: Iterable[int], size: int) -> Awaitable[dict[int, list[bytes]]]:
        return log.reader.inclusion_proofs(list(indices), size)

    await batch([0], LOG_SIZE)  # the pool's connections have now run every statement once
    one = await log.queries.count(batch([LOG_SIZE // 3], LOG_SIZE))
    fetches = log.queries.statements[-one:]
    some = await log.queries.count(batch(random.Random(1).sample(range(LOG_SIZE), 10), LOG_SIZE))
    every = await log.queries.count(batch(range(LOG_SIZE), LOG_SIZE))
    single = await log.queries.count(log.reader.inclusion_proof(LOG_SIZE - 1, LOG_SIZE))
    assert one == some == every == single
    # Nodes from both tables (leaf hashes and inner nodes) come back in one statement.
    assert len([q for q in fetches if "ledger_tree" in q or "ledger_entries" in q]) == 1


async def test_consistency_proofs_and_roots_from_the_one_query_path(log: Log) -> None:
    for size in range(LOG_SIZE + 1):
        assert await log.reader.root_at(size) == log.root(size)
    for old, new in ((0, 5), (1, 1), (1, 2), (3, 7), (8, 64), (31, 32), (33, LOG_SIZE), (64, 70)):
        proof = await log.reader.consistency_proof(old, new)
        assert proof == consistency_proof(log.leaf_hashes[:new], old)
        assert verify_consistency(old, new, proof, log.root(old), log.root(new))
    for old, new, message in (
        (3, LOG_SIZE + 1, "beyond the log"),
        (-1, LOG_SIZE + 1, "beyond the log"),
        (6, 5, "no consistency proof"),
        (-1, 5, "no consistency proof"),
    ):
        with pytest.raises(LogRangeError, match=message):
            await log.reader.consistency_proof(old, new)
    for size in (-1, LOG_SIZE + 1):
        with pytest.raises(LogRangeError, match="beyond the log"):
            await log.reader.root_at(size)
