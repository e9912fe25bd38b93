"""entered_unless_gone: a client that hangs up while its request waits cancels the wait."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest
from aiohttp import web

from coordinator.http import disconnect
from coordinator.http.disconnect import ClientGone, entered_unless_gone


class Transport:
    def __init__(self) -> None:
        self.closing = False

    def is_closing(self) -> bool:
        return self.closing


class Request:
    """What entered_unless_gone looks at: the request's transport."""

    def __init__(self) -> None:
        self.transport: Transport | None = Transport()

    def hang_up(self) -> None:
        self.transport = None


class Entry:
    """A context whose entry takes ``enter_s`` and records how it ended."""

    def __init__(self, enter_s: float) -> None:
        self.enter_s = enter_s
        self.entered = False
        self.entry_error: BaseException | None = None
        self.exited = False

    @contextlib.asynccontextmanager
    async def context(self) -> AsyncIterator[str]:
        try:
            await asyncio.sleep(self.enter_s)
        except BaseException as error:
            self.entry_error = error
            raise
        self.entered = True
        try:
            yield "value"
        finally:
            self.exited = True


@pytest.fixture(autouse=True)
def fast_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(disconnect, "POLL_S", 0.01)


def as_request(request: Request) -> web.Request:
    return cast(Any, request)


async def waiting(request: Request, entry: Entry) -> asyncio.Task[None]:
    """A request whose entry is under way, its client still there."""

    async def serve() -> None:
        async with entered_unless_gone(as_request(request), entry.context()):
            pytest.fail("the entry completed")

    task = asyncio.create_task(serve())
    await asyncio.sleep(0.05)
    return task


async def test_a_client_gone_while_waiting_cancels_the_entry() -> None:
    request, entry = Request(), Entry(enter_s=30)
    task = await waiting(request, entry)
    request.hang_up()
    with pytest.raises(ClientGone):
        await asyncio.wait_for(task, 5)
    assert isinstance(entry.entry_error, asyncio.CancelledError)
    assert not entry.entered
    assert task.cancelling() == 0  # the cancel was ours, and taken back


async def test_the_block_itself_is_never_cancelled_for_a_gone_client() -> None:
    request, entry = Request(), Entry(enter_s=0.02)
    async with entered_unless_gone(as_request(request), entry.context()) as value:
        assert value == "value"
        request.hang_up()
        await asyncio.sleep(0.1)  # ten polls' time: the timer ended with the entry
    assert entry.exited
    current = asyncio.current_task()
    assert current is not None and current.cancelling() == 0


async def test_a_cancel_from_outside_stays_a_cancel() -> None:
    request, entry = Request(), Entry(enter_s=30)
    task = await waiting(request, entry)
    request.hang_up()
    task.cancel()  # the server shuts down as the client leaves
    with pytest.raises(asyncio.CancelledError):
        await task
    assert isinstance(entry.entry_error, asyncio.CancelledError)


async def test_an_entry_that_fails_raises_its_own_error() -> None:
    request = Request()

    @contextlib.asynccontextmanager
    async def refused() -> AsyncIterator[None]:
        await asyncio.sleep(0.02)
        raise web.HTTPServiceUnavailable()
        yield  # pragma: no cover

    with pytest.raises(web.HTTPServiceUnavailable):
        async with entered_unless_gone(as_request(request), refused()):
            pytest.fail("entered")
