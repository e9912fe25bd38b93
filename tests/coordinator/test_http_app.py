"""The real aiohttp app, driven by the official openai SDK: answers, errors and request ids."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import aiohttp
import openai
import pytest
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam

from coordinator.api import ChatMessage, ModelCard, TextDelta
from coordinator.errors import (
    ContextLengthError,
    InsufficientCreditsError,
    ModelNotFoundError,
    NoMatchingEndpointError,
    NoMinerAvailableError,
    UpstreamError,
)

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

CARD = ModelCard(
    name="tiny",
    context_length=2048,
    input_price_per_mtok=150_000,
    output_price_per_mtok=600_000,
    miners=2,
    vetted_miners=1,
    created=1_700_000_123,
)


@pytest.fixture
def service() -> FakeInferenceService:
    return FakeInferenceService(cards=[CARD])


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


def error_body(exc: openai.APIStatusError) -> dict[str, Any]:
    """The "error" object of the response, as the SDK parsed it."""
    assert isinstance(exc.body, dict)
    return exc.body


AUTH = {"Authorization": f"Bearer {API_KEY}"}
HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say hello"}]


async def test_chat_completion(client: AsyncOpenAI, service: FakeInferenceService) -> None:
    service.script = Script(deltas=[*text_deltas("Hel", "lo", "", " world")])
    raw = await client.chat.completions.with_raw_response.create(
        model="tiny",
        messages=[{"role": "system", "content": "be nice"}, *HELLO],
        temperature=0.3,
        max_tokens=10,
        seed=5,
    )
    response = raw.parse()
    assert response.object == "chat.completion"
    assert response.id == "chatcmpl-fake" and response.model == "tiny"
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content == "Hello world"
    assert response.choices[0].finish_reason == "stop"
    assert response.usage is not None
    # The empty delta still carries a token, and the bill covers it.
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (PROMPT_TOKENS, 4)
    assert response.usage.total_tokens == PROMPT_TOKENS + 4
    expected_cost = PROMPT_TOKENS * INPUT_PRICE_PER_TOKEN + 4 * OUTPUT_PRICE_PER_TOKEN
    assert (response.usage.model_extra or {})["cost_micro"] == expected_cost
    assert raw.headers["x-request-id"].startswith("req_")

    (run,) = service.runs
    assert run.request.messages == (
        ChatMessage("system", "be nice"),
        ChatMessage("user", "Say hello"),
    )
    assert (run.request.temperature, run.request.max_tokens, run.request.seed) == (0.3, 10, 5)
    assert run.exited and run.exit_error is None and run.delivered == 4


async def test_text_completion(client: AsyncOpenAI, service: FakeInferenceService) -> None:
    deltas = [TextDelta("upon a", 2), TextDelta(" time", 1)]
    service.script = Script(deltas=deltas, finish_reason="length")
    response = await client.completions.create(model="tiny", prompt="Once", max_tokens=3)
    assert response.object == "text_completion"
    assert response.choices[0].text == "upon a time"
    assert response.choices[0].finish_reason == "length"
    assert response.usage is not None and response.usage.completion_tokens == 3
    assert service.runs[0].request.prompt == "Once"
    assert service.runs[0].request.messages is None


async def test_request_id_is_echoed_when_sane(client: AsyncOpenAI) -> None:
    raw = await client.chat.completions.with_raw_response.create(
        model="tiny", messages=HELLO, extra_headers={"x-request-id": "trace-42"}
    )
    assert raw.headers["x-request-id"] == "trace-42"
    raw = await client.chat.completions.with_raw_response.create(
        model="tiny", messages=HELLO, extra_headers={"x-request-id": "x" * 129}
    )
    assert raw.headers["x-request-id"].startswith("req_")


@pytest.mark.parametrize(
    ("error", "sdk_error", "status", "code"),
    [
        (ContextLengthError("prompt too long", param="messages"), openai.BadRequestError, 400,
         "context_length_exceeded"),
        (ModelNotFoundError("no such model"), openai.NotFoundError, 404, "model_not_found"),
        (NoMatchingEndpointError("too dear"), openai.NotFoundError, 404, "no_endpoints_found"),
        (InsufficientCreditsError("balance too low"), openai.APIStatusError, 402,
         "insufficient_credits"),
        (NoMinerAvailableError("all busy", retry_after=7), openai.InternalServerError, 503,
         "no_miner_available"),
    ],
)  # fmt: skip
async def test_service_errors_reach_the_sdk(
    client: AsyncOpenAI,
    service: FakeInferenceService,
    error: Exception,
    sdk_error: type[openai.APIStatusError],
    status: int,
    code: str,
) -> None:
    service.script = Script(enter_error=error)
    with pytest.raises(sdk_error) as caught:
        await client.chat.completions.create(
            model="tiny", messages=HELLO, extra_headers={"x-request-id": "err-1"}
        )
    assert caught.value.status_code == status
    assert caught.value.code == code
    assert error_body(caught.value)["message"] == str(error)
    assert caught.value.response.headers["x-request-id"] == "err-1"
    if isinstance(error, NoMinerAvailableError):
        assert caught.value.response.headers["Retry-After"] == "7"


async def test_bad_key_is_401(base_url: str) -> None:
    async with AsyncOpenAI(base_url=base_url, api_key="sk-wrong", max_retries=0) as sdk:
        with pytest.raises(openai.AuthenticationError) as caught:
            await sdk.chat.completions.create(model="tiny", messages=HELLO)
        assert caught.value.code == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            await sdk.models.list()


async def test_missing_key_is_401(base_url: str, http: aiohttp.ClientSession) -> None:
    async with http.post(f"{base_url}/chat/completions", json={"model": "tiny"}) as response:
        assert response.status == 401
        body = await response.json()
    assert body["error"]["type"] == "authentication_error"
    assert response.headers["x-request-id"].startswith("req_")


async def test_invalid_parameter_is_400_with_param(
    client: AsyncOpenAI, service: FakeInferenceService
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model="tiny", messages=HELLO, temperature=3)
    assert caught.value.param == "temperature"
    assert caught.value.type == "invalid_request_error"
    assert service.runs == []  # rejected before the service was asked


async def test_upstream_failure_without_stream_is_502(
    client: AsyncOpenAI, service: FakeInferenceService
) -> None:
    service.script = Script(
        deltas=text_deltas("a", "b", "c"), error_after=2, error=UpstreamError("miner died")
    )
    with pytest.raises(openai.InternalServerError) as caught:
        await client.completions.create(model="tiny", prompt="x")
    assert caught.value.status_code == 502
    assert error_body(caught.value)["message"] == "miner died"
    (run,) = service.runs
    assert run.exited and isinstance(run.exit_error, UpstreamError) and run.delivered == 2


@pytest.mark.parametrize("payload", [b"{not json", b"[1, 2]", b"", b'{"model": NaN}'])
async def test_malformed_body_is_400(
    base_url: str, http: aiohttp.ClientSession, payload: bytes
) -> None:
    async with http.post(f"{base_url}/chat/completions", data=payload, headers=AUTH) as response:
        assert response.status == 400
        body = await response.json()
    assert body["error"]["type"] == "invalid_request_error"
    assert set(body["error"]) == {"message", "type", "code", "param"}
    assert "x-request-id" in response.headers


async def test_body_too_large_is_413(service: FakeInferenceService) -> None:
    async with (
        serving(service, max_body_bytes=1024) as url,
        AsyncOpenAI(base_url=url, api_key=API_KEY, max_retries=0) as sdk,
    ):
        with pytest.raises(openai.APIStatusError) as caught:
            await sdk.completions.create(model="tiny", prompt="x" * 4096)
    assert caught.value.status_code == 413
    assert caught.value.code == "request_too_large"
    assert "x-request-id" in caught.value.response.headers
    assert service.runs == []


async def test_unknown_route_and_method_are_json(
    base_url: str, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{base_url}/nope", headers={"x-request-id": "r-404"}) as response:
        assert response.status == 404
        body = await response.json()
    assert response.headers["x-request-id"] == "r-404"
    assert body["error"]["message"] == "Invalid URL (GET /v1/nope)"

    async with http.get(f"{base_url}/chat/completions", headers=AUTH) as response:
        assert response.status == 405
        body = await response.json()
    assert "POST" in response.headers["Allow"]
    assert body["error"]["code"] == "method_not_allowed"
    assert response.headers["x-request-id"].startswith("req_")


async def test_unexpected_exception_is_a_bare_500(
    client: AsyncOpenAI, service: FakeInferenceService, caplog: pytest.LogCaptureFixture
) -> None:
    service.script = Script(enter_error=RuntimeError("secret-detail in /srv/pool.py"))
    with (
        caplog.at_level(logging.ERROR, logger="coordinator.http.app"),
        pytest.raises(openai.InternalServerError) as caught,
    ):
        await client.chat.completions.create(model="tiny", messages=HELLO)
    request_id = caught.value.response.headers["x-request-id"]
    text = caught.value.response.text
    assert caught.value.status_code == 500
    assert request_id in error_body(caught.value)["message"]
    assert "secret-detail" not in text and "Traceback" not in text and "RuntimeError" not in text
    # The operator gets the traceback, tagged with the same request id.
    (record,) = [r for r in caplog.records if r.exc_info]
    assert request_id in record.getMessage()
    assert record.exc_info is not None and isinstance(record.exc_info[1], RuntimeError)


async def test_models_list(client: AsyncOpenAI, service: FakeInferenceService) -> None:
    page = await client.models.list()
    (model,) = page.data
    assert (model.id, model.object, model.owned_by, model.created) == (
        "tiny",
        "model",
        "meshmint",
        CARD.created,
    )
    extra = model.model_extra or {}
    assert extra["context_length"] == 2048 and extra["miners"] == 2
    assert extra["vetted_miners"] == 1
    assert extra["input_price_per_million"] == "0.15"
    assert extra["output_price_per_million"] == "0.6"
    assert Decimal(extra["pricing"]["prompt"]) * 10**12 == CARD.input_price_per_mtok
    assert Decimal(extra["pricing"]["completion"]) == Decimal("0.0000006")

    assert (await client.models.retrieve("tiny")).id == "tiny"
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("huge")


async def test_health_needs_no_key(base_url: str, http: aiohttp.ClientSession) -> None:
    async with http.get(base_url.removesuffix("/v1") + "/health") as response:
        assert response.status == 200
        assert await response.json() == {"status": "ok", "ready": False, "miners": 0}
        assert response.headers["x-request-id"].startswith("req_")
