"""Server-sent events as OpenAI streams them: ``data: <json>`` events, then ``data: [DONE]``."""

from __future__ import annotations

from aiohttp import web

from coordinator.http.errors import compact_json

STREAM_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    # Reverse proxies (nginx) buffer responses by default, which would hold tokens back.
    "X-Accel-Buffering": "no",
}


class SseWriter:
    """Writes events to a prepared stream response; a gone client raises ConnectionResetError."""

    def __init__(self, response: web.StreamResponse) -> None:
        self._response = response

    async def send(self, event: object) -> None:
        # JSON escapes newlines inside strings, so one event is always one data line.
        await self._response.write(b"data: " + compact_json(event).encode() + b"\n\n")

    async def done(self) -> None:
        await self._response.write(b"data: [DONE]\n\n")
        await self._response.write_eof()
