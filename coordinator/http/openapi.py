"""The OpenAPI 3.1 description of the coordinator's HTTP API, served at ``GET /openapi.json``.

A static document: the buyer API (OpenAI-compatible, bearer keys), the operator endpoints
(health, metrics) and the public ledger (``coordinator/http/ledger_routes.py``). A test checks
that every route the app registers is described here, so the two cannot drift apart silently.
"""

from __future__ import annotations

from typing import Any

JsonSchema = dict[str, Any]


def _ref(name: str) -> JsonSchema:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: JsonSchema, description: str) -> JsonSchema:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> JsonSchema:
    return _json(_ref("Error"), description)


def _int_query(name: str, description: str, *, required: bool = True) -> JsonSchema:
    return {
        "name": name,
        "in": "query",
        "required": required,
        "description": description,
        "schema": {"type": "integer", "minimum": 0},
    }


_BUYER_ERRORS: JsonSchema = {
    "400": _error("Invalid request, or the prompt does not fit the model's context"),
    "401": _error("Missing, unknown or revoked API key"),
    "402": _error("Insufficient credits for the request's maximum cost"),
    "404": _error("Unknown model, or no miner within provider.max_price"),
    "413": _error("Request body too large"),
    "503": {
        **_error(
            "No miner is available for the model (none connected, or all stayed busy for the "
            "queue wait, or the queue is full); retry later"
        ),
        "headers": {"Retry-After": {"schema": {"type": "integer"}}},
    },
}

_COMPLETION_RESPONSES: JsonSchema = {
    "200": {
        "description": (
            "The completion; with ``stream: true`` a text/event-stream of chunks, the last with "
            "usage, then ``data: [DONE]`` (a failure mid-stream is a ``data: {error}`` event)"
        ),
        "content": {
            "application/json": {"schema": _ref("Completion")},
            "text/event-stream": {"schema": {"type": "string"}},
        },
    },
    **_BUYER_ERRORS,
}

_SAMPLING: JsonSchema = {
    "model": {"type": "string", "description": "A catalog name from GET /v1/models"},
    "max_tokens": {"type": ["integer", "null"], "minimum": 1},
    "max_completion_tokens": {"type": ["integer", "null"], "minimum": 1},
    "temperature": {"type": "number", "minimum": 0, "maximum": 2, "default": 1},
    "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "default": 1},
    "seed": {"type": ["integer", "null"]},
    "n": {"type": "integer", "const": 1},
    "stop": {
        "description": "Up to 4 strings; the output ends before the first one (billed through "
        "the token that completed it)",
        "oneOf": [
            {"type": "string", "minLength": 1},
            {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": 4},
            {"type": "null"},
        ],
    },
    "logprobs": {
        "description": "Chat: true for the chosen tokens' log-probabilities (top_logprobs, 0-20, "
        "adds the most likely alternatives). Completions: the number of alternatives, 0-5. The "
        "values are the miner's claim, checked by spot checks.",
        "type": ["boolean", "integer", "null"],
    },
    "provider": {
        "type": ["object", "null"],
        "description": "Routing preferences, OpenRouter's shape. Other OpenRouter keys (order, "
        "only, ignore, quantizations, ...) are accepted and ignored.",
        "properties": {
            "sort": {
                "enum": ["price", "throughput", "latency", None],
                "description": "latency: lowest time to first token; throughput: most tokens/s; "
                "price: every miner of a model sells at the catalog price, so the default "
                "(free capacity, speed and spot-check trust)",
            },
            "max_price": {
                "type": ["object", "null"],
                "description": "Most to pay, in credits per million tokens (a number or a "
                "decimal string); a model priced above it is a 404 and nothing is held",
                "properties": {
                    "prompt": {"type": ["number", "string"], "minimum": 0},
                    "completion": {"type": ["number", "string"], "minimum": 0},
                },
            },
            "allow_fallbacks": {
                "type": "boolean",
                "default": True,
                "description": "false: a miner failing before its first token is a 503 instead "
                "of a silent retry on another miner",
            },
            "data_collection": {
                "enum": ["allow", "deny", None],
                "default": "allow",
                "description": "deny: only miners that declare they retain no prompt or "
                "completion see this one, to generate or to re-score it; none serving the "
                "model is a 503 and nothing is charged",
            },
            "trust": {
                "enum": ["any", "vetted", None],
                "default": "any",
                "description": "vetted: only miners the operator vetted see the prompt, to "
                "generate or to re-score it; none serving the model is a 503 and nothing is "
                "charged",
            },
        },
    },
    "stream": {"type": "boolean", "default": False},
    "stream_options": {
        "type": ["object", "null"],
        "properties": {"include_usage": {"type": "boolean"}},
    },
}

_HEALTH = _json(
    {
        "type": "object",
        "required": ["status", "ready", "miners"],
        "properties": {
            "status": {"type": "string", "const": "ok"},
            "ready": {"type": "boolean", "description": "At least one miner serves a model"},
            "miners": {"type": "integer", "description": "Miners connected and serving"},
        },
    },
    "Liveness and readiness",
)

_PUBLIC = {"security": [], "tags": ["ledger"]}


def _ledger_get(summary: str, response: JsonSchema, *, parameters: list[JsonSchema]) -> JsonSchema:
    return {
        "get": {
            **_PUBLIC,
            "summary": summary,
            "parameters": parameters,
            "responses": {
                "200": response,
                "400": _error("Malformed parameters"),
                "404": _error("Range outside the log"),
            },
        }
    }


_HASHES = {"type": "array", "items": {"type": "string", "contentEncoding": "base64"}}

OPENAPI: JsonSchema = {
    "openapi": "3.1.0",
    "info": {
        "title": "meshmint coordinator",
        "version": "1",
        "description": (
            "OpenAI-compatible inference API served by a marketplace of miners, with a public, "
            "auditable ledger. Amounts are integer micro-credits (1 credit = 1,000,000)."
        ),
    },
    "security": [{"bearer": []}],
    "paths": {
        "/v1/chat/completions": {
            "post": {
                "tags": ["buyer"],
                "summary": "Chat completion (OpenAI-compatible)",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("ChatRequest")}},
                },
                "responses": _COMPLETION_RESPONSES,
            }
        },
        "/v1/completions": {
            "post": {
                "tags": ["buyer"],
                "summary": "Text completion (OpenAI-compatible)",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("CompletionRequest")}},
                },
                "responses": _COMPLETION_RESPONSES,
            }
        },
        "/v1/models": {
            "get": {
                "tags": ["buyer"],
                "summary": "Models on sale, with prices and live miner counts",
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {
                                "object": {"const": "list"},
                                "data": {"type": "array", "items": _ref("Model")},
                            },
                        },
                        "The catalog",
                    ),
                    "401": _BUYER_ERRORS["401"],
                },
            }
        },
        "/v1/models/{model}": {
            "get": {
                "tags": ["buyer"],
                "summary": "One model",
                "parameters": [
                    {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "responses": {
                    "200": _json(_ref("Model"), "The model"),
                    "401": _BUYER_ERRORS["401"],
                    "404": _BUYER_ERRORS["404"],
                },
            }
        },
        "/v1/key": {
            "get": {
                "tags": ["buyer"],
                "summary": "The key's balance, spend and spend limit (OpenRouter's /key shape)",
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {
                                "data": {
                                    "type": "object",
                                    "properties": {
                                        "key_id": {"type": "string"},
                                        "label": {"type": "string"},
                                        "usage": {"type": "number"},
                                        "usage_micro": {"type": "integer"},
                                        "limit": {"type": ["number", "null"]},
                                        "limit_remaining": {"type": ["number", "null"]},
                                        "balance": {"type": "number"},
                                        "balance_micro": {"type": "integer"},
                                        "refunded_micro": {"type": "integer"},
                                        "requests": {"type": "integer"},
                                        "prompt_tokens": {"type": "integer"},
                                        "completion_tokens": {"type": "integer"},
                                    },
                                }
                            },
                        },
                        "Amounts in credits, and exactly in micro-credits",
                    ),
                    "401": _BUYER_ERRORS["401"],
                },
            }
        },
        "/v1/usage": {
            "get": {
                "tags": ["buyer"],
                "summary": "The key's requests, newest first, with tokens, cost and refunds",
                "parameters": [
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20},
                    },
                    {
                        "name": "before",
                        "in": "query",
                        "description": "ISO 8601 time with offset: the next_before of a page",
                        "schema": {"type": "string", "format": "date-time"},
                    },
                ],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {
                                "object": {"const": "list"},
                                "data": {"type": "array", "items": {"type": "object"}},
                                "has_more": {"type": "boolean"},
                                "next_before": {"type": ["string", "null"]},
                            },
                        },
                        "One page of requests",
                    ),
                    "400": _BUYER_ERRORS["400"],
                    "401": _BUYER_ERRORS["401"],
                },
            }
        },
        "/health": {
            "get": {
                "security": [],
                "tags": ["operator"],
                "summary": "Liveness: always 200 while the process serves HTTP",
                "responses": {"200": _HEALTH},
            }
        },
        "/health/ready": {
            "get": {
                "security": [],
                "tags": ["operator"],
                "summary": "Readiness: 200 when at least one miner is connected, else 503",
                "responses": {"200": _HEALTH, "503": {**_HEALTH, "description": "Not ready"}},
            }
        },
        "/metrics": {
            "get": {
                "security": [],
                "tags": ["operator"],
                "summary": "Prometheus metrics (text exposition format)",
                "responses": {
                    "200": {
                        "description": "meshmint_* metrics",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/openapi.json": {
            "get": {
                "security": [],
                "tags": ["operator"],
                "summary": "This document",
                "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1")},
            }
        },
        "/ledger/key": _ledger_get(
            "The log's origin and the checkpoint signer's verifier key",
            _json(
                {
                    "type": "object",
                    "properties": {
                        "origin": {"type": "string"},
                        "verifier_key": {"type": "string"},
                    },
                },
                "Origin and C2SP verifier key",
            ),
            parameters=[],
        ),
        "/ledger/checkpoint": _ledger_get(
            "The latest signed checkpoint",
            {
                "description": "A C2SP signed note",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            },
            parameters=[],
        ),
        "/ledger/checkpoints": _ledger_get(
            "Signed checkpoints of size >= start, smallest first",
            _json(
                {
                    "type": "object",
                    "properties": {"checkpoints": {"type": "array", "items": {"type": "string"}}},
                },
                "Signed notes",
            ),
            parameters=[
                _int_query("start", "Smallest tree size", required=False),
                _int_query("limit", "At most this many (<= 10000)", required=False),
            ],
        ),
        "/ledger/entries": _ledger_get(
            "Raw entries from seq start",
            {
                "description": "Per entry a u32 big-endian length, then the entry's bytes",
                "content": {"application/octet-stream": {"schema": {"type": "string"}}},
            },
            parameters=[
                _int_query("start", "First sequence number", required=False),
                _int_query("limit", "At most this many (<= 10000)", required=False),
            ],
        ),
        "/ledger/balances": _ledger_get(
            "Every account's balance at a tree size",
            _json(
                {
                    "type": "object",
                    "properties": {
                        "size": {"type": "integer"},
                        "balances": {
                            "type": "object",
                            "additionalProperties": {"type": "integer"},
                            "description": "Keyed 'kind' or 'kind:owner', in micro-credits",
                        },
                    },
                },
                "Balances",
            ),
            parameters=[],
        ),
        "/ledger/proof/inclusion": _ledger_get(
            "RFC 6962 inclusion proof of entry index in the tree of size size",
            _json(
                {
                    "type": "object",
                    "properties": {
                        "index": {"type": "integer"},
                        "size": {"type": "integer"},
                        "hashes": _HASHES,
                    },
                },
                "The proof",
            ),
            parameters=[_int_query("index", "Entry index"), _int_query("size", "Tree size")],
        ),
        "/ledger/proof/consistency": _ledger_get(
            "RFC 6962 consistency proof between two tree sizes",
            _json(
                {
                    "type": "object",
                    "properties": {
                        "old": {"type": "integer"},
                        "new": {"type": "integer"},
                        "hashes": _HASHES,
                    },
                },
                "The proof",
            ),
            parameters=[_int_query("old", "Older size"), _int_query("new", "Newer size")],
        ),
    },
    "components": {
        "securitySchemes": {
            "bearer": {
                "type": "http",
                "scheme": "bearer",
                "description": "An API key from `meshmint-coordinator keys create`",
            }
        },
        "schemas": {
            "Error": {
                "type": "object",
                "required": ["error"],
                "properties": {
                    "error": {
                        "type": "object",
                        "required": ["message", "type"],
                        "properties": {
                            "message": {"type": "string"},
                            "type": {"type": "string"},
                            "code": {"type": ["string", "null"]},
                            "param": {"type": ["string", "null"]},
                        },
                    }
                },
            },
            "ChatRequest": {
                "type": "object",
                "required": ["model", "messages"],
                "properties": {
                    **_SAMPLING,
                    "messages": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["role", "content"],
                            "properties": {
                                "role": {"enum": ["system", "developer", "user", "assistant"]},
                                "content": {"type": ["string", "array"]},
                            },
                        },
                    },
                },
            },
            "CompletionRequest": {
                "type": "object",
                "required": ["model", "prompt"],
                "properties": {**_SAMPLING, "prompt": {"type": "string"}},
            },
            "Usage": {
                "type": "object",
                "properties": {
                    "prompt_tokens": {"type": "integer"},
                    "completion_tokens": {"type": "integer"},
                    "total_tokens": {"type": "integer"},
                    "cost_micro": {"type": "integer", "description": "Charged, in micro-credits"},
                },
            },
            "Completion": {
                "type": "object",
                "properties": {
                    "id": {"type": "string"},
                    "object": {"enum": ["chat.completion", "text_completion"]},
                    "created": {"type": "integer"},
                    "model": {"type": "string"},
                    "choices": {"type": "array", "items": {"type": "object"}},
                    "usage": _ref("Usage"),
                },
            },
            "Model": {
                "type": "object",
                "properties": {
                    "id": {"type": "string"},
                    "object": {"const": "model"},
                    "created": {"type": "integer"},
                    "owned_by": {"type": "string"},
                    "context_length": {"type": "integer"},
                    "pricing": {
                        "type": "object",
                        "description": "Credits per token, as decimal strings",
                        "properties": {
                            "prompt": {"type": "string"},
                            "completion": {"type": "string"},
                        },
                    },
                    "input_price_per_million": {"type": "string"},
                    "output_price_per_million": {"type": "string"},
                    "miners": {"type": "integer", "description": "Miners serving it now"},
                    "vetted_miners": {
                        "type": "integer",
                        "description": "Of those, miners the operator vetted (provider.trust)",
                    },
                },
            },
        },
    },
}
