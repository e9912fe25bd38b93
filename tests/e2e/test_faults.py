"""Miners that die, stall, lie or send garbage: the buyer is served or billed fairly, and the
coordinator keeps serving."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import openai
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from openai import OpenAI

from proto import miner_pb2, miner_pb2_grpc
from proto.limits import PROTOCOL_VERSION
from proto.signing import challenge_message
from proto.weights_digest import weights_sha256
from tests.e2e.conftest import FEE_BPS, INPUT_PRICE, OUTPUT_PRICE
from tests.e2e.harness import (
    Coordinator,
    balances,
    create_key,
    fetch,
    start_miner,
    wait_for_miners,
)

MESSAGES = [{"role": "user", "content": "Tell me a long story."}]


def sdk(coordinator: Coordinator, key: str) -> OpenAI:
    return OpenAI(base_url=coordinator.base_url, api_key=key, max_retries=0, timeout=60)


def test_miner_killed_mid_stream_bills_only_delivered_tokens(
    coordinator: Coordinator, model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    miner = start_miner(
        coordinator, tmp_path, name="slow", models={"tiny": model_dirs["tiny"]}, variant="slow:0.2"
    )
    key_id, key = create_key(coordinator.database_url, credits_micro=1_000_000)
    wait_for_miners(coordinator, key, "tiny", 1)
    before = balances(coordinator.database_url)
    stream = sdk(coordinator, key).chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_tokens=200,
        temperature=0,
        stream=True,
    )
    received = 0
    with pytest.raises(openai.APIError):
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content is not None:
                received += 1
                if received == 4:
                    miner.kill()
    after = balances(coordinator.database_url)
    jobs = fetch(
        coordinator.database_url, "SELECT * FROM coordinator_jobs WHERE key_id = $1", key_id
    )
    assert len(jobs) == 1
    delivered = jobs[0]["completion_tokens"]
    assert 4 <= delivered < 200
    assert jobs[0]["finish_reason"] is None
    cost = jobs[0]["prompt_tokens"] * INPUT_PRICE + delivered * OUTPUT_PRICE
    assert before[f"buyer:{key_id}"] - after[f"buyer:{key_id}"] == cost
    assert after["fee"] - before["fee"] == cost * FEE_BPS // 10_000
    assert after["escrow"] == before["escrow"]
    holds = fetch(coordinator.database_url, "SELECT status FROM ledger_holds")
    assert {h["status"] for h in holds} <= {"settled", "released"}


def test_miner_dying_before_its_first_token_is_replaced(
    coordinator: Coordinator, model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    doomed = start_miner(
        coordinator,
        tmp_path,
        name="doomed",
        models={"tiny": model_dirs["tiny"]},
        variant="die-on-job",
        max_concurrency=1,
    )
    start_miner(coordinator, tmp_path, name="honest", models={"tiny": model_dirs["tiny"]})
    _, key = create_key(coordinator.database_url, credits_micro=5_000_000)
    wait_for_miners(coordinator, key, "tiny", 2)
    client = sdk(coordinator, key)
    for _ in range(12):  # routing is random among equals: keep asking until the doomed one is hit
        reply = client.chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=8, temperature=0
        )
        assert reply.usage is not None and reply.usage.completion_tokens >= 1
        if doomed.popen.poll() is not None:
            break
    assert doomed.popen.poll() == 17, "the doomed miner never received a job"
    assert "failed before output" in coordinator.process.output()


def test_miner_sending_garbage_is_disconnected_and_service_continues(
    coordinator: Coordinator, model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    start_miner(
        coordinator,
        tmp_path,
        name="garbage",
        models={"tiny": model_dirs["tiny"]},
        variant="garbage",
        max_concurrency=1,
    )
    start_miner(coordinator, tmp_path, name="honest", models={"tiny": model_dirs["tiny"]})
    _, key = create_key(coordinator.database_url, credits_micro=5_000_000)
    wait_for_miners(coordinator, key, "tiny", 2)
    client = sdk(coordinator, key)
    deadline = time.monotonic() + 60
    while "outside the vocabulary" not in coordinator.process.output():
        assert time.monotonic() < deadline, "the garbage miner never got a job"
        reply = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4)
        assert reply.choices[0].message.content is not None
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4)
    assert reply.usage is not None and reply.usage.completion_tokens >= 1


def test_miner_with_wrong_weights_is_refused_with_a_reason(
    coordinator: Coordinator, model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    # 'tiny-b' has other weights: announcing it under the name 'tiny' must be refused.
    miner = start_miner(
        coordinator, tmp_path, name="impostor", models={"tiny": model_dirs["tiny-b"]}
    )
    assert miner.popen.wait(timeout=60) == 3
    assert "do not match the catalog" in miner.output()


# --- a raw gRPC peer that speaks the protocol badly -------------------------------------------


def _handshake(stub: miner_pb2_grpc.MinerGatewayStub, model_dir: Path) -> tuple[object, object]:
    key = Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    outbox: list[miner_pb2.MinerMessage] = []
    import queue

    pending: queue.Queue[miner_pb2.MinerMessage | None] = queue.Queue()

    def requests() -> Iterator[miner_pb2.MinerMessage]:
        while (message := pending.get()) is not None:
            outbox.append(message)
            yield message

    pending.put(
        miner_pb2.MinerMessage(
            hello=miner_pb2.Hello(
                protocol_version=PROTOCOL_VERSION,
                public_key=public,
                software_version="test",
                models=[
                    miner_pb2.ServedModel(name="tiny", weights_sha256=weights_sha256(model_dir))
                ],
                max_concurrency=1,
            )
        )
    )
    responses = stub.Connect(requests())
    challenge = next(responses)
    pending.put(
        miner_pb2.MinerMessage(
            answer=miner_pb2.ChallengeAnswer(
                signature=key.sign(challenge_message(challenge.challenge.nonce, public))
            )
        )
    )
    welcome = next(responses)
    assert welcome.WhichOneof("body") == "welcome"
    return pending, responses


def test_tokens_for_an_unknown_job_end_the_session(
    coordinator: Coordinator, model_dirs: dict[str, Path]
) -> None:
    with grpc.insecure_channel(coordinator.grpc_address) as channel:
        pending, responses = _handshake(
            miner_pb2_grpc.MinerGatewayStub(channel), model_dirs["tiny"]
        )
        pending.put(
            miner_pb2.MinerMessage(
                chunk=miner_pb2.TokenChunk(
                    job_id="job-that-never-was", token_ids=[1], logprobs=[-0.5]
                )
            )
        )
        bodies = [message for message in responses]
        pending.put(None)
    refusals = [m.refusal for m in bodies if m.WhichOneof("body") == "refusal"]
    assert refusals and refusals[0].reason == miner_pb2.REFUSAL_REASON_PROTOCOL_VIOLATION
    assert "unknown job" in refusals[0].message


def test_oversize_messages_end_the_session_and_service_continues(
    coordinator: Coordinator, model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    with grpc.insecure_channel(
        coordinator.grpc_address, options=[("grpc.max_send_message_length", 64 << 20)]
    ) as channel:
        pending, responses = _handshake(
            miner_pb2_grpc.MinerGatewayStub(channel), model_dirs["tiny"]
        )
        huge = miner_pb2.MinerMessage(
            failure=miner_pb2.JobFailure(job_id="x", message="y" * (1 << 20))
        )
        pending.put(huge)
        with pytest.raises(grpc.RpcError):
            for _ in responses:
                pass
        pending.put(None)
    start_miner(coordinator, tmp_path, name="honest", models={"tiny": model_dirs["tiny"]})
    _, key = create_key(coordinator.database_url, credits_micro=1_000_000)
    wait_for_miners(coordinator, key, "tiny", 1)
    reply = sdk(coordinator, key).chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=4
    )
    assert reply.usage is not None and reply.usage.completion_tokens >= 1
