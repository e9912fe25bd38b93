"""The miner's side of the handshake: Hello, signed challenge, Welcome or Refusal."""

from __future__ import annotations

import asyncio

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from miner.errors import MinerRefusedError
from proto import miner_pb2
from proto.limits import PROTOCOL_VERSION
from proto.signing import challenge_message

from .fake_gateway import TEST_HARDWARE, WAIT_S, FakeEngine, FakeGateway, running_miner, serve


async def test_hello_announces_the_miner_and_the_challenge_signature_verifies() -> None:
    gateway = FakeGateway()
    engines = [FakeEngine("model-a"), FakeEngine("model-b")]
    async with serve(gateway) as port, running_miner(port, engines, max_concurrency=3) as miner:
        session = await gateway.next_session()
        hello, answer = session.hello, session.answer
        assert hello is not None and answer is not None
        assert session.welcomed
        assert hello.protocol_version == PROTOCOL_VERSION
        assert hello.public_key == miner.identity.public_key
        assert len(hello.public_key) == 32
        assert hello.software_version
        assert hello.hardware == TEST_HARDWARE
        assert hello.max_concurrency == 3
        announced = {
            model.name: (model.weights_sha256, model.dtype, model.engine) for model in hello.models
        }
        assert announced == {
            engine.info.name: (engine.info.weights_sha256, engine.info.dtype, engine.info.engine)
            for engine in engines
        }
        # Independently of the fake's own check: the signature is over the protocol's layout.
        Ed25519PublicKey.from_public_bytes(hello.public_key).verify(
            answer.signature, challenge_message(session.nonce, hello.public_key)
        )


PERMANENT = [
    miner_pb2.REFUSAL_REASON_UNSUPPORTED_PROTOCOL,
    miner_pb2.REFUSAL_REASON_BAD_SIGNATURE,
    miner_pb2.REFUSAL_REASON_UNKNOWN_MODEL,
    miner_pb2.REFUSAL_REASON_WEIGHTS_MISMATCH,
    miner_pb2.REFUSAL_REASON_BANNED_KEY,
]


@pytest.mark.parametrize("reason", PERMANENT, ids=miner_pb2.RefusalReason.Name)
async def test_a_permanent_refusal_ends_run_with_the_reason(
    reason: miner_pb2.RefusalReason.ValueType, caplog: pytest.LogCaptureFixture
) -> None:
    refusal = miner_pb2.Refusal(reason=reason, message="weights hash abc is not in the catalog")
    gateway = FakeGateway(refusals=[refusal])
    async with serve(gateway) as port, running_miner(port, [FakeEngine()]) as miner:
        with pytest.raises(MinerRefusedError) as raised:
            await asyncio.wait_for(miner.task, WAIT_S)
    assert raised.value.reason == reason
    assert raised.value.detail == refusal.message
    assert len(gateway.sessions) == 1, "a permanent refusal must not be retried"
    errors = [record for record in caplog.records if record.levelname == "ERROR"]
    assert any(refusal.message in record.getMessage() for record in errors)


@pytest.mark.parametrize(
    "reason",
    [
        miner_pb2.REFUSAL_REASON_ALREADY_CONNECTED,
        miner_pb2.REFUSAL_REASON_PROTOCOL_VIOLATION,
        miner_pb2.REFUSAL_REASON_UNSPECIFIED,
    ],
    ids=miner_pb2.RefusalReason.Name,
)
async def test_a_transient_refusal_is_retried_until_welcomed(
    reason: miner_pb2.RefusalReason.ValueType,
) -> None:
    refusals = [miner_pb2.Refusal(reason=reason, message="try again")] * 2
    gateway = FakeGateway(refusals=refusals)
    async with serve(gateway) as port, running_miner(port, [FakeEngine()]) as miner:
        first, second, third = [await gateway.next_session() for _ in range(3)]
        assert first.refusal is not None and second.refusal is not None
        assert third.welcomed
        assert not miner.task.done()
        # Every attempt proves the same identity afresh.
        assert {session.hello.public_key for session in (first, second, third)} == {  # type: ignore[union-attr]
            miner.identity.public_key
        }
        assert len({session.nonce for session in (first, second, third)}) == 3


async def test_shutdown_while_the_coordinator_is_unreachable_returns_promptly() -> None:
    gateway = FakeGateway()
    async with serve(gateway) as port:
        pass  # the port is now closed: nothing listens there
    async with running_miner(port, [FakeEngine()], backoff_min_s=5, backoff_max_s=5) as miner:
        await asyncio.sleep(0.2)
        assert not miner.task.done()
        miner.daemon.shutdown()
        await asyncio.wait_for(miner.task, 2)
