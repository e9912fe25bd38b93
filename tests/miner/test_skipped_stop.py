"""A miner that goes on past a stop token, padding its output to bill more tokens, on the tiny
test model: ``miner.scorer``'s stop margins and the judge's skipped-stop rule catch it where the
margin and log-probability rules forgive it, and honest jobs that end with a stop token pass.

The padding miner is ``skip-stop`` of tests/e2e/variant_miner.py (:func:`skip_first_stop`): the
reference sampler's tokens, except at the first position where it picks a stop token, where it
takes the best other token. The honest miner is the same loop without the skip. Each job is
scored as a scoring miner scores it (one teacher-forced pass, ``score_rows``) and judged with
the default thresholds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from coordinator.api import ChatMessage
from coordinator.text.tokenization import ModelTokenizer
from coordinator.verification.judge import Claim, Scores, Thresholds, Verdict, judge_job
from miner import scorer
from miner.engine.base import GeneratedToken, GenerationRequest, SamplingParams, TokenScores
from miner.test_model import create_test_model
from tests.e2e.variant_miner import load_reference_model, skip_first_stop

QUESTIONS = ("Say nothing.", "Count with me, then tell a story.", "Bye")
SAMPLING: tuple[dict[str, Any], ...] = (
    {"temperature": 1.0},
    {"temperature": 0.8, "top_k": 40},  # the truncated path of the scorer too
    {"temperature": 1.0, "top_p": 0.95},
)
SEEDS = range(4)
MAX_TOKENS = 24
DEFAULTS = Thresholds()


@dataclass(frozen=True)
class Answer:
    """One miner's answer to one job, as a scorer scored it."""

    tokens: tuple[GeneratedToken, ...]  # what the miner streamed
    scores: TokenScores  # what an honest scorer finds for them

    @property
    def ids(self) -> tuple[int, ...]:
        return tuple(token.token_id for token in self.tokens)


@dataclass(frozen=True)
class Case:
    """One job, answered by the honest miner and by the padding one."""

    request: GenerationRequest  # the job
    honest: Answer  # the reference sampler's answer
    padded: Answer  # skip-stop's answer


@dataclass(frozen=True)
class Market:
    """What the coordinator knows of the model."""

    stops: frozenset[int]  # the tokenizer's stop tokens, as the coordinator sends them
    vocab_size: int  # ids are below this
    context_length: int  # prompt plus completion


@pytest.fixture(scope="module")
def market_and_cases(tmp_path_factory: pytest.TempPathFactory) -> tuple[Market, list[Case]]:
    model_dir = create_test_model(Path(tmp_path_factory.mktemp("tiny")) / "tiny", seed=0)
    tokenizer = ModelTokenizer.from_dir(model_dir)
    model = load_reference_model(model_dir)
    market = Market(
        stops=frozenset(tokenizer.stop_token_ids),
        vocab_size=int(model.config.vocab_size),
        context_length=int(model.config.max_position_embeddings),
    )
    cases: list[Case] = []
    for index, question in enumerate(QUESTIONS):
        prompt = tokenizer.encode_chat([ChatMessage(role="user", content=question)])
        for sampling in SAMPLING:
            for seed in SEEDS:
                params = SamplingParams(
                    max_tokens=MAX_TOKENS,
                    seed=seed,
                    stop_token_ids=tokenizer.stop_token_ids,
                    **sampling,
                )
                request = GenerationRequest(
                    job_id=f"job-{index}-{seed}-{len(cases)}",
                    prompt_token_ids=prompt,
                    sampling=params,
                )
                answers = [_answer(model, request, market, skip=skip) for skip in (False, True)]
                cases.append(Case(request, *answers))
    return market, cases


def _answer(model: Any, request: GenerationRequest, market: Market, *, skip: bool) -> Answer:
    context = market.context_length
    tokens = list(skip_first_stop(model, request, context_length=context, skip=skip))
    ids = [token.token_id for token in tokens]
    with torch.inference_mode():
        logits = scorer.teacher_forced_logits(
            model, request.prompt_token_ids, ids, device=torch.device("cpu")
        )
    scores = scorer.score_rows(logits, ids, request.sampling, noise_job_id=request.job_id)
    return Answer(tuple(tokens), scores)


def _judge(market: Market, case: Case, answer: Answer, *, stop_margins: bool = True) -> Verdict:
    """The judge's verdict on ``answer``; without ``stop_margins`` as from an older scorer."""
    ids = answer.ids
    claim = Claim(
        prompt_token_ids=tuple(case.request.prompt_token_ids),
        token_ids=ids,
        logprobs=tuple(token.logprob for token in answer.tokens),
        finish_reason="stop" if ids[-1] in market.stops else "length",
        max_tokens=MAX_TOKENS,
        stop_token_ids=market.stops,
        vocab_size=market.vocab_size,
        context_length=market.context_length,
    )
    scores = answer.scores
    return judge_job(
        claim,
        Scores(
            logprobs=scores.logprobs,
            margins=scores.margins,
            stop_margins=scores.stop_margins if stop_margins else (),
        ),
        DEFAULTS,
    )


def _skipped_at(case: Case) -> int | None:
    """Where the padding miner left the honest answer, if it did."""
    for position, (honest, padded) in enumerate(
        zip(case.honest.ids, case.padded.ids, strict=False)
    ):
        if honest != padded:
            return position
    return None


def test_honest_jobs_pass_also_those_that_end_with_a_stop_token(
    market_and_cases: tuple[Market, list[Case]],
) -> None:
    market, cases = market_and_cases
    stopped = [case for case in cases if case.honest.ids[-1] in market.stops]
    assert len(stopped) >= 5, "the workload must stop often to say anything"
    for case in cases:
        verdict = _judge(market, case, case.honest)
        assert verdict.passed, (case.request.job_id, verdict.reasons)
        scores = case.honest.scores
        assert len(scores.stop_margins) == len(case.honest.ids)
        # The sampler's own picks: where one is a stop token it is claimed, elsewhere no stop
        # token is ahead of the claimed token.
        assert all(value <= 0 for value in scores.stop_margins)


def test_the_padding_miner_goes_on_past_the_first_stop_and_bills_more(
    market_and_cases: tuple[Market, list[Case]],
) -> None:
    market, cases = market_and_cases
    skipped = [case for case in cases if _skipped_at(case) is not None]
    assert len(skipped) >= 5
    for case in skipped:
        position = _skipped_at(case)
        assert position is not None
        assert case.honest.ids[position] in market.stops  # the honest answer ended there
        assert len(case.honest.ids) == position + 1
        assert case.padded.ids[position] not in market.stops
        assert len(case.padded.ids) > len(case.honest.ids)
    # A job whose answer runs to max_tokens without a stop has nothing to skip.
    for case in cases:
        if case.honest.ids[-1] not in market.stops:
            assert case.padded.ids == case.honest.ids


def test_a_skipped_stop_fails_the_job_where_the_other_rules_forgive_it(
    market_and_cases: tuple[Market, list[Case]],
) -> None:
    market, cases = market_and_cases
    limit = DEFAULTS.stop_margin_limit
    caught, caught_by_this_rule_alone, within_tolerance = [], [], []
    for case in cases:
        position = _skipped_at(case)
        if position is None:
            continue
        scores = case.padded.scores
        skip = scores.stop_margins[position]
        # The sampler picks a stop token there: its stop margin is the padding token's margin.
        assert skip == scores.margins[position] > 0
        # Everywhere else the padding miner follows the sampler (its later stop is claimed).
        others = [v for p, v in enumerate(scores.stop_margins) if p != position]
        assert all(value <= 0 for value in others), case.request.job_id
        verdict = _judge(market, case, case.padded)
        named = [reason for reason in verdict.reasons if "would have stopped" in reason]
        if skip > limit:
            assert named == [
                f"the reference sampler would have stopped at position {position}"
                f" (stop token ahead by {skip:.3g} > {limit:g}); the miner went on"
            ]
            caught.append(case)
            if _judge(market, case, case.padded, stop_margins=False).passed:
                caught_by_this_rule_alone.append(case)
        else:
            # Within the tolerance that protects honest miners: as plausible as an honest flip.
            assert verdict.passed, verdict.reasons
            within_tolerance.append(case)
    # On this workload (seeded, so fixed) 7 stops are skipped: 2 are caught, both by this rule
    # alone (the padding token within margin_limit), 5 are within the tolerance. The random
    # model rarely prefers a stop token by much; docs/verification.md gives the rates.
    assert len(caught) + len(within_tolerance) >= 5
    assert caught_by_this_rule_alone, "the margin rules alone would have caught every skip"
    for case in caught_by_this_rule_alone:
        position = _skipped_at(case)
        assert position is not None
        assert case.padded.scores.margins[position] <= DEFAULTS.margin_limit
