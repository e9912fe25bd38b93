"""A buyer's usage and spend history: GET /v1/key and GET /v1/usage against the real marketplace."""

from __future__ import annotations

import urllib.parse

from openai import OpenAI

from tests.e2e.conftest import INPUT_PRICE, OUTPUT_PRICE
from tests.e2e.harness import Coordinator, balances, create_key, fetch, http


def test_a_buyer_sees_its_balance_spend_and_requests(marketplace: Coordinator) -> None:
    key_id, key = create_key(marketplace.database_url, credits_micro=2_000_000, name="history")
    client = OpenAI(base_url=marketplace.base_url, api_key=key, max_retries=0, timeout=60)
    answers = [
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": f"Say {word}"}], max_tokens=n
        )
        for word, n in (("one", 3), ("two", 5), ("three", 7))
    ]
    costs = [
        a.usage.prompt_tokens * INPUT_PRICE + a.usage.completion_tokens * OUTPUT_PRICE
        for a in answers
        if a.usage is not None
    ]

    status, headers, body = http(f"{marketplace.base_url}/key", api_key=key)
    assert status == 200 and "x-request-id" in headers
    data = body["data"]
    balance = balances(marketplace.database_url)[f"buyer:{key_id}"]
    assert data["key_id"] == key_id and data["label"] == "history"
    assert data["usage_micro"] == sum(costs) and data["requests"] == 3
    assert data["balance_micro"] == balance == 2_000_000 - sum(costs)
    assert data["limit"] is None and data["refunded_micro"] == 0

    status, _, first = http(f"{marketplace.base_url}/usage?limit=2", api_key=key)
    assert status == 200 and first["object"] == "list" and first["has_more"] is True
    assert [entry["id"] for entry in first["data"]] == [answers[2].id, answers[1].id]
    assert [entry["cost_micro"] for entry in first["data"]] == [costs[2], costs[1]]
    newest = first["data"][0]
    assert newest["usage"]["completion_tokens"] == answers[2].usage.completion_tokens  # type: ignore[union-attr]
    assert newest["model"] == "tiny" and newest["finish_reason"] == "length"
    cursor = urllib.parse.quote(first["next_before"])
    status, _, second = http(f"{marketplace.base_url}/usage?limit=2&before={cursor}", api_key=key)
    assert status == 200 and second["has_more"] is False
    assert [entry["id"] for entry in second["data"]] == [answers[0].id]
    jobs = fetch(
        marketplace.database_url,
        "SELECT sum(cost) AS total FROM coordinator_jobs WHERE key_id = $1",
        key_id,
    )
    assert jobs[0]["total"] == sum(costs)


def test_usage_errors_are_clear(marketplace: Coordinator) -> None:
    _, key = create_key(marketplace.database_url, credits_micro=0, name="errors")
    assert http(f"{marketplace.base_url}/usage")[0] == 401
    assert http(f"{marketplace.base_url}/key", api_key="mm-wrong")[0] == 401
    for query, param in (
        ("limit=0", "limit"),
        ("limit=x", "limit"),
        ("before=yesterday", "before"),
    ):
        status, headers, body = http(f"{marketplace.base_url}/usage?{query}", api_key=key)
        assert status == 400 and body["error"]["param"] == param and "x-request-id" in headers
    status, _, empty = http(f"{marketplace.base_url}/usage", api_key=key)
    assert status == 200 and empty["data"] == [] and empty["next_before"] is None
