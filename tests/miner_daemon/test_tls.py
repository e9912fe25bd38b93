"""The miner's TLS: when it encrypts, what it trusts, and how a failed handshake is reported."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

from miner.cli import main
from miner.tls import TLS_FAILURE_LOG_INTERVAL_S, CoordinatorTls, FailureLog
from tests.tls_certs import Issued, issue, make_ca, write_ca

from .fake_gateway import FakeEngine, FakeGateway, running_miner, serve


@pytest.fixture(scope="module")
def ca() -> Issued:
    return make_ca("miner tests CA")


@pytest.fixture
def files(ca: Issued, tmp_path: Path) -> dict[str, Path]:
    """The CA, a server certificate for 127.0.0.1, a client certificate, and a stranger CA."""
    server_cert, server_key = issue(ca, "127.0.0.1", hosts=["127.0.0.1"]).write(tmp_path, "s")
    client_cert, client_key = issue(ca, "miner", client=True).write(tmp_path, "c")
    return {
        "ca": write_ca(ca, tmp_path),
        "other_ca": write_ca(make_ca("someone else"), tmp_path, "other"),
        "server_cert": server_cert,
        "server_key": server_key,
        "client_cert": client_cert,
        "client_key": client_key,
    }


def server_credentials(files: dict[str, Path], *, mutual: bool = False) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials(
        [(files["server_key"].read_bytes(), files["server_cert"].read_bytes())],
        root_certificates=files["ca"].read_bytes() if mutual else None,
        require_client_auth=mutual,
    )


@pytest.mark.parametrize(
    ("tls", "host", "encrypted"),
    [
        (CoordinatorTls(), "127.0.0.1", False),  # the demo and the test harness: no flags
        (CoordinatorTls(), "localhost", False),
        (CoordinatorTls(), "::1", False),
        (CoordinatorTls(), "coordinator.example.org", True),  # the system's trust store
        (CoordinatorTls(), "10.0.0.7", True),
        (CoordinatorTls(), "0.0.0.0", True),
        (CoordinatorTls(insecure=True), "coordinator.example.org", False),
        (CoordinatorTls(ca_file=Path("ca.pem")), "127.0.0.1", True),
        (CoordinatorTls(cert_file=Path("c.pem"), key_file=Path("c.key")), "localhost", True),
    ],
)
def test_tls_is_on_off_loopback_and_whenever_a_tls_option_is_given(
    tls: CoordinatorTls, host: str, encrypted: bool
) -> None:
    assert tls.uses_tls(host) is encrypted


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--insecure", "--coordinator-ca", "ca.pem"], "--insecure turns TLS off"),
        (["--tls-cert", "c.pem"], "--tls-cert and --tls-key must be given together"),
        (["--coordinator-ca", "missing.pem"], "missing.pem: cannot read it"),
        (["--coordinator-ca", "{server_key}"], "no PEM certificate"),
        (["--coordinator-ca", "{expired}"], "expired on"),
        (
            ["--coordinator-ca", "{ca}", "--tls-cert", "{client_cert}", "--tls-key", "{other}"],
            "does not belong to the certificate",
        ),
    ],
)
def test_bad_tls_arguments_stop_the_miner_at_start_naming_the_file(
    arguments: list[str],
    message: str,
    ca: Issued,
    files: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    long_ago = datetime.now(UTC) - timedelta(days=30)
    expired = issue(ca, "old", hosts=["127.0.0.1"], valid_from=long_ago).write(tmp_path, "old")
    names = {
        **{name: str(path) for name, path in files.items()},
        "expired": str(expired[0]),
        "other": str(issue(ca, "other", client=True).write(tmp_path, "x")[1]),
    }
    argv = ["run", "--coordinator", "127.0.0.1:1", "--key", str(tmp_path / "k")]
    argv += ["--model", f"tiny={tmp_path}"]
    argv += [argument.format(**names) for argument in arguments]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "k").exists(), "nothing is created for a command that cannot run"


async def test_a_miner_trusting_the_coordinators_ca_connects_over_tls(
    files: dict[str, Path],
) -> None:
    gateway = FakeGateway()
    tls = CoordinatorTls(ca_file=files["ca"])
    async with (
        serve(gateway, credentials=server_credentials(files)) as port,
        running_miner(port, [FakeEngine()], tls=tls),
    ):
        assert (await gateway.next_session()).welcomed


async def test_mutual_tls_welcomes_a_miner_with_a_client_certificate(
    files: dict[str, Path],
) -> None:
    gateway = FakeGateway()
    tls = CoordinatorTls(
        ca_file=files["ca"], cert_file=files["client_cert"], key_file=files["client_key"]
    )
    async with (
        serve(gateway, credentials=server_credentials(files, mutual=True)) as port,
        running_miner(port, [FakeEngine()], tls=tls),
    ):
        session = await gateway.next_session()
        assert session.welcomed and session.signature_ok, "the Ed25519 challenge still runs"


async def tls_errors(
    caplog: pytest.LogCaptureFixture, port: int, tls: CoordinatorTls, *, attempts: int = 3
) -> list[str]:
    """Runs a miner until it failed ``attempts`` handshakes; the errors it logged."""
    caplog.set_level(logging.DEBUG, logger="miner")
    async with running_miner(port, [FakeEngine()], tls=tls):
        await logged(
            caplog, lambda: sum("(again)" in line for line in said(caplog)) >= attempts - 1
        )
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def said(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records]


async def logged(caplog: pytest.LogCaptureFixture, condition: Callable[[], bool]) -> None:
    """Waits (10 s at most) until ``condition`` holds for what was logged."""
    async with asyncio.timeout(10):
        while True:
            if condition():
                return
            await asyncio.sleep(0.02)


async def test_a_miner_with_the_wrong_ca_is_refused_and_says_so_once(
    files: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    gateway = FakeGateway()
    async with serve(gateway, credentials=server_credentials(files)) as port:
        errors = await tls_errors(caplog, port, CoordinatorTls(ca_file=files["other_ca"]))
    assert not gateway.sessions, "no stream was opened"
    assert len(errors) == 1, errors
    assert f"TLS handshake with 127.0.0.1:{port} failed" in errors[0]
    assert "not signed by the CA in --coordinator-ca" in errors[0]
    assert "CERTIFICATE_VERIFY_FAILED" in errors[0]


@pytest.mark.parametrize(
    ("mutual", "coordinator_tls", "tls", "hint"),
    [
        (True, True, "ca", "may require a client certificate (--tls-cert/--tls-key)"),
        (False, True, "plaintext", "may require TLS (give its CA with --coordinator-ca)"),
        (False, False, "ca", "does not seem to speak TLS"),
    ],
)
async def test_a_tls_mismatch_is_explained(
    mutual: bool,
    coordinator_tls: bool,
    tls: str,
    hint: str,
    files: dict[str, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    gateway = FakeGateway()
    credentials = server_credentials(files, mutual=mutual) if coordinator_tls else None
    miner_tls = CoordinatorTls(ca_file=files["ca"]) if tls == "ca" else CoordinatorTls()
    async with serve(gateway, credentials=credentials) as port:
        errors = await tls_errors(caplog, port, miner_tls, attempts=2)
    assert not any(session.welcomed for session in gateway.sessions)
    assert len(errors) == 1 and hint in errors[0], errors


def test_a_recurring_failure_is_logged_once_a_minute_with_a_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [1000.0]
    failures = FailureLog(clock=lambda: now[0])
    caplog.set_level(logging.WARNING, logger="miner.tls")
    assert failures.report("a:1", "handshake failed")
    for _ in range(4):
        now[0] += 5
        assert not failures.report("a:1", "handshake failed")
    assert failures.report("b:2", "other address"), "each address has its own minute"
    now[0] += TLS_FAILURE_LOG_INTERVAL_S
    assert failures.report("a:1", "handshake failed")
    assert [r.getMessage() for r in caplog.records] == [
        "handshake failed",
        "other address",
        "handshake failed; 4 more failed attempts since the last report",
    ]
