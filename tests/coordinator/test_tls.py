"""The coordinator's TLS: secure defaults, certificate files, tls-init, rotation without drops."""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from coordinator.cli import main
from coordinator.tls import CertificateFiles, ServerTls, TlsConfig
from coordinator.tls_init import client_files, init_tls
from proto import miner_pb2, miner_pb2_grpc
from proto.tls import CertificateFileError, read_key_pair
from tests.tls_certs import Issued, issue, make_ca, served_certificate, write_ca

LOCAL = {"http_host": "127.0.0.1", "grpc_host": "127.0.0.1"}


@pytest.fixture(scope="module")
def ca() -> Issued:
    return make_ca("coordinator tests CA")


def pair(ca: Issued, directory: Path, name: str = "server", **options: Any) -> CertificateFiles:
    cert, key = issue(ca, name, hosts=["127.0.0.1"], **options).write(directory, name)
    return CertificateFiles(cert=cert, key=key)


@pytest.mark.parametrize(
    ("http_host", "grpc_host", "flag"),
    [("0.0.0.0", "127.0.0.1", "--http 0.0.0.0"), ("localhost", "", "--grpc 0.0.0.0")],
)
def test_plaintext_off_loopback_is_refused_unless_allowed(
    http_host: str, grpc_host: str, flag: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(f"{flag} is not a loopback")) as refused:
        TlsConfig().check_listeners(http_host=http_host, grpc_host=grpc_host)
    assert "--allow-plaintext" in str(refused.value) and "--tls-cert" in str(refused.value)
    TlsConfig(allow_plaintext=True).check_listeners(http_host=http_host, grpc_host=grpc_host)
    TlsConfig().check_listeners(**LOCAL)


def test_one_pair_secures_both_listeners_unless_grpc_has_its_own(tmp_path: Path) -> None:
    shared = CertificateFiles(tmp_path / "a.pem", tmp_path / "a.key")
    own = CertificateFiles(tmp_path / "b.pem", tmp_path / "b.key")
    TlsConfig(http=shared).check_listeners(http_host="0.0.0.0", grpc_host="0.0.0.0")
    assert TlsConfig(http=shared).grpc_files == shared
    assert TlsConfig(http=shared, grpc=own).grpc_files == own
    with pytest.raises(ValueError, match=re.escape("--http 0.0.0.0")):
        TlsConfig(grpc=own).check_listeners(http_host="0.0.0.0", grpc_host="0.0.0.0")
    with pytest.raises(ValueError, match="--client-ca needs TLS on the gRPC gateway"):
        TlsConfig(client_ca=tmp_path / "ca.pem")


def test_bad_certificate_files_are_named_with_the_reason(ca: Issued, tmp_path: Path) -> None:
    good = pair(ca, tmp_path)
    expired = pair(ca, tmp_path, "expired", valid_from=datetime.now(UTC) - timedelta(days=30))
    future = pair(ca, tmp_path, "future", valid_from=datetime.now(UTC) + timedelta(days=1))
    other = pair(ca, tmp_path, "other")
    cases = [
        (CertificateFiles(tmp_path / "missing.pem", good.key), "missing.pem: cannot read it"),
        (CertificateFiles(good.key, good.key), "server.key: no PEM certificate in it"),
        (CertificateFiles(good.cert, good.cert), "server.pem: no usable PEM private key"),
        (CertificateFiles(good.cert, other.key), "other.key: this private key does not belong"),
        (expired, "expired.pem: certificate CN=expired expired on"),
        (future, "future.pem: certificate CN=future is not valid before"),
    ]
    for files, message in cases:
        with pytest.raises(CertificateFileError, match=message):
            ServerTls.load(TlsConfig(http=files))


def test_serve_refuses_plaintext_off_loopback_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["serve", "--data-dir", str(tmp_path), "--model", f"m={tmp_path}"]
    assert main([*argv, "--grpc", "0.0.0.0:0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("meshmint-coordinator: --grpc 0.0.0.0 is not a loopback address")
    assert len(err.strip().splitlines()) == 1
    assert main([*argv, "--tls-cert", "x.pem"]) == 2
    assert "--tls-cert and --tls-key must be given together" in capsys.readouterr().err


def test_serve_with_an_expired_certificate_fails_before_anything_starts(
    ca: Issued, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    expired = pair(ca, tmp_path, "expired", valid_from=datetime.now(UTC) - timedelta(days=30))
    data_dir = tmp_path / "data"
    argv = ["serve", "--data-dir", str(data_dir), "--model", f"m={tmp_path}"]
    argv += ["--tls-cert", str(expired.cert), "--tls-key", str(expired.key)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{expired.cert}: certificate CN=expired expired on" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not data_dir.exists(), "no database was started"


def test_the_cli_imports_grpc_only_after_quieting_its_per_handshake_log() -> None:
    # grpc reads GRPC_VERBOSITY once, at import: main() must run before anything imports it.
    code = "import sys, coordinator.cli; assert 'grpc' not in sys.modules, 'imported too early'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_tls_init_writes_a_ca_a_server_and_client_certificates(tmp_path: Path) -> None:
    directory = tmp_path / "tls"
    files = init_tls(directory, hosts=["mm.example.org", "127.0.0.1"], clients=["rig-1"])
    assert files.ca_created
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    for key in (directory / "ca.key", files.server_key, files.clients[0][1]):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    server = read_key_pair(files.server_cert, files.server_key).leaf
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["mm.example.org"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    client = read_key_pair(*client_files(directory, "rig-1")).leaf
    client.verify_directly_issued_by(ca)
    usage = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]

    again = init_tls(directory, hosts=["mm.example.org"])
    assert not again.ca_created, "a second run reuses the CA: miners keep trusting it"
    renewed = read_key_pair(again.server_cert, again.server_key).leaf
    renewed.verify_directly_issued_by(ca)
    assert renewed.serial_number != server.serial_number


def test_tls_init_refuses_a_half_present_ca(tmp_path: Path) -> None:
    init_tls(tmp_path, hosts=["localhost"])
    (tmp_path / "ca.key").unlink()
    with pytest.raises(CertificateFileError, match=re.escape("ca.key: cannot read it")):
        init_tls(tmp_path, hosts=["localhost"])


def handshake(server: ssl.SSLContext, ca_file: Path) -> x509.Certificate:
    """The certificate ``server`` shows a client trusting ``ca_file``, in memory."""
    client = ssl.create_default_context(cafile=str(ca_file))
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    client_end = client.wrap_bio(to_client, to_server, server_hostname="127.0.0.1")
    server_end = server.wrap_bio(to_server, to_client, server_side=True)
    for _ in range(10):
        for end in (client_end, server_end):
            with contextlib.suppress(ssl.SSLWantReadError):
                end.do_handshake()
    der = client_end.getpeercert(binary_form=True)
    assert der is not None, "the handshake did not complete"
    return x509.load_der_x509_certificate(der)


def test_a_reload_of_bad_files_keeps_the_old_certificates(ca: Issued, tmp_path: Path) -> None:
    files = pair(ca, tmp_path)
    ca_file = write_ca(ca, tmp_path)
    tls = ServerTls.load(TlsConfig(http=files))
    assert tls.http_context is not None
    serving = handshake(tls.http_context, ca_file).serial_number
    # What a reload halfway through replacing the pair would see: a key of another certificate.
    pair(ca, tmp_path, "other").key.replace(files.key)
    assert not tls.reload()
    assert handshake(tls.http_context, ca_file).serial_number == serving


class _Echo(miner_pb2_grpc.MinerGatewayServicer):
    """Answers every message with a heartbeat: a stream that stays open as long as the client's."""

    async def Connect(self, request_iterator: Any, context: Any) -> AsyncIterator[Any]:
        async for _ in request_iterator:
            yield miner_pb2.CoordinatorMessage(heartbeat=miner_pb2.Heartbeat(active_jobs=1))


async def test_reload_rotates_new_handshakes_and_keeps_open_streams(
    ca: Issued, tmp_path: Path
) -> None:
    files = pair(ca, tmp_path, "first")
    ca_file = write_ca(ca, tmp_path)
    tls = ServerTls.load(TlsConfig(http=files))
    release = asyncio.Event()

    async def slow_stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"before\n")
        await release.wait()
        await response.write(b"after\n")
        return response

    app = web.Application()
    app.router.add_get("/stream", slow_stream)
    runner = web.AppRunner(app)
    await runner.setup()
    grpc_server = grpc.aio.server()
    miner_pb2_grpc.add_MinerGatewayServicer_to_server(_Echo(), grpc_server)
    assert tls.grpc_credentials is not None
    grpc_port = grpc_server.add_secure_port("127.0.0.1:0", tls.grpc_credentials)
    outbox: asyncio.Queue[miner_pb2.MinerMessage] = asyncio.Queue()

    async def requests() -> AsyncIterator[miner_pb2.MinerMessage]:
        while True:
            yield await outbox.get()

    try:
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls.http_context).start()
        await grpc_server.start()
        http_address = f"127.0.0.1:{runner.addresses[0][1]}"
        grpc_address = f"127.0.0.1:{grpc_port}"
        client_context = ssl.create_default_context(cafile=str(ca_file))
        credentials = grpc.ssl_channel_credentials(ca_file.read_bytes())
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"https://{http_address}/stream", ssl=client_context) as streaming,
            grpc.aio.secure_channel(grpc_address, credentials) as channel,
        ):
            assert await streaming.content.readline() == b"before\n"
            call = miner_pb2_grpc.MinerGatewayStub(channel).Connect(requests())
            outbox.put_nowait(miner_pb2.MinerMessage(heartbeat=miner_pb2.Heartbeat()))
            assert (await call.read()).WhichOneof("body") == "heartbeat"

            second = issue(ca, "second", hosts=["127.0.0.1"])
            second.write(tmp_path, "first")  # the operator renews the files in place
            assert tls.reload()

            for address, alpn in ((http_address, None), (grpc_address, "h2")):
                served = await asyncio.to_thread(served_certificate, address, ca_file, alpn=alpn)
                assert served.serial_number == second.cert.serial_number, address
            # The stream and the gRPC call opened before the reload carry on.
            release.set()
            assert await streaming.content.read() == b"after\n"
            outbox.put_nowait(miner_pb2.MinerMessage(heartbeat=miner_pb2.Heartbeat()))
            assert (await call.read()).WhichOneof("body") == "heartbeat"
            call.cancel()
    finally:
        await grpc_server.stop(grace=None)
        await runner.cleanup()
