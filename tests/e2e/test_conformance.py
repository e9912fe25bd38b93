"""OpenAI conformance: the official SDK, sync (`OpenAI`) and async (`AsyncOpenAI`) clients alike,
against a real coordinator, real miners and the ledger.

Every test runs once per client. What is checked is what an OpenAI client relies on: the shape
of streamed chunks (one id, the role first, one finish reason, usage last), usage that equals
the charge on the ledger, each error raising the SDK's matching exception with a request id,
and the stop / max_tokens / max_completion_tokens / logprobs behaviours.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import openai
import pytest
from openai.types import Completion, CompletionUsage
from openai.types.chat import ChatCompletionChunk, ChatCompletionMessageParam

from tests.e2e.conftest import FEE_BPS, INPUT_PRICE, OUTPUT_PRICE, tiny_coordinator
from tests.e2e.harness import (
    MODES,
    Buyer,
    Coordinator,
    Mode,
    balances,
    create_key,
    fetch,
    start_miner,
    wait_for_miners,
)

MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Tell me about the sea, tiny model."}
]
PROMPT = "Once upon a time"
CONTEXT_LENGTH = 512  # the test model's (see test_marketplace.py)
CREDITS = 10_000_000


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> Mode:
    return cast(Mode, request.param)


@pytest.fixture
def buyer(marketplace: Coordinator, mode: Mode) -> Buyer:
    """A fresh key with plenty of credits, on the shared marketplace."""
    key_id, key = create_key(marketplace.database_url, credits_micro=CREDITS)
    return Buyer(mode, marketplace.base_url, key_id, key)


# --- helpers ------------------------------------------------------------------------------


def expected_cost(prompt_tokens: int, completion_tokens: int) -> int:
    # Prices are whole micro-units per token here, so the ceil in the billing formula is exact.
    return prompt_tokens * INPUT_PRICE + completion_tokens * OUTPUT_PRICE


def charged_micro(usage: CompletionUsage) -> int:
    """The ``cost_micro`` the coordinator adds to OpenAI's usage object."""
    extra = usage.model_extra or {}
    return int(extra["cost_micro"])


@dataclass
class Ledger:
    """Balances before and after some calls of one buyer."""

    database_url: str  # the marketplace's database
    key_id: str  # the buyer's key id
    before: dict[str, int]  # every account's balance before the calls

    def assert_charged(self, *job_costs: int) -> None:
        """The buyer paid exactly the sum of ``job_costs``; the fee account got its share of
        each (rounded down per job), the miners the rest."""
        after = balances(self.database_url)
        before = self.before
        cost = sum(job_costs)
        buyer = f"buyer:{self.key_id}"
        assert before[buyer] - after[buyer] == cost
        miners = sum(after[k] - before.get(k, 0) for k in after if k.startswith("miner:"))
        fee = after["fee"] - before.get("fee", 0)
        assert fee == sum(job * FEE_BPS // 10_000 for job in job_costs)
        assert miners + fee == cost
        assert after.get("escrow", 0) == before.get("escrow", 0)
        assert sum(after.values()) == 0

    def assert_nothing_charged(self) -> None:
        assert balances(self.database_url) == self.before


def watch(coordinator: Coordinator, buyer: Buyer) -> Ledger:
    return Ledger(coordinator.database_url, buyer.key_id, balances(coordinator.database_url))


def chat_text(chunks: list[ChatCompletionChunk]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def finishes(chunks: list[ChatCompletionChunk] | list[Completion]) -> list[str]:
    return [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]


def assert_stream_envelope(
    chunks: list[ChatCompletionChunk] | list[Completion],
    *,
    object_name: str,
    started: float,
    ended: float,
    max_tokens: int,
) -> CompletionUsage:
    """One id, one created time, the model's name, usage only in a last chunk without choices,
    exactly one finish reason (in the chunk before it); returns that usage."""
    assert len(chunks) >= 3  # at least some text, the finish and the usage
    assert len({chunk.id for chunk in chunks}) == 1
    assert {chunk.object for chunk in chunks} == {object_name}
    assert {chunk.model for chunk in chunks} == {"tiny"}
    created = {chunk.created for chunk in chunks}
    assert len(created) == 1
    assert math.floor(started) <= created.pop() <= math.ceil(ended)
    *body, last = chunks
    assert last.choices == [] and last.usage is not None
    assert all(chunk.usage is None for chunk in body)
    assert all(len(chunk.choices) == 1 and chunk.choices[0].index == 0 for chunk in body)
    reasons = finishes(chunks)
    assert len(reasons) == 1 and reasons[0] in ("stop", "length")
    assert body[-1].choices[0].finish_reason == reasons[0]
    usage = last.usage
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert 1 <= usage.completion_tokens <= max_tokens
    if reasons[0] == "length":
        assert usage.completion_tokens == max_tokens
    return usage


def assert_error_response(error: openai.APIStatusError, *, status: int) -> None:
    """The status, an OpenAI-shaped body, and a request id the SDK picked up."""
    assert error.status_code == status
    request_id = error.response.headers.get("x-request-id")
    assert request_id and error.request_id == request_id
    body = cast(dict[str, Any], error.body)
    assert isinstance(body.get("message"), str) and body["message"]
    assert isinstance(body.get("type"), str) and body["type"]


def stop_string_in(text: str) -> str:
    """A short piece from the middle of ``text``, first found past its start, free of
    replacement characters (an incomplete UTF-8 sequence is never a stable stop string)."""
    for length in (3, 2, 1):
        for start in range(len(text) // 2, len(text) - length):
            piece = text[start : start + length]
            if "\ufffd" not in piece and text.find(piece) > 0:
                return piece
    raise AssertionError(f"no usable stop string in {text!r}")


# --- streams ------------------------------------------------------------------------------


def test_streamed_chat_has_one_id_role_first_one_finish_and_usage_last(
    marketplace: Coordinator, buyer: Buyer
) -> None:
    ledger = watch(marketplace, buyer)
    started = time.time()
    chunks = buyer.chat_stream(
        model="tiny",
        messages=MESSAGES,
        max_tokens=12,
        temperature=0.9,
        seed=11,
        stream_options={"include_usage": True},
    )
    ended = time.time()
    usage = assert_stream_envelope(
        chunks, object_name="chat.completion.chunk", started=started, ended=ended, max_tokens=12
    )
    first = chunks[0].choices[0].delta
    assert first.role == "assistant"
    assert all(c.choices[0].delta.role in (None, "assistant") for c in chunks[1:-1])
    assert sum(c.choices[0].delta.role == "assistant" for c in chunks[:-1]) == 1
    assert chat_text(chunks)
    cost = expected_cost(usage.prompt_tokens, usage.completion_tokens)
    assert charged_micro(usage) == cost
    ledger.assert_charged(cost)
    jobs = fetch(
        marketplace.database_url, "SELECT * FROM coordinator_jobs WHERE key_id = $1", buyer.key_id
    )
    assert len(jobs) == 1
    assert jobs[0]["completion_tokens"] == usage.completion_tokens
    assert jobs[0]["prompt_tokens"] == usage.prompt_tokens
    assert jobs[0]["cost"] == cost


def test_streamed_completion_has_the_same_envelope(marketplace: Coordinator, buyer: Buyer) -> None:
    ledger = watch(marketplace, buyer)
    started = time.time()
    chunks = buyer.text_stream(
        model="tiny",
        prompt=PROMPT,
        max_tokens=10,
        temperature=0,
        stream_options={"include_usage": True},
    )
    ended = time.time()
    usage = assert_stream_envelope(
        chunks, object_name="text_completion", started=started, ended=ended, max_tokens=10
    )
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    plain = buyer.text(model="tiny", prompt=PROMPT, max_tokens=10, temperature=0)
    assert plain.object == "text_completion" and plain.usage is not None
    assert plain.choices[0].text == streamed  # greedy: the same tokens either way
    assert plain.choices[0].finish_reason == finishes(chunks)[0]
    assert plain.usage.completion_tokens == usage.completion_tokens
    cost = expected_cost(usage.prompt_tokens, usage.completion_tokens)
    assert charged_micro(usage) == charged_micro(plain.usage) == cost
    ledger.assert_charged(cost, cost)


def test_plain_and_streamed_chat_agree_and_usage_is_the_charge(
    marketplace: Coordinator, buyer: Buyer
) -> None:
    ledger = watch(marketplace, buyer)
    plain = buyer.chat(model="tiny", messages=MESSAGES, max_tokens=16, temperature=0)
    assert plain.object == "chat.completion" and plain.model == "tiny"
    assert plain.choices[0].message.role == "assistant"
    assert plain.usage is not None
    plain_cost = expected_cost(plain.usage.prompt_tokens, plain.usage.completion_tokens)
    assert charged_micro(plain.usage) == plain_cost
    ledger.assert_charged(plain_cost)

    ledger = watch(marketplace, buyer)
    chunks = buyer.chat_stream(model="tiny", messages=MESSAGES, max_tokens=16, temperature=0)
    # Usage comes last even without stream_options (OpenRouter's convention).
    usage = chunks[-1].usage
    assert usage is not None and chunks[-1].choices == []
    assert all(chunk.usage is None for chunk in chunks[:-1])
    assert chat_text(chunks) == plain.choices[0].message.content
    assert finishes(chunks) == [plain.choices[0].finish_reason]
    assert usage.model_dump() == plain.usage.model_dump()
    ledger.assert_charged(plain_cost)


# --- stop, max_tokens, max_completion_tokens, logprobs --------------------------------------


def test_max_tokens_and_max_completion_tokens_end_with_length(
    marketplace: Coordinator, buyer: Buyer
) -> None:
    full = buyer.chat(model="tiny", messages=MESSAGES, max_tokens=16, temperature=0)
    assert full.usage is not None
    natural = full.usage.completion_tokens
    assert natural >= 2, "the greedy answer is too short to cut"
    cut = min(4, natural - 1)

    ledger = watch(marketplace, buyer)
    replies = [
        buyer.chat(model="tiny", messages=MESSAGES, max_tokens=cut, temperature=0),
        buyer.chat(model="tiny", messages=MESSAGES, max_completion_tokens=cut, temperature=0),
        # Both set: max_completion_tokens, the newer name, wins.
        buyer.chat(
            model="tiny",
            messages=MESSAGES,
            max_tokens=natural + 8,
            max_completion_tokens=cut,
            temperature=0,
        ),
    ]
    costs: list[int] = []
    for reply in replies:
        assert reply.choices[0].finish_reason == "length"
        assert reply.usage is not None and reply.usage.completion_tokens == cut
        costs.append(charged_micro(reply.usage))
    assert costs == 3 * [expected_cost(full.usage.prompt_tokens, cut)]
    chunks = buyer.chat_stream(
        model="tiny", messages=MESSAGES, max_completion_tokens=cut, temperature=0
    )
    assert finishes(chunks) == ["length"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == cut
    costs.append(charged_micro(chunks[-1].usage))
    text = buyer.text(model="tiny", prompt=PROMPT, max_tokens=2, temperature=0)
    assert text.usage is not None and text.usage.completion_tokens <= 2
    assert (text.choices[0].finish_reason == "length") == (text.usage.completion_tokens == 2)
    costs.append(charged_micro(text.usage))
    ledger.assert_charged(*costs)


def test_a_stop_string_that_occurs_ends_with_stop(marketplace: Coordinator, buyer: Buyer) -> None:
    full = buyer.chat(model="tiny", messages=MESSAGES, max_tokens=32, temperature=0)
    text = full.choices[0].message.content or ""
    assert full.usage is not None
    stop = stop_string_in(text)
    cut = text.find(stop)

    ledger = watch(marketplace, buyer)
    stopped = buyer.chat(model="tiny", messages=MESSAGES, max_tokens=32, temperature=0, stop=stop)
    assert stopped.choices[0].message.content == text[:cut]
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.usage is not None
    assert 0 < stopped.usage.completion_tokens < full.usage.completion_tokens
    chunks = buyer.chat_stream(
        model="tiny", messages=MESSAGES, max_tokens=32, temperature=0, stop=[stop]
    )
    assert chat_text(chunks) == text[:cut]
    assert finishes(chunks) == ["stop"]
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == stopped.usage.completion_tokens
    cost = expected_cost(stopped.usage.prompt_tokens, stopped.usage.completion_tokens)
    ledger.assert_charged(cost, cost)


def test_logprobs_come_one_entry_per_token(marketplace: Coordinator, buyer: Buyer) -> None:
    plain = buyer.chat(
        model="tiny", messages=MESSAGES, max_tokens=12, temperature=0, logprobs=True, top_logprobs=0
    )
    assert plain.usage is not None and plain.choices[0].logprobs is not None
    content = plain.choices[0].logprobs.content or []
    assert len(content) == plain.usage.completion_tokens
    for entry in content:
        assert isinstance(entry.token, str)
        assert math.isfinite(entry.logprob) and entry.logprob <= 0
        assert entry.bytes is not None
        if "\ufffd" not in entry.token:  # a whole character or more: its bytes are its text's
            assert entry.bytes == list(entry.token.encode())
        assert entry.top_logprobs == []
    assert len({entry.logprob for entry in content}) > 1  # real values, not a placeholder

    chunks = buyer.chat_stream(
        model="tiny", messages=MESSAGES, max_tokens=12, temperature=0, logprobs=True
    )
    streamed = [
        entry
        for chunk in chunks
        if chunk.choices and chunk.choices[0].logprobs is not None
        for entry in chunk.choices[0].logprobs.content or []
    ]
    assert [e.token for e in streamed] == [e.token for e in content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-4)

    text = buyer.text(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=0)
    assert text.usage is not None and text.choices[0].logprobs is not None
    logprobs = text.choices[0].logprobs
    assert len(logprobs.tokens or []) == text.usage.completion_tokens
    values = logprobs.token_logprobs or []
    assert len(values) == text.usage.completion_tokens
    assert all(value is not None and value <= 0 for value in values)
    offsets = logprobs.text_offset or []
    assert len(offsets) == text.usage.completion_tokens
    assert offsets[0] == 0 and offsets == sorted(offsets)


# Greedy output of the test model for this prompt holds characters split across tokens.
SPLIT_MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Write a poem."}]


def test_logprob_bytes_add_up_to_the_text(buyer: Buyer) -> None:
    reply = buyer.chat(
        model="tiny", messages=SPLIT_MESSAGES, max_tokens=12, temperature=0, logprobs=True
    )
    assert reply.choices[0].logprobs is not None
    content = reply.choices[0].logprobs.content or []
    text = reply.choices[0].message.content or ""
    # The premise: some character of the answer spans tokens (else this proves nothing).
    assert "".join(entry.token for entry in content) != text
    joined = b"".join(bytes(entry.bytes or []) for entry in content)
    assert joined.decode("utf-8", errors="replace") == text


# --- errors: the SDK's matching exception, a request id, nothing charged ---------------------


def test_a_bad_key_raises_authentication_error(marketplace: Coordinator, buyer: Buyer) -> None:
    impostor = Buyer(buyer.mode, buyer.base_url, buyer.key_id, "mm-not-a-real-key")
    ledger = watch(marketplace, buyer)
    with pytest.raises(openai.AuthenticationError) as caught:
        impostor.chat(model="tiny", messages=MESSAGES, max_tokens=4)
    assert_error_response(caught.value, status=401)
    with pytest.raises(openai.AuthenticationError) as caught:
        impostor.text_stream(model="tiny", prompt=PROMPT, max_tokens=4)
    assert_error_response(caught.value, status=401)
    ledger.assert_nothing_charged()


INVALID: dict[str, tuple[str, dict[str, Any]]] = {
    "temperature": ("temperature", {"temperature": 7}),
    "top_p": ("top_p", {"top_p": 0}),
    "n": ("n", {"n": 2}),
    "top_logprobs_out_of_range": ("top_logprobs", {"logprobs": True, "top_logprobs": 21}),
    "top_logprobs_without_logprobs": ("top_logprobs", {"top_logprobs": 3}),
    "max_tokens": ("max_tokens", {"max_tokens": 0}),
    "stop": ("stop", {"stop": ["a", "b", "c", "d", "e"]}),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_parameters_raise_bad_request(
    marketplace: Coordinator, buyer: Buyer, case: str
) -> None:
    param, params = INVALID[case]
    ledger = watch(marketplace, buyer)
    with pytest.raises(openai.BadRequestError) as caught:
        buyer.chat(model="tiny", messages=MESSAGES, **params)
    assert_error_response(caught.value, status=400)
    assert caught.value.type == "invalid_request_error"
    assert cast(dict[str, Any], caught.value.body)["param"] == param
    with pytest.raises(openai.BadRequestError) as caught:
        buyer.chat_stream(model="tiny", messages=MESSAGES, **params)
    assert_error_response(caught.value, status=400)
    ledger.assert_nothing_charged()


def test_too_long_a_prompt_raises_bad_request(marketplace: Coordinator, buyer: Buyer) -> None:
    ledger = watch(marketplace, buyer)
    calls: list[Callable[[], object]] = [
        lambda: buyer.text(model="tiny", prompt="x" * (CONTEXT_LENGTH + 100), max_tokens=4),
        lambda: buyer.chat_stream(
            model="tiny", messages=[{"role": "user", "content": "y " * CONTEXT_LENGTH}]
        ),
        # The prompt fits but the prompt plus max_tokens does not.
        lambda: buyer.chat(model="tiny", messages=MESSAGES, max_tokens=CONTEXT_LENGTH),
    ]
    for call in calls:
        with pytest.raises(openai.BadRequestError) as caught:
            call()
        assert_error_response(caught.value, status=400)
        assert caught.value.code == "context_length_exceeded"
    ledger.assert_nothing_charged()


def test_an_unknown_model_raises_not_found(marketplace: Coordinator, buyer: Buyer) -> None:
    ledger = watch(marketplace, buyer)
    with pytest.raises(openai.NotFoundError) as caught:
        buyer.chat(model="gpt-9", messages=MESSAGES, max_tokens=4)
    assert_error_response(caught.value, status=404)
    assert caught.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError) as caught:
        buyer.text_stream(model="gpt-9", prompt=PROMPT, max_tokens=4)
    assert_error_response(caught.value, status=404)
    ledger.assert_nothing_charged()


def test_a_model_without_miners_raises_503_with_retry_after(
    marketplace: Coordinator, buyer: Buyer
) -> None:
    ledger = watch(marketplace, buyer)
    with pytest.raises(openai.InternalServerError) as caught:
        buyer.chat_stream(model="tiny-b", messages=MESSAGES, max_tokens=4)
    assert_error_response(caught.value, status=503)
    assert int(caught.value.response.headers["retry-after"]) >= 1
    ledger.assert_nothing_charged()


def test_insufficient_credits_raise_402(marketplace: Coordinator, mode: Mode) -> None:
    key_id, key = create_key(marketplace.database_url, credits_micro=50, name="poor")
    poor = Buyer(mode, marketplace.base_url, key_id, key)
    ledger = watch(marketplace, poor)
    with pytest.raises(openai.APIStatusError) as caught:
        poor.chat(model="tiny", messages=MESSAGES, max_tokens=100)
    assert_error_response(caught.value, status=402)
    with pytest.raises(openai.APIStatusError) as caught:
        poor.chat_stream(model="tiny", messages=MESSAGES, max_tokens=100)
    assert_error_response(caught.value, status=402)
    ledger.assert_nothing_charged()


RPM = 2  # per key, for the rate-limited coordinator below


@pytest.fixture
def rate_limited(
    database_url: str, model_dirs: dict[str, Path], tmp_path: Path
) -> Iterator[Coordinator]:
    """A coordinator of its own that allows each key RPM requests a minute, with one miner."""
    with tiny_coordinator(
        tmp_path, database_url=database_url, model_dirs=model_dirs, extra=["--rpm", str(RPM)]
    ) as running:
        start_miner(running, tmp_path, name="alice", models={"tiny": model_dirs["tiny"]})
        _, probe = create_key(database_url, credits_micro=0, name="probe")
        wait_for_miners(running, probe, "tiny", 1)
        yield running


def test_too_many_requests_raise_rate_limit_error_with_retry_after(
    rate_limited: Coordinator,
) -> None:
    # Both clients in one test: the coordinator and its miner take a while to start.
    for mode in MODES:
        key_id, key = create_key(rate_limited.database_url, credits_micro=CREDITS, name=mode)
        limited = Buyer(mode, rate_limited.base_url, key_id, key)
        for _ in range(RPM):
            reply = limited.chat(model="tiny", messages=MESSAGES, max_tokens=2)
            assert reply.usage is not None
        ledger = watch(rate_limited, limited)
        with pytest.raises(openai.RateLimitError) as caught:
            limited.chat_stream(model="tiny", messages=MESSAGES, max_tokens=2)
        assert_error_response(caught.value, status=429)
        headers = caught.value.response.headers
        assert int(headers["retry-after"]) >= 1
        assert headers["x-ratelimit-limit-requests"] == str(RPM)
        assert headers["x-ratelimit-remaining-requests"] == "0"
        with pytest.raises(openai.RateLimitError):
            limited.text(model="tiny", prompt=PROMPT, max_tokens=2)
        ledger.assert_nothing_charged()
