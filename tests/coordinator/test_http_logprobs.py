"""logprobs and stop through the real HTTP app and the official openai SDK, over a fake service."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import openai
import pytest
from openai import AsyncOpenAI

from coordinator.api import TextDelta, TokenLogprob

from .fake_service import API_KEY, FakeInferenceService, Script, serving

# "Héllo" as three tokens; the middle one's text went out only with the next (held back).
TOKENS = [
    TokenLogprob(token_id=10, text="H", logprob=-0.25, raw=b"H"),
    TokenLogprob(token_id=11, text="é", logprob=-1.5, raw="é".encode()),
    TokenLogprob(token_id=12, text="llo", logprob=float("-inf"), raw=b"llo"),
]
DELTAS = [
    TextDelta(text="H", token_count=1, tokens=(TOKENS[0],)),
    TextDelta(text="", token_count=1, tokens=(TOKENS[1],)),
    TextDelta(text="éllo", token_count=1, tokens=(TOKENS[2],)),
]
EXPECTED = [-0.25, -1.5, -9999.0]  # -inf has no JSON form: OpenAI's floor stands in


@pytest.fixture
def service() -> FakeInferenceService:
    return FakeInferenceService(script=Script(deltas=DELTAS))


@pytest.fixture
async def client(service: FakeInferenceService) -> AsyncIterator[AsyncOpenAI]:
    async with (
        serving(service) as url,
        AsyncOpenAI(base_url=url, api_key=API_KEY, max_retries=0) as sdk,
    ):
        yield sdk


async def test_chat_logprobs(client: AsyncOpenAI) -> None:
    reply = await client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], logprobs=True, top_logprobs=0
    )
    choice = reply.choices[0]
    assert choice.message.content == "Héllo"
    assert choice.logprobs is not None and choice.logprobs.content is not None
    content = choice.logprobs.content
    assert [entry.token for entry in content] == ["H", "é", "llo"]
    assert [entry.logprob for entry in content] == EXPECTED
    assert [entry.bytes for entry in content] == [[72], [0xC3, 0xA9], [108, 108, 111]]
    assert all(entry.top_logprobs == [] for entry in content)


async def test_chat_without_logprobs_has_none(client: AsyncOpenAI) -> None:
    reply = await client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}]
    )
    assert reply.choices[0].logprobs is None


async def test_chat_stream_logprobs_come_with_every_token(client: AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], logprobs=True, stream=True
    )
    texts: list[str] = []
    entries: list[tuple[str, float]] = []
    async for chunk in stream:
        for choice in chunk.choices:
            texts.append(choice.delta.content or "")
            if choice.logprobs is not None and choice.logprobs.content:
                entries.extend((entry.token, entry.logprob) for entry in choice.logprobs.content)
    assert "".join(texts) == "Héllo"
    # The held-back token still gets its own chunk, with empty text.
    assert entries == [(token.text, value) for token, value in zip(TOKENS, EXPECTED, strict=True)]


async def test_completions_legacy_logprobs(client: AsyncOpenAI) -> None:
    reply = await client.completions.create(model="tiny", prompt="p", logprobs=0)
    logprobs = reply.choices[0].logprobs
    assert logprobs is not None
    assert logprobs.tokens == ["H", "é", "llo"]
    assert logprobs.token_logprobs == EXPECTED
    assert logprobs.text_offset == [0, 1, 2]
    assert logprobs.top_logprobs is None


async def test_completions_stream_offsets_run_on_across_chunks(client: AsyncOpenAI) -> None:
    stream = await client.completions.create(model="tiny", prompt="p", logprobs=0, stream=True)
    offsets: list[int] = []
    values: list[float] = []
    async for chunk in stream:
        for choice in chunk.choices:
            if choice.logprobs is not None:
                offsets.extend(choice.logprobs.text_offset or [])
                values.extend(value for value in choice.logprobs.token_logprobs or [])
    assert offsets == [0, 1, 2] and values == EXPECTED


async def test_odd_miner_values_are_clamped_into_json(
    client: AsyncOpenAI, service: FakeInferenceService
) -> None:
    odd = [TokenLogprob(token_id=1, text="a", logprob=value) for value in (math.nan, 0.5)]
    service.script = Script(deltas=[TextDelta(text="aa", token_count=2, tokens=tuple(odd))])
    reply = await client.completions.create(model="tiny", prompt="p", logprobs=0)
    assert reply.choices[0].logprobs is not None
    assert reply.choices[0].logprobs.token_logprobs == [-9999.0, 0.0]


def _with_alternatives() -> list[TextDelta]:
    """DELTAS whose tokens carry two alternatives each: themselves and "x"."""
    deltas = []
    for delta in DELTAS:
        tokens = tuple(
            replace(
                token,
                alternatives=(token, TokenLogprob(token_id=99, text="x", logprob=-3.0, raw=b"x")),
            )
            for token in delta.tokens
        )
        deltas.append(replace(delta, tokens=tokens))
    return deltas


async def test_chat_top_logprobs(client: AsyncOpenAI, service: FakeInferenceService) -> None:
    service.script = Script(deltas=_with_alternatives())
    messages: Any = [{"role": "user", "content": "hi"}]
    reply = await client.chat.completions.create(
        model="tiny", messages=messages, logprobs=True, top_logprobs=2
    )
    assert service.runs[-1].request.top_logprobs == 2
    assert reply.choices[0].logprobs is not None
    content = reply.choices[0].logprobs.content or []
    assert [[alt.token for alt in entry.top_logprobs] for entry in content] == [
        ["H", "x"],
        ["é", "x"],
        ["llo", "x"],
    ]
    assert [entry.top_logprobs[0].logprob for entry in content] == EXPECTED
    assert content[1].top_logprobs[0].bytes == list("é".encode())
    streamed = [
        entry
        async for chunk in await client.chat.completions.create(
            model="tiny", messages=messages, logprobs=True, top_logprobs=2, stream=True
        )
        if chunk.choices and chunk.choices[0].logprobs
        for entry in chunk.choices[0].logprobs.content or []
    ]
    assert [entry.model_dump() for entry in streamed] == [e.model_dump() for e in content]


async def test_completions_top_logprobs(client: AsyncOpenAI, service: FakeInferenceService) -> None:
    service.script = Script(deltas=_with_alternatives())
    reply = await client.completions.create(model="tiny", prompt="p", logprobs=2)
    assert service.runs[-1].request.top_logprobs == 2
    logprobs = reply.choices[0].logprobs
    assert logprobs is not None
    assert logprobs.top_logprobs == [
        {"H": -0.25, "x": -3.0},
        {"é": -1.5, "x": -3.0},
        {"llo": -9999.0, "x": -3.0},
    ]


async def test_stop_reaches_the_service(client: AsyncOpenAI, service: FakeInferenceService) -> None:
    await client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], stop=["\n", "END"]
    )
    await client.completions.create(model="tiny", prompt="p", stop="##")
    assert [run.request.stop for run in service.runs] == [("\n", "END"), ("##",)]
    with pytest.raises(openai.BadRequestError) as caught:
        await client.completions.create(model="tiny", prompt="p", stop=["a", "b", "c", "d", "e"])
    assert caught.value.body is not None and "stop" in str(caught.value.body)
