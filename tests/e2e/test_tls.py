"""TLS end to end: certificates from the real ``tls-init``, a coordinator serving HTTPS and gRPC
over TLS that demands client certificates, a miner holding one, and buyers on the openai SDK.

Certificate rotation runs on a coordinator of its own: a SIGHUP while a stream is in flight.
"""

from __future__ import annotations

import asyncio
import http.client
import signal
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx2
import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from miner.tls import CoordinatorTls
from proto import miner_pb2, miner_pb2_grpc
from tests.e2e.conftest import NO_SPOT_CHECKS, price_args
from tests.e2e.harness import (
    Coordinator,
    create_key,
    running_coordinator,
    start_miner,
    wait_for_miners,
)
from tests.e2e.tls_harness import miner_args, serve_args, tls_init
from tests.miner_daemon.fake_gateway import FakeEngine, running_miner
from tests.miner_daemon.test_tls import logged, said
from tests.tls_certs import make_ca, served_certificate, write_ca

HOSTS = ["127.0.0.1", "localhost"]
MESSAGES = [{"role": "user", "content": "Say something over TLS."}]


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tls") / "certs"
    printed = tls_init(directory, hosts=HOSTS, clients=["alice"])
    assert "created CA" in printed and "server.pem" in printed
    return directory


@pytest.fixture(scope="module")
def secure(
    module_database_url: str,
    model_dirs: dict[str, Path],
    certificates: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Coordinator]:
    """HTTPS for buyers, mutual TLS for miners, and miner alice with her client certificate."""
    tmp = tmp_path_factory.mktemp("secure")
    with running_coordinator(
        tmp,
        database_url=module_database_url,
        models={"tiny": model_dirs["tiny"]},
        extra=[*price_args(), *NO_SPOT_CHECKS, *serve_args(certificates, client_ca=True)],
        ca_file=certificates / "ca.pem",
    ) as coordinator:
        assert coordinator.base_url.startswith("https://127.0.0.1:")
        start_miner(
            coordinator,
            tmp,
            name="alice",
            models={"tiny": model_dirs["tiny"]},
            extra=miner_args(certificates, client="alice"),
        )
        _, probe = create_key(module_database_url, credits_micro=0, name="probe")
        wait_for_miners(coordinator, probe, "tiny", 1)
        yield coordinator


def sdk(coordinator: Coordinator, key: str, ca_file: Path) -> AsyncOpenAI:
    """The official SDK, its httpx2 transport verifying the coordinator against ``ca_file``."""
    verify = ssl.create_default_context(cafile=str(ca_file))
    return AsyncOpenAI(
        base_url=coordinator.base_url,
        api_key=key,
        max_retries=0,
        timeout=60,
        http_client=httpx2.AsyncClient(verify=verify),
    )


def test_the_openai_sdk_gets_completions_over_https_from_a_mutual_tls_miner(
    secure: Coordinator, certificates: Path
) -> None:
    _, key = create_key(secure.database_url, credits_micro=10_000_000)

    async def ask() -> None:
        async with sdk(secure, key, certificates / "ca.pem") as client:
            whole = await client.chat.completions.create(
                model="tiny", messages=MESSAGES, max_tokens=8, temperature=0
            )
            assert whole.usage is not None and whole.usage.completion_tokens > 0
            stream = await client.chat.completions.create(
                model="tiny",
                messages=MESSAGES,
                max_tokens=8,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
            chunks = [chunk async for chunk in stream]
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert text == whole.choices[0].message.content
            assert chunks[-1].usage == whole.usage

    asyncio.run(ask())


def test_a_client_that_does_not_trust_the_ca_is_refused(
    secure: Coordinator, tmp_path: Path
) -> None:
    stranger = write_ca(make_ca("not the coordinator's CA"), tmp_path)

    async def ask() -> None:
        async with sdk(secure, "mm-unused", stranger) as client:
            await client.models.list()

    with pytest.raises(openai.APIConnectionError):
        asyncio.run(ask())


def test_plain_http_to_the_https_port_gets_no_answer(secure: Coordinator) -> None:
    plain = secure.base_url.replace("https://", "http://") + "/models"
    with pytest.raises((urllib.error.URLError, http.client.HTTPException, ConnectionError)):
        urllib.request.urlopen(plain, timeout=10)


def test_a_plaintext_grpc_client_gets_no_stream(secure: Coordinator) -> None:
    with grpc.insecure_channel(secure.grpc_address) as channel:
        call = miner_pb2_grpc.MinerGatewayStub(channel).Connect(
            iter([miner_pb2.MinerMessage(hello=miner_pb2.Hello())]), timeout=10
        )
        with pytest.raises(grpc.RpcError) as failed:
            next(iter(call))
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    ("client", "ca", "hint"),
    [
        (False, "ours", "may require a client certificate (--tls-cert/--tls-key)"),
        (True, "stranger", "not signed by the CA in --coordinator-ca"),
    ],
)
def test_a_miner_without_a_client_certificate_or_with_the_wrong_ca_is_refused(
    client: bool,
    ca: str,
    hint: str,
    secure: Coordinator,
    certificates: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    ca_file = certificates / "ca.pem"
    if ca == "stranger":
        ca_file = write_ca(make_ca("a stranger"), tmp_path)
    cert, key = (certificates / "client-alice.pem", certificates / "client-alice.key")
    tls = CoordinatorTls(
        ca_file=ca_file, cert_file=cert if client else None, key_file=key if client else None
    )
    port = int(secure.grpc_address.rpartition(":")[2])

    async def try_to_join() -> None:
        async with running_miner(port, [FakeEngine("tiny")], tls=tls):
            await logged(caplog, lambda: any(hint in line for line in said(caplog)))

    asyncio.run(try_to_join())
    lines = said(caplog)
    assert not any("connected to" in line or "refused" in line for line in lines), lines


def test_sighup_rotates_the_certificates_while_a_stream_is_in_flight(
    database_url: str, model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    certificates = tmp_path / "certs"
    tls_init(certificates, hosts=HOSTS)
    ca_file = certificates / "ca.pem"
    with running_coordinator(
        tmp_path,
        database_url=database_url,
        models={"tiny": model_dirs["tiny"]},
        extra=[*price_args(), *NO_SPOT_CHECKS, *serve_args(certificates)],
        ca_file=ca_file,
    ) as coordinator:
        # A slow miner: its job is still generating when the certificates change.
        miner = start_miner(
            coordinator,
            tmp_path,
            name="slow",
            variant="slow:0.05",
            models={"tiny": model_dirs["tiny"]},
            extra=miner_args(certificates),
        )
        _, key = create_key(database_url, credits_micro=10_000_000)
        wait_for_miners(coordinator, key, "tiny", 1)
        http_address = coordinator.base_url.removeprefix("https://").removesuffix("/v1")
        before = served_certificate(http_address, ca_file).serial_number
        verify = ssl.create_default_context(cafile=str(ca_file))
        with OpenAI(
            base_url=coordinator.base_url,
            api_key=key,
            max_retries=0,
            timeout=60,
            http_client=httpx2.Client(verify=verify),
        ) as client:
            stream = iter(
                client.completions.create(
                    model="tiny", prompt="rotate", max_tokens=40, temperature=0, stream=True
                )
            )
            chunks = [next(stream)]

            tls_init(certificates, hosts=HOSTS)  # renewed in place, same CA
            coordinator.process.popen.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            while "TLS reloaded: gRPC" not in coordinator.process.output():
                assert time.monotonic() < deadline, coordinator.process.output()[-2000:]
                time.sleep(0.05)

            chunks += list(stream)
            finished = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices]
            assert finished[-1] == "length", "the stream ran to its end"

            for address, alpn in ((http_address, None), (coordinator.grpc_address, "h2")):
                after = served_certificate(address, ca_file, alpn=alpn).serial_number
                assert after != before, f"{address} still serves the old certificate"
            # A new connection, with the new certificate, is served as before.
            again = client.completions.create(model="tiny", prompt="after", max_tokens=2)
            assert again.usage is not None and again.usage.completion_tokens == 2
        assert miner.output().count("connected to") == 1, "the miner's stream was never dropped"
        assert coordinator.process.popen.poll() is None
