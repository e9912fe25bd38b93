"""Checking the alternatives a miner claimed with its tokens (the buyer's ``top_logprobs``).

For each completion token the miner reported the k most likely tokens and their logprobs. The
scorer (``miner.scorer.top_logprob_scores``) returns its own logprobs of those same ids and its
k-th largest logprob at the position. A job fails when

- the claimed logprobs are **off** on average, by the same rule as the chosen tokens' (sum of
  ``|claimed - scored|`` over every alternative above ``dlogprob_allowance +
  max_mean_abs_dlogprob * count``), or
- a claimed alternative is **not a top token**: its logprob at the scorer is below the scorer's
  k-th largest by more than ``top_logprob_tolerance``. Honest rounding moves logprobs by a few
  hundredths (0.38 at most for bf16 SmolLM2 under batching, docs/verification.md); a made-up
  alternative is usually several nats below.

Pure Python, like the judge that calls it.
"""

from __future__ import annotations

from collections.abc import Sequence

DLOGPROB_CAP = 50.0  # as the judge's: one impossible alternative does not make the sum infinite


def alternative_problems(
    claimed: Sequence[Sequence[tuple[int, float]]],
    scored: Sequence[Sequence[float]],
    thresholds: Sequence[float],
    *,
    tolerance: float,
    max_mean_abs_dlogprob: float,
    dlogprob_allowance: float,
) -> list[str]:
    """Why the claimed alternatives fail, or nothing. Both sides have one entry per token (the
    caller checked); an empty ``scored`` means the scorer did not check them."""
    if not claimed or not scored:
        return []
    problems: list[str] = []
    total, count = 0.0, 0
    outsider: tuple[int, int, float, float] | None = None
    for position, (pairs, values, threshold) in enumerate(
        zip(claimed, scored, thresholds, strict=True)
    ):
        for (token, claimed_logprob), scored_logprob in zip(pairs, values, strict=True):
            difference = abs(claimed_logprob - scored_logprob)
            total += difference if difference <= DLOGPROB_CAP else DLOGPROB_CAP
            count += 1
            if outsider is None and not scored_logprob >= threshold - tolerance:
                outsider = (position, token, scored_logprob, threshold)
    if outsider is not None:
        position, token, value, threshold = outsider
        problems.append(
            f"claimed alternative {token} at position {position} is not a top token"
            f" (logprob {value:.3g} at the scorer, its k-th largest {threshold:.3g})"
        )
    allowed = dlogprob_allowance + max_mean_abs_dlogprob * count
    if count and total > allowed:
        problems.append(
            f"claimed top_logprobs are off by {total / count:.4f} per alternative on average;"
            f" at most {allowed / count:.4f} allowed"
        )
    return problems
