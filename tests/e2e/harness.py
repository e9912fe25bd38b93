"""Real processes for end-to-end tests: `meshmint-coordinator serve` and `meshmint-miner run`.

Everything runs as the user would run it (console scripts, real gRPC on loopback, ports chosen
by the OS, a real PostgreSQL); tests talk to it with the official `openai` SDK and read the
ledger with asyncpg.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import asyncpg
from openai import AsyncOpenAI, OpenAI
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from coordinator.billing.keys import KeyStore
from ledger.interface import AccountKind, AccountRef
from ledger.postgres import PostgresLedger

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]


def _wait_for(
    log: Path, pattern: str, process: subprocess.Popen[bytes], timeout: float
) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(pattern, log.read_text(errors="replace"))
        if match:
            return match
        if process.poll() is not None:
            break
        time.sleep(0.1)
    raise AssertionError(f"{log.name} never printed {pattern!r}:\n{log.read_text()[-3000:]}")


@dataclass
class Process:
    popen: subprocess.Popen[bytes]
    log: Path

    def stop(self, timeout: float = 20) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait()

    def kill(self) -> None:
        self.popen.kill()
        self.popen.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class Coordinator:
    process: Process
    base_url: str
    grpc_address: str
    database_url: str
    miners: list[Process] = field(default_factory=list)
    ssl_context: ssl.SSLContext | None = None  # verifies base_url when it is https


def start_coordinator(
    tmp: Path,
    *,
    database_url: str,
    models: dict[str, Path],
    extra: list[str] | None = None,
    ca_file: Path | None = None,
) -> Coordinator:
    """``ca_file``: the CA that signed the certificate ``extra`` serves HTTPS with."""
    log = tmp / "coordinator.log"
    args = [
        str(BIN / "meshmint-coordinator"),
        "serve",
        "--database-url",
        database_url,
        "--data-dir",
        str(tmp / "coordinator"),
        "--http",
        "127.0.0.1:0",
        "--grpc",
        "127.0.0.1:0",
        "--first-token-timeout",
        "20",
    ]
    for name, path in models.items():
        args += ["--model", f"{name}={path}"]
    popen = subprocess.Popen(args + (extra or []), stdout=log.open("wb"), stderr=subprocess.STDOUT)
    process = Process(popen, log)
    ready = _wait_for(log, r"buyers (https?://\S+/v1), miners (\S+)\n", popen, timeout=60)
    context = ssl.create_default_context(cafile=str(ca_file)) if ca_file is not None else None
    return Coordinator(process, ready.group(1), ready.group(2), database_url, ssl_context=context)


@contextlib.contextmanager
def running_coordinator(
    tmp: Path,
    *,
    database_url: str,
    models: dict[str, Path],
    extra: list[str] | None = None,
    kill_miners: bool = False,
    ca_file: Path | None = None,
) -> Iterator[Coordinator]:
    """A coordinator for the block; its miners are stopped (or killed) and it is stopped after."""
    running = start_coordinator(
        tmp, database_url=database_url, models=models, extra=extra, ca_file=ca_file
    )
    try:
        yield running
    finally:
        for miner in running.miners:
            if kill_miners:
                miner.kill()
            else:
                miner.stop()
        running.process.stop()


def start_miner(
    coordinator: Coordinator,
    tmp: Path,
    *,
    name: str,
    models: dict[str, Path],
    variant: str = "honest",
    max_concurrency: int = 2,
    extra: Sequence[str] = (),
) -> Process:
    log = tmp / f"miner-{name}.log"
    args = [
        sys.executable,
        str(ROOT / "tests" / "e2e" / "variant_miner.py"),
        variant,
        "run",
        "--coordinator",
        coordinator.grpc_address,
        "--key",
        str(tmp / f"{name}.key"),
        "--max-concurrency",
        str(max_concurrency),
    ]
    for model, path in models.items():
        args += ["--model", f"{model}={path}"]
    popen = subprocess.Popen([*args, *extra], stdout=log.open("wb"), stderr=subprocess.STDOUT)
    process = Process(popen, log)
    coordinator.miners.append(process)
    return process


def wait_for_miners(
    coordinator: Coordinator, api_key: str, model: str, count: int, timeout: float = 90
) -> None:
    deadline = time.monotonic() + timeout
    seen: Any = None
    while time.monotonic() < deadline:
        _, _, seen = http(
            f"{coordinator.base_url}/models", api_key=api_key, context=coordinator.ssl_context
        )
        if any(m["id"] == model and m["miners"] == count for m in seen.get("data", [])):
            return
        time.sleep(0.2)
    logs = "\n".join(m.output()[-1500:] for m in coordinator.miners)
    raise AssertionError(f"expected {count} miners for {model}, saw {seen}\n{logs}")


def http(
    url: str,
    *,
    api_key: str | None = None,
    body: bytes | None = None,
    context: ssl.SSLContext | None = None,
) -> tuple[int, dict[str, str], Any]:
    """A raw request (GET, or POST with ``body``): status, lower-cased headers, parsed JSON.
    ``context`` verifies an https URL (e.g. ``Coordinator.ssl_context``)."""
    headers = {"Content-Type": "application/json"}
    if api_key is not None:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url, data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as response:
            status, raw_headers, payload = response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        status, raw_headers, payload = error.code, error.headers, error.read()
    lowered = {name.lower(): value for name, value in raw_headers.items()}
    return status, lowered, json.loads(payload) if payload else None


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


def create_key(database_url: str, *, credits_micro: int, name: str = "buyer") -> tuple[str, str]:
    """Returns (key_id, secret), the account funded with ``credits_micro``."""

    async def go() -> tuple[str, str]:
        pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
        try:
            ledger = await PostgresLedger.create(pool)
            keys = await KeyStore.create(pool)
            key = await keys.issue(name)
            account = AccountRef(AccountKind.BUYER, key.key_id)
            await ledger.open_account(account)
            if credits_micro:
                await ledger.mint(account, credits_micro, memo="test credits")
            return key.key_id, key.secret
        finally:
            await pool.close()

    result: tuple[str, str] = _run(go())
    return result


def balances(database_url: str) -> dict[str, int]:
    """Every account's balance, keyed 'kind' or 'kind:owner'."""

    async def go() -> dict[str, int]:
        pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
        try:
            ledger = PostgresLedger(pool)
            return {str(b.account): b.balance for b in await ledger.balances()}
        finally:
            await pool.close()

    result: dict[str, int] = _run(go())
    return result


def fetch(database_url: str, query: str, *args: Any) -> list[dict[str, Any]]:
    async def go() -> list[dict[str, Any]]:
        connection = await asyncpg.connect(database_url)
        try:
            return [dict(row) for row in await connection.fetch(query, *args)]
        finally:
            await connection.close()

    result: list[dict[str, Any]] = _run(go())
    return result


def miner_identity(miner: Process) -> str | None:
    """The id the miner's log says it connected as (hex public key), or None before it did."""
    match = re.search(r"connected to \S+ as (\S+)", miner.output())
    return match.group(1) if match else None


def eventually(condition: Callable[[], bool], what: str, *, timeout: float = 30.0) -> None:
    """Polls ``condition`` until it holds; fails the test naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout:g} s")
        time.sleep(0.1)


def open_holds(database_url: str) -> int:
    """Holds on the ledger that were neither settled nor released."""
    rows = fetch(database_url, "SELECT count(*) AS n FROM ledger_holds WHERE status = 'open'")
    return int(rows[0]["n"])


def ledger_audit(coordinator: Coordinator) -> subprocess.CompletedProcess[str]:
    """Runs the installed ``meshmint-ledger audit`` over the coordinator's public API, trusting
    the verifier key the coordinator publishes (exit status 0 means no finding)."""
    base = coordinator.base_url.removesuffix("/v1")
    _, _, key_info = http(base + "/ledger/key")
    return subprocess.run(
        [
            str(BIN / "meshmint-ledger"),
            "audit",
            "--coordinator",
            base,
            "--verifier-key",
            key_info["verifier_key"],
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def greedy_twice(
    client: OpenAI, *, model: str, messages: list[dict[str, str]], max_tokens: int
) -> tuple[ChatCompletion, list[ChatCompletionChunk], str]:
    """The same greedy chat request non-streaming, then streaming with usage: the whole reply,
    the stream's chunks and the streamed text."""
    whole = client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0
    )
    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    return whole, chunks, streamed


Mode = Literal["sync", "async"]
"""Which client of the official SDK drives a :class:`Buyer`: ``OpenAI`` or ``AsyncOpenAI``."""

MODES: tuple[Mode, ...] = ("sync", "async")


@dataclass(frozen=True)
class Buyer:
    """One funded API key, driven through the sync or the async SDK client.

    Each call makes a fresh client: an async one lives inside its own ``asyncio.run``.
    """

    mode: Mode  # which SDK client makes the calls
    base_url: str  # the coordinator's /v1 URL
    key_id: str  # the key's id: its ledger account is "buyer:<key_id>"
    key: str  # the secret sent as the bearer token

    def chat(self, **params: Any) -> ChatCompletion:
        return cast(ChatCompletion, self._call("chat", params))

    def chat_stream(self, **params: Any) -> list[ChatCompletionChunk]:
        return cast(list[ChatCompletionChunk], self._call("chat", {**params, "stream": True}))

    def text(self, **params: Any) -> Completion:
        return cast(Completion, self._call("text", params))

    def text_stream(self, **params: Any) -> list[Completion]:
        return cast(list[Completion], self._call("text", {**params, "stream": True}))

    def _call(self, endpoint: str, params: dict[str, Any]) -> object:
        if self.mode == "async":
            return asyncio.run(self._async_call(endpoint, params))
        with OpenAI(base_url=self.base_url, api_key=self.key, max_retries=0, timeout=60) as sdk:
            if endpoint == "chat":
                result: Any = sdk.chat.completions.create(**params)
            else:
                result = sdk.completions.create(**params)
            return list(result) if params.get("stream") else result

    async def _async_call(self, endpoint: str, params: dict[str, Any]) -> object:
        async with AsyncOpenAI(
            base_url=self.base_url, api_key=self.key, max_retries=0, timeout=60
        ) as sdk:
            if endpoint == "chat":
                result: Any = await sdk.chat.completions.create(**params)
            else:
                result = await sdk.completions.create(**params)
            if params.get("stream"):
                return [chunk async for chunk in result]
            return result
