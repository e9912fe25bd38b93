"""Parsing and validation of OpenAI request bodies, and the price strings of the model list."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator.api import ChatMessage
from coordinator.errors import InvalidRequestError
from coordinator.http.protocol import (
    credits_per_million,
    credits_per_token,
    parse_chat_request,
    parse_completion_request,
)


def chat(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    body.update(fields)
    return body


def test_chat_defaults_and_roles() -> None:
    body = chat(
        messages=[
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": t} for t in ("a", "b")]},
            {"role": "assistant", "content": "ok", "name": "bot"},
        ],
        unknown_field={"anything": 1},
    )
    request, options = parse_chat_request(body)
    assert request.messages == (
        ChatMessage(role="system", content="be brief"),
        ChatMessage(role="user", content="a\nb"),
        ChatMessage(role="assistant", content="ok"),
    )
    assert request.prompt is None
    assert (request.max_tokens, request.temperature, request.top_p, request.seed) == (
        None,
        1.0,
        1.0,
        None,
    )
    assert (options.stream, options.include_usage) == (False, False)


def test_sampling_fields_are_carried() -> None:
    request, options = parse_chat_request(
        chat(
            temperature=0,
            top_p=0.5,
            seed=42,
            max_tokens=9,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert (request.temperature, request.top_p, request.seed, request.max_tokens) == (
        0.0,
        0.5,
        42,
        9,
    )
    assert (options.stream, options.include_usage) == (True, True)


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    assert parse_chat_request(chat(max_tokens=5, max_completion_tokens=8))[0].max_tokens == 8
    assert parse_chat_request(chat(max_tokens=5, max_completion_tokens=None))[0].max_tokens == 5


def test_negative_seed_maps_to_its_unsigned_twin() -> None:
    assert parse_chat_request(chat(seed=-1))[0].seed == 2**64 - 1


def test_supported_values_of_unsupported_features_are_accepted() -> None:
    request, _ = parse_chat_request(
        chat(n=1, stop=None, logprobs=False, tools=[], response_format={"type": "text"})
    )
    assert request.model == "tiny"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"model": ""}, "model"),
        ({"model": 3}, "model"),
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": ["hi"]}, "messages[0]"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages[0].content",
        ),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 1_000_001}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"max_tokens": 2.0}, "max_tokens"),
        ({"max_completion_tokens": -1}, "max_completion_tokens"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": "1"}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"seed": 1.5}, "seed"),
        ({"seed": True}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"stream": "yes"}, "stream"),
        ({"stream": 1}, "stream"),
        ({"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
        ({"n": 2}, "n"),
        ({"n": True}, "n"),
        ({"stop": ""}, "stop"),
        ({"stop": ["a", ""]}, "stop"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": 3}, "stop"),
        ({"stop": ["x" * 1001]}, "stop"),
        ({"logprobs": 1}, "logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"top_logprobs": 21}, "top_logprobs"),
        ({"top_logprobs": True}, "top_logprobs"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
    ],
)
def test_chat_rejections_name_the_field(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        parse_chat_request(chat(**fields))
    assert caught.value.param == param


def test_body_must_be_an_object() -> None:
    with pytest.raises(InvalidRequestError):
        parse_chat_request([chat()])


def test_unsupported_features_say_so() -> None:
    with pytest.raises(InvalidRequestError, match="not supported yet"):
        parse_chat_request(chat(tools=[{"type": "function"}]))
    with pytest.raises(InvalidRequestError, match="top_logprobs are not supported: miners"):
        parse_chat_request(chat(logprobs=True, top_logprobs=3))
    with pytest.raises(InvalidRequestError, match="top_logprobs are not supported: miners"):
        parse_completion_request({"model": "tiny", "prompt": "p", "logprobs": 1})


@pytest.mark.parametrize(
    ("stop", "expected"),
    [(None, ()), ([], ()), ("\n", ("\n",)), (["a", "bc", "a"], ("a", "bc", "a"))],
)
def test_stop_forms(stop: object, expected: tuple[str, ...]) -> None:
    assert parse_chat_request(chat(stop=stop))[0].stop == expected
    body = {"model": "tiny", "prompt": "p", "stop": stop}
    assert parse_completion_request(body)[0].stop == expected


def test_logprobs_flags() -> None:
    def chat_wants(**fields: Any) -> bool:
        return parse_chat_request(chat(**fields))[1].logprobs

    def text_wants(**fields: Any) -> bool:
        return parse_completion_request({"model": "tiny", "prompt": "p", **fields})[1].logprobs

    assert chat_wants(logprobs=True) and chat_wants(logprobs=True, top_logprobs=0)
    assert not chat_wants() and not chat_wants(logprobs=False, top_logprobs=0)
    assert text_wants(logprobs=0)
    assert not text_wants() and not text_wants(logprobs=None) and not text_wants(logprobs=False)
    with pytest.raises(InvalidRequestError, match="only text content is supported"):
        parse_chat_request(chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]))


def test_completion_prompt_forms() -> None:
    request, _ = parse_completion_request({"model": "tiny", "prompt": "Once", "max_tokens": 3})
    assert (request.prompt, request.messages, request.max_tokens) == ("Once", None, 3)
    request, _ = parse_completion_request({"model": "tiny", "prompt": ["Once"]})
    assert request.prompt == "Once"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"prompt": [1, 2, 3]}, "prompt"),
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": None}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"logprobs": 2}, "logprobs"),
        ({"logprobs": 6}, "logprobs"),
        ({"logprobs": True}, "logprobs"),
        ({"logprobs": -1}, "logprobs"),
        ({"echo": True}, "echo"),
        ({"best_of": 3}, "best_of"),
        ({"suffix": "end"}, "suffix"),
    ],
)
def test_completion_rejections(fields: dict[str, Any], param: str) -> None:
    body: dict[str, Any] = {"model": "tiny", "prompt": "p"}
    body.update(fields)
    with pytest.raises(InvalidRequestError) as caught:
        parse_completion_request(body)
    assert caught.value.param == param


def test_token_id_prompts_are_not_supported() -> None:
    with pytest.raises(InvalidRequestError, match="token id prompts are not supported"):
        parse_completion_request({"model": "tiny", "prompt": [50256]})


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
request_fields = st.sampled_from(
    ["model", "messages", "prompt", "max_tokens", "temperature", "top_p", "seed", "stream",
     "stream_options", "n", "stop", "logprobs", "response_format", "max_completion_tokens"]
)  # fmt: skip


@given(st.dictionaries(request_fields, json_values) | json_values)
def test_any_json_is_parsed_or_rejected_as_invalid(body: object) -> None:
    for parse in (parse_chat_request, parse_completion_request):
        try:
            request, _ = parse(body)
        except InvalidRequestError:
            continue
        assert 0 <= request.temperature <= 2 and 0 < request.top_p <= 1
        assert request.max_tokens is None or 1 <= request.max_tokens <= 1_000_000
        assert request.seed is None or 0 <= request.seed < 2**64


def test_price_strings_are_plain_decimals() -> None:
    assert credits_per_million(150_000) == "0.15"
    assert credits_per_token(150_000) == "0.00000015"
    assert credits_per_million(2_000_000) == "2"
    assert credits_per_token(0) == "0"
    assert credits_per_token(1) == "0.000000000001"


@given(st.integers(min_value=0, max_value=10**15))
def test_price_strings_are_exact(micro_per_mtok: int) -> None:
    assert Decimal(credits_per_million(micro_per_mtok)) * 10**6 == micro_per_mtok
    assert Decimal(credits_per_token(micro_per_mtok)) * 10**12 == micro_per_mtok
    assert "E" not in credits_per_token(micro_per_mtok)
