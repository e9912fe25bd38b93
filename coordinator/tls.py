"""The coordinator's TLS: which listeners are encrypted, their certificates, and rotation.

``serve --tls-cert/--tls-key`` encrypts the buyers' HTTP API and, unless
``--grpc-tls-cert/--grpc-tls-key`` name another pair, the miners' gRPC gateway;
``--client-ca`` makes the gateway require a client certificate signed by that CA (mutual TLS;
the miner's Ed25519 identity and challenge stay as they are). A listener on an address other
than loopback must be encrypted unless ``--allow-plaintext`` says a TLS-terminating proxy sits
in front.

Rotation: :meth:`ServerTls.reload` (SIGHUP) re-reads every file and applies the new
certificates to new handshakes; connections already open keep the ones they were made with,
so no stream is dropped. aiohttp's listener reads the one ``ssl.SSLContext`` it was given at
each handshake, so the new pair is loaded into that same context; grpc asks
:meth:`ServerTls._fetch_grpc` before each handshake (``grpc.dynamic_ssl_server_credentials``).
Files that do not load (a mismatched pair half-way through being replaced, an expired
certificate) leave the old certificates in service.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast

from proto.tls import (
    CertificateFileError,
    KeyPair,
    is_loopback,
    read_certificates,
    read_key_pair,
)

if TYPE_CHECKING:
    # Imported where used: coordinator/config.py imports this module, and the CLI sets
    # GRPC_VERBOSITY before grpc is first imported.
    import grpc

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CertificateFiles:
    """A PEM certificate chain (leaf first) and its unencrypted private key."""

    cert: Path  # the leaf certificate, then any intermediates
    key: Path  # the leaf's private key


@dataclass(frozen=True)
class TlsConfig:
    """Which listeners speak TLS, with which files; see the module docstring."""

    http: CertificateFiles | None = None  # --tls-cert/--tls-key; None: plain HTTP
    # --grpc-tls-cert/--grpc-tls-key; None: the gateway uses ``http``'s pair (or none).
    grpc: CertificateFiles | None = None
    # --client-ca: miners must present a certificate signed by one of its CAs (mutual TLS).
    client_ca: Path | None = None
    # --allow-plaintext: a non-loopback listener may be unencrypted (a TLS proxy in front).
    allow_plaintext: bool = False

    def __post_init__(self) -> None:
        if self.client_ca is not None and self.grpc_files is None:
            raise ValueError(
                "--client-ca needs TLS on the gRPC gateway (--tls-cert/--tls-key "
                "or --grpc-tls-cert/--grpc-tls-key)"
            )

    @property
    def grpc_files(self) -> CertificateFiles | None:
        """The pair the gateway serves: its own, else the HTTP one."""
        return self.grpc or self.http

    def check_listeners(self, *, http_host: str, grpc_host: str) -> None:
        """Raises ValueError when a listener off loopback would be plaintext without
        ``allow_plaintext``: API keys, prompts and receipts would cross the network readable."""
        if self.allow_plaintext:
            return
        for flag, host, files, needs in (
            ("--http", http_host, self.http, "--tls-cert/--tls-key"),
            ("--grpc", grpc_host, self.grpc_files, "--tls-cert/--tls-key"),
        ):
            if files is None and not is_loopback(host):
                raise ValueError(
                    f"{flag} {host or '0.0.0.0'} is not a loopback address and would carry "
                    f"API keys, prompts and completions in plaintext: give {needs}, or "
                    "--allow-plaintext if a TLS-terminating proxy sits in front"
                )


@dataclass
class _Loaded:
    """The files as last read successfully."""

    http: KeyPair | None  # the HTTPS pair; None: plain HTTP
    grpc: KeyPair | None  # the gateway's pair (the same object as http when shared)
    client_ca_pem: bytes | None = field(repr=False)  # --client-ca's certificates, for mTLS


class ServerTls:
    """The coordinator's live TLS state: the HTTP listener's ``ssl.SSLContext`` and the gRPC
    gateway's credentials, both following :meth:`reload`. Build with :meth:`load`."""

    def __init__(self, config: TlsConfig, loaded: _Loaded) -> None:
        import grpc

        self._config = config
        self._loaded = loaded
        self._lock = threading.Lock()  # grpc calls the fetcher from its own threads
        self._grpc_pending: grpc.ServerCertificateConfiguration | None = None
        self.http_context: ssl.SSLContext | None = None
        """What aiohttp's listener serves; None when HTTP is plaintext."""
        if config.http is not None:
            self.http_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.http_context.minimum_version = ssl.TLSVersion.TLSv1_2
            self.http_context.load_cert_chain(config.http.cert, config.http.key)
        self.grpc_credentials: grpc.ServerCredentials | None = None
        """What the gateway's port is added with; None when gRPC is plaintext."""
        if loaded.grpc is not None:
            self.grpc_credentials = grpc.dynamic_ssl_server_credentials(
                self._grpc_configuration(loaded),
                # grpc documents None as "keep the current configuration"; grpc-stubs omit it.
                cast("Callable[[], grpc.ServerCertificateConfiguration]", self._fetch_grpc),
                require_client_authentication=config.client_ca is not None,
            )

    @classmethod
    def load(cls, config: TlsConfig) -> ServerTls:
        """Reads and checks every file; raises :class:`proto.tls.CertificateFileError` naming
        the file and the reason."""
        loaded = _read(config)
        try:
            return cls(config, loaded)
        except ssl.SSLError as error:
            # Files that parse but that OpenSSL refuses (a key type it lacks, say).
            assert config.http is not None
            raise CertificateFileError(f"{config.http.cert}: {error.reason or error}") from None

    @property
    def http_scheme(self) -> str:
        return "https" if self.http_context is not None else "http"

    @property
    def grpc_transport(self) -> str:
        """How miners connect, in words for logs."""
        if self.grpc_credentials is None:
            return "plaintext"
        if self._config.client_ca is not None:
            return "TLS, client certificates required"
        return "TLS"

    def reload(self) -> bool:
        """Re-reads every file and serves the new certificates to new handshakes. Returns False
        (and logs why) when the files do not load; the old certificates stay in service."""
        if self.http_context is None and self.grpc_credentials is None:
            logger.info("TLS reload asked, but no listener serves TLS")
            return True
        try:
            loaded = _read(self._config)
            if self.http_context is not None and self._config.http is not None:
                # A scratch context first: load_cert_chain on the live one with a bad pair
                # could leave it holding a certificate without its key.
                ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(
                    self._config.http.cert, self._config.http.key
                )
        except (ValueError, ssl.SSLError, OSError) as error:
            logger.error("TLS reload failed, still serving the previous certificates: %s", error)
            return False
        if self.http_context is not None and self._config.http is not None:
            self.http_context.load_cert_chain(self._config.http.cert, self._config.http.key)
        if self.grpc_credentials is not None:
            with self._lock:
                self._grpc_pending = self._grpc_configuration(loaded)
        self._loaded = loaded
        for what, pair in (("HTTP", loaded.http), ("gRPC", loaded.grpc)):
            if pair is not None:
                logger.info(
                    "TLS reloaded: %s serves %s (serial %x) until %s",
                    what,
                    pair.leaf.subject.rfc4514_string(),
                    pair.leaf.serial_number,
                    f"{pair.leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC",
                )
        return True

    def _fetch_grpc(self) -> grpc.ServerCertificateConfiguration | None:
        # grpc calls this before every handshake; None keeps the configuration it has.
        with self._lock:
            pending, self._grpc_pending = self._grpc_pending, None
        return pending

    def _grpc_configuration(self, loaded: _Loaded) -> grpc.ServerCertificateConfiguration:
        import grpc

        assert loaded.grpc is not None
        return grpc.ssl_server_certificate_configuration(
            [(loaded.grpc.key_pem, loaded.grpc.chain_pem)],
            root_certificates=loaded.client_ca_pem,
        )


def _read(config: TlsConfig) -> _Loaded:
    http = read_key_pair(config.http.cert, config.http.key) if config.http else None
    grpc_files = config.grpc_files
    if grpc_files is None:
        grpc_pair = None
    elif grpc_files == config.http:
        grpc_pair = http
    else:
        grpc_pair = read_key_pair(grpc_files.cert, grpc_files.key)
    client_ca = read_certificates(config.client_ca)[0] if config.client_ca else None
    return _Loaded(http=http, grpc=grpc_pair, client_ca_pem=client_ca)
