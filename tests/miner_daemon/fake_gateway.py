"""Fakes for unit tests of the miner daemon: a scripted coordinator and a scripted engine.

``FakeGateway`` is a real gRPC servicer (served on 127.0.0.1, port 0) that plays the
coordinator's side of proto/miner.proto just far enough to test the miner: it verifies the
challenge signature, welcomes or refuses, records every message the miner sends and lets a test
push Jobs, CancelJobs, ScoreJobs and SlashNotices. The real coordinator is tested end to end
elsewhere.

``FakeEngine`` implements ``miner.engine.base.Engine`` with deterministic tokens and scores and
configurable delays, so daemon tests run in milliseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from miner.config import MinerConfig
from miner.daemon import MinerDaemon
from miner.engine.base import (
    Engine,
    GeneratedToken,
    GenerationRequest,
    ModelInfo,
    ScoreRequest,
    TokenScores,
)
from miner.identity import Identity
from proto import miner_pb2, miner_pb2_grpc
from proto.limits import MAX_COORDINATOR_MESSAGE_BYTES, MAX_MINER_MESSAGE_BYTES
from proto.signing import challenge_message

WAIT_S = 5.0
"""How long a test waits for something that should happen within milliseconds."""


class FakeSession:
    """One miner connection as the fake coordinator sees it."""

    def __init__(self) -> None:
        self.nonce = os.urandom(32)
        self.hello: miner_pb2.Hello | None = None
        self.answer: miner_pb2.ChallengeAnswer | None = None
        self.signature_ok = False
        self.refusal: miner_pb2.Refusal | None = None
        self.welcomed = False
        self.received: list[miner_pb2.MinerMessage] = []
        """Every message after the handshake, heartbeats included, in arrival order."""
        self.ended = asyncio.Event()
        """Set when the miner's request stream ended or broke."""
        self._inbox: asyncio.Queue[miner_pb2.MinerMessage] = asyncio.Queue()
        self._outbox: asyncio.Queue[miner_pb2.CoordinatorMessage | None] = asyncio.Queue()

    def send(self, message: miner_pb2.CoordinatorMessage) -> None:
        self._outbox.put_nowait(message)

    def send_job(self, job: miner_pb2.Job) -> None:
        self.send(miner_pb2.CoordinatorMessage(job=job))

    def send_cancel(self, job_id: str) -> None:
        self.send(miner_pb2.CoordinatorMessage(cancel=miner_pb2.CancelJob(job_id=job_id)))

    def send_score(self, score: miner_pb2.ScoreJob) -> None:
        self.send(miner_pb2.CoordinatorMessage(score=score))

    def send_slash(self, notice: miner_pb2.SlashNotice) -> None:
        self.send(miner_pb2.CoordinatorMessage(slash_notice=notice))

    async def score_result(
        self, score_id: str, *, within_s: float = WAIT_S
    ) -> miner_pb2.ScoreResult:
        """The ScoreResult naming ``score_id``; other messages are skipped."""
        async with asyncio.timeout(within_s):
            while True:
                message = await self._inbox.get()
                if (
                    message.WhichOneof("body") == "score_result"
                    and message.score_result.score_id == score_id
                ):
                    return message.score_result

    def close(self) -> None:
        """Ends the stream from the coordinator's side."""
        self._outbox.put_nowait(None)

    async def next(self, kind: str, *, within_s: float = WAIT_S) -> miner_pb2.MinerMessage:
        """The next message whose body is ``kind``; messages of other kinds are skipped."""
        async with asyncio.timeout(within_s):
            while True:
                message = await self._inbox.get()
                if message.WhichOneof("body") == kind:
                    return message

    async def job_outcome(self, job_id: str, *, within_s: float = WAIT_S) -> JobOutcome:
        """Collects the chunks of ``job_id`` up to its JobResult or JobFailure."""
        outcome = JobOutcome()
        async with asyncio.timeout(within_s):
            while True:
                message = await self._inbox.get()
                kind = message.WhichOneof("body")
                if kind == "chunk" and message.chunk.job_id == job_id:
                    outcome.chunks.append(message.chunk)
                elif kind == "result" and message.result.job_id == job_id:
                    outcome.result = message.result
                    return outcome
                elif kind == "failure" and message.failure.job_id == job_id:
                    outcome.failure = message.failure
                    return outcome

    def of_kind(self, kind: str) -> list[miner_pb2.MinerMessage]:
        return [message for message in self.received if message.WhichOneof("body") == kind]


@dataclass
class JobOutcome:
    """What the miner sent for one job."""

    chunks: list[miner_pb2.TokenChunk] = field(default_factory=list)
    result: miner_pb2.JobResult | None = None
    failure: miner_pb2.JobFailure | None = None

    @property
    def token_ids(self) -> list[int]:
        return [token for chunk in self.chunks for token in chunk.token_ids]


class FakeGateway(miner_pb2_grpc.MinerGatewayServicer):
    """A scripted coordinator. ``refusals`` are used up one per connection, then it welcomes."""

    def __init__(
        self,
        *,
        heartbeat_interval_ms: int = 1000,
        send_heartbeats: bool = True,
        refusals: Sequence[miner_pb2.Refusal] = (),
    ) -> None:
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.send_heartbeats = send_heartbeats
        self.sessions: list[FakeSession] = []
        self._refusals = list(refusals)
        self._decided: asyncio.Queue[FakeSession] = asyncio.Queue()

    async def next_session(self, *, within_s: float = WAIT_S) -> FakeSession:
        """The next connection that got its Welcome or Refusal."""
        async with asyncio.timeout(within_s):
            return await self._decided.get()

    async def Connect(
        self, request_iterator: Any, context: Any
    ) -> AsyncIterator[miner_pb2.CoordinatorMessage]:
        session = FakeSession()
        self.sessions.append(session)
        requests = request_iterator.__aiter__()
        try:
            session.hello = (await anext(requests)).hello
            yield miner_pb2.CoordinatorMessage(challenge=miner_pb2.Challenge(nonce=session.nonce))
            session.answer = (await anext(requests)).answer
        except StopAsyncIteration:
            session.ended.set()
            return
        session.signature_ok = _verify(session)
        if not session.signature_ok:
            session.refusal = miner_pb2.Refusal(
                reason=miner_pb2.REFUSAL_REASON_BAD_SIGNATURE, message="bad signature"
            )
        elif self._refusals:
            session.refusal = self._refusals.pop(0)
        if session.refusal is not None:
            self._decided.put_nowait(session)
            yield miner_pb2.CoordinatorMessage(refusal=session.refusal)
            return
        yield miner_pb2.CoordinatorMessage(
            welcome=miner_pb2.Welcome(
                miner_id=session.hello.public_key.hex(),
                heartbeat_interval_ms=self.heartbeat_interval_ms,
            )
        )
        session.welcomed = True
        self._decided.put_nowait(session)
        pump = asyncio.create_task(_pump(requests, session))
        beats = asyncio.create_task(self._heartbeats(session))
        try:
            while (message := await session._outbox.get()) is not None:
                yield message
        finally:
            for task in (pump, beats):
                task.cancel()
            await asyncio.gather(pump, beats, return_exceptions=True)
            session.ended.set()

    async def _heartbeats(self, session: FakeSession) -> None:
        while self.send_heartbeats:
            now = int(time.time() * 1000)
            session.send(
                miner_pb2.CoordinatorMessage(heartbeat=miner_pb2.Heartbeat(sent_at_unix_ms=now))
            )
            await asyncio.sleep(self.heartbeat_interval_ms / 1000)


async def _pump(requests: AsyncIterator[miner_pb2.MinerMessage], session: FakeSession) -> None:
    with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
        async for message in requests:
            session.received.append(message)
            session._inbox.put_nowait(message)
    # Like the real coordinator: once the miner is done writing, close the stream.
    session.ended.set()
    session.close()


def _verify(session: FakeSession) -> bool:
    assert session.hello is not None and session.answer is not None
    try:
        Ed25519PublicKey.from_public_bytes(session.hello.public_key).verify(
            session.answer.signature, challenge_message(session.nonce, session.hello.public_key)
        )
    except (InvalidSignature, ValueError):
        return False
    return True


@asynccontextmanager
async def serve(
    gateway: FakeGateway, *, port: int = 0, credentials: grpc.ServerCredentials | None = None
) -> AsyncIterator[int]:
    """Serves ``gateway`` on 127.0.0.1 (over TLS with ``credentials``) and yields the port."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MINER_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_COORDINATOR_MESSAGE_BYTES),
        ]
    )
    miner_pb2_grpc.add_MinerGatewayServicer_to_server(gateway, server)
    address = f"127.0.0.1:{port}"
    if credentials is None:
        bound = server.add_insecure_port(address)
    else:
        bound = server.add_secure_port(address, credentials)
    await server.start()
    try:
        yield bound
    finally:
        await server.stop(grace=None)


class FakeEngine:
    """Deterministic tokens (see :func:`fake_tokens`) with optional delays and failures."""

    def __init__(
        self,
        name: str = "fake-model",
        *,
        token_delay_s: float = 0.0,
        first_token_delay_s: float = 0.0,
        error: Exception | None = None,
        error_after: int = 0,
        score_delay_s: float = 0.0,
        score_error: Exception | None = None,
        score_stop_margins: bool = True,
    ) -> None:
        self._info = ModelInfo(
            name=name,
            weights_sha256=hashlib.sha256(name.encode()).digest(),
            vocab_size=VOCAB_SIZE,
            context_length=4096,
            dtype="float32",
            device="cpu",
            engine="fake/1.0",
        )
        self._token_delay_s = token_delay_s
        self._first_token_delay_s = first_token_delay_s
        self._error = error
        self._error_after = error_after
        self._score_delay_s = score_delay_s
        self._score_error = score_error
        # False: an engine that predates stop margins (it reports none).
        self._score_stop_margins = score_stop_margins
        self.scoring: set[str] = set()
        """Noise job ids of score calls that started and have not returned or been cancelled."""
        self.scores_cancelled: set[str] = set()
        """Noise job ids of score calls that were cancelled."""
        self.produced: dict[str, int] = {}
        """Tokens yielded per job id."""
        self.closed: set[str] = set()
        """Job ids whose generator has been closed or ran to its end."""
        self._closing = asyncio.Event()

    @property
    def info(self) -> ModelInfo:
        return self._info

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GeneratedToken]:
        job_id = request.job_id
        self.produced[job_id] = 0
        try:
            await asyncio.sleep(self._first_token_delay_s)
            tokens = fake_tokens(request.prompt_token_ids, request.sampling.max_tokens)
            for position, token in enumerate(tokens):
                if self._error is not None and position == self._error_after:
                    raise self._error
                if position:
                    await asyncio.sleep(self._token_delay_s)
                self.produced[job_id] += 1
                yield GeneratedToken(token_id=token, logprob=fake_logprob(position))
                if token in request.sampling.stop_token_ids:
                    return
        finally:
            self.closed.add(job_id)
            self._closing.set()

    async def score(self, request: ScoreRequest) -> TokenScores:
        """Margin 0 for each token :func:`fake_tokens` would produce at its position, else 1;
        where that token is a stop token the stop margin is the margin, elsewhere -1."""
        job_id = request.noise_job_id
        self.scoring.add(job_id)
        try:
            await asyncio.sleep(self._score_delay_s)
        except asyncio.CancelledError:
            self.scores_cancelled.add(job_id)
            raise
        finally:
            self.scoring.discard(job_id)
        if self._score_error is not None:
            raise self._score_error
        completion = list(request.completion_token_ids)
        honest = fake_tokens(request.prompt_token_ids, len(completion))
        margins = tuple(
            0.0 if token == expected else 1.0
            for token, expected in zip(completion, honest, strict=True)
        )
        stops = frozenset(request.sampling.stop_token_ids)
        stop_margins = tuple(
            margin if expected in stops else -1.0
            for margin, expected in zip(margins, honest, strict=True)
        )
        return TokenScores(
            logprobs=tuple(fake_logprob(position) for position in range(len(completion))),
            margins=margins,
            stop_margins=stop_margins if self._score_stop_margins else (),
        )

    async def wait_closed(self, job_id: str) -> None:
        async with asyncio.timeout(WAIT_S):
            while job_id not in self.closed:
                self._closing.clear()
                await self._closing.wait()


VOCAB_SIZE = 1000


def fake_tokens(prompt: Sequence[int], count: int) -> list[int]:
    """The tokens FakeEngine generates for ``prompt`` (ignoring stop tokens)."""
    return [(sum(prompt) + 7 * position) % VOCAB_SIZE for position in range(count)]


def fake_logprob(position: int) -> float:
    return -0.125 * (position + 1)  # exact in float32, so chunks compare exactly


def make_job(
    job_id: str,
    *,
    model: str = "fake-model",
    prompt: Sequence[int] = (1, 2, 3),
    max_tokens: int = 8,
    stop: Sequence[int] = (),
    seed: int = 7,
) -> miner_pb2.Job:
    return miner_pb2.Job(
        job_id=job_id,
        model=model,
        prompt_token_ids=list(prompt),
        sampling=miner_pb2.SamplingParams(
            temperature=0.5,
            top_p=0.9,
            top_k=40,
            max_tokens=max_tokens,
            seed=seed,
            stop_token_ids=list(stop),
        ),
    )


TEST_HARDWARE = miner_pb2.Hardware(
    accelerator="cpu", device_name="test CPU", memory_bytes=1 << 30, cpu_count=2
)


@dataclass
class RunningMiner:
    """A daemon running in a task, for tests."""

    daemon: MinerDaemon
    task: asyncio.Task[None]
    identity: Identity


@asynccontextmanager
async def running_miner(
    port: int, engines: Sequence[Engine], **config: Any
) -> AsyncIterator[RunningMiner]:
    """Runs a MinerDaemon against 127.0.0.1:``port`` with short timeouts; stops it on exit."""
    settings: dict[str, Any] = {
        "backoff_min_s": 0.02,
        "backoff_max_s": 0.1,
        "handshake_timeout_s": WAIT_S,
        "drain_timeout_s": WAIT_S,
    }
    settings.update(config)
    identity = Identity.generate()
    daemon = MinerDaemon(
        MinerConfig(coordinator=f"127.0.0.1:{port}", **settings),
        identity=identity,
        engines=engines,
        hardware=TEST_HARDWARE,
    )
    task = asyncio.create_task(daemon.run())
    try:
        yield RunningMiner(daemon=daemon, task=task, identity=identity)
    finally:
        daemon.shutdown()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(WAIT_S * 2):
                await asyncio.gather(task, return_exceptions=True)
        task.cancel()
