"""Parsing and validation of OpenAI request bodies, and the price strings of the model list."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator.api import ChatMessage, ProviderPreferences
from coordinator.dispatch.privacy import PrivacyPolicy
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


def test_top_logprobs_forms() -> None:
    assert parse_chat_request(chat(logprobs=True, top_logprobs=3))[0].top_logprobs == 3
    assert parse_chat_request(chat(logprobs=True, top_logprobs=20))[0].top_logprobs == 20
    assert parse_chat_request(chat(logprobs=True))[0].top_logprobs == 0
    text = parse_completion_request({"model": "tiny", "prompt": "p", "logprobs": 5})[0]
    assert (text.logprobs, text.top_logprobs) == (True, 5)
    with pytest.raises(InvalidRequestError, match="needs logprobs to be true"):
        parse_chat_request(chat(top_logprobs=2))
    with pytest.raises(InvalidRequestError, match="from 0 to 5"):
        parse_completion_request({"model": "tiny", "prompt": "p", "logprobs": 6})
    with pytest.raises(InvalidRequestError, match="top_logprobs is a chat parameter"):
        parse_completion_request({"model": "tiny", "prompt": "p", "top_logprobs": 2})


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
        ({"logprobs": 6}, "logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
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
     "stream_options", "n", "stop", "logprobs", "response_format", "max_completion_tokens",
     "provider"]
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


# --- provider: OpenRouter's routing preferences -----------------------------------------------


def test_provider_defaults_when_absent_or_null() -> None:
    assert parse_chat_request(chat())[0].provider == ProviderPreferences()
    assert parse_chat_request(chat(provider=None))[0].provider == ProviderPreferences()
    assert parse_chat_request(chat(provider={}))[0].provider == ProviderPreferences()
    assert ProviderPreferences().allow_fallbacks and ProviderPreferences().sort is None


@pytest.mark.parametrize("sort", ["price", "throughput", "latency"])
def test_provider_sort_values(sort: str) -> None:
    assert parse_chat_request(chat(provider={"sort": sort}))[0].provider.sort == sort
    body = {"model": "tiny", "prompt": "p", "provider": {"sort": sort}}
    assert parse_completion_request(body)[0].provider.sort == sort


def test_provider_max_price_numbers_and_decimal_strings_are_exact() -> None:
    provider = parse_chat_request(
        chat(provider={"max_price": {"prompt": 0.1, "completion": "2.50", "request": 9}})
    )[0].provider
    assert provider.max_prompt_price == Decimal("0.1")  # the decimal, not the binary float
    assert provider.max_completion_price == Decimal("2.5")
    only_prompt = parse_chat_request(chat(provider={"max_price": {"prompt": 3}}))[0].provider
    assert (only_prompt.max_prompt_price, only_prompt.max_completion_price) == (Decimal(3), None)


def test_provider_allow_fallbacks_and_unknown_keys() -> None:
    provider = parse_chat_request(
        chat(
            provider={
                "allow_fallbacks": False,
                "order": ["anthropic"],
                "only": ["x"],
                "ignore": ["y"],
                "quantizations": ["fp8"],
                "require_parameters": True,
            }
        )
    )[0].provider
    assert provider == ProviderPreferences(allow_fallbacks=False)


def test_provider_privacy_tiers() -> None:
    def privacy(provider: object) -> PrivacyPolicy:
        return parse_chat_request(chat(provider=provider))[0].provider.privacy

    assert privacy({}) == PrivacyPolicy() and not PrivacyPolicy().restricted
    assert privacy({"data_collection": "allow", "trust": "any"}) == PrivacyPolicy()
    assert privacy({"data_collection": "deny"}) == PrivacyPolicy(no_retention=True)
    assert privacy({"trust": "vetted"}) == PrivacyPolicy(vetted_only=True)
    both = privacy({"trust": "vetted", "data_collection": "deny"})
    assert both.vetted_only and both.no_retention and both.restricted
    body = {"model": "tiny", "prompt": "p", "provider": {"trust": "vetted"}}
    assert parse_completion_request(body)[0].provider.privacy.vetted_only


def test_a_privacy_policy_admits_only_miners_inside_its_tier() -> None:
    def admitted(policy: PrivacyPolicy) -> set[tuple[bool, bool]]:
        return {
            (vetted, retains)
            for vetted in (False, True)
            for retains in (False, True)
            if policy.admits(vetted=vetted, retains_data=retains)
        }

    everyone = {(False, False), (False, True), (True, False), (True, True)}
    assert admitted(PrivacyPolicy()) == everyone
    assert admitted(PrivacyPolicy(vetted_only=True)) == {(True, False), (True, True)}
    assert admitted(PrivacyPolicy(no_retention=True)) == {(False, False), (True, False)}
    assert admitted(PrivacyPolicy(vetted_only=True, no_retention=True)) == {(True, False)}
    assert "provider.trust: vetted" in PrivacyPolicy(vetted_only=True).describe()


def test_max_price_refusal_reasons() -> None:
    caps = ProviderPreferences(max_prompt_price=Decimal("1.5"), max_completion_price=Decimal(2))
    assert caps.over_max_price(prompt=Decimal("1.5"), completion=Decimal(2)) == []
    reasons = caps.over_max_price(prompt=Decimal("1.6"), completion=Decimal("2.5"))
    assert len(reasons) == 2 and "1.6" in reasons[0] and "2.5" in reasons[1]
    assert ProviderPreferences().over_max_price(prompt=Decimal(10**9), completion=Decimal(1)) == []


@pytest.mark.parametrize(
    ("provider", "param"),
    [
        ("fast", "provider"),
        ([{"sort": "latency"}], "provider"),
        ({"sort": "speed"}, "provider.sort"),
        ({"sort": 1}, "provider.sort"),
        ({"sort": ["latency"]}, "provider.sort"),
        ({"allow_fallbacks": "false"}, "provider.allow_fallbacks"),
        ({"allow_fallbacks": 0}, "provider.allow_fallbacks"),
        ({"max_price": 1}, "provider.max_price"),
        ({"max_price": {"prompt": -1}}, "provider.max_price.prompt"),
        ({"max_price": {"prompt": "cheap"}}, "provider.max_price.prompt"),
        ({"max_price": {"prompt": True}}, "provider.max_price.prompt"),
        ({"max_price": {"prompt": [1]}}, "provider.max_price.prompt"),
        ({"max_price": {"completion": float("inf")}}, "provider.max_price.completion"),
        ({"max_price": {"completion": float("nan")}}, "provider.max_price.completion"),
        ({"max_price": {"completion": "NaN"}}, "provider.max_price.completion"),
        ({"max_price": {"completion": "-0.5"}}, "provider.max_price.completion"),
        ({"data_collection": "never"}, "provider.data_collection"),
        ({"data_collection": False}, "provider.data_collection"),
        ({"trust": "trusted"}, "provider.trust"),
        ({"trust": True}, "provider.trust"),
    ],
)
def test_provider_rejections_name_the_field(provider: object, param: str) -> None:
    for parse, body in (
        (parse_chat_request, chat(provider=provider)),
        (parse_completion_request, {"model": "tiny", "prompt": "p", "provider": provider}),
    ):
        with pytest.raises(InvalidRequestError) as caught:
            parse(body)
        assert caught.value.param == param


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
