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

from coordinator.errors import CoordinatorError

_T = TypeVar("_T")

POLL_S = 0.25
"""How often a waiting request checks that its client is still connected (each check costs a
timer; bench/load.py measured 0.1 s polls at 12% of the CPU of a queued request)."""


class ClientGone(CoordinatorError):
    """The client disconnected before its answer started."""


def client_gone(request: web.Request) -> bool:
    return request.transport is None or request.transport.is_closing()


@contextlib.asynccontextmanager
async def entered_unless_gone(
    request: web.Request, context: AbstractAsyncContextManager[_T]
) -> AsyncIterator[_T]:
    """Enters ``context`` like ``async with``, but raises :class:`ClientGone` (after cancelling
    the entry) when the client disconnects before the entry completes.

    The entry runs in the caller's task (a task of its own would cost every request a hop
    through the event loop before its first token); a timer looks at the connection every
    :data:`POLL_S` and, when the client has gone, cancels the caller's task. That cancellation
    lands inside the entry, which cleans up as for any cancellation, and comes out here as
    ClientGone. The timer is cancelled the moment the entry returns, before the event loop can
    run it again, so it never hits the body of the block.
    """
    task = asyncio.current_task()
    assert task is not None, "entered_unless_gone runs in a task"
    loop = asyncio.get_running_loop()
    gone = False
    timer: asyncio.TimerHandle

    def look() -> None:
        nonlocal gone, timer
        if client_gone(request):
            gone = True
            task.cancel()
        else:
            timer = loop.call_later(POLL_S, look)

    timer = loop.call_later(POLL_S, look)
    try:
        value = await context.__aenter__()
    except asyncio.CancelledError:
        if gone and task.uncancel() == 0:
            raise ClientGone from None
        raise  # our own task is being cancelled too
    finally:
        timer.cancel()
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_exit(context.__aexit__)
        yield value
