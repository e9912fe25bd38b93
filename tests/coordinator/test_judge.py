"""The spot-check judge: every rule fails what it should and passes what it should."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import pytest

from coordinator.verification.judge import (
    DLOGPROB_CAP,
    Claim,
    PooledStats,
    Scores,
    Thresholds,
    Verdict,
    judge_job,
    structure_problems,
)

STOP = 99
VOCAB = 100
# Explicit values, so the tests do not move when the calibrated defaults do.
RULES = Thresholds(
    margin_limit=1.0,
    max_disagreeing_fraction=0.005,
    disagreeing_allowance=1.0,
    max_mean_abs_dlogprob=0.02,
    dlogprob_allowance=0.1,
    stop_token_must_agree=True,
    stop_margin_limit=0.5,
    pooled_min_tokens=100,
    pooled_max_mean_abs_dlogprob=0.01,
    pooled_max_disagreeing_fraction=0.01,
)


def make_claim(n: int = 10, *, stop: bool = False, **changes: object) -> Claim:
    """An honest claim of ``n`` tokens: ending in the stop token, or exactly max_tokens long."""
    tokens = tuple(i % 50 for i in range(n - 1)) + ((STOP,) if stop else (7,))
    claim = Claim(
        prompt_token_ids=(1, 2, 3),
        token_ids=tokens,
        logprobs=(-0.5,) * n,
        finish_reason="stop" if stop else "length",
        max_tokens=n + 5 if stop else n,
        stop_token_ids=frozenset({STOP}),
        vocab_size=VOCAB,
        context_length=1000,
    )
    return dataclasses.replace(claim, **changes)  # type: ignore[arg-type]


def agreeing(claim: Claim, *, dlogprob: float = 0.0) -> Scores:
    """Scores of a scorer that agrees with every token, off by ``dlogprob`` each."""
    return Scores(
        logprobs=tuple(lp - dlogprob for lp in claim.logprobs),
        margins=(0.0,) * len(claim.token_ids),
    )


def with_margins(claim: Claim, margins: dict[int, float]) -> Scores:
    values = [margins.get(i, 0.0) for i in range(len(claim.token_ids))]
    return dataclasses.replace(agreeing(claim), margins=tuple(values))


def with_stop_margins(claim: Claim, stop_margins: dict[int, float]) -> Scores:
    """An agreeing scorer's scores, with these stop margins (elsewhere no stop token close:
    -3) and, as a scorer reports them, the same positive values as margins."""
    values = [stop_margins.get(i, -3.0) for i in range(len(claim.token_ids))]
    margins = {i: value for i, value in stop_margins.items() if value > 0}
    return dataclasses.replace(with_margins(claim, margins), stop_margins=tuple(values))


# --- structure -------------------------------------------------------------------------------


@pytest.mark.parametrize("stop", [False, True])
def test_honest_structure_has_no_problems(stop: bool) -> None:
    claim = make_claim(12, stop=stop)
    assert structure_problems(claim) == []
    verdict = judge_job(claim, agreeing(claim), RULES)
    assert verdict == Verdict(
        passed=True, reasons=(), tokens=12, disagreeing=0, sum_abs_dlogprob=0.0
    )


def _bad_claims() -> dict[str, Claim]:
    base = make_claim(10)
    stopped = make_claim(10, stop=True)
    return {
        "too many tokens": dataclasses.replace(base, max_tokens=9),
        "past the context": dataclasses.replace(base, context_length=12),
        "empty prompt": dataclasses.replace(base, prompt_token_ids=()),
        "id too large": dataclasses.replace(base, token_ids=(*base.token_ids[:-1], VOCAB)),
        "negative id": dataclasses.replace(base, token_ids=(-1, *base.token_ids[1:])),
        "stop token early": dataclasses.replace(base, token_ids=(STOP, *base.token_ids[1:])),
        "stop without stop token": dataclasses.replace(base, finish_reason="stop"),
        "length after a stop token": dataclasses.replace(
            stopped, finish_reason="length", max_tokens=10
        ),
        "length short of max_tokens": dataclasses.replace(base, max_tokens=11),
        "unknown finish reason": dataclasses.replace(base, finish_reason="done"),
        "too few logprobs": dataclasses.replace(base, logprobs=base.logprobs[:-1]),
        "too many logprobs": dataclasses.replace(base, logprobs=(*base.logprobs, -1.0)),
        "NaN logprob": dataclasses.replace(base, logprobs=(math.nan, *base.logprobs[1:])),
        "inf logprob": dataclasses.replace(base, logprobs=(math.inf, *base.logprobs[1:])),
        "-inf logprob": dataclasses.replace(base, logprobs=(-math.inf, *base.logprobs[1:])),
        "positive logprob": dataclasses.replace(base, logprobs=(0.01, *base.logprobs[1:])),
    }


@pytest.mark.parametrize("case", sorted(_bad_claims()))
def test_each_structure_problem_fails_the_job(case: str) -> None:
    claim = _bad_claims()[case]
    problems = structure_problems(claim)
    assert len(problems) == 1, problems
    n = len(claim.token_ids)
    scores = Scores(logprobs=(-0.5,) * n, margins=(0.0,) * n)
    verdict = judge_job(claim, scores, RULES)
    assert not verdict.passed
    assert problems[0] in verdict.reasons


def test_length_is_fine_when_the_context_is_full() -> None:
    claim = make_claim(10, max_tokens=50)
    assert structure_problems(claim) != []
    assert structure_problems(dataclasses.replace(claim, context_length=13)) == []


def test_cancelled_may_stop_anywhere_and_even_after_a_stop_token() -> None:
    assert structure_problems(make_claim(10, finish_reason="cancelled", max_tokens=40)) == []
    assert structure_problems(make_claim(10, stop=True, finish_reason="cancelled")) == []
    empty = make_claim(1, finish_reason="cancelled", token_ids=(), logprobs=())
    assert structure_problems(empty) == []
    assert judge_job(empty, Scores((), ()), RULES).passed


def test_zero_logprob_is_allowed() -> None:
    claim = make_claim(5, logprobs=(0.0,) * 5)
    assert structure_problems(claim) == []


# --- scores that do not fit -------------------------------------------------------------------


@pytest.mark.parametrize("field", ["logprobs", "margins", "stop_margins"])
@pytest.mark.parametrize("delta", [-1, 1])
def test_scores_of_the_wrong_length_fail_without_statistics(field: str, delta: int) -> None:
    claim = make_claim(10)
    scores = with_stop_margins(claim, {})
    values = getattr(scores, field)
    values = values[:delta] if delta < 0 else (*values, 0.0)
    verdict = judge_job(claim, dataclasses.replace(scores, **{field: values}), RULES)
    assert not verdict.passed
    assert "the scorer returned" in " ".join(verdict.reasons)
    assert verdict.tokens == 0


@pytest.mark.parametrize("field", ["logprobs", "margins", "stop_margins"])
def test_nan_scores_fail_the_job(field: str) -> None:
    claim = make_claim(10)
    scores = with_stop_margins(claim, {})
    values = (math.nan, *getattr(scores, field)[1:])
    verdict = judge_job(claim, dataclasses.replace(scores, **{field: values}), RULES)
    assert not verdict.passed
    assert verdict.tokens == 0
    assert any("NaN" in reason for reason in verdict.reasons)


# --- margins ---------------------------------------------------------------------------------


@pytest.mark.parametrize("allowance", [0.0, 1.0, 2.0])
@pytest.mark.parametrize("n", [10, 100, 200, 600])
def test_disagreeing_tokens_are_allowed_up_to_an_allowance_plus_a_fraction(
    n: int, allowance: float
) -> None:
    rules = dataclasses.replace(RULES, disagreeing_allowance=allowance)
    claim = make_claim(n)
    allowed = allowance + rules.max_disagreeing_fraction * n
    most = math.floor(allowed)
    ok = judge_job(claim, with_margins(claim, {i: 5.0 for i in range(most)}), rules)
    assert ok.passed, ok.reasons
    assert ok.disagreeing == most
    bad = judge_job(claim, with_margins(claim, {i: 5.0 for i in range(most + 1)}), rules)
    assert not bad.passed
    assert bad.disagreeing == most + 1
    assert "disagree" in bad.reasons[0]


def test_a_margin_counts_only_above_the_limit_and_inf_counts() -> None:
    claim = make_claim(100)
    limit = RULES.margin_limit
    at_limit = judge_job(claim, with_margins(claim, {0: limit, 1: limit, 2: limit}), RULES)
    assert at_limit.passed and at_limit.disagreeing == 0
    above = judge_job(claim, with_margins(claim, {0: math.inf, 1: limit * 1.01}), RULES)
    assert above.disagreeing == 2 and not above.passed


def test_a_disagreeing_final_stop_token_fails_alone() -> None:
    claim = make_claim(100, stop=True)
    forged = with_margins(claim, {99: 3.0})
    verdict = judge_job(claim, forged, RULES)
    assert verdict.disagreeing == 1
    assert not verdict.passed
    assert "final stop token" in verdict.reasons[0]
    lenient = dataclasses.replace(RULES, stop_token_must_agree=False)
    assert judge_job(claim, forged, lenient).passed
    # The same margin on an ordinary last token is forgiven by the "1 +".
    plain = make_claim(100)
    assert judge_job(plain, with_margins(plain, {99: 3.0}), RULES).passed


# --- skipped stops ----------------------------------------------------------------------------


def test_going_on_where_the_sampler_would_have_stopped_fails_alone() -> None:
    claim = make_claim(100)
    skipped = with_stop_margins(claim, {40: 0.8})
    # The margin rule forgives the token (0.8 is within margin_limit, and one disagreeing token
    # would be forgiven anyway), as does a scorer that sends no stop margins (it predates them);
    # the skipped stop alone fails the job.
    without = dataclasses.replace(skipped, stop_margins=())
    assert judge_job(claim, without, RULES).passed
    verdict = judge_job(claim, skipped, RULES)
    assert not verdict.passed
    assert verdict.reasons == (
        "the reference sampler would have stopped at position 40 (stop token ahead by 0.8 > 0.5);"
        " the miner went on",
    )
    assert verdict.disagreeing == 0 and verdict.tokens == 100


def test_a_stop_margin_counts_only_above_the_limit() -> None:
    claim = make_claim(20)
    limit = RULES.stop_margin_limit
    at_limit = with_stop_margins(claim, {3: limit, 4: 0.0, 5: -math.inf})
    assert judge_job(claim, at_limit, RULES).passed
    above = judge_job(claim, with_stop_margins(claim, {3: limit * 1.01}), RULES)
    assert not above.passed and "position 3" in above.reasons[0]
    stricter = dataclasses.replace(RULES, stop_margin_limit=limit / 2)
    assert not judge_job(claim, at_limit, stricter).passed


def test_every_skipped_stop_is_counted_and_the_first_named() -> None:
    claim = make_claim(20)
    verdict = judge_job(claim, with_stop_margins(claim, {2: 3.0, 7: math.inf, 9: 1.5}), RULES)
    assert not verdict.passed
    skipped = [r for r in verdict.reasons if "would have stopped" in r]
    assert skipped == [
        "the reference sampler would have stopped at position 2 (stop token ahead by 3 > 0.5);"
        " the miner went on (3 positions like it)"
    ]


@pytest.mark.parametrize("finish_reason", ["length", "cancelled"])
def test_the_last_token_counts_unless_it_is_a_stop_token(finish_reason: str) -> None:
    claim = make_claim(10, finish_reason=finish_reason)
    verdict = judge_job(claim, with_stop_margins(claim, {9: 0.7}), RULES)
    assert not verdict.passed and "position 9" in verdict.reasons[0]
    # A final stop token with a positive stop margin stopped too (on another stop token, or on
    # the same one by a disagreeing margin, which is the stop-token rule's business).
    stopped = make_claim(10, stop=True)
    other_stop = with_stop_margins(stopped, {9: 0.7})
    assert judge_job(stopped, other_stop, RULES).passed


# --- log-probabilities -----------------------------------------------------------------------


def test_mean_abs_dlogprob_has_an_allowance_plus_a_rate() -> None:
    n = 50
    claim = make_claim(n)
    limit = RULES.dlogprob_allowance + RULES.max_mean_abs_dlogprob * n
    under = judge_job(claim, agreeing(claim, dlogprob=0.99 * limit / n), RULES)
    assert under.passed, under.reasons
    assert under.sum_abs_dlogprob == pytest.approx(0.99 * limit)
    # Either sign counts: the miner claiming too high or too low.
    for sign in (1, -1):
        over = judge_job(claim, agreeing(claim, dlogprob=sign * 1.01 * limit / n), RULES)
        assert not over.passed
        assert "off by" in over.reasons[0]


def test_one_token_off_by_a_lot_is_capped_and_fails() -> None:
    claim = make_claim(10)
    scores = dataclasses.replace(
        agreeing(claim), logprobs=(-math.inf, *agreeing(claim).logprobs[1:])
    )
    verdict = judge_job(claim, scores, RULES)
    assert not verdict.passed
    assert verdict.sum_abs_dlogprob == DLOGPROB_CAP


# --- pooled statistics -----------------------------------------------------------------------


def _verdict(tokens: int, *, disagreeing: int = 0, mean: float = 0.0) -> Verdict:
    return Verdict(
        passed=True,
        reasons=(),
        tokens=tokens,
        disagreeing=disagreeing,
        sum_abs_dlogprob=mean * tokens,
    )


def test_pool_gives_no_verdict_until_enough_tokens() -> None:
    pool = PooledStats()
    assert pool.verdict(RULES) is None
    pool.add(_verdict(RULES.pooled_min_tokens - 1, mean=1.0))
    assert pool.verdict(RULES) is None
    pool.add(_verdict(1, mean=1.0))
    verdict = pool.verdict(RULES)
    assert verdict is not None and not verdict.passed
    assert (pool.jobs, pool.tokens) == (2, RULES.pooled_min_tokens)


def test_pool_fails_on_its_mean_abs_dlogprob() -> None:
    limit = RULES.pooled_max_mean_abs_dlogprob
    under, over = PooledStats(), PooledStats()
    for _ in range(4):
        under.add(_verdict(50, mean=0.99 * limit))
        over.add(_verdict(50, mean=1.01 * limit))
    ok, bad = under.verdict(RULES), over.verdict(RULES)
    assert ok is not None and ok.passed
    assert bad is not None and not bad.passed
    assert "off by" in bad.reasons[0]
    assert bad.sum_abs_dlogprob == pytest.approx(200 * 1.01 * limit)


def test_pool_fails_on_its_disagreeing_fraction() -> None:
    tokens = 1000
    allowed = int(RULES.pooled_max_disagreeing_fraction * tokens)
    ok, bad = PooledStats(), PooledStats()
    ok.add(_verdict(tokens, disagreeing=allowed))
    bad.add(_verdict(tokens, disagreeing=allowed + 1))
    ok_verdict, bad_verdict = ok.verdict(RULES), bad.verdict(RULES)
    assert ok_verdict is not None and ok_verdict.passed
    assert bad_verdict is not None and not bad_verdict.passed
    assert bad_verdict.disagreeing == allowed + 1
    assert "disagree" in bad_verdict.reasons[0]


def test_pool_adds_job_verdicts_and_unscored_jobs_add_no_tokens() -> None:
    claim = make_claim(30)
    pool = PooledStats()
    pool.add(judge_job(claim, with_margins(claim, {0: 2.0}), RULES))
    pool.add(judge_job(claim, Scores((), ()), RULES))
    pool.add(judge_job(claim, agreeing(claim, dlogprob=0.01), RULES))
    assert (pool.jobs, pool.tokens, pool.disagreeing) == (3, 60, 1)
    assert pool.sum_abs_dlogprob == pytest.approx(0.3)


# --- configuration and dependencies ------------------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [
        {"margin_limit": -1.0},
        {"stop_margin_limit": -0.5},
        {"stop_margin_limit": math.inf},
        {"max_disagreeing_fraction": math.nan},
        {"max_mean_abs_dlogprob": math.inf},
        {"pooled_min_tokens": 0},
    ],
)
def test_thresholds_refuse_nonsense(change: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Thresholds(**change)  # type: ignore[arg-type]


def test_defaults_pass_an_honest_job_and_fail_a_substituted_one() -> None:
    claim = make_claim(100)
    assert judge_job(claim, agreeing(claim), Thresholds()).passed
    assert judge_job(claim, with_stop_margins(claim, {}), Thresholds()).passed
    substituted = {i: 10 * Thresholds().margin_limit for i in range(0, 100, 10)}
    assert not judge_job(claim, with_margins(claim, substituted), Thresholds()).passed


def test_defaults_fail_a_skipped_stop_that_the_margin_rule_forgives() -> None:
    defaults = Thresholds()
    # Above the largest honest margin measured (0.295), below margin_limit.
    assert 0.295 < defaults.stop_margin_limit < defaults.margin_limit
    claim = make_claim(300)  # long enough for the disagreeing allowance to forgive one token
    skipped = {150: defaults.margin_limit * 1.5}
    assert judge_job(claim, with_margins(claim, skipped), defaults).passed
    assert not judge_job(claim, with_stop_margins(claim, skipped), defaults).passed


def test_the_judge_imports_no_torch() -> None:
    probe = (
        "import sys, coordinator.verification.judge\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'miner'}))"
    )
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=root, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def _with_alternatives(n: int = 10) -> tuple[Claim, Scores]:
    """An honest claim whose tokens each report 3 alternatives, and a scorer that agrees."""
    tops = tuple(((i % 50, -0.5), (60, -1.5), (61, -2.0)) for i in range(n))
    claim = make_claim(n, top_logprobs=tops)
    scores = dataclasses.replace(
        agreeing(claim),
        top_logprobs=tuple((-0.5, -1.5, -2.0) for _ in range(n)),
        top_thresholds=(-2.0,) * n,
    )
    return claim, scores


def test_honest_alternatives_pass_even_a_little_off() -> None:
    claim, scores = _with_alternatives()
    assert judge_job(claim, scores, RULES).passed
    nudged = dataclasses.replace(
        scores,
        top_logprobs=tuple(tuple(v - 0.01 for v in row) for row in scores.top_logprobs),
        top_thresholds=tuple(t - 0.3 for t in scores.top_thresholds),
    )
    assert judge_job(claim, nudged, RULES).passed


def test_a_made_up_alternative_is_not_a_top_token() -> None:
    claim, scores = _with_alternatives()
    # Position 4's third alternative is in truth far less likely than the scorer's third best.
    rows = list(scores.top_logprobs)
    rows[4] = (-0.5, -1.5, -9.0)
    faked = dataclasses.replace(scores, top_logprobs=tuple(rows))
    verdict = judge_job(claim, faked, RULES)
    assert not verdict.passed
    assert any(
        "claimed alternative 61 at position 4 is not a top token" in r for r in verdict.reasons
    )


def test_alternatives_off_on_average_fail() -> None:
    claim, scores = _with_alternatives()
    # Still the top tokens, but every claimed value 0.3 too high (inflated alternatives).
    off = dataclasses.replace(
        scores,
        top_logprobs=tuple(tuple(v - 0.3 for v in row) for row in scores.top_logprobs),
        top_thresholds=tuple(t - 0.3 for t in scores.top_thresholds),
    )
    verdict = judge_job(claim, off, RULES)
    assert not verdict.passed
    assert any("top_logprobs are off by 0.3000 per alternative" in r for r in verdict.reasons)


def test_unchecked_or_misshapen_scorer_alternatives_do_not_blame_the_miner() -> None:
    claim, scores = _with_alternatives()
    unchecked = dataclasses.replace(scores, top_logprobs=(), top_thresholds=())
    assert judge_job(claim, unchecked, RULES).passed
    short = dataclasses.replace(scores, top_logprobs=scores.top_logprobs[:-1])
    assert judge_job(claim, short, RULES).passed
    # A claim without one entry per token is the miner's own structure problem.
    broken = dataclasses.replace(claim, top_logprobs=claim.top_logprobs[:-1])
    assert not judge_job(broken, scores, RULES).passed
