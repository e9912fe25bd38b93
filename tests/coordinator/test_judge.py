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


@pytest.mark.parametrize("field", ["logprobs", "margins"])
@pytest.mark.parametrize("delta", [-1, 1])
def test_scores_of_the_wrong_length_fail_without_statistics(field: str, delta: int) -> None:
    claim = make_claim(10)
    scores = agreeing(claim)
    values = getattr(scores, field)
    values = values[:delta] if delta < 0 else (*values, 0.0)
    verdict = judge_job(claim, dataclasses.replace(scores, **{field: values}), RULES)
    assert not verdict.passed
    assert "the scorer returned" in " ".join(verdict.reasons)
    assert verdict.tokens == 0


@pytest.mark.parametrize("field", ["logprobs", "margins"])
def test_nan_scores_fail_the_job(field: str) -> None:
    claim = make_claim(10)
    scores = agreeing(claim)
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
    substituted = {i: 10 * Thresholds().margin_limit for i in range(0, 100, 10)}
    assert not judge_job(claim, with_margins(claim, substituted), Thresholds()).passed


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
