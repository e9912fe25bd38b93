"""Buyer -> coordinator -> miner -> ledger, driven by the official openai SDK."""

from __future__ import annotations

import concurrent.futures
import json
from pathlib import Path

import openai
import pytest
from openai import OpenAI

from coordinator.api import ChatMessage
from coordinator.text.tokenization import ModelTokenizer
from tests.e2e.conftest import FEE_BPS, INPUT_PRICE, OUTPUT_PRICE
from tests.e2e.harness import Coordinator, balances, create_key, fetch, http

MESSAGES = [{"role": "user", "content": "Say something, tiny model."}]


def expected_cost(prompt_tokens: int, completion_tokens: int) -> int:
    # Prices are whole micro-units per token here, so the ceil in the billing formula is exact.
    return prompt_tokens * INPUT_PRICE + completion_tokens * OUTPUT_PRICE


def client(coordinator: Coordinator, key: str) -> OpenAI:
    return OpenAI(base_url=coordinator.base_url, api_key=key, max_retries=0, timeout=60)


def miner_and_fee_gains(before: dict[str, int], after: dict[str, int]) -> tuple[int, int]:
    miners = sum(after[k] - before.get(k, 0) for k in after if k.startswith("miner:"))
    return miners, after["fee"] - before["fee"]


def assert_settled(before: dict[str, int], after: dict[str, int], key_id: str, cost: int) -> None:
    buyer = f"buyer:{key_id}"
    assert before[buyer] - after[buyer] == cost
    miners, fee = miner_and_fee_gains(before, after)
    assert fee == cost * FEE_BPS // 10_000
    assert miners + fee == cost
    assert after["escrow"] == before["escrow"]
    assert sum(after.values()) == 0


def test_models_lists_prices_context_and_miners(marketplace: Coordinator) -> None:
    _, key = create_key(marketplace.database_url, credits_micro=0)
    models = {m.id: m.model_dump() for m in client(marketplace, key).models.list()}
    assert set(models) == {"tiny", "tiny-b"}
    assert models["tiny"]["miners"] == 2 and models["tiny-b"]["miners"] == 0
    assert models["tiny"]["context_length"] == 512
    assert models["tiny"]["input_price_per_million"] == "2"
    assert models["tiny"]["output_price_per_million"] == "5"


def test_chat_non_streaming_bills_exactly(
    marketplace: Coordinator, model_dirs: dict[str, Path]
) -> None:
    key_id, key = create_key(marketplace.database_url, credits_micro=10_000_000)
    before = balances(marketplace.database_url)
    reply = client(marketplace, key).chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=24, temperature=0
    )
    after = balances(marketplace.database_url)
    assert reply.usage is not None
    own_count = len(
        ModelTokenizer.from_dir(model_dirs["tiny"]).encode_chat(
            [ChatMessage(role="user", content=MESSAGES[0]["content"])]
        )
    )
    assert reply.usage.prompt_tokens == own_count
    assert 1 <= reply.usage.completion_tokens <= 24
    assert reply.choices[0].finish_reason in ("stop", "length")
    if reply.choices[0].finish_reason == "length":
        assert reply.usage.completion_tokens == 24
    assert_settled(before, after, key_id, expected_cost(own_count, reply.usage.completion_tokens))
    job = fetch(
        marketplace.database_url, "SELECT * FROM coordinator_jobs WHERE key_id = $1", key_id
    )
    assert len(job) == 1 and job[0]["receipt"] and job[0]["receipt_signature"]
    assert job[0]["completion_tokens"] == reply.usage.completion_tokens


def test_greedy_output_is_reproducible_across_miners(marketplace: Coordinator) -> None:
    _, key = create_key(marketplace.database_url, credits_micro=10_000_000)
    answers = {
        client(marketplace, key)
        .chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=16, temperature=0)
        .choices[0]
        .message.content
        for _ in range(4)
    }
    assert len(answers) == 1


def test_chat_streaming_chunks_and_billing(marketplace: Coordinator) -> None:
    key_id, key = create_key(marketplace.database_url, credits_micro=10_000_000)
    before = balances(marketplace.database_url)
    stream = client(marketplace, key).chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_tokens=20,
        temperature=0.8,
        seed=3,
        stream=True,
    )
    chunks = list(stream)
    after = balances(marketplace.database_url)
    assert len({chunk.id for chunk in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert len(finishes) == 1
    usage = chunks[-1].usage
    assert usage is not None and chunks[-1].choices == []
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert_settled(
        before, after, key_id, expected_cost(usage.prompt_tokens, usage.completion_tokens)
    )


def test_completions_endpoint(marketplace: Coordinator) -> None:
    key_id, key = create_key(marketplace.database_url, credits_micro=10_000_000)
    before = balances(marketplace.database_url)
    sdk = client(marketplace, key)
    plain = sdk.completions.create(model="tiny", prompt="def main(", max_tokens=10, temperature=0)
    streamed = list(
        sdk.completions.create(
            model="tiny", prompt="def main(", max_tokens=10, temperature=0, stream=True
        )
    )
    after = balances(marketplace.database_url)
    assert plain.object == "text_completion" and plain.usage is not None
    text = "".join(c.choices[0].text for c in streamed if c.choices)
    assert text == plain.choices[0].text  # greedy: same tokens either way
    stream_usage = streamed[-1].usage
    assert stream_usage is not None
    assert stream_usage.completion_tokens == plain.usage.completion_tokens
    total = 2 * expected_cost(plain.usage.prompt_tokens, plain.usage.completion_tokens)
    assert_settled(before, after, key_id, total)


def test_concurrent_requests_never_overdraw(marketplace: Coordinator) -> None:
    # Enough for about three maximum-cost holds; eight requests race for it.
    key_id, key = create_key(marketplace.database_url, credits_micro=3 * (40 * 2 + 30 * 5))
    sdk = client(marketplace, key)

    def ask(_: int) -> str:
        try:
            sdk.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=30)
            return "ok"
        except openai.APIStatusError as error:
            return str(error.status_code)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(ask, range(8)))
    assert "ok" in outcomes
    assert set(outcomes) <= {"ok", "402"}
    after = balances(marketplace.database_url)
    assert after[f"buyer:{key_id}"] >= 0
    open_holds = fetch(
        marketplace.database_url, "SELECT count(*) AS n FROM ledger_holds WHERE status = 'open'"
    )
    assert open_holds[0]["n"] == 0


# --- errors: each is OpenAI-shaped, carries a request id, and charges nothing ---------------


def assert_nothing_charged(marketplace: Coordinator, before: dict[str, int]) -> None:
    assert balances(marketplace.database_url) == before


def test_missing_and_wrong_keys_are_401(marketplace: Coordinator) -> None:
    before = balances(marketplace.database_url)
    with pytest.raises(openai.AuthenticationError) as caught:
        client(marketplace, "mm-not-a-real-key").chat.completions.create(
            model="tiny", messages=MESSAGES
        )
    assert caught.value.response.headers["x-request-id"]
    status, headers, body = http(
        f"{marketplace.base_url}/chat/completions", body=json.dumps({"model": "tiny"}).encode()
    )
    assert status == 401 and body["error"]["type"] == "authentication_error"
    assert headers["x-request-id"]
    assert_nothing_charged(marketplace, before)


def test_malformed_json_and_invalid_parameters_are_400(marketplace: Coordinator) -> None:
    _, key = create_key(marketplace.database_url, credits_micro=1_000_000)
    before = balances(marketplace.database_url)
    status, headers, body = http(
        f"{marketplace.base_url}/chat/completions", api_key=key, body=b"{not json"
    )
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    assert headers["x-request-id"]
    with pytest.raises(openai.BadRequestError) as caught:
        client(marketplace, key).chat.completions.create(
            model="tiny", messages=MESSAGES, temperature=7
        )
    assert caught.value.body["param"] == "temperature"
    assert_nothing_charged(marketplace, before)


def test_prompt_longer_than_the_context_is_400(marketplace: Coordinator) -> None:
    _, key = create_key(marketplace.database_url, credits_micro=1_000_000)
    before = balances(marketplace.database_url)
    with pytest.raises(openai.BadRequestError) as caught:
        client(marketplace, key).completions.create(model="tiny", prompt="x" * 600, max_tokens=5)
    assert caught.value.code == "context_length_exceeded"
    assert_nothing_charged(marketplace, before)


def test_unknown_model_is_404(marketplace: Coordinator) -> None:
    _, key = create_key(marketplace.database_url, credits_micro=1_000_000)
    before = balances(marketplace.database_url)
    with pytest.raises(openai.NotFoundError):
        client(marketplace, key).chat.completions.create(model="gpt-9", messages=MESSAGES)
    assert_nothing_charged(marketplace, before)


def test_insufficient_credits_is_402(marketplace: Coordinator) -> None:
    _, key = create_key(marketplace.database_url, credits_micro=50)
    before = balances(marketplace.database_url)
    with pytest.raises(openai.APIStatusError) as caught:
        client(marketplace, key).chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=100
        )
    assert caught.value.status_code == 402
    assert_nothing_charged(marketplace, before)


def test_model_without_miners_is_503_with_retry_after(marketplace: Coordinator) -> None:
    _, key = create_key(marketplace.database_url, credits_micro=1_000_000)
    before = balances(marketplace.database_url)
    with pytest.raises(openai.APIStatusError) as caught:
        client(marketplace, key).chat.completions.create(model="tiny-b", messages=MESSAGES)
    assert caught.value.status_code == 503
    assert int(caught.value.response.headers["retry-after"]) > 0
    assert_nothing_charged(marketplace, before)
