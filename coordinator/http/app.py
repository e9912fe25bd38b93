"""The buyer-facing HTTP API: OpenAI-compatible routes over an :class:`InferenceService`.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``,
``GET /v1/models/{model}``; for operators ``GET /health`` (liveness: always 200, with the
readiness in the body), ``GET /health/ready`` (200 once a miner serves, else 503),
``GET /metrics`` (Prometheus) and ``GET /openapi.json``. Every response, errors and unknown
routes included, carries an ``x-request-id`` header, is counted in ``/metrics`` and, when it
fails, has an OpenAI-shaped error body.

A stream starts only after the service has accepted the job (entering ``complete`` waits for
the first token), so every error that happens before output is an ordinary HTTP error; after
that, a failure is a ``data: {"error": ...}`` event and the stream ends without ``[DONE]``.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from contextvars import ContextVar

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware

from coordinator.api import Buyer, CompletionRequest, InferenceService, Readiness, TextDelta
from coordinator.errors import (
    AuthenticationError,
    CoordinatorError,
    InvalidRequestError,
    ModelNotFoundError,
)
from coordinator.http.disconnect import ClientGone, entered_unless_gone
from coordinator.http.errors import (
    HttpError,
    compact_json,
    http_error_for,
    http_error_for_status,
    internal_error,
    rate_limit_headers,
)
from coordinator.http.openapi import OPENAPI
from coordinator.http.protocol import (
    ChunkShape,
    Endpoint,
    StreamOptions,
    completion_body,
    model_body,
    models_body,
    parse_chat_request,
    parse_completion_request,
)
from coordinator.http.sse import STREAM_HEADERS, SseWriter
from coordinator.ops.metrics import CONTENT_TYPE, CoordinatorMetrics

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
# nginx's status for a client that closed its connection before the answer (nobody reads it).
CLIENT_CLOSED_REQUEST = 499
"""Largest request body accepted; a ~1M-token prompt of plain text fits."""

# A client's own id is echoed only when it is safe to put back into a header and a log line.
_SANE_REQUEST_ID = re.compile(r"[\x20-\x7e]{1,128}")

# The id of the request being handled; the middleware sets it for the handler's task.
_request_id: ContextVar[str] = ContextVar("meshmint_http_request_id")


def create_app(
    service: InferenceService,
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    metrics: CoordinatorMetrics | None = None,
) -> web.Application:
    """The aiohttp application; serving it (runner, site, shutdown) is the caller's business.

    ``metrics`` is served at ``/metrics`` and counts responses; the service should record into
    the same object. Without it the app counts into a private one.
    """
    metrics = metrics if metrics is not None else CoordinatorMetrics()
    api = _Api(service, metrics)
    app = web.Application(
        client_max_size=max_body_bytes, middlewares=[_error_middleware(max_body_bytes, metrics)]
    )
    app.router.add_post("/v1/chat/completions", api.chat_completions)
    app.router.add_post("/v1/completions", api.completions)
    app.router.add_get("/v1/models", api.models)
    app.router.add_get("/v1/models/{model}", api.model)
    app.router.add_get("/health", api.health)
    app.router.add_get("/health/ready", api.ready)
    app.router.add_get("/metrics", api.metrics)
    app.router.add_get("/openapi.json", api.openapi)
    return app


def bearer_key(request: web.Request) -> str:
    """The API key of ``Authorization: Bearer <key>``; AuthenticationError when there is none."""
    scheme, _, key = request.headers.get(hdrs.AUTHORIZATION, "").partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise AuthenticationError("Missing API key: send it as 'Authorization: Bearer <key>'")
    return key


def current_request_id() -> str:
    """The id of the request this task is handling (only valid inside a handler)."""
    return _request_id.get()


def _request_id_for(request: web.Request) -> str:
    supplied = request.headers.get(REQUEST_ID_HEADER, "")
    if _SANE_REQUEST_ID.fullmatch(supplied):
        return supplied
    return f"req_{uuid.uuid4().hex}"


def _endpoint(request: web.Request) -> str:
    # The route's template, never the raw path: unknown paths must not grow the label set.
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def _error_middleware(max_body_bytes: int, metrics: CoordinatorMetrics) -> Middleware:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        request_id = _request_id_for(request)
        token = _request_id.set(request_id)
        try:
            response = await _respond(request, handler, request_id, max_body_bytes)
        finally:
            _request_id.reset(token)
        metrics.http_response(_endpoint(request), response.status)
        if not response.prepared:  # a stream sets its own header before it starts
            response.headers[REQUEST_ID_HEADER] = request_id
        return response

    return middleware


async def _respond(
    request: web.Request, handler: Handler, request_id: str, max_body_bytes: int
) -> web.StreamResponse:
    error: HttpError
    try:
        return await handler(request)
    except web.HTTPException as exc:
        error = http_error_for_status(
            exc, method=request.method, path=request.path, max_body_bytes=max_body_bytes
        )
    except CoordinatorError as exc:
        error = http_error_for(exc)
        if error.status >= 500:
            logger.warning("request %s failed: %s (%s)", request_id, exc, type(exc).__name__)
    except Exception:
        logger.exception("request %s %s %s failed", request_id, request.method, request.path)
        error = internal_error(request_id)
    return error.response()


class _Api:
    """The route handlers, bound to one service."""

    def __init__(self, service: InferenceService, metrics: CoordinatorMetrics) -> None:
        self._service = service
        self._metrics = metrics

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response(_health_body(await self._service.readiness()))

    async def ready(self, request: web.Request) -> web.Response:
        readiness = await self._service.readiness()
        return web.json_response(_health_body(readiness), status=200 if readiness.ready else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self._metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response(OPENAPI, dumps=compact_json)

    async def models(self, request: web.Request) -> web.Response:
        await self._authenticate(request)
        cards = await self._service.models()
        return web.json_response(models_body(cards), dumps=compact_json)

    async def model(self, request: web.Request) -> web.Response:
        await self._authenticate(request)
        name = request.match_info["model"]
        for card in await self._service.models():
            if card.name == name:
                return web.json_response(model_body(card), dumps=compact_json)
        raise ModelNotFoundError(f"The model {name!r} does not exist")

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        buyer = await self._authenticate(request)
        completion_request, options = parse_chat_request(await _read_json(request))
        return await self._complete(request, "chat", buyer, completion_request, options)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        buyer = await self._authenticate(request)
        completion_request, options = parse_completion_request(await _read_json(request))
        return await self._complete(request, "text", buyer, completion_request, options)

    async def _authenticate(self, request: web.Request) -> Buyer:
        return await self._service.authenticate(bearer_key(request))

    async def _complete(
        self,
        request: web.Request,
        endpoint: Endpoint,
        buyer: Buyer,
        completion_request: CompletionRequest,
        options: StreamOptions,
    ) -> web.StreamResponse:
        try:
            return await self._answer(request, endpoint, buyer, completion_request, options)
        except ClientGone:
            logger.info("request %s: the client left before its answer began", current_request_id())
            return web.Response(status=CLIENT_CLOSED_REQUEST)

    async def _answer(
        self,
        request: web.Request,
        endpoint: Endpoint,
        buyer: Buyer,
        completion_request: CompletionRequest,
        options: StreamOptions,
    ) -> web.StreamResponse:
        if options.stream:
            return await self._stream(request, endpoint, buyer, completion_request, options)
        deltas: list[TextDelta] = []
        opened = self._service.complete(buyer, completion_request)
        async with entered_unless_gone(request, opened) as completion:
            async for delta in completion:
                # Nothing is written until the end, so a client that left is noticed only here,
                # at each token: leaving the context then cancels the job on the miner.
                if request.transport is None or request.transport.is_closing():
                    # A non-streaming answer that can no longer be sent delivered nothing.
                    logger.info("request %s: the client went away", current_request_id())
                    completion.abandon()
                    break
                deltas.append(delta)
            finish_reason = completion.finish_reason or "stop"
        # Leaving the context settles the bill, so usage is read after it.
        body = completion_body(
            endpoint,
            completion_id=completion.id,
            created=completion.created,
            model=completion.model,
            text="".join(delta.text for delta in deltas),
            finish_reason=finish_reason,
            usage=completion.usage,
            logprobs=[t for delta in deltas for t in delta.tokens] if options.logprobs else None,
        )
        return web.json_response(
            body, dumps=compact_json, headers=rate_limit_headers(completion.rate_limits)
        )

    async def _stream(
        self,
        request: web.Request,
        endpoint: Endpoint,
        buyer: Buyer,
        completion_request: CompletionRequest,
        options: StreamOptions,
    ) -> web.StreamResponse:
        request_id = current_request_id()
        response = web.StreamResponse(headers={**STREAM_HEADERS, REQUEST_ID_HEADER: request_id})
        sse = SseWriter(response)
        try:
            opened = self._service.complete(buyer, completion_request)
            async with entered_unless_gone(request, opened) as completion:
                response.headers.update(rate_limit_headers(completion.rate_limits))
                chunks = ChunkShape(
                    endpoint=endpoint,
                    completion_id=completion.id,
                    created=completion.created,
                    model=completion.model,
                    include_usage=options.include_usage,
                    logprobs=options.logprobs,
                )
                await response.prepare(request)
                opening = chunks.opening()
                if opening is not None:
                    await sse.send(opening)
                # A write to a gone client raises, which leaves the loop before the next delta
                # is asked for: the service then bills only what was delivered.
                async for delta in completion:
                    if delta.text or (options.logprobs and delta.tokens):
                        await sse.send(chunks.text(delta.text, delta.tokens))
                await sse.send(chunks.finish(completion.finish_reason or "stop"))
            await sse.send(chunks.usage(completion.usage))
            await sse.done()
        except ConnectionResetError:
            if not response.prepared:
                raise
            logger.info("request %s: the client went away mid-stream", request_id)
        except Exception as exc:
            if not response.prepared:
                raise  # nothing sent yet: the middleware answers with a plain HTTP error
            await _send_stream_error(sse, exc, request_id)
        return response


def _health_body(readiness: Readiness) -> dict[str, object]:
    return {"status": "ok", "ready": readiness.ready, "miners": readiness.miners}


async def _send_stream_error(sse: SseWriter, exc: Exception, request_id: str) -> None:
    if isinstance(exc, CoordinatorError):
        logger.warning("request %s: stream failed: %s (%s)", request_id, exc, type(exc).__name__)
        error = http_error_for(exc)
    else:
        logger.error("request %s: stream failed", request_id, exc_info=exc)
        error = internal_error(request_id)
    try:
        await sse.send(error.body())
    except ConnectionResetError:
        logger.info("request %s: the client went away before the error event", request_id)


async def _read_json(request: web.Request) -> object:
    raw = await request.read()  # raises HTTPRequestEntityTooLarge past client_max_size
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise InvalidRequestError(
            "We could not parse the JSON body of your request. Send valid JSON."
        ) from exc


def _reject_constant(name: str) -> object:
    # Python's json accepts NaN and Infinity, which are not JSON and no client means.
    raise ValueError(f"{name} is not valid JSON")
