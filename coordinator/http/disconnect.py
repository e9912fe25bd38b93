"""Noticing a buyer who hangs up before the answer starts.

aiohttp does not cancel a handler when its client disconnects (turning that on would also cut
settlement short), so the HTTP layer looks at the connection itself. While a request waits to
be served — queued for a free miner, or waiting for the miner's first token — nothing is
written, so :func:`entered_unless_gone` polls the connection and cancels the wait when the client
has gone: the request leaves the queue, the miner is told to stop, and nothing is billed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import TypeVar

from aiohttp import web

_T = TypeVar("_T")

POLL_S = 0.25
"""How often a waiting request checks that its client is still connected (each check costs a
timer; bench/load.py measured 0.1 s polls at 12% of the CPU of a queued request)."""


class ClientGone(Exception):
    """The client disconnected before its answer started."""


def client_gone(request: web.Request) -> bool:
    return request.transport is None or request.transport.is_closing()


@contextlib.asynccontextmanager
async def entered_unless_gone(
    request: web.Request, context: AbstractAsyncContextManager[_T]
) -> AsyncIterator[_T]:
    """Enters ``context`` like ``async with``, but raises :class:`ClientGone` (after cancelling
    the entry) when the client disconnects before the entry completes."""
    entering = asyncio.ensure_future(context.__aenter__())
    try:
        while not entering.done():
            await asyncio.wait({entering}, timeout=POLL_S)
            if not entering.done() and client_gone(request):
                await _abandon(entering, context)
    except BaseException:
        entering.cancel()  # our own task is being cancelled, or the client left
        raise
    value = entering.result()
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_exit(context.__aexit__)
        yield value


async def _abandon(entering: asyncio.Future[_T], context: AbstractAsyncContextManager[_T]) -> None:
    """Cancels the entry and raises ClientGone (leaving the context if it got entered anyway)."""
    entering.cancel()
    try:
        await entering
    except asyncio.CancelledError:
        if _current_task_cancelling():
            raise
        raise ClientGone from None
    await context.__aexit__(None, None, None)  # it finished before the cancel landed
    raise ClientGone


def _current_task_cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
