"""A trivial OpenAI-shaped streaming server: the HTTP floor under ``bench/load.py``'s figures.

``POST /v1/chat/completions`` answers every request at once with the stream the coordinator
sends for the instant engine's output: a role chunk, one chunk per token (one character each),
a finish chunk, a usage chunk and ``[DONE]``, each written (and awaited) separately, as
``coordinator/http/app.py`` does. No authentication, no tokenizer, no miner, no database, no
access log. What the coordinator costs above this is its own logic; what this costs above the
direct engine is aiohttp, SSE and the loopback connection.

Usage: ``python -m bench.load_echo [--tokens N] [--token-delay SECONDS]``; prints ``echo ready http://HOST:PORT/v1``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
import uuid

from aiohttp import web

STREAM_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


def _event(value: object) -> bytes:
    return b"data: " + json.dumps(value, separators=(",", ":")).encode() + b"\n\n"


def create_echo_app(*, tokens: int, token_delay_s: float = 0.0) -> web.Application:
    """The application: ``tokens`` text chunks per stream (at most ``max_tokens``); like the
    instant engine, a stream that ends before ``max_tokens`` counts one more (stop) token."""

    async def chat(request: web.Request) -> web.StreamResponse:
        body = json.loads(await request.read())
        max_tokens = int(body.get("max_tokens") or tokens)
        count = min(tokens, max_tokens)
        stopped = count < max_tokens  # the instant engine's stop token, billed like the others
        chunk = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": body.get("model", "echo"),
            "usage": None,
        }

        def choice(delta: dict[str, str], finish: str | None) -> bytes:
            return _event(
                {
                    **chunk,
                    "choices": [
                        {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
                    ],
                }
            )

        response = web.StreamResponse(headers=STREAM_HEADERS)
        await response.prepare(request)
        await response.write(choice({"role": "assistant", "content": ""}, None))
        for index in range(count):
            if token_delay_s:
                await asyncio.sleep(token_delay_s)
            await response.write(choice({"content": "abcdefgh"[index % 8]}, None))
        await response.write(choice({}, "stop" if stopped else "length"))
        completion = count + stopped
        usage = {
            "prompt_tokens": 1,
            "completion_tokens": completion,
            "total_tokens": 1 + completion,
        }
        await response.write(_event({**chunk, "choices": [], "usage": usage}))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


async def serve(*, host: str, port: int, tokens: int, token_delay_s: float) -> None:
    app = create_echo_app(tokens=tokens, token_delay_s=token_delay_s)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    bound = runner.addresses[0]
    sys.stdout.write(f"echo ready http://{bound[0]}:{bound[1]}/v1\n")
    sys.stdout.flush()
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--tokens", type=int, default=16, help="text chunks per stream")
    parser.add_argument("--token-delay", type=float, default=0.0, metavar="SECONDS")
    args = parser.parse_args(argv)
    if args.tokens < 1 or args.token_delay < 0:
        parser.error("--tokens must be >= 1, --token-delay >= 0")
    asyncio.run(
        serve(host=args.host, port=args.port, tokens=args.tokens, token_delay_s=args.token_delay)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
