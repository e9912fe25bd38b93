"""Server-sent event streams: chunk shapes, usage last, errors mid-stream, clients that leave."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam

from coordinator.errors import NoMinerAvailableError, RateLimitState, UpstreamError

from .fake_service import (
    API_KEY,
    INPUT_PRICE_PER_TOKEN,
    OUTPUT_PRICE_PER_TOKEN,
    PROMPT_TOKENS,
    FakeInferenceService,
    Script,
    serving,
    text_deltas,
)

AUTH = {"Authorization": f"Bearer {API_KEY}"}
HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say hello"}]


@pytest.fixture
def service() -> FakeInferenceService:
    return FakeInferenceService()


@pytest.fixture
async def base_url(service: FakeInferenceService) -> AsyncIterator[str]:
    async with serving(service) as url:
        yield url


@pytest.fixture
async def client(base_url: str) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(base_url=base_url, api_key=API_KEY, max_retries=0) as sdk:
        yield sdk


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def parse_events(raw: str) -> list[str]:
    """The data of each event, in order; every event must be exactly one data line."""
    assert raw.endswith("\n\n")
    events = raw[: -len("\n\n")].split("\n\n")
    assert all(event.startswith("data: ") and "\n" not in event for event in events)
    return [event[len("data: ") :] for event in events]


async def stream_raw(
    http: aiohttp.ClientSession, url: str, body: dict[str, Any]
) -> tuple[aiohttp.ClientResponse, list[str]]:
    async with http.post(url, json=body, headers=AUTH) as response:
        raw = await response.text()
    return response, parse_events(raw)


async def test_chat_stream_through_the_sdk(
    client: AsyncOpenAI, service: FakeInferenceService
) -> None:
    service.script = Script(deltas=text_deltas("Hel", "", "lo", " world"), finish_reason="length")
    stream = await client.chat.completions.create(model="tiny", messages=HELLO, stream=True)
    chunks = [chunk async for chunk in stream]

    assert {chunk.id for chunk in chunks} == {"chatcmpl-fake"}
    assert len({chunk.created for chunk in chunks}) == 1
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    first, *middle, finish, last = chunks
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
    # The empty delta sends no chunk of its own, but its token is billed.
    assert [chunk.choices[0].delta.content for chunk in middle] == ["Hel", "lo", " world"]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    finishes = [reason for reason in finishes if reason is not None]
    assert finishes == ["length"]
    assert finish.choices[0].finish_reason == "length" and finish.choices[0].delta.content is None
    assert last.choices == [] and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (PROMPT_TOKENS, 4)
    cost = PROMPT_TOKENS * INPUT_PRICE_PER_TOKEN + 4 * OUTPUT_PRICE_PER_TOKEN
    assert (last.usage.model_extra or {})["cost_micro"] == cost
    (run,) = service.runs
    assert run.exited and run.exit_error is None and run.delivered == 4


async def test_chat_stream_on_the_wire(
    base_url: str, http: aiohttp.ClientSession, service: FakeInferenceService
) -> None:
    service.script = Script(deltas=text_deltas("a", "b"))
    body = {"model": "tiny", "messages": HELLO, "stream": True}
    response, events = await stream_raw(http, f"{base_url}/chat/completions", body)
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/event-stream"
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.headers["x-request-id"].startswith("req_")
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert [len(chunk["choices"]) for chunk in chunks] == [1, 1, 1, 1, 0]
    assert "usage" not in chunks[0]  # without include_usage only the last chunk has usage
    assert chunks[-1]["usage"]["total_tokens"] == PROMPT_TOKENS + 2


async def test_include_usage_puts_null_usage_on_every_chunk(
    base_url: str, http: aiohttp.ClientSession, service: FakeInferenceService
) -> None:
    service.script = Script(deltas=text_deltas("a", "b"))
    body = {
        "model": "tiny",
        "messages": HELLO,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    _, events = await stream_raw(http, f"{base_url}/chat/completions", body)
    chunks = [json.loads(event) for event in events[:-1]]
    assert [chunk["usage"] is None for chunk in chunks] == [True] * (len(chunks) - 1) + [False]


async def test_text_completion_stream(client: AsyncOpenAI, service: FakeInferenceService) -> None:
    service.script = Script(deltas=text_deltas(" upon", "", " a time"))
    stream = await client.completions.create(model="tiny", prompt="Once", stream=True)
    chunks = [chunk async for chunk in stream]
    assert {chunk.id for chunk in chunks} == {"cmpl-fake"}
    assert all(chunk.object == "text_completion" for chunk in chunks)
    *texts, finish, last = chunks
    assert [chunk.choices[0].text for chunk in texts] == [" upon", " a time"]
    assert all(chunk.choices[0].finish_reason is None for chunk in texts)
    assert finish.choices[0].finish_reason == "stop" and finish.choices[0].text == ""
    assert last.choices == [] and last.usage is not None and last.usage.completion_tokens == 3


async def test_errors_before_output_are_plain_http_errors(
    client: AsyncOpenAI, service: FakeInferenceService
) -> None:
    service.script = Script(enter_error=NoMinerAvailableError("all busy", retry_after=3))
    with pytest.raises(openai.InternalServerError) as caught:
        await client.chat.completions.create(model="tiny", messages=HELLO, stream=True)
    assert caught.value.status_code == 503
    assert caught.value.response.headers["Retry-After"] == "3"
    assert caught.value.response.headers["Content-Type"].startswith("application/json")


async def test_upstream_error_mid_stream_raises_in_the_sdk(
    client: AsyncOpenAI, service: FakeInferenceService
) -> None:
    service.script = Script(
        deltas=text_deltas("a", "b", "c", "d"), error_after=2, error=UpstreamError("miner died")
    )
    stream = await client.chat.completions.create(model="tiny", messages=HELLO, stream=True)
    received: list[str] = []
    with pytest.raises(openai.APIError) as caught:
        async for chunk in stream:
            received.append(chunk.choices[0].delta.content or "")
    assert caught.value.message == "miner died"
    assert received == ["", "a", "b"]
    (run,) = service.runs
    assert run.exited and run.delivered == 2 and not run.finished


async def test_error_event_ends_the_stream_without_done(
    base_url: str, http: aiohttp.ClientSession, service: FakeInferenceService
) -> None:
    service.script = Script(
        deltas=text_deltas("a", "b"), error_after=1, error=UpstreamError("miner died")
    )
    body = {"model": "tiny", "prompt": "x", "stream": True}
    _, events = await stream_raw(http, f"{base_url}/completions", body)
    assert "[DONE]" not in events
    error = json.loads(events[-1])["error"]
    assert error == {
        "message": "miner died",
        "type": "upstream_error",
        "code": "upstream_error",
        "param": None,
    }


async def test_unexpected_exception_mid_stream_hides_details(
    base_url: str, http: aiohttp.ClientSession, service: FakeInferenceService
) -> None:
    service.script = Script(
        deltas=text_deltas("a", "b"), error_after=1, error=KeyError("secret-detail")
    )
    body = {"model": "tiny", "messages": HELLO, "stream": True}
    response, events = await stream_raw(http, f"{base_url}/chat/completions", body)
    error = json.loads(events[-1])["error"]
    assert error["type"] == "server_error"
    assert response.headers["x-request-id"] in error["message"]
    assert "secret-detail" not in "".join(events)


@pytest.mark.parametrize("handler_cancellation", [False, True])
async def test_client_leaving_stops_the_completion(
    service: FakeInferenceService, http: aiohttp.ClientSession, handler_cancellation: bool
) -> None:
    total = 200
    service.script = Script(deltas=text_deltas(*["tok"] * total), delay=0.01)
    body = {"model": "tiny", "messages": HELLO, "stream": True}
    async with serving(service, handler_cancellation=handler_cancellation) as base_url:
        response = await http.post(f"{base_url}/chat/completions", json=body, headers=AUTH)
        received = 0
        async for line in response.content:
            if b'"content":"tok"' in line:
                received += 1
                if received == 3:
                    break
        response.close()  # drops the connection mid-stream

        (run,) = service.runs
        await asyncio.wait_for(run.left.wait(), timeout=5)
    # Without handler cancellation the next write fails; with it, the handler is cancelled.
    expected = asyncio.CancelledError if handler_cancellation else ConnectionResetError
    assert isinstance(run.exit_error, expected)
    assert not run.finished
    # Billed: what was written before the server noticed; never the rest of the job.
    assert received <= run.delivered < total
    assert run.taken <= run.delivered + 1


@pytest.mark.parametrize("stream", [True, False])
async def test_a_client_leaving_before_the_answer_begins_cancels_the_wait(
    service: FakeInferenceService, http: aiohttp.ClientSession, stream: bool
) -> None:
    # Entering complete() is where a request waits in the queue or for the first token.
    service.script = Script(deltas=text_deltas("never"), enter_delay=30)
    body = {"model": "tiny", "messages": HELLO, "stream": stream}
    async with serving(service) as base_url:
        request = asyncio.ensure_future(
            http.post(f"{base_url}/chat/completions", json=body, headers=AUTH)
        )
        await asyncio.wait_for(service.started.wait(), timeout=5)
        request.cancel()  # the client hangs up while it waits
        with pytest.raises(asyncio.CancelledError):
            await request
        (run,) = service.runs
        await asyncio.wait_for(run.left.wait(), timeout=5)
    assert isinstance(run.exit_error, asyncio.CancelledError)
    assert run.taken == 0 and run.delivered == 0


@pytest.mark.parametrize("stream", [True, False])
async def test_successful_answers_carry_the_rate_limit_headers(
    service: FakeInferenceService, http: aiohttp.ClientSession, stream: bool
) -> None:
    service.script = Script(
        deltas=text_deltas("hi"),
        rate_limits={
            "requests": RateLimitState(limit=60, remaining=59, reset_s=1.0),
            "tokens": RateLimitState(limit=1000, remaining=900, reset_s=6.0),
        },
    )
    body = {"model": "tiny", "messages": HELLO, "stream": stream}
    async with (
        serving(service) as base_url,
        http.post(f"{base_url}/chat/completions", json=body, headers=AUTH) as response,
    ):
        assert response.status == 200
        await response.read()
    assert response.headers["x-ratelimit-limit-requests"] == "60"
    assert response.headers["x-ratelimit-remaining-requests"] == "59"
    assert response.headers["x-ratelimit-reset-requests"] == "1s"
    assert response.headers["x-ratelimit-remaining-tokens"] == "900"
    assert response.headers["x-ratelimit-reset-tokens"] == "6s"
