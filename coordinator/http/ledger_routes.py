"""The public, read-only ledger API for auditors and miners (no authentication).

GET /ledger/key                                  {"origin", "verifier_key"}
GET /ledger/checkpoint                           the latest signed checkpoint (text/plain note)
GET /ledger/checkpoints?start=N&limit=M          {"checkpoints": [note, ...]}, sizes >= N
GET /ledger/entries?start=N&limit=M              application/octet-stream: per entry, a u32
                                                 big-endian length then the entry's bytes
GET /ledger/balances                             {"size", "balances": {"kind[:owner]": int}}
GET /ledger/proof/inclusion?index=I&size=S       {"index", "size", "hashes": [base64, ...]}
GET /ledger/proof/consistency?old=A&new=B        {"old", "new", "hashes": [base64, ...]}

Malformed parameters are 400, ranges outside the log 404; never a 500 for a bad request.
"""

from __future__ import annotations

import base64
import functools
import struct
from collections.abc import Awaitable, Callable

from aiohttp import web

from coordinator.api import PublicLedger
from coordinator.http.errors import HttpError

PUBLIC_LEDGER_KEY: web.AppKey[PublicLedger] = web.AppKey("public_ledger", PublicLedger)
MAX_LIMIT = 10_000

Handler = Callable[[web.Request], Awaitable[web.Response]]


class _Reject(Exception):
    def __init__(self, error: HttpError) -> None:
        super().__init__(error.message)
        self.error = error


def _bad(name: str, message: str) -> _Reject:
    return _Reject(HttpError(400, message, "invalid_request_error", param=name))


def _public(handler: Handler) -> Handler:
    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.Response:
        try:
            return await handler(request)
        except _Reject as rejection:
            return rejection.error.response()
        except ValueError as error:  # the ledger's way of saying "outside the log"
            return HttpError(404, str(error), "not_found_error", code="out_of_range").response()

    return wrapped


def _int(
    request: web.Request, name: str, *, default: int | None = None, high: int = 2**63 - 1
) -> int:
    text = request.query.get(name)
    if text is None:
        if default is None:
            raise _bad(name, f"missing query parameter '{name}'")
        return default
    if not text.isascii() or not text.isdigit() or len(text) > 19 or int(text) > high:
        raise _bad(name, f"'{name}' must be an integer between 0 and {high}")
    return int(text)


def _limit(request: web.Request) -> int:
    limit = _int(request, "limit", default=1000, high=MAX_LIMIT)
    if limit < 1:
        raise _bad("limit", "'limit' must be at least 1")
    return limit


def _ledger(request: web.Request) -> PublicLedger:
    return request.app[PUBLIC_LEDGER_KEY]


def _proof(hashes: list[bytes]) -> list[str]:
    return [base64.b64encode(item).decode("ascii") for item in hashes]


@_public
async def key(request: web.Request) -> web.Response:
    ledger = _ledger(request)
    return web.json_response({"origin": ledger.origin, "verifier_key": ledger.verifier_key})


@_public
async def checkpoint(request: web.Request) -> web.Response:
    note = await _ledger(request).latest_checkpoint()
    if note is None:
        raise _Reject(HttpError(404, "no checkpoint has been signed yet", "not_found_error"))
    return web.Response(body=note, content_type="text/plain", charset="utf-8")


@_public
async def checkpoints(request: web.Request) -> web.Response:
    notes = await _ledger(request).checkpoints(_int(request, "start", default=0), _limit(request))
    return web.json_response({"checkpoints": [note.decode("utf-8") for note in notes]})


@_public
async def entries(request: web.Request) -> web.Response:
    raw = await _ledger(request).entries(_int(request, "start", default=0), _limit(request))
    body = b"".join(struct.pack(">I", len(entry)) + entry for entry in raw)
    return web.Response(body=body, content_type="application/octet-stream")


@_public
async def balances(request: web.Request) -> web.Response:
    snapshot = await _ledger(request).balances()
    return web.json_response({"size": snapshot.size, "balances": snapshot.balances})


@_public
async def inclusion(request: web.Request) -> web.Response:
    index, size = _int(request, "index"), _int(request, "size")
    hashes = await _ledger(request).inclusion_proof(index, size)
    return web.json_response({"index": index, "size": size, "hashes": _proof(hashes)})


@_public
async def consistency(request: web.Request) -> web.Response:
    old, new = _int(request, "old"), _int(request, "new")
    hashes = await _ledger(request).consistency_proof(old, new)
    return web.json_response({"old": old, "new": new, "hashes": _proof(hashes)})


def add_ledger_routes(app: web.Application, ledger: PublicLedger) -> None:
    app[PUBLIC_LEDGER_KEY] = ledger
    app.router.add_get("/ledger/key", key)
    app.router.add_get("/ledger/checkpoint", checkpoint)
    app.router.add_get("/ledger/checkpoints", checkpoints)
    app.router.add_get("/ledger/entries", entries)
    app.router.add_get("/ledger/balances", balances)
    app.router.add_get("/ledger/proof/inclusion", inclusion)
    app.router.add_get("/ledger/proof/consistency", consistency)
