"""TLS for end-to-end tests: certificates from the real ``tls-init`` and the arguments that
give them to ``serve`` and ``run``."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

from tests.e2e.harness import BIN


def tls_init(directory: Path, *, hosts: Sequence[str], clients: Sequence[str] = ()) -> str:
    """Runs ``meshmint-coordinator tls-init`` as an operator would; returns what it printed.
    Files land in ``directory``: ca.pem, server.pem/.key, client-NAME.pem/.key."""
    args = [str(BIN / "meshmint-coordinator"), "tls-init", str(directory)]
    args += [f"--host={host}" for host in hosts] + [f"--client={name}" for name in clients]
    done = subprocess.run(args, capture_output=True, text=True, timeout=60, check=True)
    return done.stdout


def serve_args(directory: Path, *, client_ca: bool = False) -> list[str]:
    """``serve`` arguments for the certificates :func:`tls_init` wrote (``client_ca``: mTLS)."""
    args = ["--tls-cert", str(directory / "server.pem"), "--tls-key", str(directory / "server.key")]
    return args + (["--client-ca", str(directory / "ca.pem")] if client_ca else [])


def miner_args(directory: Path, *, client: str | None = None) -> list[str]:
    """``run`` arguments trusting :func:`tls_init`'s CA, with ``client``'s certificate if named."""
    args = ["--coordinator-ca", str(directory / "ca.pem")]
    if client is not None:
        args += ["--tls-cert", str(directory / f"client-{client}.pem")]
        args += ["--tls-key", str(directory / f"client-{client}.key")]
    return args
