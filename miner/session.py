"""One connection to the coordinator: handshake, then jobs and heartbeats until it ends.

Besides its own jobs, a connection carries spot checks: ``ScoreJob`` (re-score a finished job,
``miner/score_jobs.py``) and ``SlashNotice`` (a failed check took credits, ``miner/slashes.py``).

A session ends in one of three ways: it returns after a graceful drain (shutdown was asked),
it raises :class:`ConnectionLostError` (the daemon reconnects), or it raises
:class:`MinerRefusedError` (the coordinator will never accept this miner as it is).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Mapping

import grpc

from miner.config import MinerConfig
from miner.engine.base import Engine
from miner.errors import ConnectionLostError, MinerRefusedError, TlsHandshakeError
from miner.identity import Identity
from miner.jobs import JobRunner, StopReason, failure
from miner.score_jobs import ScoreRunner, score_error
from miner.slashes import record_slash
from miner.tls import describe_tls_failure
from miner.witness import Witness, WitnessLink
from proto import miner_pb2, miner_pb2_grpc
from proto.limits import MAX_COORDINATOR_MESSAGE_BYTES, MAX_MINER_MESSAGE_BYTES
from proto.signing import challenge_message

logger = logging.getLogger(__name__)

PERMANENT_REFUSALS = frozenset(
    {
        miner_pb2.REFUSAL_REASON_UNSUPPORTED_PROTOCOL,
        miner_pb2.REFUSAL_REASON_BAD_SIGNATURE,
        miner_pb2.REFUSAL_REASON_UNKNOWN_MODEL,
        miner_pb2.REFUSAL_REASON_WEIGHTS_MISMATCH,
        miner_pb2.REFUSAL_REASON_BANNED_KEY,
    }
)
"""Refusals that reconnecting cannot fix: the miner stops instead of retrying forever."""

_Call = grpc.aio.StreamStreamCall[miner_pb2.MinerMessage, miner_pb2.CoordinatorMessage]

# A coordinator that sends no heartbeat interval gets this one (it is a protocol bug, though).
_DEFAULT_HEARTBEAT_S = 10.0
# Silence for this many heartbeat intervals means the connection is dead.
_DEAD_AFTER_INTERVALS = 3
# After the miner half-closes, how long the coordinator has to end the stream itself.
_CLOSE_GRACE_S = 5.0


def channel_options(config: MinerConfig) -> list[tuple[str, int]]:
    """gRPC channel options: the protocol's size limits and NAT-friendly keepalive."""
    return [
        ("grpc.max_send_message_length", MAX_MINER_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_COORDINATOR_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", int(config.keepalive_s * 1000)),
        ("grpc.keepalive_timeout_ms", 10_000),
        # Heartbeats are data, but a stalled stream must still be pinged.
        ("grpc.http2.max_pings_without_data", 0),
        # Each connection attempt gets a fresh subchannel: a shared one would carry grpc's own
        # reconnect backoff (up to 120 s) over from the last failure and override ours.
        ("grpc.use_local_subchannel_pool", 1),
    ]


class Session:
    """One ``MinerGateway.Connect`` stream. Use once: ``await session.run()``."""

    def __init__(
        self,
        config: MinerConfig,
        *,
        hello: miner_pb2.Hello,
        identity: Identity,
        engines: Mapping[str, Engine],
        stopping: asyncio.Event,
        address: str,
        witness: Witness | None = None,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        """``witness`` checks the coordinator's credit receipts; None ignores them.
        ``credentials`` secure the channel (miner/tls.py); None dials in plaintext.
        ``address`` is the gateway to dial (one of ``config.coordinators``)."""
        self._config = config
        self._address = address
        self._credentials = credentials
        self._hello = hello
        self._identity = identity
        self._stopping = stopping
        self._outbox: asyncio.Queue[miner_pb2.MinerMessage | None] = asyncio.Queue()
        self._runner = JobRunner(
            engines, identity=identity, send=self._send, max_concurrency=config.max_concurrency
        )
        self._scores = ScoreRunner(engines, send=self._send)
        self._draining = False
        self._witness = witness
        self._witness_link: WitnessLink | None = None
        self.welcome: miner_pb2.Welcome | None = None
        """The coordinator's Welcome, once the handshake succeeded."""

    async def run(self) -> None:
        """Runs the connection to its end; see the module docstring for how it ends."""
        options = channel_options(self._config)
        if self._credentials is None:
            channel = grpc.aio.insecure_channel(self._address, options=options)
        else:
            channel = grpc.aio.secure_channel(self._address, self._credentials, options=options)
        async with channel:
            call = miner_pb2_grpc.MinerGatewayStub(channel).Connect(self._requests())
            try:
                self._send(miner_pb2.MinerMessage(hello=self._hello))
                if await self._handshake_unless_stopping(call):
                    await self._serve(call)
            finally:
                # Ends the request iterator, or grpc's task consuming it would wait forever.
                self._outbox.put_nowait(None)
                call.cancel()

    def _send(self, message: miner_pb2.MinerMessage) -> None:
        if self._witness is not None and message.WhichOneof("body") == "result":
            self._witness.job_result(message.result)
        self._outbox.put_nowait(message)

    async def _requests(self) -> AsyncIterator[miner_pb2.MinerMessage]:
        while (message := await self._outbox.get()) is not None:
            if message.WhichOneof("body") == "chunk":
                # From here grpc may serialize it at any moment: no token may join it any more.
                self._runner.chunk_taken(message.chunk.job_id)
            yield message

    async def _read(
        self, call: _Call, limit_s: float, waiting_for: str
    ) -> miner_pb2.CoordinatorMessage:
        try:
            # asyncio.timeout, not wait_for: no task per message on the per-token path.
            async with asyncio.timeout(limit_s):
                message = await call.read()
        except TimeoutError:
            raise ConnectionLostError(
                f"no {waiting_for} from the coordinator within {limit_s:.1f} s"
            ) from None
        except grpc.aio.AioRpcError as err:
            details = err.details() or ""
            if self.welcome is None and err.code() == grpc.StatusCode.UNAVAILABLE:
                tls_failure = describe_tls_failure(
                    details,
                    address=self._address,
                    tls=self._config.tls,
                    encrypted=self._credentials is not None,
                )
                if tls_failure is not None:
                    raise TlsHandshakeError(tls_failure) from None
            raise ConnectionLostError(f"{err.code().name}: {details}") from None
        if not isinstance(message, miner_pb2.CoordinatorMessage):  # grpc.aio.EOF
            raise ConnectionLostError("the coordinator closed the stream")
        if message.WhichOneof("body") == "refusal":
            raise self._refused(message.refusal)
        return message

    def _refused(self, refusal: miner_pb2.Refusal) -> Exception:
        error = MinerRefusedError(refusal.reason, refusal.message)
        logger.error("%s", error)
        if refusal.reason in PERMANENT_REFUSALS:
            return error
        return ConnectionLostError(f"refused ({error.reason_name}): {refusal.message}")

    async def _handshake_unless_stopping(self, call: _Call) -> bool:
        """True once welcomed; False when shutdown was asked before the Welcome arrived."""
        handshake = asyncio.create_task(self._handshake(call))
        stopping = asyncio.create_task(self._stopping.wait())
        try:
            await asyncio.wait({handshake, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (handshake, stopping):
                task.cancel()
        if not handshake.done() or handshake.cancelled():
            await asyncio.gather(handshake, return_exceptions=True)
            logger.info("shutdown asked before the coordinator welcomed the miner")
            return False
        self.welcome = handshake.result()
        return True

    async def _handshake(self, call: _Call) -> miner_pb2.Welcome:
        timeout = self._config.handshake_timeout_s
        message = await self._read(call, timeout, "challenge")
        if message.WhichOneof("body") != "challenge":
            raise ConnectionLostError(f"expected a Challenge, got {message.WhichOneof('body')}")
        signature = self._identity.sign(
            challenge_message(message.challenge.nonce, self._identity.public_key)
        )
        self._send(miner_pb2.MinerMessage(answer=miner_pb2.ChallengeAnswer(signature=signature)))
        message = await self._read(call, timeout, "welcome")
        if message.WhichOneof("body") != "welcome":
            raise ConnectionLostError(f"expected a Welcome, got {message.WhichOneof('body')}")
        welcome = message.welcome
        if welcome.miner_id and welcome.miner_id != self._identity.miner_id:
            logger.warning(
                "the coordinator calls this miner %s, expected %s",
                welcome.miner_id,
                self._identity.miner_id,
            )
        return welcome

    async def _serve(self, call: _Call) -> None:
        assert self.welcome is not None
        interval_ms = self.welcome.heartbeat_interval_ms
        if interval_ms == 0:
            logger.warning(
                "the coordinator sent no heartbeat interval; using %s s", _DEFAULT_HEARTBEAT_S
            )
        interval = interval_ms / 1000 if interval_ms else _DEFAULT_HEARTBEAT_S
        logger.info(
            "connected to %s as %s (heartbeat every %.3g s)",
            self._address,
            self._identity.miner_id,
            interval,
        )
        if self._witness is not None:
            self._witness_link = self._witness.attach(self.welcome, self._send)
        reader = asyncio.create_task(self._read_loop(call, interval * _DEAD_AFTER_INTERVALS))
        heartbeats = asyncio.create_task(self._heartbeats(interval))
        stopping = asyncio.create_task(self._stopping.wait())
        try:
            await asyncio.wait({reader, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if reader.done():
                reader.result()  # always raises: the reader only ends when the stream does
            await self._drain(reader)
        finally:
            for task in (reader, heartbeats, stopping):
                task.cancel()
            await asyncio.gather(reader, heartbeats, stopping, return_exceptions=True)
            if self._witness_link is not None:
                await self._witness_link.aclose()
            # Whatever is still running has nobody left to report to.
            await self._runner.stop_all(StopReason.DISCONNECT)
            await self._scores.stop_all(StopReason.DISCONNECT)

    async def _read_loop(self, call: _Call, dead_after: float) -> None:
        while True:
            message = await self._read(call, dead_after, "message")
            kind = message.WhichOneof("body")
            if kind == "job":
                if self._draining:
                    self._send(failure(message.job.job_id, "draining", retryable=True))
                else:
                    self._runner.start(message.job)
            elif kind == "cancel":
                if not self._runner.stop(message.cancel.job_id, StopReason.COORDINATOR):
                    logger.debug("CancelJob for %s, which is not running", message.cancel.job_id)
            elif kind == "score":
                if self._draining:
                    self._send(score_error(message.score.score_id, "draining"))
                else:
                    self._scores.start(message.score)
            elif kind == "slash_notice":
                record_slash(message.slash_notice, directory=self._config.witness_dir)
            elif kind in ("credit_receipt", "consistency_proof"):
                if self._witness_link is not None:
                    self._witness_link.handle(message)
            elif kind != "heartbeat":
                logger.warning("ignoring an unexpected %s from the coordinator", kind)

    async def _wait_all(self, limit_s: float) -> bool:
        """Waits for jobs and score jobs in flight; True when all ended within ``limit_s``."""
        jobs, scores = await asyncio.gather(self._runner.wait(limit_s), self._scores.wait(limit_s))
        return jobs and scores

    async def _heartbeats(self, interval: float) -> None:
        while True:
            heartbeat = miner_pb2.Heartbeat(
                sent_at_unix_ms=int(time.time() * 1000), active_jobs=self._runner.active
            )
            self._send(miner_pb2.MinerMessage(heartbeat=heartbeat))
            await asyncio.sleep(interval)

    async def _drain(self, reader: asyncio.Task[None]) -> None:
        """Stops taking jobs, lets running ones finish (up to the timeout), then closes."""
        self._draining = True
        self._send(miner_pb2.MinerMessage(drain=miner_pb2.Drain(reason="shutting down")))
        timeout = self._config.drain_timeout_s
        logger.info(
            "draining: %d jobs and %d score jobs in flight, waiting up to %.0f s",
            self._runner.active,
            self._scores.active,
            timeout,
        )
        finished = asyncio.create_task(self._wait_all(timeout))
        try:
            await asyncio.wait({finished, reader}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            finished.cancel()
        if reader.done():
            with contextlib.suppress(ConnectionLostError):
                reader.result()
            logger.warning("the connection ended while draining")
            return
        if not finished.result():
            logger.warning(
                "drain timeout: handing back %d unfinished jobs and %d score jobs",
                self._runner.active,
                self._scores.active,
            )
            await self._runner.stop_all(StopReason.HANDBACK)
            await self._scores.stop_all(StopReason.HANDBACK)
        # Half-close: grpc writes everything queued before the end marker, then the coordinator
        # sees the end of the request stream and closes its side.
        self._outbox.put_nowait(None)
        await asyncio.wait({reader}, timeout=_CLOSE_GRACE_S)
        logger.info("disconnected from %s", self._address)
