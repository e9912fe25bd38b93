"""The vLLM logits processor through which :mod:`miner.sampler` picks every token.

vLLM loads it by name (``miner.engine.vllm_processor:KeyedGumbelChoice``) in the process that
runs its sampler, for Model Runner V2 (vLLM 0.34). Each step it sees the batch's logits before
vLLM's temperature, top-k/top-p and sampling; for every row of one of our jobs it leaves only
the reference sampler's token (:func:`miner.engine.forced_choice.force_choices`).

Only ``miner.engine.vllm_engine`` names this module; importing it needs vLLM.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.v1.worker.gpu.sample.logits_processor import (
    LogitsContext,
    LogitsProcessor,
    LogitsProcRequestState,
)

from miner.engine.forced_choice import KeyedJob, force_choices, job_from_extra_args


class KeyedGumbelChoice(LogitsProcessor):  # type: ignore[misc]  # vLLM ships no type stubs
    """Forces the keyed Gumbel-max choice on the rows of requests that carry a job."""

    def __init__(self, vllm_config: Any, req_states: LogitsProcRequestState) -> None:
        super().__init__(vllm_config, req_states)
        # Request slot -> its job. Slots are recycled; add_request overwrites or clears them.
        self._jobs: dict[int, KeyedJob] = {}

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        job_from_extra_args(sampling_params.extra_args)

    def add_request(self, req_idx: int, sampling_params: Any) -> bool:
        job = job_from_extra_args(sampling_params.extra_args)
        if job is None:
            self._jobs.pop(req_idx, None)
            return False
        self._jobs[req_idx] = job
        return True

    def apply(self, logits: torch.Tensor, ctx: LogitsContext) -> torch.Tensor:
        if not self._jobs:
            return logits
        slots = ctx.expanded_idx_mapping.tolist()
        positions = ctx.pos.tolist()
        rows: list[tuple[int, KeyedJob, int]] = []
        for row, (slot, input_position) in enumerate(zip(slots, positions, strict=True)):
            job = self._jobs.get(slot)
            if job is None:
                continue
            position = job.completion_position(input_position)
            if position is not None:  # a prompt chunk's row: vLLM discards its sample
                rows.append((row, job, position))
        return force_choices(logits, rows)
