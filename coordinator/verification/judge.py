"""The judge of a spot check: does a scorer's view of a job agree with what its miner claimed?

Pure Python (no torch), so the coordinator can run it anywhere. The inputs are the checked
miner's :class:`Claim` (prompt, tokens, claimed log-probabilities, finish reason and the job's
limits) and a scorer's :class:`Scores` (``miner.scorer``: per-token log-probabilities, margins
and stop margins under the reference sampler, from one teacher-forced pass). A job fails when

- its **structure** is wrong (:func:`structure_problems`): more tokens than allowed, a stop
  token anywhere but last, a finish reason the tokens do not bear out, ids outside the
  vocabulary, or claimed log-probabilities that are missing, non-finite or positive;
- the scores do not fit the claim (wrong length) or hold NaN;
- more than ``disagreeing_allowance + max_disagreeing_fraction * n`` of its ``n`` tokens
  **disagree** (margin above ``margin_limit``: the scorer's reference sampler would have picked
  another token). The allowance forgives honest near-ties, e.g. a token at the edge of the
  top-k or top-p set that another dtype keeps and the scorer drops;
- its claimed **stop token disagrees** (a truncation with a forged end: one token, which the
  allowance would otherwise forgive);
- it **skipped a stop**: at some position whose claimed token is not a stop token, the reference
  sampler's pick is a stop token ahead of the claimed token by more than ``stop_margin_limit``
  (the stop margin). Going on past the end pads the output and bills tokens nobody asked for,
  so that one disagreement fails the job whatever the margin rules forgive: the miner's token
  there is usually the best other token, whose margin is the gap between the two best noisy
  scores, mostly below ``margin_limit``. Scores without stop margins (a scorer that predates
  them) leave this rule out;
- its claimed log-probabilities are **off** on average: ``sum |claimed - scored|`` above
  ``dlogprob_allowance + max_mean_abs_dlogprob * n``;
- its claimed top_logprobs **alternatives** are not top tokens or are off on average
  (:func:`_alternative_problems`).

Subtle cheats (quantized or perturbed weights, rare substitutions) pass most single jobs, so
:class:`PooledStats` adds up a miner's checked jobs (per scorer) and judges the totals once they
cover ``pooled_min_tokens`` tokens.

The defaults of :class:`Thresholds` are calibrated by ``bench/verification.py`` on the demo
model (docs/benchmarks.md, "Verification"). ``miner.scorer``'s margins tolerate the edge of the
top-k / top-p set (a token another dtype keeps and the scorer drops by a hair is not a
disagreement), so honest margins stay below 0.06 on every honest variant measured while
``margin_limit`` is 1.0: no disagreeing token is forgiven (``disagreeing_allowance=0``), which
catches single substitutions. Thresholds are per model: a random model's large logits need
looser log-probability and margin rules (benchmarks.md gives the tiny test model's values).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

logger = logging.getLogger(__name__)

FINISH_REASONS = frozenset({"stop", "length", "cancelled"})
# One token's |claimed - scored| counts at most this much: a token the scorer finds impossible
# (-inf) would otherwise make a miner's pooled sum infinite, which JSON cannot store.
DLOGPROB_CAP = 50.0


@dataclass(frozen=True)
class Thresholds:
    """When a checked job, or a miner's pooled record, fails. One per model in the catalog."""

    # A token disagrees when its margin exceeds this (margins are in units of the scaled
    # logits; honest devices and dtypes stay far below it, a substituted token is far above).
    margin_limit: float = 1.0
    # A job fails with more than disagreeing_allowance + this * n disagreeing tokens out of n ...
    max_disagreeing_fraction: float = 0.005
    # ... where this allowance can forgive near-ties (the design's "1 +"); 0 by default, since
    # miner.scorer's margins already tolerate the top-k / top-p edge.
    disagreeing_allowance: float = 0.0
    # A job fails when sum |claimed - scored| log-prob exceeds allowance + this * n ... (0.08:
    # an honest bf16 miner of SmolLM2-135M, 30 blocks, reached 0.049 a token on a job; the
    # subtle model cheats there stay above 0.11, see docs/verification.md)
    max_mean_abs_dlogprob: float = 0.08
    # ... where this allowance keeps short honest jobs from failing on one noisy token.
    dlogprob_allowance: float = 0.1
    # A claimed final stop token whose margin exceeds margin_limit fails the job by itself.
    stop_token_must_agree: bool = True
    # A claimed non-stop token whose stop margin exceeds this (the reference sampler would have
    # stopped there, by this much) fails the job by itself. A stop margin is a margin, so an
    # honest miner's stays below its largest margin (0.295 on SmolLM2-135M in bf16, 0.051 on
    # the demo model); a skipped stop is caught when the sampler preferred stopping by more than
    # this (docs/verification.md gives the measured rates).
    stop_margin_limit: float = 0.5
    # A claimed top_logprobs alternative whose logprob at the scorer is below the scorer's k-th
    # largest by more than this is not a top token (_alternative_problems below).
    top_logprob_tolerance: float = 1.0
    # Pooled per-miner statistics give a verdict once they cover this many tokens.
    pooled_min_tokens: int = 300
    # A pool fails when its mean |claimed - scored| log-prob exceeds this (honest bf16 SmolLM2
    # pools reached 0.043; 5% weight noise pools 0.2 and more) ...
    pooled_max_mean_abs_dlogprob: float = 0.07
    # ... or when more than this fraction of its tokens disagree.
    pooled_max_disagreeing_fraction: float = 0.002

    def __post_init__(self) -> None:
        for name in (
            "margin_limit",
            "stop_margin_limit",
            "top_logprob_tolerance",
            "max_disagreeing_fraction",
            "disagreeing_allowance",
            "max_mean_abs_dlogprob",
            "dlogprob_allowance",
            "pooled_max_mean_abs_dlogprob",
            "pooled_max_disagreeing_fraction",
        ):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be finite and >= 0, got {value}")
        if self.pooled_min_tokens < 1:
            raise ValueError(f"pooled_min_tokens must be >= 1, got {self.pooled_min_tokens}")


@dataclass(frozen=True)
class Claim:
    """What the checked miner delivered, with the limits of its job."""

    prompt_token_ids: tuple[int, ...]  # the job's prompt (tokenized by the coordinator)
    token_ids: tuple[int, ...]  # the completion the miner claims it sampled
    logprobs: tuple[float, ...]  # claimed, one per token
    finish_reason: str  # "stop", "length" or "cancelled"
    max_tokens: int  # the job's limit on generated tokens
    stop_token_ids: frozenset[int]  # tokens that end generation
    vocab_size: int  # valid token ids are [0, vocab_size)
    context_length: int  # the model's context: prompt plus completion
    # Claimed alternatives per token, (id, logprob) most likely first; empty when not asked.
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...] = ()


@dataclass(frozen=True)
class Scores:
    """What a scorer returned for the claimed tokens (``miner.scorer.score_rows``)."""

    logprobs: tuple[float, ...]  # the scorer's fp32 log-probability of each claimed token
    margins: tuple[float, ...]  # 0 = the scorer picks the same token; inf = truncated away
    # > 0: the scorer's pick is a stop token this far ahead of the claimed token; <= 0: no stop
    # skipped there. Empty: the scorer did not send them (it predates them): unknown.
    stop_margins: tuple[float, ...] = ()
    # The scorer's logprobs of the claimed alternatives (one entry per token, same order) and
    # its k-th largest logprob per token; empty: not checked.
    top_logprobs: tuple[tuple[float, ...], ...] = ()
    top_thresholds: tuple[float, ...] = ()


@dataclass(frozen=True)
class Verdict:
    """The judgement of one job (or of a miner's pool)."""

    passed: bool  # no rule failed
    reasons: tuple[str, ...]  # human-readable, empty when passed (shown to the miner)
    tokens: int  # tokens the statistics cover (0 when the scores could not be used)
    disagreeing: int  # tokens with margin > margin_limit
    sum_abs_dlogprob: float  # sum over tokens of |claimed - scored| (each capped)


def structure_problems(claim: Claim) -> list[str]:
    """What is wrong with the claim on its face, before any scoring; empty when nothing is."""
    problems: list[str] = []
    tokens, n = claim.token_ids, len(claim.token_ids)
    if not claim.prompt_token_ids:
        problems.append("the prompt is empty")
    if n > claim.max_tokens:
        problems.append(f"{n} tokens exceed max_tokens {claim.max_tokens}")
    total = len(claim.prompt_token_ids) + n
    if total > claim.context_length:
        problems.append(
            f"prompt plus completion ({total}) exceed the context {claim.context_length}"
        )
    outside = [t for t in tokens if not 0 <= t < claim.vocab_size]
    if outside:
        problems.append(
            f"{len(outside)} token ids outside the vocabulary [0, {claim.vocab_size}),"
            f" e.g. {outside[0]}"
        )
    early = [i for i, t in enumerate(tokens[:-1]) if t in claim.stop_token_ids]
    if early:
        problems.append(f"a stop token at position {early[0]}, before the end")
    problems.extend(_finish_problems(claim, total))
    if len(claim.logprobs) != n:
        problems.append(f"{len(claim.logprobs)} claimed log-probabilities for {n} tokens")
    bad = [i for i, lp in enumerate(claim.logprobs) if not (math.isfinite(lp) and lp <= 0.0)]
    if bad:
        value = claim.logprobs[bad[0]]
        problems.append(
            f"{len(bad)} claimed log-probabilities are not finite and <= 0,"
            f" e.g. {value!r} at position {bad[0]}"
        )
    return problems


def _finish_problems(claim: Claim, total: int) -> list[str]:
    reason, n = claim.finish_reason, len(claim.token_ids)
    ends_with_stop = n > 0 and claim.token_ids[-1] in claim.stop_token_ids
    if reason not in FINISH_REASONS:
        return [f"unknown finish reason {reason!r}"]
    if reason == "stop" and not ends_with_stop:
        return ["finish reason 'stop' without a stop token at the end"]
    if reason == "length":
        if ends_with_stop:
            return ["finish reason 'length' after a stop token (it should be 'stop')"]
        if n < claim.max_tokens and total < claim.context_length:
            return [
                f"finish reason 'length' after {n} tokens, with max_tokens {claim.max_tokens}"
                " and room left in the context"
            ]
    # "cancelled" is the coordinator's own decision; a stop token may have crossed the cancel
    # in flight, so it may end in one.
    return []


def judge_job(claim: Claim, scores: Scores, thresholds: Thresholds) -> Verdict:
    """Judges one checked job: its structure, then the scorer's margins and log-probabilities."""
    reasons = structure_problems(claim)
    n = len(claim.token_ids)
    stop_margins = scores.stop_margins
    if len(scores.logprobs) != n or len(scores.margins) != n:
        reasons.append(
            f"the scorer returned {len(scores.logprobs)} log-probabilities and"
            f" {len(scores.margins)} margins for {n} tokens"
        )
        return _verdict(reasons, tokens=0, disagreeing=0, sum_abs=0.0)
    if len(stop_margins) not in (0, n):
        reasons.append(f"the scorer returned {len(stop_margins)} stop margins for {n} tokens")
        return _verdict(reasons, tokens=0, disagreeing=0, sum_abs=0.0)
    if any(math.isnan(v) for v in (*scores.logprobs, *scores.margins, *stop_margins)):
        reasons.append("the scorer's log-probabilities or margins hold NaN")
        return _verdict(reasons, tokens=0, disagreeing=0, sum_abs=0.0)

    limit = thresholds.margin_limit
    disagreeing = sum(1 for margin in scores.margins if margin > limit)
    allowed = thresholds.disagreeing_allowance + thresholds.max_disagreeing_fraction * n
    if disagreeing > allowed:
        reasons.append(
            f"{disagreeing} of {n} tokens disagree with the reference sampler (margin > {limit:g});"
            f" at most {allowed:.2f} allowed"
        )
    if (
        thresholds.stop_token_must_agree
        and n > 0
        and claim.token_ids[-1] in claim.stop_token_ids
        and scores.margins[-1] > limit
    ):
        reasons.append(
            f"the final stop token disagrees with the reference sampler"
            f" (margin {scores.margins[-1]:.3g} > {limit:g})"
        )
    reasons.extend(_skipped_stops(claim, stop_margins, thresholds.stop_margin_limit))
    if claim.top_logprobs and len(claim.top_logprobs) != n:
        reasons.append(f"{len(claim.top_logprobs)} top_logprobs entries for {n} tokens")
    elif scores.top_logprobs and (
        [len(values) for values in scores.top_logprobs] != [len(t) for t in claim.top_logprobs]
        or len(scores.top_thresholds) != n
    ):
        # The scorer's fault, not the miner's (scoring.py drops such answers before this).
        logger.warning("the scorer's top_logprobs do not fit the claimed ones; not judged")
    else:
        reasons.extend(
            _alternative_problems(
                claim.top_logprobs,
                scores.top_logprobs,
                scores.top_thresholds,
                tolerance=thresholds.top_logprob_tolerance,
                max_mean_abs_dlogprob=thresholds.max_mean_abs_dlogprob,
                dlogprob_allowance=thresholds.dlogprob_allowance,
            )
        )
    sum_abs = sum(
        _abs_dlogprob(claimed, scored)
        for claimed, scored in zip(claim.logprobs, scores.logprobs, strict=False)
    )
    allowed_sum = thresholds.dlogprob_allowance + thresholds.max_mean_abs_dlogprob * n
    if n > 0 and sum_abs > allowed_sum:
        reasons.append(
            f"claimed log-probabilities are off by {sum_abs / n:.4f} per token on average;"
            f" at most {allowed_sum / n:.4f} allowed for {n} tokens"
        )
    return _verdict(reasons, tokens=n, disagreeing=disagreeing, sum_abs=sum_abs)


def _skipped_stops(claim: Claim, stop_margins: tuple[float, ...], limit: float) -> list[str]:
    """The reason for going on where the reference sampler would have stopped, if it did.

    Every position counts whose claimed token is not a stop token: one before the end, and the
    last one of a job that ended at ``max_tokens`` or was cancelled (a stop token there would
    have ended it with "stop").
    """
    skipped = [
        (position, value)
        for position, (token, value) in enumerate(zip(claim.token_ids, stop_margins, strict=False))
        if value > limit and token not in claim.stop_token_ids
    ]
    if not skipped:
        return []
    position, value = skipped[0]
    more = f" ({len(skipped)} positions like it)" if len(skipped) > 1 else ""
    return [
        f"the reference sampler would have stopped at position {position} (stop token ahead"
        f" by {value:.3g} > {limit:g}); the miner went on{more}"
    ]


def _abs_dlogprob(claimed: float, scored: float) -> float:
    difference = abs(claimed - scored)
    # NaN (a non-finite claim, already a structure problem) counts as the cap, like inf.
    return difference if difference <= DLOGPROB_CAP else DLOGPROB_CAP


def _verdict(reasons: list[str], *, tokens: int, disagreeing: int, sum_abs: float) -> Verdict:
    return Verdict(
        passed=not reasons,
        reasons=tuple(reasons),
        tokens=tokens,
        disagreeing=disagreeing,
        sum_abs_dlogprob=sum_abs,
    )


@dataclass
class PooledStats:
    """Running statistics of one miner's checked jobs (keep one pool per scorer)."""

    jobs: int = 0  # verdicts added
    tokens: int = 0  # tokens they cover
    disagreeing: int = 0  # of which disagreed
    sum_abs_dlogprob: float = 0.0  # sum of |claimed - scored| over those tokens

    def add(self, verdict: Verdict) -> None:
        """Adds one job's verdict (a verdict without usable scores adds a job, no tokens)."""
        self.jobs += 1
        self.tokens += verdict.tokens
        self.disagreeing += verdict.disagreeing
        self.sum_abs_dlogprob += verdict.sum_abs_dlogprob

    def verdict(self, thresholds: Thresholds) -> Verdict | None:
        """The pool's verdict, or None while it covers fewer than ``pooled_min_tokens`` tokens."""
        if self.tokens < thresholds.pooled_min_tokens:
            return None
        reasons: list[str] = []
        mean = self.sum_abs_dlogprob / self.tokens
        if mean > thresholds.pooled_max_mean_abs_dlogprob:
            reasons.append(
                f"over {self.jobs} checked jobs ({self.tokens} tokens) the claimed"
                f" log-probabilities are off by {mean:.4f} per token on average;"
                f" at most {thresholds.pooled_max_mean_abs_dlogprob:.4f} allowed"
            )
        fraction = self.disagreeing / self.tokens
        if fraction > thresholds.pooled_max_disagreeing_fraction:
            reasons.append(
                f"over {self.jobs} checked jobs {self.disagreeing} of {self.tokens} tokens"
                f" ({fraction:.2%}) disagree with the reference sampler;"
                f" at most {thresholds.pooled_max_disagreeing_fraction:.2%} allowed"
            )
        if reasons:
            logger.debug("pooled verdict failed: %s", "; ".join(reasons))
        return _verdict(
            reasons,
            tokens=self.tokens,
            disagreeing=self.disagreeing,
            sum_abs=self.sum_abs_dlogprob,
        )


def _alternative_problems(
    claimed: Sequence[Sequence[tuple[int, float]]],
    scored: Sequence[Sequence[float]],
    thresholds: Sequence[float],
    *,
    tolerance: float,
    max_mean_abs_dlogprob: float,
    dlogprob_allowance: float,
) -> list[str]:
    """Why the claimed top_logprobs alternatives fail, or nothing. The scorer returned its own
    logprobs of the ids the miner named (``miner.scorer.top_logprob_scores``) and its k-th
    largest logprob per position; an alternative more than ``tolerance`` below that is not a
    top token (honest rounding moves logprobs by hundredths, a made-up alternative is usually
    nats below), and their ``|claimed - scored|`` sum has the chosen tokens' allowance. Both
    sides have one entry per token (the caller checked); empty ``scored``: not checked."""
    if not claimed or not scored:
        return []
    problems: list[str] = []
    total, count = 0.0, 0
    outsider: tuple[int, int, float, float] | None = None
    for position, (pairs, values, threshold) in enumerate(
        zip(claimed, scored, thresholds, strict=True)
    ):
        for (token, claimed_logprob), scored_logprob in zip(pairs, values, strict=True):
            total += _abs_dlogprob(claimed_logprob, scored_logprob)
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
