"""The daemon and the CLI with the real TorchEngine on the tiny test model (CPU, a few seconds)."""

from __future__ import annotations

import asyncio
import importlib.util
import signal
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from miner.cli import main
from miner.engine.base import Engine
from miner.identity import load_or_create_identity
from proto import miner_pb2
from proto.signing import output_digest, receipt_message, request_digest
from proto.weights_digest import weights_sha256

from .fake_gateway import FakeGateway, make_job, running_miner, serve

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("miner.engine.torch_engine") is None
    or importlib.util.find_spec("torch") is None,
    reason="miner/engine/torch_engine.py (or torch) is not available",
)

SLOW_S = 60.0  # model loads and subprocess start-ups on a loaded 2-core machine
PROMPT = (256 + 2, 72, 105, 10)  # <|im_start|> "Hi\n": ids of the byte-level test tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from miner.test_model import create_test_model

    return create_test_model(tmp_path_factory.mktemp("tiny"), seed=3)


@asynccontextmanager
async def tiny_engine(model_dir: Path) -> AsyncIterator[Engine]:
    from miner.engine.torch_engine import TorchEngine

    async with TorchEngine.load("tiny", model_dir, device="cpu", max_concurrency=2) as engine:
        yield engine


def test_create_test_model_prints_the_directory_and_its_weights_hash(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "again"
    assert main(["create-test-model", str(target), "--seed", "3"]) == 0
    printed_dir, printed_hash = capsys.readouterr().out.split()
    assert Path(printed_dir) == target
    assert printed_hash == weights_sha256(target).hex()
    assert printed_hash == weights_sha256(model_dir).hex(), "same seed, same weights"


async def test_a_real_model_serves_streams_and_cancels(model_dir: Path) -> None:
    gateway = FakeGateway()
    async with (
        tiny_engine(model_dir) as engine,
        serve(gateway) as port,
        running_miner(port, [engine], max_concurrency=2) as miner,
    ):
        session = await gateway.next_session(within_s=SLOW_S)
        assert session.hello is not None
        [served] = session.hello.models
        assert served.weights_sha256 == weights_sha256(model_dir)
        assert served.engine.startswith("torch-transformers/")

        job = make_job("real", model="tiny", prompt=PROMPT, max_tokens=12)
        session.send_job(job)
        outcome = await session.job_outcome("real", within_s=SLOW_S)
        assert outcome.result is not None, outcome.failure
        tokens = outcome.token_ids
        assert 1 <= len(tokens) <= 12
        assert all(0 <= token < engine.info.vocab_size for token in tokens)
        assert all(chunk.logprobs[0] <= 0 for chunk in outcome.chunks)
        receipt = outcome.result.receipt
        assert receipt.request_sha256 == request_digest(job)
        assert receipt.output_sha256 == output_digest(tokens)
        assert receipt.weights_sha256 == served.weights_sha256
        Ed25519PublicKey.from_public_bytes(miner.identity.public_key).verify(
            outcome.result.signature, receipt_message(receipt)
        )
        # Same job, same seed: the sampler makes the output reproducible.
        session.send_job(job)
        again = await session.job_outcome("real", within_s=SLOW_S)
        assert again.token_ids == tokens

        session.send_job(make_job("endless", model="tiny", prompt=PROMPT, max_tokens=400))
        await session.next("chunk", within_s=SLOW_S)
        session.send_cancel("endless")
        cancelled = await session.job_outcome("endless", within_s=SLOW_S)
        assert cancelled.result is not None
        assert cancelled.result.finish_reason == miner_pb2.FINISH_REASON_CANCELLED
        assert 1 <= cancelled.result.receipt.completion_tokens < 400


async def test_a_real_model_scores_a_finished_job_over_the_wire(model_dir: Path) -> None:
    gateway = FakeGateway()
    async with (
        tiny_engine(model_dir) as engine,
        serve(gateway) as port,
        running_miner(port, [engine]),
    ):
        session = await gateway.next_session(within_s=SLOW_S)
        job = make_job("checked", model="tiny", prompt=PROMPT, max_tokens=12)
        session.send_job(job)
        outcome = await session.job_outcome("checked", within_s=SLOW_S)
        tokens = outcome.token_ids
        forged = [*tokens[:-1], (tokens[-1] + 1) % engine.info.vocab_size]
        results = []
        for score_id, completion in (("honest", tokens), ("forged", forged)):
            session.send_score(
                miner_pb2.ScoreJob(
                    score_id=score_id,
                    model="tiny",
                    prompt_token_ids=job.prompt_token_ids,
                    completion_token_ids=completion,
                    sampling=job.sampling,
                    noise_job_id=job.job_id,
                )
            )
            results.append(await session.score_result(score_id, within_s=SLOW_S))
        honest, forged_result = results
    assert honest.error == "" and list(honest.margins) == [0.0] * len(tokens)
    claimed = [logprob for chunk in outcome.chunks for logprob in chunk.logprobs]
    assert honest.logprobs == pytest.approx(claimed, abs=1e-4)
    assert list(forged_result.margins[:-1]) == [0.0] * (len(tokens) - 1)
    assert forged_result.margins[-1] > 0


def miner_command() -> list[str]:
    script = Path(sys.executable).parent / "meshmint-miner"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from miner.cli import main; sys.exit(main())"]


async def test_the_cli_serves_and_drains_on_sigterm(model_dir: Path, tmp_path: Path) -> None:
    gateway = FakeGateway()
    key = tmp_path / "identity.key"
    async with serve(gateway) as port:
        process = await asyncio.create_subprocess_exec(
            *miner_command(),
            "run",
            "--coordinator",
            f"127.0.0.1:{port}",
            "--model",
            f"tiny={model_dir}",
            "--key",
            str(key),
            "--device",
            "cpu",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            session = await gateway.next_session(within_s=SLOW_S)
            assert session.hello is not None
            assert session.hello.public_key == load_or_create_identity(key).public_key
            session.send_job(make_job("busy", model="tiny", prompt=PROMPT, max_tokens=150))
            await session.next("chunk", within_s=SLOW_S)
            process.send_signal(signal.SIGTERM)
            await session.next("drain", within_s=SLOW_S)
            outcome = await session.job_outcome("busy", within_s=SLOW_S)
            _, stderr = await asyncio.wait_for(process.communicate(), SLOW_S)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    log = stderr.decode()
    assert process.returncode == 0, log
    assert outcome.result is not None, "the job in flight finished during the drain"
    kinds = [message.WhichOneof("body") for message in session.received]
    assert kinds.index("drain") < kinds.index("result")
    assert outcome.result.finish_reason in (
        miner_pb2.FINISH_REASON_LENGTH,
        miner_pb2.FINISH_REASON_STOP,
    )
    assert load_or_create_identity(key).miner_id in log
    assert "Traceback" not in log


@contextmanager
def gateway_in_thread(gateway: FakeGateway) -> Iterator[int]:
    """Serves ``gateway`` from its own event loop, for tests that call the blocking main()."""
    loop = asyncio.new_event_loop()
    ready: asyncio.Future[int] = loop.create_future()
    stop = asyncio.Event()

    async def serve_until_stopped() -> None:
        async with serve(gateway) as port:
            ready.set_result(port)
            await stop.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve_until_stopped(),))
    thread.start()
    try:
        yield asyncio.run_coroutine_threadsafe(_wait(ready), loop).result(SLOW_S)
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(SLOW_S)
        loop.close()


async def _wait(future: asyncio.Future[int]) -> int:
    return await future


def test_a_permanent_refusal_exits_3_with_the_reason(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    refusal = miner_pb2.Refusal(
        reason=miner_pb2.REFUSAL_REASON_WEIGHTS_MISMATCH, message="tiny expects weights 00ff"
    )
    with gateway_in_thread(FakeGateway(refusals=[refusal])) as port:
        code = main(
            [
                "run",
                "--coordinator",
                f"127.0.0.1:{port}",
                "--model",
                f"tiny={model_dir}",
                "--key",
                str(tmp_path / "identity.key"),
                "--device",
                "cpu",
            ]
        )
    assert code == 3
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "meshmint-miner: error: refused by the coordinator (WEIGHTS_MISMATCH): "
        "tiny expects weights 00ff"
    )


def test_a_directory_without_weights_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    argv = ["run", "--coordinator", "127.0.0.1:1", "--model", f"tiny={empty}"]
    assert main([*argv, "--key", str(tmp_path / "k"), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("meshmint-miner: error: cannot load a model: ")
    assert str(empty) in err.strip().splitlines()[-1]
