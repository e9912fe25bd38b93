"""``miner.scorer.score_rows`` against the row-at-a-time definition it vectorizes.

``_reference_margins`` below is the scorer as it was written first: one row at a time, a full
stable sort, full-vocabulary noise from ``miner.sampler.gumbel_noise``, and the stop margin
straight from its definition. The vectorized scorer must give the same margins and stop margins
bit for bit (the same infinities, the same finite floats) for any logits, sampling parameters,
stop tokens and claimed tokens, ties and tokens outside the set included.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from miner import sampler, scorer
from miner.engine.base import SamplingParams, TokenScores
from miner.scorer import P_TOLERANCE, TOLERANCE

JOB = "job-test"


def _reference_core_and_edge(
    z: torch.Tensor, *, top_k: int, top_p: float
) -> tuple[torch.Tensor, torch.Tensor]:
    vocab = z.shape[-1]
    negated = -z.double()
    ascending, order = torch.sort(negated, stable=True)
    strictly = torch.searchsorted(ascending, ascending - TOLERANCE, side="left")
    loosely = torch.searchsorted(ascending, ascending + TOLERANCE, side="right")
    core_sorted = torch.ones(vocab, dtype=torch.bool)
    edge_sorted = torch.ones(vocab, dtype=torch.bool)
    in_top_k = torch.ones(vocab, dtype=torch.bool)
    if 0 < top_k < vocab:
        core_sorted &= loosely - 1 < top_k
        edge_sorted &= strictly < top_k
        in_top_k = -ascending >= -ascending[top_k - 1]
    if top_p < 1.0:
        probs = torch.softmax((-ascending).masked_fill(~in_top_k, -math.inf), dim=-1)
        mass = torch.cat([torch.zeros(1, dtype=probs.dtype), torch.cumsum(probs, dim=-1)])
        core_sorted &= mass[loosely] - probs < top_p - P_TOLERANCE
        edge_sorted &= mass[strictly] < top_p + P_TOLERANCE
    core = torch.empty_like(core_sorted).scatter_(0, order, core_sorted)
    edge = torch.empty_like(edge_sorted).scatter_(0, order, edge_sorted)
    return core, edge


def _reference_margin(
    x: torch.Tensor, token: int, params: SamplingParams, noise_job_id: str, position: int
) -> tuple[float, float]:
    """The margin and the stop margin of ``token`` on the row ``x``."""
    is_stop = torch.zeros(x.shape[0], dtype=torch.bool)
    for stop in params.stop_token_ids:
        if 0 <= stop < x.shape[0]:
            is_stop[stop] = True
    if params.temperature == 0:
        gap = x.max() - x[token]
        if not bool(is_stop.any()):
            return float(gap.item()), -math.inf
        best_stop = x[is_stop].max()
        stop_gap = gap if best_stop >= x.max() else best_stop - x.max()
        return float(gap.item()), float(stop_gap.item())
    z = x / torch.full_like(x, params.temperature)
    core, edge = _reference_core_and_edge(z, top_k=params.top_k, top_p=params.top_p)
    noise = sampler.gumbel_noise(
        seed=params.seed, job_id=noise_job_id, position=position, vocab_size=x.shape[0]
    )
    scores = z + torch.from_numpy(noise.astype(np.float32))
    best = scores.masked_fill(~core, -math.inf).max()
    behind = float((best - scores[token]).item())
    margin = max(0.0, behind) if bool(edge[token]) else math.inf
    if not bool((core & is_stop).any()):
        return margin, -math.inf
    best_stop = scores.masked_fill(~(core & is_stop), -math.inf).max()
    if best_stop >= best:
        return margin, margin
    return margin, float((best_stop - best).item())


def _reference_margins(
    logits: torch.Tensor, completion: Sequence[int], params: SamplingParams
) -> tuple[list[float], list[float]]:
    """The margins and the stop margins of ``completion``, one row at a time."""
    pairs = [
        _reference_margin(logits[position].float().cpu(), token, params, JOB, position)
        for position, token in enumerate(completion)
    ]
    return [margin for margin, _ in pairs], [stop for _, stop in pairs]


def _same(got: Sequence[float], want: Sequence[float]) -> None:
    """Equal bit for bit: the same floats, the same infinities."""
    assert len(got) == len(want)
    for position, (a, b) in enumerate(zip(got, want, strict=True)):
        assert np.float64(a).tobytes() == np.float64(b).tobytes(), (position, a, b)


@st.composite
def _cases(draw: st.DrawFn) -> tuple[torch.Tensor, list[int], SamplingParams]:
    vocab = draw(st.sampled_from([1, 2, 3, 5, 17, 64, 257]))
    rows = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**32))
    generator = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([0.05, 0.3, 1.0, 4.0, 20.0]))
    logits = torch.randn((rows, vocab), generator=generator) * scale
    if draw(st.booleans()):
        # Coarse logits: many exact ties and near-ties within the tolerance.
        logits = torch.round(logits * draw(st.sampled_from([1.0, 4.0, 10.0]))) / 4.0
    if draw(st.booleans()):
        masked = torch.rand((rows, vocab), generator=generator) < 0.2
        logits = logits.masked_fill(masked, -math.inf)
    temperature = draw(st.sampled_from([0.0, 0.1, 0.5, 0.7, 1.0, 1.3, 2.0]))
    top_k = draw(st.sampled_from([0, 1, 2, 3, max(vocab - 1, 0), vocab, vocab + 5]))
    top_p = draw(st.sampled_from([0.0, 0.01, 0.02, 0.3, 0.5, 0.9, 0.95, 0.999, 1.0]))
    params = SamplingParams(
        temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, max_tokens=rows
    )
    # Tokens: a mix of the reference sampler's own picks, the row's argmax and arbitrary ids.
    tokens = []
    for position in range(rows):
        choice = draw(st.sampled_from(["sampled", "argmax", "any"]))
        if choice == "sampled" and temperature > 0:
            token, _ = sampler.sample(logits[position], params, job_id=JOB, position=position)
        elif choice == "argmax":
            token = int(torch.argmax(logits[position]))
        else:
            token = draw(st.integers(0, vocab - 1))
        tokens.append(token)
    # Stop ids (the sampler ignores them): none, arbitrary ones, ids past the vocabulary, and
    # often the sampler's own pick at some position, so that other tokens there skip it.
    stops = draw(st.lists(st.integers(0, vocab + 2), max_size=3))
    for position in draw(st.lists(st.integers(0, rows - 1), max_size=2)):
        row = logits[position]
        if temperature > 0:
            stops.append(sampler.sample(row, params, job_id=JOB, position=position)[0])
        else:
            stops.append(int(torch.argmax(row)))
    return logits, tokens, dataclasses.replace(params, stop_token_ids=tuple(stops))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_cases())
def test_margins_are_those_of_the_row_at_a_time_definition(
    case: tuple[torch.Tensor, list[int], SamplingParams],
) -> None:
    logits, tokens, params = case
    got = scorer.score_rows(logits, tokens, params, noise_job_id=JOB)
    margins, stop_margins = _reference_margins(logits, tokens, params)
    _same(got.margins, margins)
    _same(got.stop_margins, stop_margins)
    # A positive stop margin is the margin of a token the sampler would have stopped instead of.
    for margin, stop_margin in zip(got.margins, got.stop_margins, strict=True):
        assert not stop_margin > 0 or stop_margin == margin


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"),
    [(0.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 40, 1.0), (0.7, 0, 0.9), (1.0, 50, 0.95)],
)
def test_a_language_model_sized_row_set_matches(
    temperature: float, top_k: int, top_p: float
) -> None:
    """2048-token rows with a peaked head and a flat tail, as the demo model's; the sampler's
    own picks, most of which have margin 0, plus substitutions."""
    generator = torch.Generator().manual_seed(7)
    logits = torch.randn((40, 2048), generator=generator) * 2.5
    logits[:, :30] += 6.0
    # Two stop ids in the peaked head, so the sampler picks them now and then, one in the tail.
    stops = (3, 17, 2000)
    params = SamplingParams(
        temperature=temperature, top_k=top_k, top_p=top_p, seed=99, stop_token_ids=stops
    )
    tokens = [
        sampler.sample(row, params, job_id=JOB, position=p)[0]
        if p % 3
        else int(torch.randint(0, 2048, (1,), generator=generator))
        for p, row in enumerate(logits)
    ]
    scores = scorer.score_rows(logits, tokens, params, noise_job_id=JOB)
    got = scores.margins
    want, want_stop = _reference_margins(logits, tokens, params)
    _same(got, want)
    _same(scores.stop_margins, want_stop)
    honest_stops = [s for p, s in enumerate(scores.stop_margins) if p % 3]
    # The sampler's own picks never go on past a stop it would have picked.
    assert all(s <= 0 for s in honest_stops)
    if temperature > 0:
        honest = [m for p, m in enumerate(got) if p % 3]
        assert honest.count(0.0) == len(honest)  # the sampler's own picks agree with it
        assert any(m > 0 for p, m in enumerate(got) if not p % 3)  # substitutions do not


def test_chunks_give_the_same_margins(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows scored in chunks (a long completion over a large vocabulary) keep their positions."""
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn((9, 300), generator=generator) * 3
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=5, stop_token_ids=(0, 1, 2))
    tokens = [
        sampler.sample(row, params, job_id=JOB, position=p)[0] for p, row in enumerate(logits)
    ]
    tokens[4] = int(torch.argmin(logits[4]))
    whole = scorer.score_rows(logits, tokens, params, noise_job_id=JOB)
    monkeypatch.setattr(scorer, "_CHUNK_ELEMENTS", 2 * 300)
    chunked = scorer.score_rows(logits, tokens, params, noise_job_id=JOB)
    _same(chunked.margins, whole.margins)
    _same(chunked.stop_margins, whole.stop_margins)
    margins, stop_margins = _reference_margins(logits, tokens, params)
    _same(chunked.margins, margins)
    _same(chunked.stop_margins, stop_margins)
    assert chunked.logprobs == whole.logprobs


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**64 - 1),
    positions=st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=3),
    vocab=st.integers(1, 3000),
    data=st.data(),
)
def test_noise_at_chosen_tokens_is_the_samplers(
    seed: int, positions: list[int], vocab: int, data: st.DataObject
) -> None:
    key = sampler.noise_key(seed=seed, job_id=JOB)
    full = [
        sampler.gumbel_noise(seed=seed, job_id=JOB, position=p, vocab_size=vocab).astype(np.float32)
        for p in positions
    ]
    every = scorer._noise_at(key, positions=positions, tokens=None, vocab_size=vocab)
    assert every.numpy().tobytes() == np.concatenate(full).tobytes()
    ids = st.lists(st.integers(0, vocab - 1), min_size=1, max_size=50)
    wanted = [np.array(sorted(set(data.draw(ids))), dtype=np.int64) for _ in positions]
    some = scorer._noise_at(key, positions=positions, tokens=wanted, vocab_size=vocab)
    want = np.concatenate([row[w] for row, w in zip(full, wanted, strict=True)])
    assert some.numpy().tobytes() == want.tobytes()


def test_a_core_that_is_not_a_sorted_prefix_is_looked_up_by_value() -> None:
    """The fallback for rows where rounding broke the prefix shape of the core (never seen)."""
    z = torch.tensor([[1.0, 3.0, 2.0, 0.0], [1.0, 3.0, 2.0, 0.0]])
    ascending = torch.sort(-z.double(), dim=1).values  # z: 3, 2, 1, 0
    core_head = torch.tensor([[True, True, False], [True, False, True]])
    core = scorer._spread(core_head, ascending, z)
    assert core.tolist() == [[False, True, True, False], [True, True, False, False]]


def test_look_up_gives_each_value_the_mask_of_its_sorted_position() -> None:
    """The fallback for a core that is not a prefix of the sorted tokens."""
    head = torch.tensor([-3.0, -2.0, -2.0, -1.0, 0.5], dtype=torch.float64)
    head_mask = torch.tensor([True, False, False, True, False])
    values = torch.tensor([-1.0, 0.5, -2.0, -3.0, 7.0, -2.5, -2.0], dtype=torch.float64)
    got = scorer._look_up(head_mask, head, values)
    assert got.tolist() == [True, False, False, True, False, False, False]


def test_row_wise_kernels_do_not_depend_on_the_batch() -> None:
    """What the vectorized scorer rests on: a row's softmax and running sum are the same bits
    whether the row is alone or one of many (any length, any position in the batch)."""
    generator = torch.Generator().manual_seed(11)
    for vocab in (1, 7, 31, 2048, 2053):
        batch = torch.randn((5, vocab), generator=generator, dtype=torch.float64) * 3
        soft, cumulative = torch.softmax(batch, dim=-1), torch.cumsum(batch.exp(), dim=-1)
        for row in range(5):
            assert torch.equal(soft[row], torch.softmax(batch[row], dim=-1))
            assert torch.equal(cumulative[row], torch.cumsum(batch[row].exp(), dim=-1))


def test_temperature_zero_margin_is_the_logit_gap() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.5], [0.0, 0.0, -1.0]])
    got = scorer.score_rows(logits, [2, 1], SamplingParams(temperature=0.0), noise_job_id=JOB)
    assert got.margins == (0.5, 0.0)


def test_a_token_outside_the_edge_has_an_infinite_margin_and_a_near_one_does_not() -> None:
    # top-k 1: token 1 is 0.1 behind the first (within TOLERANCE), token 2 is 2 behind.
    logits = torch.tensor([[5.0, 4.9, 3.0]] * 2)
    params = SamplingParams(temperature=1.0, top_k=1, seed=1)
    got = scorer.score_rows(logits, [1, 2], params, noise_job_id=JOB).margins
    assert math.isfinite(got[0]) and got[1] == math.inf


def test_rows_and_tokens_must_match() -> None:
    with pytest.raises(ValueError, match="rows of logits"):
        scorer.score_rows(torch.zeros((2, 4)), [1], SamplingParams(), noise_job_id=JOB)
    assert scorer.score_rows(torch.zeros((0, 4)), [], SamplingParams(), noise_job_id=JOB) == (
        TokenScores(logprobs=(), margins=(), stop_margins=())
    )


def test_temperature_zero_stop_margin_is_the_margin_where_a_stop_token_is_the_pick() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.5]] * 3)

    def stop_margins(stops: tuple[int, ...], tokens: list[int]) -> tuple[float, ...]:
        params = SamplingParams(temperature=0.0, stop_token_ids=stops)
        return scorer.score_rows(logits, tokens, params, noise_job_id=JOB).stop_margins

    # Token 1 (3.0) is the pick: a miner that went on with token 2 or 0 skipped it.
    assert stop_margins((1,), [2, 0, 1]) == (0.5, 2.0, 0.0)
    # Token 2 is a stop token half a logit behind the pick: no stop was skipped.
    assert stop_margins((2,), [1, 0, 2]) == (-0.5, -0.5, -0.5)
    # No stop tokens (or only ids outside the vocabulary): nothing to skip.
    assert stop_margins((), [1, 0, 2]) == (-math.inf,) * 3
    assert stop_margins((7,), [1, 0, 2]) == (-math.inf,) * 3


def test_only_stop_tokens_in_the_core_count() -> None:
    # top-k 2: token 0 is core; token 1 (3.0) is in the top 2 by a hair less than TOLERANCE
    # ahead of token 2 (2.9), so both are edge tokens another device may keep or drop.
    logits = torch.tensor([[5.0, 3.0, 2.9, -10.0]] * 3)
    params = SamplingParams(temperature=1.0, top_k=2, seed=3, stop_token_ids=(1,))
    # ... even where the claimed token is that stop token.
    edge_stop = scorer.score_rows(logits, [2, 1, 3], params, noise_job_id=JOB)
    assert edge_stop.stop_margins == (-math.inf,) * 3
    # Token 0, the only core token, is the pick whatever the noise: as a stop token, going on
    # with an edge token skips it by that token's margin, and with a token outside the set by
    # an infinite one.
    core_stop = dataclasses.replace(params, stop_token_ids=(0,))
    got = scorer.score_rows(logits, [2, 1, 3], core_stop, noise_job_id=JOB)
    assert got.stop_margins[0] == got.margins[0] > 0
    assert got.stop_margins[1] == got.margins[1] > 0
    assert got.margins[2] == got.stop_margins[2] == math.inf


def test_a_stop_token_behind_the_pick_gives_how_far_behind_it_is() -> None:
    logits = torch.tensor([[8.0, 0.0, 0.0]])
    params = SamplingParams(temperature=1.0, seed=4, stop_token_ids=(2,))
    got = scorer.score_rows(logits, [0], params, noise_job_id=JOB).stop_margins[0]
    noise = sampler.gumbel_noise(seed=4, job_id=JOB, position=0, vocab_size=3).astype(np.float32)
    assert got == float(torch.tensor(noise[2]) - (8.0 + torch.tensor(noise[0])))
    assert got < 0
