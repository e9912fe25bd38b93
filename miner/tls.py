"""How a miner secures its connection to the coordinator.

The rule, in order:

1. ``--insecure``: plaintext, whatever the address (a trusted network, or a test rig).
2. ``--coordinator-ca FILE`` or a client certificate (``--tls-cert/--tls-key``): TLS, trusting
   that CA (or self-signed certificate) if given, else the system's trust store.
3. A loopback coordinator (``localhost``, 127.0.0.0/8, ``::1``): plaintext. Nothing leaves the
   machine, and a coordinator on the same box is the one setup that needs no certificate.
4. Anything else: TLS with the system's trust store (OpenSSL's default CA file, which
   ``SSL_CERT_FILE`` overrides; grpc's bundled roots when there is none).

``--insecure`` together with a TLS option is refused at start: one of them is a mistake.
The miner's Ed25519 identity and its challenge are the same over TLS or not; TLS hides the
traffic and proves the coordinator's name, the identity proves the miner's key.

A handshake that fails (wrong CA, a coordinator that does not speak TLS, a client certificate
missing or refused) is retried like any lost connection, but :class:`FailureLog` reports it
once a minute per address, not on every attempt.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from proto.tls import is_loopback, read_certificates, read_key_pair

if TYPE_CHECKING:
    # Imported where used: miner/cli.py sets GRPC_VERBOSITY before grpc is first imported,
    # and miner/config.py (imported first) imports this module.
    import grpc

logger = logging.getLogger(__name__)

TLS_FAILURE_LOG_INTERVAL_S = 60.0
"""How often one address's failing TLS handshake is logged at WARNING or above."""


@dataclass(frozen=True)
class CoordinatorTls:
    """The miner's TLS options (see the module docstring for how they combine)."""

    # --coordinator-ca: PEM CA certificate(s), or the coordinator's self-signed certificate, to
    # trust instead of the system's store; implies TLS, also to a loopback coordinator.
    ca_file: Path | None = None
    # --tls-cert: a client certificate (chain) for a coordinator that demands one (serve
    # --client-ca); not the miner's identity, which stays its Ed25519 key.
    cert_file: Path | None = None
    # --tls-key: the client certificate's private key; given with cert_file or not at all.
    key_file: Path | None = None
    # --insecure: plaintext even to a coordinator off this machine.
    insecure: bool = False

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("--tls-cert and --tls-key must be given together")
        if self.insecure and (self.ca_file is not None or self.cert_file is not None):
            raise ValueError(
                "--insecure turns TLS off; it cannot be combined with --coordinator-ca "
                "or --tls-cert/--tls-key"
            )

    def uses_tls(self, host: str) -> bool:
        """Whether a connection to ``host`` is encrypted."""
        if self.insecure:
            return False
        if self.ca_file is not None or self.cert_file is not None:
            return True
        return not is_loopback(host)


def channel_credentials(tls: CoordinatorTls, host: str) -> grpc.ChannelCredentials | None:
    """The credentials to dial ``host`` with, None for plaintext. Reads and checks the files;
    raises :class:`proto.tls.CertificateFileError` naming the file and the reason."""
    if not tls.uses_tls(host):
        return None
    import grpc

    if tls.ca_file is not None:
        roots: bytes | None = read_certificates(tls.ca_file)[0]
    else:
        roots = _system_roots()
    if tls.cert_file is None or tls.key_file is None:
        return grpc.ssl_channel_credentials(root_certificates=roots)
    pair = read_key_pair(tls.cert_file, tls.key_file)
    return grpc.ssl_channel_credentials(
        root_certificates=roots, private_key=pair.key_pem, certificate_chain=pair.chain_pem
    )


def _system_roots() -> bytes | None:
    cafile = ssl.get_default_verify_paths().cafile
    if cafile is None:
        return None
    try:
        return Path(cafile).read_bytes()
    except OSError:
        return None


_TLS_MARKERS = ("handshake", "ssl", "tls", "certificate", "verification")


def describe_tls_failure(
    details: str, *, address: str, tls: CoordinatorTls, encrypted: bool
) -> str | None:
    """One line a miner's operator can act on when grpc's ``details`` of a connection that
    failed before the Welcome describe a TLS problem; None when they describe something else.

    A server that drops the connection at once ("Socket closed") is a TLS mismatch too: a TLS
    coordinator closes a plaintext client, and under TLS 1.3 a client learns that its
    certificate was missing or refused only that way.
    """
    lowered = details.lower()
    host = address.rpartition(":")[0]
    if "socket closed" in lowered:
        if not encrypted:
            hint = "the coordinator may require TLS (give its CA with --coordinator-ca)"
        elif tls.cert_file is None:
            hint = "the coordinator may require a client certificate (--tls-cert/--tls-key)"
        else:
            hint = "the coordinator may not accept this client certificate (--tls-cert)"
    elif not any(marker in lowered for marker in _TLS_MARKERS):
        return None
    elif "wrong_version_number" in lowered:
        hint = "the coordinator does not seem to speak TLS (--insecure if it really is plaintext)"
    elif "hostname verification" in lowered:
        hint = f"its certificate does not name {host}"
    elif "certificate_verify_failed" in lowered:
        hint = (
            "its certificate is not signed by the CA in --coordinator-ca"
            if tls.ca_file is not None
            else "its certificate is not trusted by the system; give its CA with --coordinator-ca"
        )
    else:
        hint = "see the details"
    return f"TLS handshake with {address} failed: {hint} ({details})"


class FailureLog:
    """Logs a recurring failure once per key per interval; the repeats in between go to DEBUG
    with a count, so a miner retrying every few seconds does not flood its log."""

    def __init__(
        self,
        *,
        interval_s: float = TLS_FAILURE_LOG_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._interval_s = interval_s
        self._clock = clock
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def report(self, key: str, message: str, *, level: int = logging.ERROR) -> bool:
        """Logs ``message`` unless ``key`` was logged less than the interval ago; True if it
        was logged."""
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self._interval_s:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            logger.debug("%s (again)", message)
            return False
        self._last[key] = now
        repeats = self._suppressed.pop(key, 0)
        if repeats:
            logger.log(level, "%s; %d more failed attempts since the last report", message, repeats)
        else:
            logger.log(level, "%s", message)
        return True
