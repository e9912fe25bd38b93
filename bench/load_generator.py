"""The load generator of ``bench/load.py``: one process, many closed-loop workers, JSON out.

``bench/load.py`` starts one or more of these as separate processes (so the generator's own CPU
time is visible and never shares the coordinator's event loop) and reads one JSON document from
each one's stdout. Every worker sends one request, reads its whole stream, and sends the next,
from ``start_at - warmup`` until ``start_at + duration`` (wall-clock times, so several generator
processes measure the same window); then no new request starts, and those in flight finish
(uncounted; cancelled only after ``DRAIN_S``).

- A request *completed in the window* ends inside [start_at, start_at + duration]: requests/s is
  their count over the duration.
- A *sample* (TTFT, end-to-end) is a request that both started and ended inside the window, so
  no warm-up request and no cut-off request biases the percentiles.
- ``cpu_s`` is this process's user + system CPU time over the window.

Targets: ``direct`` (the instant engine's ``generate`` in this process: the floor), or an
HTTP base URL (``.../v1``) driven with aiohttp (the default) or, for comparison only, the
official ``openai`` SDK (``--client openai``). The SDK costs about ten times more client CPU per
streamed request than aiohttp (``bench/load.py --paths echo --client openai`` shows it), so
1,000 requests/s would take several cores of client alone: it cannot be the load generator.

TTFT is the time from sending the request to the first non-empty ``delta.content`` (direct: the
first token, which the instant engine makes visible text).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MAX_ERRORS_KEPT = 20  # error messages returned; all are counted
REQUEST_TIMEOUT_S = 60.0  # one request, call to end of stream
DRAIN_S = 10.0  # after the window, how long requests in flight may finish before being cancelled
ERROR_PAUSE_S = 0.01  # a failing worker waits this long, so errors cannot spin the CPU
PROMPT = "Say something short."


@dataclass(frozen=True)
class Sample:
    """One request that started and ended inside the window."""

    ttft_s: float  # request sent to first visible text
    e2e_s: float  # request sent to end of stream
    tokens: int  # completion tokens (the usage chunk's count; direct: tokens yielded)


@dataclass
class Outcome:
    """What one generator process saw; printed as JSON."""

    samples: list[Sample] = field(default_factory=list)  # requests inside the window
    completed: int = 0  # requests that ended inside the window
    errors: int = 0  # failed requests, warm-up included
    error_messages: list[str] = field(default_factory=list)  # the first MAX_ERRORS_KEPT
    cpu_s: float = 0.0  # this process's CPU time over the window
    window_s: float = 0.0  # the window as this process measured it

    def as_json(self) -> dict[str, Any]:
        """Compact: samples as [ttft_s, e2e_s, tokens] (a direct run makes tens of thousands)."""
        document = asdict(self)
        document["samples"] = [[s.ttft_s, s.e2e_s, s.tokens] for s in self.samples]
        return document

    def failed(self, message: str) -> None:
        self.errors += 1
        if len(self.error_messages) < MAX_ERRORS_KEPT:
            self.error_messages.append(message)


class RequestFailed(Exception):
    """A request got an error status, an error event, or a stream without ``[DONE]``."""


One = Callable[[], Awaitable[tuple[float, int]]]
"""Sends one request and reads it to the end; returns (perf_counter of first text, tokens)."""


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run_window(
    one: One, *, workers: int, start_at: float, warmup_s: float, duration_s: float
) -> Outcome:
    """Runs ``workers`` closed-loop workers around the window; see the module docstring."""
    outcome = Outcome()
    # Wall clock (shared with the other generator processes) to this process's perf_counter.
    offset = time.time() - time.perf_counter()
    start = start_at - offset
    end = start + duration_s

    async def worker() -> None:
        while True:
            sent = time.perf_counter()
            if sent >= end:
                return
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT_S):
                    first, tokens = await one()
            except (Exception, TimeoutError) as error:
                outcome.failed(f"{type(error).__name__}: {error}")
                await asyncio.sleep(ERROR_PAUSE_S)
                continue
            ended = time.perf_counter()
            if start <= ended <= end:
                outcome.completed += 1
                if sent >= start:
                    outcome.samples.append(Sample(first - sent, ended - sent, tokens))

    await asyncio.sleep(max(0.0, start - warmup_s - time.perf_counter()))
    tasks = [asyncio.create_task(worker()) for _ in range(workers)]
    await asyncio.sleep(max(0.0, start - time.perf_counter()))
    cpu_before, window_started = _cpu_s(), time.perf_counter()
    await asyncio.sleep(max(0.0, end - time.perf_counter()))
    outcome.cpu_s = _cpu_s() - cpu_before
    outcome.window_s = time.perf_counter() - window_started
    # Requests in flight finish (uncounted): cancelling them would only add disconnects to what
    # the server under test does.
    _, late = await asyncio.wait(tasks, timeout=DRAIN_S)
    for task in late:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return outcome


# --- the clients -------------------------------------------------------------------------------


def chat_body(model: str, *, max_tokens: int) -> dict[str, Any]:
    """The streaming chat request every HTTP target gets."""
    return {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def _read_sse(lines: Any) -> tuple[float, int]:
    """Reads an OpenAI chat stream; parses JSON only up to the first text and for the usage."""
    first: float | None = None
    last: bytes | None = None
    async for line in lines:
        if not line.startswith(b"data: "):
            continue
        payload = line[6:].rstrip()
        if payload == b"[DONE]":
            if first is None or last is None:
                raise RequestFailed("the stream ended without text")
            usage = json.loads(last).get("usage") or {}
            return first, int(usage.get("completion_tokens", -1))
        if payload.startswith(b'{"error"'):
            raise RequestFailed(payload.decode(errors="replace")[:300])
        last = payload
        if first is None:
            choices = json.loads(payload).get("choices") or [{}]
            if (choices[0].get("delta") or {}).get("content"):
                first = time.perf_counter()
    raise RequestFailed("the stream ended without [DONE]")


async def aiohttp_target(
    base_url: str, *, api_key: str, model: str, max_tokens: int, workers: int
) -> tuple[One, Callable[[], Awaitable[None]]]:
    import aiohttp

    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=workers),
        timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S),
    )
    url = f"{base_url}/chat/completions"
    body = json.dumps(chat_body(model, max_tokens=max_tokens)).encode()
    headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}

    async def one() -> tuple[float, int]:
        async with session.post(url, data=body, headers=headers) as response:
            if response.status != 200:
                text = (await response.text())[:300]
                raise RequestFailed(f"HTTP {response.status}: {text}")
            return await _read_sse(response.content)

    return one, session.close


async def openai_target(
    base_url: str, *, api_key: str, model: str, max_tokens: int, workers: int
) -> tuple[One, Callable[[], Awaitable[None]]]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=60)

    async def one() -> tuple[float, int]:
        stream = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": PROMPT}],
            max_tokens=max_tokens,
            stream=True,
            stream_options={"include_usage": True},
        )
        first: float | None = None
        tokens = -1
        async for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter()
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        if first is None:
            raise RequestFailed("the stream ended without text")
        return first, tokens

    return one, client.close


async def direct_target(
    model_dir: Path, *, tokens: int, token_delay_s: float, max_tokens: int
) -> tuple[One, Callable[[], Awaitable[None]]]:
    """The instant engine in this process, fed the token ids the coordinator would send."""
    from bench.instant_miner import load_instant_engine
    from coordinator.api import ChatMessage
    from coordinator.text.tokenization import ModelTokenizer
    from miner.engine.base import GenerationRequest, SamplingParams

    tokenizer = ModelTokenizer.from_dir(model_dir)
    engine = load_instant_engine("direct", model_dir, tokens=tokens, token_delay_s=token_delay_s)
    prompt_ids = tokenizer.encode_chat([ChatMessage(role="user", content=PROMPT)])
    sampling = SamplingParams(
        temperature=0, max_tokens=max_tokens, stop_token_ids=tokenizer.stop_token_ids
    )
    counter = iter(range(1 << 62))

    async def one() -> tuple[float, int]:
        request = GenerationRequest(
            job_id=f"direct-{next(counter)}", prompt_token_ids=prompt_ids, sampling=sampling
        )
        first: float | None = None
        count = 0
        async for _ in engine.generate(request):
            count += 1
            if first is None:
                first = time.perf_counter()
        if first is None:
            raise RequestFailed("the engine yielded nothing")
        return first, count

    async def close() -> None:
        return None

    return one, close


async def generate(args: argparse.Namespace) -> Outcome:
    if args.target == "direct":
        if args.model_dir is None:
            raise SystemExit("--model-dir is required for the direct target")
        one, close = await direct_target(
            args.model_dir,
            tokens=args.tokens,
            token_delay_s=args.token_delay,
            max_tokens=args.max_tokens,
        )
    else:
        make = openai_target if args.client == "openai" else aiohttp_target
        one, close = await make(
            args.target,
            api_key=args.api_key,
            model=args.model,
            max_tokens=args.max_tokens,
            workers=args.workers,
        )
    try:
        return await run_window(
            one,
            workers=args.workers,
            start_at=args.start_at,
            warmup_s=args.warmup,
            duration_s=args.duration,
        )
    finally:
        await close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="'direct' or an HTTP base URL (.../v1)")
    parser.add_argument("--workers", type=int, required=True, help="concurrent requests")
    parser.add_argument("--start-at", type=float, required=True, help="window start (epoch s)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before the window")
    parser.add_argument("--duration", type=float, default=5.0, help="window length (s)")
    parser.add_argument("--client", choices=("aiohttp", "openai"), default="aiohttp")
    parser.add_argument("--api-key", default="none")
    parser.add_argument("--model", default="bench-model")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--model-dir", type=Path, help="direct: the model directory")
    parser.add_argument("--tokens", type=int, default=16, help="direct: text tokens per job")
    parser.add_argument("--token-delay", type=float, default=0.0, help="direct: s per token")
    args = parser.parse_args(argv)
    if args.workers < 1 or args.duration <= 0 or args.warmup < 0:
        parser.error("--workers must be >= 1, --duration > 0, --warmup >= 0")
    outcome = asyncio.run(generate(args))
    json.dump(outcome.as_json(), sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
