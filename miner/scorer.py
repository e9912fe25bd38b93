"""Re-scoring a finished job: what a spot check asks of a miner other than the one that ran it.

The checked miner claims it sampled ``completion`` from ``prompt`` with the reference sampler
(``miner.sampler``). The scorer runs the same model once over ``prompt + completion[:-1]``
(teacher forcing: the logits at every position come from one prefill, about as costly as the
checked job's own prefill) and reports, for each claimed token:

- its **log-probability** under the scorer's fp32 logits at temperature 1, to be compared with
  the log-probability the miner claimed;
- its **margin**: how far behind the token the reference sampler would pick it is, in scaled
  logits plus the job's Gumbel noise. An honest miner's token has margin 0 up to floating-point
  differences between devices; a substituted token usually has a margin of the order of the
  noise itself (about 1); a token clearly outside top-k or top-p has an infinite margin.

Margins tolerate the edge of the truncated set. Another device may keep or drop a token that
sits within a hair of the top-k / top-p cut-off (a bf16 miner does so about once in a thousand
sampled tokens), so with ``z`` the scaled logits, membership is judged with a tolerance
(``TOLERANCE`` in scaled logits, ``P_TOLERANCE`` in top-p mass):

- *core* tokens are in the set by more than the tolerance (for top-k, ``z`` above the k-th
  value by more than it, near-ties counted ahead; for top-p, the mass ahead of them, near-ties
  included, below ``top_p - P_TOLERANCE``);
- *edge* tokens are in the set, or out of it by at most the tolerance;
- a claimed token outside the edge set has an infinite margin; otherwise its margin is
  ``max(0, max over core tokens of (z + noise) - (z + noise)[token])``.

At temperature 0 the margin is ``max(x) - x[token]``.

It also reports, for each claimed token, a **stop margin**, so that a miner cannot pad a job
(and bill more tokens) by going on where the reference sampler would have stopped: where the
best stop token of the job (``SamplingParams.stop_token_ids``) is the sampler's pick (its score
is the best core score, ties included), the stop margin is the claimed token's margin; elsewhere
it is the best stop token's score minus the best core score (negative: how close the sampler
came to stopping), or ``-inf`` when no stop token is in the core. Only *core* stop tokens count,
as for the margin's best token: a stop token at the edge of the top-k / top-p set may be dropped
by an honest miner's device, and going on there is no fraud. So a positive stop margin always
equals the margin, and means exactly "the reference sampler would have stopped here, by this
much"; an ordinary substitution next to a likely stop is left to the margin rule. The definition
is the same whatever the claimed token (the judge ignores claimed stop tokens). At temperature 0
the scores are the logits and every stop token counts. Stop ids outside the vocabulary are
ignored.

The coordinator judges these numbers (``coordinator/verification/judge.py``, calibrated by
``bench/verification.py``); a miner only computes them.

That is the definition row by row; ``score_rows`` computes it for all rows at once and draws
noise only where it can matter, with the same bits (tests/miner/test_scorer.py keeps the
row-at-a-time version and compares).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from miner import sampler
from miner.engine.base import SamplingParams, TokenScores

TOLERANCE = 0.25
"""Edge tolerance in scaled logits: far above bf16 noise, far below a typical substitution."""
P_TOLERANCE = 0.02
"""Edge tolerance in top-p probability mass."""
# Rows are scored in chunks of about this many logits (bounds the temporaries' memory).
_CHUNK_ELEMENTS = 1 << 21
# Steps 4 and 5 of miner.sampler's noise definition: 52 random bits, centred in their interval.
_MANTISSA_SHIFT = 12
_MANTISSA_SCALE = 2.0**-52


def teacher_forced_logits(
    model: Any, prompt: Sequence[int], completion: Sequence[int], *, device: torch.device
) -> torch.Tensor:
    """Rows of logits, one per completion token: row ``i`` is what predicts ``completion[i]``.

    One forward pass over ``prompt + completion[:-1]``; call it under ``torch.inference_mode``.
    Only the completion's rows are computed when the model takes ``logits_to_keep`` (a long
    prompt's rows over a large vocabulary would otherwise cost gigabytes).
    """
    if not prompt:
        raise ValueError("the prompt is empty")
    if not completion:
        return torch.empty((0, 0))
    ids = torch.tensor([list(prompt) + list(completion[:-1])], dtype=torch.long, device=device)
    extra = (
        {"logits_to_keep": len(completion)}
        if "logits_to_keep" in inspect.signature(model.forward).parameters
        else {}
    )
    logits: torch.Tensor = model(input_ids=ids, use_cache=False, **extra).logits[0]
    return logits[-len(completion) :]


def score_rows(
    logits: torch.Tensor,
    completion: Sequence[int],
    params: SamplingParams,
    *,
    noise_job_id: str,
    claimed_top_ids: Sequence[Sequence[int]] = (),
) -> TokenScores:
    """Log-probabilities, margins and stop margins of ``completion`` given its rows of ``logits``.

    ``logits`` has one row per completion token (any dtype, any device); the noise for row ``i``
    is the sampler's for position ``i`` of job ``noise_job_id``. With ``claimed_top_ids`` (one
    entry per token: the alternatives the checked miner reported), also the scorer's logprobs of
    those ids and its k-th largest logprob at each position (:func:`top_logprob_scores`).
    """
    if claimed_top_ids and len(claimed_top_ids) != len(completion):
        raise ValueError(
            f"{len(claimed_top_ids)} top_logprobs entries for {len(completion)} tokens"
        )
    if logits.shape[0] != len(completion):
        raise ValueError(f"{logits.shape[0]} rows of logits for {len(completion)} tokens")
    if not completion:
        return TokenScores(logprobs=(), margins=(), stop_margins=())
    tokens = torch.tensor(list(completion), dtype=torch.long, device=logits.device)
    every_logprob = sampler.logprobs_fp32(logits)
    logprobs = every_logprob.gather(1, tokens[:, None])[:, 0]
    top_logprobs, top_thresholds = top_logprob_scores(every_logprob, claimed_top_ids)
    del every_logprob
    sampler.validate(params)
    # Rows go through in chunks so that a long completion over a large vocabulary stays within a
    # few hundred MB of temporaries (sorts, masks and noise are all [rows, vocab]).
    step = max(1, _CHUNK_ELEMENTS // max(1, logits.shape[-1]))
    cpu_tokens = tokens.cpu()
    vocab = logits.shape[-1]
    stops = torch.tensor(
        sorted({t for t in params.stop_token_ids if 0 <= t < vocab}), dtype=torch.long
    )
    margins: list[float] = []
    stop_margins: list[float] = []
    for first in range(0, len(completion), step):
        chunk, stop_chunk = _margins(
            logits[first : first + step].detach().float().cpu(),
            cpu_tokens[first : first + step],
            params,
            stops=stops,
            noise_job_id=noise_job_id,
            first_position=first,
        )
        margins.extend(chunk.tolist())
        stop_margins.extend(stop_chunk.tolist())
    return TokenScores(
        logprobs=tuple(logprobs.tolist()),
        margins=tuple(margins),
        stop_margins=tuple(stop_margins),
        top_logprobs=top_logprobs,
        top_thresholds=top_thresholds,
    )


def top_logprob_scores(
    logprobs: torch.Tensor, claimed_top_ids: Sequence[Sequence[int]]
) -> tuple[tuple[tuple[float, ...], ...], tuple[float, ...]]:
    """For each row of fp32 ``logprobs`` and its claimed alternatives: their logprobs here, and
    the row's k-th largest logprob (k = how many were claimed; 0 claimed: +inf, nothing to
    compare). An honest miner's alternatives are the k most likely, so each is at or above the
    threshold up to rounding; a made-up one is usually far below it."""
    if not claimed_top_ids:
        return (), ()
    vocab = logprobs.shape[-1]
    scored: list[tuple[float, ...]] = []
    thresholds: list[float] = []
    for row, ids in enumerate(claimed_top_ids):
        wanted = [int(i) for i in ids]
        if not all(0 <= i < vocab for i in wanted):
            raise ValueError(f"top_logprobs token ids must be in [0, {vocab})")
        values = logprobs[row]
        scored.append(tuple(values[wanted].tolist()) if wanted else ())
        width = min(len(wanted), vocab)
        thresholds.append(float(torch.topk(values, width).values[-1]) if width else math.inf)
    return tuple(scored), tuple(thresholds)


def _margins(
    x: torch.Tensor,
    tokens: torch.Tensor,
    params: SamplingParams,
    *,
    stops: torch.Tensor,
    noise_job_id: str,
    first_position: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The margins and stop margins of ``tokens`` (one per row of the float32 CPU rows ``x``),
    as float32; ``stops`` are the sorted stop ids within the vocabulary.

    Bit for bit the per-row definition of the module docstring; tests/miner/test_scorer.py
    checks it against a row-at-a-time reference.
    """
    column = tokens[:, None]
    if params.temperature == 0:
        peak = x.amax(dim=1)
        # Which of +0 and -0 a maximum of zeros is depends on the reduction's order; a row's own
        # max(), as the definition takes it, settles it.
        for row in (peak == 0).nonzero()[:, 0].tolist():
            peak[row] = x[row].max()
        gaps = peak - x.gather(1, column)[:, 0]
        if stops.numel() == 0:
            return gaps, torch.full_like(gaps, -math.inf)
        return gaps, _stop_margins(gaps, best=peak, best_stop=x[:, stops].amax(dim=1))
    z = x / torch.full_like(x, params.temperature)
    core, in_edge = _core_and_claimed_edge(z, tokens, top_k=params.top_k, top_p=params.top_p)
    margins = torch.full((x.shape[0],), math.inf, dtype=torch.float32)
    stop_margins = torch.full((x.shape[0],), -math.inf, dtype=torch.float32)
    # A row whose claimed token is outside the edge has an infinite margin without any noise,
    # but its stop margin still needs the core's scores when a stop token is in the core.
    if core is None:
        has_stop = torch.full_like(in_edge, stops.numel() > 0)
    else:
        has_stop = core[:, stops].any(dim=1)
    rows = (in_edge | has_stop).nonzero()[:, 0]
    if rows.numel() == 0:
        return margins, stop_margins
    key = sampler.noise_key(seed=params.seed, job_id=noise_job_id)
    positions = [first_position + row for row in rows.tolist()]
    if core is None:  # no truncation: every token is core, every row needs all its noise
        noise = _noise_at(key, positions=positions, tokens=None, vocab_size=x.shape[1])
        scores = z[rows] + noise.view(len(positions), -1)
        best = scores.amax(dim=1)
        claimed = scores.gather(1, column[rows])[:, 0]
        best_stop = scores[:, stops].amax(dim=1) if stops.numel() else None
    else:
        # Only the core tokens and the claimed one can change the margins (the stop tokens
        # that count are core tokens), so only they get noise: a few dozen of the vocabulary
        # under typical top-k / top-p.
        wanted = core[rows].scatter(1, column[rows], True)
        at_row, at_token = wanted.nonzero(as_tuple=True)
        ends = torch.cumsum(wanted.sum(dim=1), dim=0)[:-1]
        noise = _noise_at(
            key,
            positions=positions,
            tokens=np.split(at_token.numpy(), ends.numpy()),
            vocab_size=x.shape[1],
        )
        scores = z[rows[at_row], at_token] + noise
        in_core = core[rows[at_row], at_token]
        best = _row_max(scores, at_row, in_core, rows=len(positions))
        claimed = scores[at_token == tokens[rows[at_row]]]
        best_stop = None
        if stops.numel():
            is_stop = torch.isin(at_token, stops)
            best_stop = _row_max(scores, at_row, in_core & is_stop, rows=len(positions))
    behind = best - claimed
    # max(0, behind) as Python's max(0.0, behind) has it: NaN (-inf behind -inf) becomes 0.
    behind = torch.where(behind > 0, behind, torch.zeros_like(behind))
    margins[rows] = torch.where(in_edge[rows], behind, margins[rows])
    if best_stop is not None:
        found = _stop_margins(margins[rows], best=best, best_stop=best_stop)
        stop_margins[rows] = torch.where(has_stop[rows], found, stop_margins[rows])
    return margins, stop_margins


def _row_max(
    scores: torch.Tensor, at_row: torch.Tensor, keep: torch.Tensor, *, rows: int
) -> torch.Tensor:
    """Per row, the largest of the ``scores`` (flattened, row ``at_row``) where ``keep`` holds;
    -inf for a row with none."""
    return torch.full((rows,), -math.inf, dtype=torch.float32).scatter_reduce(
        0, at_row, scores.masked_fill(~keep, -math.inf), reduce="amax"
    )


def _stop_margins(
    margins: torch.Tensor, *, best: torch.Tensor, best_stop: torch.Tensor
) -> torch.Tensor:
    """The margin where the best stop token is the pick (ties included), else how far it is
    behind the pick (negative); rows with a stop token to pick only."""
    return torch.where(best_stop >= best, margins, best_stop - best)


def _noise_at(
    key: tuple[int, int],
    *,
    positions: Sequence[int],
    tokens: Sequence[npt.NDArray[np.int64]] | None,
    vocab_size: int,
) -> torch.Tensor:
    """The sampler's Gumbel noise (``miner.sampler.gumbel_noise``, rounded to float32) at the
    sorted ids ``tokens[i]`` (every id when None) of position ``positions[i]``, concatenated.

    Word ``r_t`` of a position's Philox stream does not depend on how many words are drawn, and
    steps 4 and 5 of the definition are element-wise numpy ufuncs on contiguous float64 arrays
    (the same loop, lane for lane, whatever the length), so computing them on the wanted words
    only gives the same bits; the logarithms are most of the noise's cost.
    """
    generator = np.random.Philox(key=np.array(key, dtype=np.uint64))
    # Setting the counter of one generator is several times cheaper than making one per
    # position; the state of a fresh generator has an empty output buffer, as the sampler's has.
    state = generator.state
    raw = []
    for index, position in enumerate(positions):
        state["state"]["counter"] = np.array([0, position, 0, 0], dtype=np.uint64)
        generator.state = state
        if tokens is None:
            raw.append(generator.random_raw(vocab_size))
        else:
            raw.append(generator.random_raw(int(tokens[index][-1]) + 1)[tokens[index]])
    words = np.concatenate(raw)
    uniform = ((words >> np.uint64(_MANTISSA_SHIFT)).astype(np.float64) + 0.5) * _MANTISSA_SCALE
    noise = -np.log(-np.log(uniform))
    return torch.from_numpy(noise.astype(np.float32))


def _core_and_claimed_edge(
    z: torch.Tensor, tokens: torch.Tensor, *, top_k: int, top_p: float
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The core mask of every row of ``z`` ([rows, vocab]; None: every token) and whether each
    row's claimed token is in its edge set (see the module docstring).

    Written out per row, the definition sorts ``-z`` (``ascending``), finds for each sorted
    token how many tokens are more than ``TOLERANCE`` ahead (``strictly``) or at most
    ``TOLERANCE`` behind (``loosely``), and keeps it in the core when ``loosely - 1 < top_k``
    and ``mass[loosely] - probs < top_p - P_TOLERANCE``, in the edge when ``strictly < top_k``
    and ``mass[strictly] < top_p + P_TOLERANCE`` (``probs`` the softmax of the sorted top-k set,
    ``mass`` its running sum from 0). A token's masks depend only on its value, which is what
    lets this skip the argsort and most of the searches:

    - top-k alone: ``strictly < k`` iff ``ascending[k-1] >= v - TOLERANCE`` and
      ``loosely - 1 < k`` iff ``ascending[k] > v + TOLERANCE``, so ``topk`` gives both masks;
    - top-p: the sorted values (for the softmax), one search for the claimed token's edge, and
      searches for the sorted tokens that can be core at all (``mass[j + 1] - probs[j] <
      top_p - P_TOLERANCE``, since ``loosely >= j + 1`` and ``mass`` never decreases).
    """
    rows, vocab = z.shape
    use_top_k = 0 < top_k < vocab
    if not use_top_k and top_p >= 1.0:
        return None, torch.ones(rows, dtype=torch.bool)
    claimed = -z.gather(1, tokens[:, None]).double()
    if top_p >= 1.0:
        ends = -torch.topk(z, top_k + 1, dim=1).values[:, top_k - 1 :].double()
        core = -z.double() + TOLERANCE < ends[:, 1:]
        return core, (claimed - TOLERANCE <= ends[:, :1])[:, 0]
    # Sorting float32 and widening gives the sorted doubles: widening keeps the order.
    ascending = torch.from_numpy(np.sort((-z).numpy(), axis=1)).double()
    scaled = -ascending
    if use_top_k:
        tail = scaled[:, top_k:]  # the top-k set is a prefix of the sorted tokens
        tail.masked_fill_(ascending[:, top_k:] > ascending[:, top_k - 1 : top_k], -math.inf)
    probs = torch.softmax(scaled, dim=-1)
    cumulative = torch.cumsum(probs, dim=-1)  # mass[j] is cumulative[j - 1], mass[0] is 0
    strictly = torch.searchsorted(ascending, claimed - TOLERANCE, side="left")
    in_edge = _mass(cumulative, strictly) < top_p + P_TOLERANCE
    if use_top_k:
        in_edge &= strictly < top_k
    low = top_p - P_TOLERANCE
    possible = cumulative - probs < low
    if use_top_k:
        possible[:, top_k:] = False
    found = possible.any(dim=0).nonzero()
    width = int(found[-1]) + 1 if found.numel() else 0
    head = ascending[:, :width]
    loosely = torch.searchsorted(ascending, head + TOLERANCE, side="right")
    core_head = _mass(cumulative, loosely) - probs[:, :width] < low
    if use_top_k:
        core_head &= loosely - 1 < top_k
    return _spread(core_head, ascending, z), in_edge[:, 0]


def _mass(cumulative: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The probability mass of the first ``counts`` sorted tokens of each row."""
    before = cumulative.gather(1, (counts - 1).clamp(min=0))
    return before.masked_fill(counts == 0, 0.0)


def _spread(core_head: torch.Tensor, ascending: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The core mask in vocabulary order, from its first sorted columns (the rest are not core).

    A row whose core is a prefix of length ``c`` of the sorted tokens is every token whose value
    is at most ``ascending[c - 1]`` (tokens of equal value share their masks, so no tie
    straddles the cut). That holds unless rounding made the softmax increase somewhere; such a
    row looks each token's value up in the sorted head instead.
    """
    width = core_head.shape[1]
    counts = core_head.sum(dim=1)
    prefix = torch.arange(width)[None, :] < counts[:, None]
    # -ascending[c - 1] is some token's z, so the float32 comparison is exact.
    last = -ascending.gather(1, (counts - 1).clamp(min=0)[:, None]).float()
    core = (z >= last) & (counts > 0)[:, None]
    for row in (core_head != prefix).any(dim=1).nonzero()[:, 0].tolist():
        core[row] = _look_up(core_head[row], ascending[row, :width], -z[row].double())
    return core


def _look_up(head_mask: torch.Tensor, head: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``head_mask`` at the first position of each value in the sorted ``head``; False for a
    value beyond it."""
    if head.numel() == 0:
        return torch.zeros(values.shape, dtype=torch.bool)
    at = torch.searchsorted(head, values, side="left").clamp(max=head.numel() - 1)
    return head_mask[at] & (head[at] == values)
