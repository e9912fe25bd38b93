"""The gRPC end of the miner protocol: handshake, then a session until either side leaves.

Every miner holds ONE bidirectional stream (it dials out, so home routers are no obstacle).
The handler below reads the miner's messages in a task of its own and yields whatever the
session's outbox holds: jobs, cancels and heartbeats.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

import grpc

from coordinator.catalog import Catalog
from coordinator.dispatch.registry import MinerRegistry
from coordinator.gateway.config import GatewayConfig
from coordinator.gateway.handshake import check_hello, refusal, signature_is_valid
from coordinator.gateway.session import MinerSession
from coordinator.worker import Worker
from proto import miner_pb2, miner_pb2_grpc

if TYPE_CHECKING:
    from coordinator.billing.receipts import LedgerReceipts

logger = logging.getLogger(__name__)

_R = miner_pb2.RefusalReason


class _HandshakeFailed(Exception):
    def __init__(self, refusal: miner_pb2.Refusal | None, log_reason: str) -> None:
        super().__init__(log_reason)
        self.refusal = refusal


class MinerGateway(miner_pb2_grpc.MinerGatewayServicer):
    """Admits miners into the registry and keeps their sessions alive."""

    def __init__(
        self,
        config: GatewayConfig,
        *,
        catalog: Catalog,
        registry: MinerRegistry,
        on_welcome: Callable[[Worker], Awaitable[None]] | None = None,
        receipts: LedgerReceipts | None = None,
        is_banned: Callable[[str], bool] | None = None,
    ) -> None:
        """``receipts`` makes miners witnesses of the ledger: Welcome names the log and its key,
        and their consistency requests and alarms go there. ``is_banned`` (miner id -> bool)
        refuses keys banned by spot checks."""
        self._config = config
        self._catalog = catalog
        self._registry = registry
        self._on_welcome = on_welcome
        self._receipts = receipts
        self._is_banned = is_banned

    async def Connect(
        self,
        request_iterator: AsyncIterator[miner_pb2.MinerMessage],
        context: grpc.aio.ServicerContext[miner_pb2.MinerMessage, miner_pb2.CoordinatorMessage],
    ) -> AsyncIterator[miner_pb2.CoordinatorMessage]:
        peer = context.peer()
        incoming = aiter(request_iterator)
        try:
            hello = await self._expect(incoming, "hello")
            assert isinstance(hello, miner_pb2.Hello)
            problem = check_hello(hello, self._catalog)
            if problem is not None:
                raise _HandshakeFailed(problem, problem.message)
            nonce = secrets.token_bytes(32)
            yield miner_pb2.CoordinatorMessage(challenge=miner_pb2.Challenge(nonce=nonce))
            answer = await self._expect(incoming, "answer")
            assert isinstance(answer, miner_pb2.ChallengeAnswer)
            if not signature_is_valid(hello.public_key, nonce, answer.signature):
                raise _HandshakeFailed(
                    refusal(_R.REFUSAL_REASON_BAD_SIGNATURE, "the challenge signature is invalid"),
                    "bad signature",
                )
            if self._is_banned is not None and self._is_banned(hello.public_key.hex()):
                raise _HandshakeFailed(
                    refusal(
                        _R.REFUSAL_REASON_BANNED_KEY,
                        "this key is banned: spot checks confirmed that it faked its work",
                    ),
                    "banned key",
                )
        except _HandshakeFailed as failure:
            logger.warning("refused miner at %s: %s", peer, failure)
            if failure.refusal is not None:
                yield miner_pb2.CoordinatorMessage(refusal=failure.refusal)
            return

        session = MinerSession(
            hello,
            miner_id=hello.public_key.hex(),
            vocab_sizes={
                model.name: self._catalog.get(model.name).tokenizer.vocab_size
                for model in hello.models
            },
            witness_desk=self._receipts,
        )
        if self._on_welcome is not None:
            await self._on_welcome(session)
        self._registry.add(session)
        logger.info(
            "miner %s joined from %s: models %s, %d slots, %s",
            session.miner_id[:12],
            peer,
            sorted(session.models),
            session.max_concurrency,
            hello.hardware.device_name or hello.hardware.accelerator,
        )
        interval_ms = int(self._config.heartbeat_interval_s * 1000)
        welcome = miner_pb2.Welcome(miner_id=session.miner_id, heartbeat_interval_ms=interval_ms)
        if self._receipts is not None:
            welcome.ledger_origin = self._receipts.origin
            welcome.ledger_verifier_key = self._receipts.verifier_key
        yield miner_pb2.CoordinatorMessage(welcome=welcome)
        reader = asyncio.create_task(self._read(incoming, session))
        keeper = asyncio.create_task(self._keep_alive(session))
        try:
            while (message := await session.outbox.get()) is not None:
                yield message
        finally:
            reader.cancel()
            keeper.cancel()
            session.close(session.closed_reason or "disconnected")
            self._registry.remove(session)
            logger.info("miner %s left: %s", session.miner_id[:12], session.closed_reason)

    async def _expect(
        self, incoming: AsyncIterator[miner_pb2.MinerMessage], kind: str
    ) -> miner_pb2.Hello | miner_pb2.ChallengeAnswer:
        try:
            message = await asyncio.wait_for(anext(incoming), self._config.handshake_timeout_s)
        except TimeoutError:
            raise _HandshakeFailed(
                refusal(_R.REFUSAL_REASON_PROTOCOL_VIOLATION, f"no {kind} in time"), "timeout"
            ) from None
        except (StopAsyncIteration, grpc.RpcError) as error:
            raise _HandshakeFailed(None, f"stream ended during handshake ({error!r})") from None
        if message.WhichOneof("body") != kind:
            raise _HandshakeFailed(
                refusal(_R.REFUSAL_REASON_PROTOCOL_VIOLATION, f"expected {kind} first"),
                f"sent {message.WhichOneof('body')} instead of {kind}",
            )
        return message.hello if kind == "hello" else message.answer

    async def _read(
        self, incoming: AsyncIterator[miner_pb2.MinerMessage], session: MinerSession
    ) -> None:
        reason = "the miner closed the stream"
        try:
            async for message in incoming:
                violation = session.deliver(message)
                if violation is not None:
                    logger.warning(
                        "miner %s violated the protocol: %s", session.miner_id[:12], violation
                    )
                    session.outbox.put_nowait(
                        miner_pb2.CoordinatorMessage(
                            refusal=refusal(_R.REFUSAL_REASON_PROTOCOL_VIOLATION, violation)
                        )
                    )
                    reason = f"protocol violation: {violation}"
                    break
        except grpc.RpcError as error:
            # Oversize messages end up here too (RESOURCE_EXHAUSTED from the size limit).
            reason = f"stream error: {error.code() if hasattr(error, 'code') else error!r}"
        session.close(reason)

    async def _keep_alive(self, session: MinerSession) -> None:
        interval = self._config.heartbeat_interval_s
        limit = interval * self._config.missed_heartbeats
        while session.closed_reason is None:
            await asyncio.sleep(interval)
            silent_for = time.monotonic() - session.last_seen
            if silent_for > limit:
                session.close(f"evicted: silent for {silent_for:.1f} s")
                return
            heartbeat = miner_pb2.Heartbeat(sent_at_unix_ms=int(time.time() * 1000))
            session.outbox.put_nowait(miner_pb2.CoordinatorMessage(heartbeat=heartbeat))
