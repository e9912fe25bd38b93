"""The coordinator path of ``bench/engine.py``: the marketplace as separate processes.

``meshmint-coordinator serve`` (embedded PostgreSQL, spot checks and rate limits off), started
once per model by ``bench.load_stack.coordinator_stack`` as ``bench/load.py`` starts it, and one
real ``meshmint-miner run`` per level, its engine configured exactly as the engine path's
(``--max-concurrency`` N, the same KV cache), driven through the same closed loop
(``bench/engine_load.py``) by the official ``openai`` ``AsyncOpenAI`` client, streaming chat with
``logprobs`` (see :func:`drive`). The processes' CPU time is read over each level, so a report
can say where the cores went.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil  # type: ignore[import-untyped]  # installed with pgserver; no stubs here

from bench.engine_load import CpuMeter, PathFigures, Timing, closed_loop, figures, peak_rss_mib
from bench.engine_paths import Workload
from bench.load_stack import (
    LoadProcesses,
    Stack,
    StackConfig,
    coordinator_stack,
    postgres_processes,
)
from bench.overhead import BIN, MODEL_NAME, STARTUP_TIMEOUT_S, wait_for_line, wait_for_miners

READY = r"buyers (http://\S+/v1), miners (\S+)\n"  # the coordinator's ready line
REQUEST_TIMEOUT_S = 300.0  # one request


@dataclass(frozen=True)
class CoordinatorLevel:
    figures: PathFigures
    miner_peak_rss_mib: float | None  # the miner process's peak (a fresh miner per level)
    # CPU seconds per second over the level's whole loop (warm-up included), per process group
    # (this process is the client) and for the whole machine: where the 2 cores went.
    cpu_cores: dict[str, float]
    cpu_ms_per_token: float  # miner, coordinator, PostgreSQL and client together


class CoordinatorPath:
    """A running coordinator; :meth:`level` starts a miner for one level and drives it."""

    def __init__(self, workload: Workload, processes: LoadProcesses, stack: Stack) -> None:
        self._workload = workload
        self._processes = processes
        self._stack = stack
        # The stack names the buyers' URL only; the miners' address is in the same ready line.
        ready = wait_for_line(
            processes.work / "coordinator.log", READY, stack.coordinator, STARTUP_TIMEOUT_S
        )
        self._grpc_address = ready.group(2).rstrip(",")

    def level(self, concurrency: int, per_client: int) -> CoordinatorLevel:
        """A fresh miner whose engine is configured as the engine path's; the same loop."""
        workload, stack, work = self._workload, self._stack, self._processes.work
        miner, _ = self._processes.start(
            [
                *(str(BIN / "meshmint-miner"), "run", "--coordinator", self._grpc_address),
                *("--model", f"{MODEL_NAME}={workload.source}"),
                *("--key", str(work / "miner.key"), "--device", "cpu"),
                *("--cache-dir", str(workload.cache_dir), "--log-level", "WARNING"),
                *("--max-concurrency", str(concurrency)),
                *("--kv-cache-tokens", str(workload.kv_cache_tokens(concurrency))),
            ],
            f"miner-c{concurrency}",
        )
        wait_for_miners(stack.base_url, stack.api_key, 1, STARTUP_TIMEOUT_S)
        watch = {
            "miner": [psutil.Process(miner.pid)],
            "coordinator": [psutil.Process(stack.coordinator.pid)],
            "postgres": postgres_processes(stack.postgres_dir or work),
            "client": [psutil.Process()],
        }
        cpu = CpuMeter(watch)
        timings, generated = asyncio.run(
            drive(
                stack.base_url, stack.api_key, workload, concurrency=concurrency, rounds=per_client
            )
        )
        cores, cpu_s = cpu.read()
        measured = CoordinatorLevel(
            figures(timings), peak_rss_mib(miner.pid), cores, 1000 * cpu_s / max(1, generated)
        )
        self._processes.stop(miner)
        wait_for_miners(stack.base_url, stack.api_key, 0, STARTUP_TIMEOUT_S)
        return measured


@contextmanager
def coordinator_path(workload: Workload, work: Path) -> Iterator[CoordinatorPath]:
    """The coordinator of ``bench/load.py`` (no miner yet); stops it and any miner on exit.

    It runs, idle, while the engine path measures in this process, so that each level's two
    paths run back to back and see the same background load on a shared machine."""
    processes = LoadProcesses(work)
    with coordinator_stack(
        StackConfig(model_dir=workload.source, work=work, miners=0), processes
    ) as stack:
        yield CoordinatorPath(workload, processes, stack)


class RequestFailed(Exception):
    """A request through the coordinator did not deliver the tokens it billed."""


async def drive(
    base_url: str, api_key: str, workload: Workload, *, concurrency: int, rounds: int
) -> tuple[list[list[Timing]], int]:
    """The closed loop through the coordinator: the timings, and all tokens (warm-up too)."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(
        base_url=base_url, api_key=api_key, max_retries=0, timeout=REQUEST_TIMEOUT_S
    )

    generated = 0

    async def one(client_index: int, index: int, max_tokens: int) -> Timing:
        nonlocal generated
        question = workload.questions[(client_index + index) % len(workload.questions)]
        sent = time.perf_counter()
        # logprobs: a chunk per token, with or without visible text. The random models' bytes
        # often are not UTF-8 yet, so without it the first *text* can come tokens after the
        # first token, and tokens could not be counted as they arrive.
        stream = await client.chat.completions.create(
            model=MODEL_NAME,
            messages=[{"role": "user", "content": question}],
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            logprobs=True,
        )
        arrivals: list[float] = []
        billed = -1
        async for chunk in stream:
            arrived = time.perf_counter()
            if chunk.choices and chunk.choices[0].logprobs and chunk.choices[0].logprobs.content:
                arrivals.extend([arrived] * len(chunk.choices[0].logprobs.content))
            if chunk.usage is not None:
                billed = chunk.usage.completion_tokens
        if billed != len(arrivals) or not arrivals:
            raise RequestFailed(f"{len(arrivals)} tokens streamed, {billed} billed")
        generated += len(arrivals)
        return Timing(sent, tuple(arrivals), time.perf_counter())

    try:
        timings = await closed_loop(
            one, clients=concurrency, per_client=rounds, max_tokens=workload.max_tokens
        )
        return timings, generated
    finally:
        await client.close()
