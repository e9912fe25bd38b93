"""The paged KV cache's block pool and slot arithmetic, without a model."""

from __future__ import annotations

import pytest
import torch

from miner.engine.kv_cache import NULL_BLOCK, BlockPool, PagedKVCache


def test_the_pool_never_hands_out_the_null_block_and_allocates_all_or_nothing() -> None:
    pool = BlockPool(4, block_size=16)
    assert pool.blocks_for(0) == 0 and pool.blocks_for(16) == 1 and pool.blocks_for(17) == 2
    taken = pool.allocate(3)
    assert taken is not None and NULL_BLOCK not in taken and len(set(taken)) == 3
    assert pool.allocate(2) is None  # one left: nothing is taken
    assert pool.free_blocks == 1
    last = pool.allocate(1)
    assert last is not None and NULL_BLOCK not in last
    pool.release(taken)
    assert pool.free_blocks == 3
    assert sorted([*taken, *last]) == [1, 2, 3, 4]


def test_positions_map_to_slots_through_the_block_table() -> None:
    pool = BlockPool(8, block_size=4)
    cache = PagedKVCache(num_layers=1, pool=pool, device=torch.device("cpu"))
    slots = cache.slots([5, 2], torch.arange(7))
    assert slots.tolist() == [20, 21, 22, 23, 8, 9, 10]
    with pytest.raises(RuntimeError, match="set_step"):
        cache.step_slots()
