"""Forward passes of one causal LM over the paged KV cache (``miner.engine.kv_cache``).

Two kinds of pass, each one call of the stock ``transformers`` model:

- :meth:`ModelRunner.decode`: one new token for each of several sequences, as a padded batch
  ``[rows, 1]``; row ``b`` reads its own positions ``0 .. start_b`` (shorter rows are padded
  with the null block and masked);
- :meth:`ModelRunner.prefill`: prompt chunks of several sequences *packed* into one row
  ``[1, total new tokens]``, the way varlen attention kernels take them: the keys are the
  sequences' contexts one after the other, and a block-diagonal causal mask lets each token see
  only its own sequence's earlier positions. One pass over all the chunks of a step keeps the
  matrix products large, whatever the mix of prompt lengths.

Positions are given per token (``position_ids``) and the mask is an additive 4-D one (the model
passes it through unchanged); every layer writes and reads through the cache's slots.

Blocking: call it from one thread at a time, under ``torch.inference_mode``.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from miner.engine.base import EngineError
from miner.engine.kv_cache import NULL_BLOCK, BlockPool, PagedKVCache

logger = logging.getLogger(__name__)

# The self-check at load compares the paged pass with a plain one within these (relative to
# the largest logit): far above rounding, far below what a wrong mask or position gives.
_SELF_CHECK_TOLERANCE = {torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 5e-2}


@dataclass(frozen=True)
class Row:
    """One row of a forward pass."""

    token_ids: Sequence[int]  # the new tokens, fed at positions start, start + 1, ...
    start: int  # how many of the sequence's positions are already in the cache
    blocks: Sequence[int]  # the sequence's block table; it covers every position fed


class UnsupportedModelError(EngineError):
    """The model cannot run over the paged cache (see :meth:`ModelRunner.self_check`)."""


class ModelRunner:
    """Runs ``model`` over rows of new tokens, with their context in ``cache``."""

    def __init__(self, model: Any, *, cache: PagedKVCache, device: torch.device) -> None:
        self._model = model
        self._cache = cache
        self._device = device
        self._dtype: torch.dtype = model.dtype
        accepts = inspect.signature(model.forward).parameters
        self._keeps_logits = "logits_to_keep" in accepts
        # transformers 5 renamed past_key_values to cache (the old name warns, then goes).
        self._cache_argument = "cache" if "cache" in accepts else "past_key_values"

    def decode(self, rows: Sequence[Row]) -> torch.Tensor:
        """Logits ``[len(rows), vocab]`` of one new token per row (a padded batch)."""
        if any(len(row.token_ids) != 1 for row in rows):
            raise ValueError("a decode pass feeds exactly one token per row")
        starts = torch.tensor([row.start for row in rows], dtype=torch.long)
        length = int(starts.max()) + 1
        keys = torch.arange(length)
        read = torch.zeros((len(rows), length), dtype=torch.long)
        for index, row in enumerate(rows):
            # Beyond its own positions a row reads the null block's slots (zeros, masked).
            read[index] = NULL_BLOCK * self._cache.block_size + keys % self._cache.block_size
            read[index, : row.start + 1] = self._cache.slots(row.blocks, keys[: row.start + 1])
        write = read.gather(1, starts[:, None])[:, 0]
        visible = keys[None, None, :] <= starts[:, None, None]  # [rows, 1 query, length]
        ids = torch.tensor([[row.token_ids[0]] for row in rows], dtype=torch.long)
        logits = self._run(ids, starts[:, None], visible, write=write, read=read, keep=1)
        return logits[:, -1]

    def prefill(self, rows: Sequence[Row], *, keep: Sequence[int]) -> list[torch.Tensor]:
        """Each row's logits ``[keep[i], vocab]`` for its last ``keep[i]`` new tokens (packed).

        ``keep[i]`` may be 0 (a chunk that is not its prompt's last needs no logits). The mask
        keeps rows apart, but not NaN: a masked score is NaN plus a large negative number, so
        one row gone NaN poisons the others of the pass; :meth:`poisoned` tells which.
        """
        if len(keep) != len(rows) or any(
            not 0 <= k <= len(r.token_ids) for k, r in zip(keep, rows, strict=True)
        ):
            raise ValueError("keep must give, for each row, at most its number of new tokens")
        if any(not row.token_ids for row in rows):
            raise ValueError("a prefill row feeds at least one token")
        positions, owners, reads, writes = [], [], [], []
        key_positions, key_owners = [], []
        for index, row in enumerate(rows):
            new = torch.arange(row.start, row.start + len(row.token_ids))
            context = torch.arange(row.start + len(row.token_ids))
            slots = self._cache.slots(row.blocks, context)
            positions.append(new)
            owners.append(torch.full_like(new, index))
            reads.append(slots)
            writes.append(slots[row.start :])
            key_positions.append(context)
            key_owners.append(torch.full_like(context, index))
        query_position = torch.cat(positions)
        key_position = torch.cat(key_positions)
        visible = (torch.cat(owners)[:, None] == torch.cat(key_owners)[None, :]) & (
            key_position[None, :] <= query_position[:, None]
        )
        ends = torch.cumsum(torch.tensor([len(row.token_ids) for row in rows]), dim=0)
        wanted = torch.cat(
            [torch.arange(int(end) - k, int(end)) for end, k in zip(ends, keep, strict=True)]
        )
        ids = torch.tensor([[token for row in rows for token in row.token_ids]], dtype=torch.long)
        if wanted.numel() == 0:
            wanted = ends[-1:] - 1  # the model computes at least one row; it is dropped below
        logits = self._run(
            ids,
            query_position[None, :],
            visible[None],
            write=torch.cat(writes),
            read=torch.cat(reads)[None, :],
            keep=wanted,
        )[0]
        pieces = []
        taken = 0
        for k in keep:
            pieces.append(logits[taken : taken + k])
            taken += k
        return pieces

    def poisoned(self, row: Row, logits: torch.Tensor) -> bool:
        """Whether ``row``'s kept logits or the keys and values it wrote are not finite."""
        if bool(torch.isnan(logits).any()) or bool(torch.isposinf(logits).any()):
            return True
        written = torch.arange(row.start, row.start + len(row.token_ids))
        return not self._cache.finite(self._cache.slots(row.blocks, written))

    def _run(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        visible: torch.Tensor,
        *,
        write: torch.Tensor,
        read: torch.Tensor,
        keep: int | torch.Tensor,
    ) -> torch.Tensor:
        """One forward pass; ``visible`` is ``[rows, queries, keys]``. Logits of the kept rows."""
        self._cache.set_step(write=write, read=read)
        mask = additive_mask(visible, self._dtype)
        extra: dict[str, Any] = {self._cache_argument: self._cache}
        if self._keeps_logits:
            extra["logits_to_keep"] = (
                keep.to(self._device) if isinstance(keep, torch.Tensor) else keep
            )
        output = self._model(
            input_ids=ids.to(self._device),
            position_ids=positions.to(self._device),
            attention_mask=mask[:, None].to(self._device),
            use_cache=True,
            **extra,
        )
        logits: torch.Tensor = output.logits
        if self._keeps_logits:
            return logits
        if isinstance(keep, torch.Tensor):
            return logits[:, keep.to(logits.device)]
        return logits[:, -keep:]

    def self_check(self, pool: BlockPool, *, vocab_size: int) -> None:
        """Compares the paged pass with plain forward passes; raises UnsupportedModelError.

        Two sequences: one prefilled in two chunks (the second packed with the other
        sequence's first token), then a decode step over both in one batch. A model whose
        attention does not go through the cache's ``update`` or ignores the 4-D mask (sliding
        windows, custom kernels) fails here at load, instead of serving wrong tokens. The first
        pass also allocates the whole KV pool, so a pool that does not fit fails here too.
        """
        first = [(7 * i + 1) % vocab_size for i in range(6)]
        second = [(11 * i + 3) % vocab_size for i in range(2)]
        blocks = [pool.allocate(pool.blocks_for(len(seq))) for seq in (first, second)]
        if blocks[0] is None or blocks[1] is None:
            raise UnsupportedModelError("the KV pool is too small for the self-check")
        a, b = blocks[0], blocks[1]
        try:
            # A chunk of one, then chunks of both packed together, then a decode step over both.
            head = self.prefill([Row(first[:3], 0, a)], keep=[3])
            packed = self.prefill([Row(first[3:5], 3, a), Row(second[:1], 0, b)], keep=[2, 1])
            step = self.decode([Row(first[5:], 5, a), Row(second[1:], 1, b)])
            paged_first = torch.cat([head[0], packed[0], step[:1]])
            paged_second = torch.cat([packed[1], step[1:]])
            plain_first = self._plain(first)
            plain_second = self._plain(second)
        except Exception as exc:  # any failure of an unknown architecture
            raise UnsupportedModelError(
                f"a forward pass over the paged cache failed: {exc!r}"
            ) from exc
        finally:
            pool.release(a)
            pool.release(b)
        worst = max(
            _relative_error(paged_first, plain_first), _relative_error(paged_second, plain_second)
        )
        tolerance = _SELF_CHECK_TOLERANCE.get(self._dtype, 5e-2)
        if not worst <= tolerance:
            raise UnsupportedModelError(
                f"logits over the paged cache differ from a plain forward pass by {worst:.3g} "
                f"(relative; at most {tolerance:g} expected)"
            )
        logger.debug("paged self-check passed (relative error %.3g)", worst)

    def _plain(self, token_ids: Sequence[int]) -> torch.Tensor:
        ids = torch.tensor([list(token_ids)], dtype=torch.long, device=self._device)
        logits: torch.Tensor = self._model(input_ids=ids, use_cache=False).logits[0]
        return logits


def additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where a query sees a key, the dtype's lowest value elsewhere (not -inf: a row that sees
    nothing then averages finite values instead of turning NaN)."""
    return torch.zeros(visible.shape, dtype=dtype).masked_fill(~visible, torch.finfo(dtype).min)


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = max(1.0, float(want.float().abs().max()))
    return float((got.float() - want.float()).abs().max()) / scale
