"""The OpenAI wire format: request bodies in, response bodies and stream chunks out.

Parsing is strict about what would change the output (an unsupported feature is a 400, not a
silent approximation) and lenient about the rest: unknown fields are ignored, as OpenAI
clients send many optional ones. Every rejection is an :class:`InvalidRequestError` whose
``param`` names the offending field.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Literal, TypeGuard

from coordinator.api import (
    ChatMessage,
    CompletionRequest,
    FinishReason,
    ModelCard,
    TokenLogprob,
    Usage,
)
from coordinator.errors import InvalidRequestError
from coordinator.http.provider import parse_provider

Endpoint = Literal["chat", "text"]
"""``chat``: /v1/chat/completions; ``text``: /v1/completions."""

JsonObject = dict[str, object]

MAX_TOKENS_LIMIT = 1_000_000
"""Largest ``max_tokens`` accepted; far above any context, it only rejects nonsense early."""

_SEED_MIN = -(2**63)  # OpenAI documents seed as a signed 64-bit integer
_UINT64 = 2**64  # the miner protocol carries seeds as uint64

_ROLES: dict[str, Literal["system", "user", "assistant"]] = {
    "system": "system",
    "developer": "system",  # OpenAI's newer name for the system role
    "user": "user",
    "assistant": "assistant",
}

# Fields that would change the output if we accepted and ignored them; a later issue adds some.
_UNSUPPORTED_WHEN_SET = ("tools", "functions", "suffix")

MAX_STOP_SEQUENCES = 4
"""OpenAI's limit on ``stop`` strings per request."""

MAX_STOP_CHARS = 1000
"""Longest stop string accepted: the coordinator holds back up to this much streamed text."""

_MAX_TOP_LOGPROBS = {"chat": 20, "text": 5}  # OpenAI's ranges for top_logprobs / logprobs


@dataclass(frozen=True)
class StreamOptions:
    """How the buyer asked to receive the answer."""

    stream: bool  # server-sent events instead of one JSON body
    include_usage: bool  # stream_options.include_usage: every chunk carries "usage" (null but last)
    logprobs: bool = False  # each token's log-probability goes out with the text


def parse_chat_request(body: object) -> tuple[CompletionRequest, StreamOptions]:
    """Validates a /v1/chat/completions body."""
    fields = _require_object(body)
    messages = _parse_messages(fields.get("messages"))
    return _parse_common(fields, "chat", messages=messages, prompt=None)


def parse_completion_request(body: object) -> tuple[CompletionRequest, StreamOptions]:
    """Validates a /v1/completions body."""
    fields = _require_object(body)
    if fields.get("echo") not in (None, False):
        raise InvalidRequestError("echo is not supported yet", param="echo")
    if fields.get("best_of") not in (None, 1):
        raise InvalidRequestError("best_of must be 1", param="best_of")
    prompt = _parse_prompt(fields.get("prompt"))
    return _parse_common(fields, "text", messages=None, prompt=prompt)


def _require_object(body: object) -> JsonObject:
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    return body


def _parse_common(
    fields: JsonObject,
    endpoint: Endpoint,
    *,
    messages: tuple[ChatMessage, ...] | None,
    prompt: str | None,
) -> tuple[CompletionRequest, StreamOptions]:
    model = fields.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequestError("model must be a non-empty string", param="model")
    _reject_unsupported(fields)
    logprobs, top_logprobs = _parse_logprobs(fields, endpoint)
    request = CompletionRequest(
        model=model,
        messages=messages,
        prompt=prompt,
        max_tokens=_parse_max_tokens(fields),
        temperature=_number(fields, "temperature", default=1.0, low=0.0, high=2.0),
        top_p=_number(fields, "top_p", default=1.0, low=0.0, high=1.0, low_open=True),
        seed=_parse_seed(fields.get("seed")),
        stop=_parse_stop(fields.get("stop")),
        provider=parse_provider(fields.get("provider")),
        logprobs=logprobs,
        top_logprobs=top_logprobs,
    )
    options = _parse_stream_options(fields)
    return request, replace(options, logprobs=request.logprobs)


def _reject_unsupported(fields: JsonObject) -> None:
    n = fields.get("n")
    if n is not None and (not _is_int(n) or n != 1):
        raise InvalidRequestError("n must be 1", param="n")
    for name in _UNSUPPORTED_WHEN_SET:
        value = fields.get(name)
        if value is not None and value != [] and value != "":
            raise InvalidRequestError(f"{name} is not supported yet", param=name)
    response_format = fields.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise InvalidRequestError(
            "response_format other than text is not supported yet", param="response_format"
        )


def _parse_stop(value: object) -> tuple[str, ...]:
    if value is None or value == []:
        return ()
    stops = [value] if isinstance(value, str) else value
    if (
        not isinstance(stops, list)
        or len(stops) > MAX_STOP_SEQUENCES
        or not all(isinstance(stop, str) and 0 < len(stop) <= MAX_STOP_CHARS for stop in stops)
    ):
        raise InvalidRequestError(
            f"stop must be a string or an array of up to {MAX_STOP_SEQUENCES} non-empty strings "
            f"of at most {MAX_STOP_CHARS} characters",
            param="stop",
        )
    return tuple(stops)


def _parse_logprobs(fields: JsonObject, endpoint: Endpoint) -> tuple[bool, int]:
    """Whether the buyer asked for logprobs, and for how many alternatives per token."""
    value = fields.get("logprobs")
    top = fields.get("top_logprobs")
    if endpoint == "chat":
        if top is not None and (not _is_int(top) or not 0 <= top <= _MAX_TOP_LOGPROBS["chat"]):
            raise InvalidRequestError(
                "top_logprobs must be an integer from 0 to 20", param="top_logprobs"
            )
        if value is not None and not isinstance(value, bool):
            raise InvalidRequestError("logprobs must be a boolean", param="logprobs")
        if top and not value:
            raise InvalidRequestError(
                "top_logprobs needs logprobs to be true", param="top_logprobs"
            )
        return bool(value), int(top or 0)
    # Completions take the number of alternatives per token; false and null mean none at all.
    if top is not None:
        raise InvalidRequestError(
            "top_logprobs is a chat parameter; completions take logprobs as an integer",
            param="top_logprobs",
        )
    if value is None or value is False:
        return False, 0
    if not _is_int(value) or not 0 <= value <= _MAX_TOP_LOGPROBS["text"]:
        raise InvalidRequestError("logprobs must be an integer from 0 to 5", param="logprobs")
    return True, int(value)


def _parse_messages(value: object) -> tuple[ChatMessage, ...]:
    if not isinstance(value, list) or not value:
        raise InvalidRequestError("messages must be a non-empty array", param="messages")
    return tuple(_parse_message(item, index) for index, item in enumerate(value))


def _parse_message(item: object, index: int) -> ChatMessage:
    where = f"messages[{index}]"
    if not isinstance(item, dict):
        raise InvalidRequestError(f"{where} must be an object", param=where)
    role = item.get("role")
    if not isinstance(role, str) or role not in _ROLES:
        raise InvalidRequestError(
            f"{where}.role must be one of system, developer, user, assistant",
            param=f"{where}.role",
        )
    return ChatMessage(role=_ROLES[role], content=_parse_content(item.get("content"), where))


def _parse_content(content: object, where: str) -> str:
    param = f"{where}.content"
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequestError(f"{param} must be a string or an array of parts", param=param)
    texts: list[str] = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") != "text":
            raise InvalidRequestError("only text content is supported", param=param)
        text = part.get("text")
        if not isinstance(text, str):
            raise InvalidRequestError(f"{param} text parts need a string text", param=param)
        texts.append(text)
    # Parts are separate paragraphs to the author; vLLM and others join them the same way.
    return "\n".join(texts)


def _parse_prompt(value: object) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(_is_int(item) for item in value):
        raise InvalidRequestError("token id prompts are not supported", param="prompt")
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        return value[0]
    if isinstance(value, list) and len(value) > 1:
        raise InvalidRequestError("only one prompt per request is supported", param="prompt")
    raise InvalidRequestError("prompt must be a string", param="prompt")


def _parse_max_tokens(fields: JsonObject) -> int | None:
    chosen: int | None = None
    # max_completion_tokens is the newer name; when both are set it wins.
    for name in ("max_tokens", "max_completion_tokens"):
        value = fields.get(name)
        if value is None:
            continue
        if not _is_int(value) or not 1 <= value <= MAX_TOKENS_LIMIT:
            raise InvalidRequestError(
                f"{name} must be an integer from 1 to {MAX_TOKENS_LIMIT}", param=name
            )
        chosen = value
    return chosen


def _number(
    fields: JsonObject,
    name: str,
    *,
    default: float,
    low: float,
    high: float,
    low_open: bool = False,
) -> float:
    value = fields.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequestError(f"{name} must be a number", param=name)
    number = float(value)
    too_low = number <= low if low_open else number < low
    if not math.isfinite(number) or too_low or number > high:
        lower = "(" if low_open else "["
        raise InvalidRequestError(f"{name} must be in {lower}{low:g}, {high:g}]", param=name)
    return number


def _parse_seed(value: object) -> int | None:
    if value is None:
        return None
    if not _is_int(value) or not _SEED_MIN <= value < _UINT64:
        raise InvalidRequestError("seed must be a 64-bit integer", param="seed")
    # Negative int64 seeds map to their two's complement so every OpenAI seed stays valid.
    return value % _UINT64


def _parse_stream_options(fields: JsonObject) -> StreamOptions:
    stream = fields.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequestError("stream must be a boolean", param="stream")
    options = fields.get("stream_options")
    include_usage: object = None
    if isinstance(options, dict):
        include_usage = options.get("include_usage")
    elif options is not None:
        raise InvalidRequestError("stream_options must be an object", param="stream_options")
    if include_usage is not None and not isinstance(include_usage, bool):
        raise InvalidRequestError(
            "stream_options.include_usage must be a boolean", param="stream_options.include_usage"
        )
    return StreamOptions(stream=bool(stream), include_usage=bool(include_usage))


def _is_int(value: object) -> TypeGuard[int]:
    # JSON true/false arrive as Python bools, which are ints; a flag is never a count.
    return isinstance(value, int) and not isinstance(value, bool)


def usage_body(usage: Usage) -> JsonObject:
    """OpenAI's usage object plus ``cost_micro``: what the buyer was charged, in micro-units."""
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "cost_micro": usage.cost,
    }


def completion_body(
    endpoint: Endpoint,
    *,
    completion_id: str,
    created: int,
    model: str,
    text: str,
    finish_reason: FinishReason,
    usage: Usage,
    logprobs: Sequence[TokenLogprob] | None = None,
) -> JsonObject:
    """The non-streaming response body; ``logprobs`` when the buyer asked for them."""
    choice: JsonObject = {"index": 0}
    if endpoint == "chat":
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    choice["finish_reason"] = finish_reason
    choice["logprobs"] = None if logprobs is None else logprobs_body(endpoint, logprobs)
    return {
        "id": completion_id,
        "object": "chat.completion" if endpoint == "chat" else "text_completion",
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": usage_body(usage),
    }


_LOWEST_LOGPROB = -9999.0  # OpenAI's stand-in for log(0); JSON has no -Infinity


def logprobs_body(
    endpoint: Endpoint, tokens: Sequence[TokenLogprob], *, text_offset: int = 0
) -> JsonObject:
    """The ``logprobs`` of a choice: chat's ``content`` list or the legacy completions shape.

    Values are the miner's claims, forced into [-9999, 0] so a bad one cannot break the JSON.
    ``text_offset`` is where the first token's text starts in the completion text.
    """
    values = [_sane_logprob(token.logprob) for token in tokens]
    if endpoint == "chat":
        content: list[JsonObject] = [
            {
                "token": token.text,
                "logprob": value,
                "bytes": list(token.raw),
                "top_logprobs": [
                    {
                        "token": other.text,
                        "logprob": _sane_logprob(other.logprob),
                        "bytes": list(other.raw),
                    }
                    for other in token.alternatives
                ],
            }
            for token, value in zip(tokens, values, strict=True)
        ]
        return {"content": content, "refusal": None}
    offsets: list[int] = []
    for token in tokens:
        offsets.append(text_offset)
        text_offset += len(token.text)
    return {
        "tokens": [token.text for token in tokens],
        "token_logprobs": values,
        # The legacy shape: one {text: logprob} object per token (alternatives whose texts
        # coincide share a key, as with OpenAI); null when none were asked for.
        "top_logprobs": (
            [
                {other.text: _sane_logprob(other.logprob) for other in token.alternatives}
                for token in tokens
            ]
            if any(token.alternatives for token in tokens)
            else None
        ),
        "text_offset": offsets,
    }


def _sane_logprob(value: float) -> float:
    if math.isnan(value):
        return _LOWEST_LOGPROB
    return min(0.0, max(_LOWEST_LOGPROB, value))


@dataclass
class ChunkShape:
    """Builds the chunks of one stream; they all share its id, created time and model."""

    endpoint: Endpoint  # chat chunks carry deltas, completion chunks carry text
    completion_id: str  # the same "id" in every chunk
    created: int  # the same "created" in every chunk
    model: str  # catalog name
    include_usage: bool  # OpenAI's include_usage: "usage": null on every chunk but the last
    logprobs: bool = False  # text chunks carry their tokens' logprobs
    # Completions' text_offset of the next token: the text length of the tokens sent so far.
    _text_offset: int = field(default=0, init=False)

    def opening(self) -> JsonObject | None:
        """Chat streams announce the assistant role first; completion streams need nothing."""
        if self.endpoint != "chat":
            return None
        return self._chunk(self._choice({"role": "assistant", "content": ""}, None))

    def text(self, text: str, tokens: Sequence[TokenLogprob] = ()) -> JsonObject:
        """A piece of output; ``tokens`` are the ones behind it, for logprobs."""
        choice = self._choice({"content": text}, None, text=text)
        if self.logprobs:
            choice["logprobs"] = logprobs_body(self.endpoint, tokens, text_offset=self._text_offset)
            self._text_offset += sum(len(token.text) for token in tokens)
        return self._chunk(choice)

    def finish(self, finish_reason: FinishReason) -> JsonObject:
        return self._chunk(self._choice({}, finish_reason, text=""))

    def usage(self, usage: Usage) -> JsonObject:
        """The last chunk: no choices, only usage (sent whether or not include_usage was set)."""
        chunk = self._chunk(None)
        chunk["usage"] = usage_body(usage)
        return chunk

    def _choice(
        self, delta: JsonObject, finish_reason: FinishReason | None, *, text: str = ""
    ) -> JsonObject:
        choice: JsonObject = {"index": 0}
        if self.endpoint == "chat":
            choice["delta"] = delta
        else:
            choice["text"] = text
        choice["finish_reason"] = finish_reason
        choice["logprobs"] = None
        return choice

    def _chunk(self, choice: JsonObject | None) -> JsonObject:
        chunk: JsonObject = {
            "id": self.completion_id,
            "object": "chat.completion.chunk" if self.endpoint == "chat" else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [] if choice is None else [choice],
        }
        if self.include_usage:
            chunk["usage"] = None
        return chunk


def models_body(cards: Sequence[ModelCard]) -> JsonObject:
    """GET /v1/models: OpenAI's list, with OpenRouter-style pricing in credits."""
    return {"object": "list", "data": [model_body(card) for card in cards]}


def model_body(card: ModelCard) -> JsonObject:
    return {
        "id": card.name,
        "object": "model",
        "created": card.created,
        "owned_by": "meshmint",
        "context_length": card.context_length,
        "pricing": {
            "prompt": credits_per_token(card.input_price_per_mtok),
            "completion": credits_per_token(card.output_price_per_mtok),
        },
        "input_price_per_million": credits_per_million(card.input_price_per_mtok),
        "output_price_per_million": credits_per_million(card.output_price_per_mtok),
        "miners": card.miners,
        "vetted_miners": card.vetted_miners,
    }


def credits_per_million(micro_per_mtok: int) -> str:
    """Micro-units per million tokens as credits per million tokens, e.g. 150000 -> "0.15"."""
    return _decimal_string(Decimal(micro_per_mtok).scaleb(-6))


def credits_per_token(micro_per_mtok: int) -> str:
    """Micro-units per million tokens as credits per token, e.g. 150000 -> "0.00000015"."""
    return _decimal_string(Decimal(micro_per_mtok).scaleb(-12))


def _decimal_string(value: Decimal) -> str:
    # Plain notation without trailing zeros: clients parse these, and "1.5E-7" surprises them.
    text = format(value.normalize(), "f")
    return "0" if text in ("-0", "") else text
