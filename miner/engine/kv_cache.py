"""The batching engine's paged KV cache: token slots in fixed-size blocks, and a free list.

Every attention layer keeps its keys and values in two tensors of shape
``[(num_blocks + 1) * block_size, kv_heads, head_dim]``, allocated once, at the first forward
pass (from the shapes the model writes, so any head layout works). A sequence owns a list of
blocks (its *block table*); position ``p`` of the sequence lives in slot
``blocks[p // block_size] * block_size + p % block_size``. Block 0 is the *null block*: never
handed out and never written, so it stays zero; rows of a batch shorter than the longest one
read their padding from it (masked out, and finite, so a masked position can never turn a
softmax weight of 0 into NaN).

Memory is bounded once, by configuration: ``num_blocks * block_size`` tokens, whatever the
traffic. The scheduler (``miner.engine.scheduler``) hands blocks out and takes them back; it
never asks for more than :class:`BlockPool` holds, so a burst of long requests waits instead of
taking the process down.

For one forward pass the runner (``miner.engine.model_runner``) sets the step's *write slots*
(where the new tokens' keys and values go) and *read slots* (every position each row attends to,
padded with the null block); each layer's :meth:`PagedLayer.update` scatters the new keys and
values and gathers the rows' full contexts as the ``[rows, heads, length, head_dim]`` tensors
the attention expects.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

NULL_BLOCK = 0
"""The block padding reads from: never allocated, always zero."""


class BlockPool:
    """The free list of KV blocks ``1 .. num_blocks`` (block 0 is the null block)."""

    def __init__(self, num_blocks: int, *, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # Popped from the end: recently freed blocks are reused first (warm in the caches).
        self._free = list(range(num_blocks + NULL_BLOCK, NULL_BLOCK, -1))

    @property
    def free_blocks(self) -> int:
        """Blocks not owned by any sequence."""
        return len(self._free)

    def blocks_for(self, tokens: int) -> int:
        """Blocks needed to hold ``tokens`` positions."""
        return -(-tokens // self.block_size)

    def allocate(self, count: int) -> list[int] | None:
        """``count`` blocks, or None (and nothing taken) when fewer are free."""
        if count > len(self._free):
            return None
        taken = self._free[len(self._free) - count :]
        del self._free[len(self._free) - count :]
        return taken

    def release(self, blocks: Iterable[int]) -> None:
        """Gives blocks back to the pool."""
        self._free.extend(blocks)


class PagedLayer(CacheLayerMixin):  # type: ignore[no-untyped-call]
    """One attention layer's share of the pool; reads its step's slots from the owning cache."""

    is_sliding = False

    def __init__(self, owner: PagedKVCache) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._owner = owner

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        slots = (self._owner.num_blocks + 1) * self._owner.block_size
        _, kv_heads, _, key_dim = key_states.shape
        self.keys = key_states.new_zeros((slots, kv_heads, key_dim))
        self.values = value_states.new_zeros((slots, kv_heads, value_states.shape[-1]))
        self.device = key_states.device
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stores the step's new keys and values; returns every row's context, padded."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        assert self.keys is not None and self.values is not None
        write, read = self._owner.step_slots()
        heads = key_states.shape[1]
        # [batch, heads, new, dim] -> [batch * new, heads, dim], in the order of the write slots.
        self.keys.index_copy_(
            0, write, key_states.transpose(1, 2).reshape(-1, heads, key_states.shape[-1])
        )
        self.values.index_copy_(
            0, write, value_states.transpose(1, 2).reshape(-1, heads, value_states.shape[-1])
        )
        # [rows, length] slots -> [rows, length, heads, dim] -> [rows, heads, length, dim]
        flat = read.reshape(-1)
        keys = self.keys.index_select(0, flat).view(*read.shape, *self.keys.shape[1:])
        values = self.values.index_select(0, flat).view(*read.shape, *self.values.shape[1:])
        return keys.transpose(1, 2), values.transpose(1, 2)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # The scheduler passes its own 4-D mask, so the model never builds one from these.
        return self._owner.step_length(), 0

    def get_seq_length(self) -> int:
        return self._owner.step_length()

    def get_max_length(self) -> int:
        return -1

    def scrub(self, slots: torch.Tensor) -> None:
        """Zeroes the given slots (a sequence whose values went NaN leaves no NaN behind)."""
        if self.keys is not None and self.values is not None:
            self.keys.index_fill_(0, slots, 0.0)
            self.values.index_fill_(0, slots, 0.0)

    def allocated_bytes(self) -> int:
        """Bytes this layer's keys and values take (0 before the first forward pass)."""
        if self.keys is None or self.values is None:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values))


class PagedKVCache(Cache):
    """The KV pool of one model, as the ``transformers`` cache object its forward passes use.

    :meth:`set_step` must be called before every forward pass; the model then writes and reads
    the slots it names.
    """

    def __init__(self, *, num_layers: int, pool: BlockPool, device: torch.device) -> None:
        self.num_blocks = pool.num_blocks
        self.block_size = pool.block_size
        self.device = device
        self._write: torch.Tensor | None = None
        self._read: torch.Tensor | None = None
        self._paged = [PagedLayer(self) for _ in range(num_layers)]
        super().__init__(layers=list(self._paged))

    def slots(self, blocks: Sequence[int], positions: torch.Tensor) -> torch.Tensor:
        """The slots of a sequence's ``positions`` (a 1-D tensor) under its block table."""
        size = self.block_size
        table = torch.tensor(list(blocks), dtype=torch.long)
        return table[positions // size] * size + positions % size

    def set_step(self, *, write: torch.Tensor, read: torch.Tensor) -> None:
        """Names the slots of the next forward pass: ``write`` ``[new tokens]``, in the order the
        model lays the new tokens out (row by row), and ``read`` ``[rows, length]``."""
        self._write = write.to(self.device)
        self._read = read.to(self.device)

    def step_slots(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The current step's write slots ``[rows * new]`` and read slots ``[rows, length]``."""
        if self._write is None or self._read is None:
            raise RuntimeError("PagedKVCache.set_step was not called before the forward pass")
        return self._write, self._read

    def step_length(self) -> int:
        """Positions the current step reads per row (0 before the first step)."""
        return 0 if self._read is None else int(self._read.shape[1])

    def scrub(self, blocks: Sequence[int]) -> None:
        """Zeroes every layer's slots in ``blocks``."""
        if not blocks:
            return
        size = self.block_size
        slots = (torch.tensor(list(blocks))[:, None] * size + torch.arange(size)[None, :]).reshape(
            -1
        )
        slots = slots.to(self.device)
        for layer in self._paged:
            layer.scrub(slots)

    def finite(self, slots: torch.Tensor) -> bool:
        """Whether the last layer's keys and values at ``slots`` are all finite. NaN anywhere in
        a sequence's forward pass reaches its last layer, so this tells a poisoned sequence."""
        last = self._paged[-1]
        if last.keys is None or last.values is None:
            return True
        slots = slots.to(self.device)
        return bool(
            torch.isfinite(last.keys.index_select(0, slots)).all()
            and torch.isfinite(last.values.index_select(0, slots)).all()
        )

    def allocated_bytes(self) -> int:
        """Bytes the pool's tensors take across layers."""
        return sum(
            layer.allocated_bytes() for layer in self.layers if isinstance(layer, PagedLayer)
        )
