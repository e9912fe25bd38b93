"""``stop`` and ``logprobs`` through a real coordinator, miner and ledger, via the openai SDK."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from openai import OpenAI
from openai.types.chat import ChatCompletionMessageParam

from tests.e2e.conftest import FEE_BPS, INPUT_PRICE, OUTPUT_PRICE
from tests.e2e.harness import (
    Coordinator,
    balances,
    create_key,
    fetch,
    start_miner,
    wait_for_miners,
)

MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Tell me a story, tiny model."}
]


def expected_cost(prompt_tokens: int, completion_tokens: int) -> int:
    # Prices are whole micro-units per token here, so the ceil in the billing formula is exact.
    return prompt_tokens * INPUT_PRICE + completion_tokens * OUTPUT_PRICE


def buyer_with_a_miner(
    coordinator: Coordinator, model_dirs: dict[str, Path], tmp_path: Path, *, miner: str
) -> tuple[str, OpenAI]:
    """A funded buyer key (its id and an SDK client) once a miner of 'tiny' named ``miner``
    serves."""
    key_id, key = create_key(coordinator.database_url, credits_micro=10_000_000)
    start_miner(coordinator, tmp_path, name=miner, models={"tiny": model_dirs["tiny"]})
    wait_for_miners(coordinator, key, "tiny", 1)
    return key_id, OpenAI(base_url=coordinator.base_url, api_key=key, max_retries=0, timeout=60)


def middle_stop(text: str) -> str:
    """A short piece from the middle of ``text`` that contains no replacement character."""
    for length in (3, 2, 1):
        for start in range(len(text) // 2, len(text) - length):
            piece = text[start : start + length]
            if "\ufffd" not in piece and text.find(piece) > 0:
                return piece
    raise AssertionError(f"no usable stop string in {text!r}")


def test_stop_cuts_bills_and_logprobs_come_per_token(
    coordinator: Coordinator, model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    key_id, sdk = buyer_with_a_miner(coordinator, model_dirs, tmp_path, miner="alice")

    full = sdk.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_tokens=40,
        temperature=0,
        logprobs=True,
    )
    text = full.choices[0].message.content or ""
    assert full.usage is not None and full.choices[0].logprobs is not None
    content = full.choices[0].logprobs.content or []
    assert len(content) == full.usage.completion_tokens
    assert all(math.isfinite(entry.logprob) and entry.logprob <= 0 for entry in content)
    assert len({entry.logprob for entry in content}) > 1  # real values, not a placeholder

    stop = middle_stop(text)
    cut = text.find(stop)
    before = balances(coordinator.database_url)
    stopped = sdk.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_tokens=40,
        temperature=0,
        stop=[stop, "never appears \x00"],
        logprobs=True,
    )
    after = balances(coordinator.database_url)
    assert stopped.choices[0].message.content == text[:cut]
    assert stopped.choices[0].finish_reason == "stop"
    usage = stopped.usage
    assert usage is not None and usage.prompt_tokens == full.usage.prompt_tokens
    assert 0 < usage.completion_tokens < full.usage.completion_tokens
    assert stopped.choices[0].logprobs is not None
    stopped_content = stopped.choices[0].logprobs.content or []
    assert len(stopped_content) == usage.completion_tokens
    # Greedy: the same tokens as the full reply, up to the one that completed the stop string.
    expected = [e.logprob for e in content[: usage.completion_tokens]]
    assert [e.logprob for e in stopped_content] == pytest.approx(expected, abs=1e-4)
    cost = expected_cost(usage.prompt_tokens, usage.completion_tokens)
    assert before[f"buyer:{key_id}"] - after[f"buyer:{key_id}"] == cost
    miners = sum(after[k] - before.get(k, 0) for k in after if k.startswith("miner:"))
    assert after["fee"] - before["fee"] == cost * FEE_BPS // 10_000
    assert miners + after["fee"] - before["fee"] == cost
    jobs = fetch(
        coordinator.database_url,
        "SELECT * FROM coordinator_jobs WHERE key_id = $1 ORDER BY completion_tokens",
        key_id,
    )
    assert jobs[0]["finish_reason"] == "stop" and jobs[0]["receipt"] is not None
    assert jobs[0]["completion_tokens"] == usage.completion_tokens

    # Streaming: no piece of the stop string ever goes out, and the text is the same.
    stream = sdk.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_tokens=40,
        temperature=0,
        stop=stop,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text[:cut]
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finishes == ["stop"]
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == usage.completion_tokens


def test_top_logprobs_come_from_the_miner_streamed_and_not(
    coordinator: Coordinator, model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    _, sdk = buyer_with_a_miner(coordinator, model_dirs, tmp_path, miner="bob")
    options = {"model": "tiny", "messages": MESSAGES, "max_tokens": 20, "temperature": 0}

    reply = sdk.chat.completions.create(**options, logprobs=True, top_logprobs=5)
    assert reply.choices[0].logprobs is not None
    content = reply.choices[0].logprobs.content or []
    assert len(content) == (reply.usage.completion_tokens if reply.usage else -1)
    for entry in content:
        alternatives = entry.top_logprobs
        assert len(alternatives) == 5
        values = [alt.logprob for alt in alternatives]
        assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)
        # Greedy: the chosen token is the most likely one, reported alike in both places.
        assert (alternatives[0].token, alternatives[0].bytes) == (entry.token, entry.bytes)
        assert alternatives[0].logprob == pytest.approx(entry.logprob, abs=1e-6)
        assert len({bytes(alt.bytes or []) for alt in alternatives}) == 5

    stream = sdk.chat.completions.create(**options, logprobs=True, top_logprobs=5, stream=True)
    streamed = [
        entry
        for chunk in stream
        if chunk.choices and chunk.choices[0].logprobs
        for entry in chunk.choices[0].logprobs.content or []
    ]
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in content]

    legacy = sdk.completions.create(
        model="tiny", prompt="Once upon", max_tokens=8, temperature=0, logprobs=3
    )
    assert legacy.choices[0].logprobs is not None
    tops = legacy.choices[0].logprobs.top_logprobs or []
    assert len(tops) == len(legacy.choices[0].logprobs.tokens or []) > 0
    assert all(1 <= len(top) <= 3 for top in tops)  # texts of alternatives may coincide
