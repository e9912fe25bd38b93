"""``meshmint-coordinator tls-init DIR``: a private CA and the certificates it signs.

For tests and small deployments that have no certificate authority of their own. The CA is
created once and reused by later runs, so running ``tls-init`` again (say, before the server
certificate expires) writes a fresh server certificate that every miner already trusts; a
SIGHUP makes the running coordinator pick it up. Keys are ECDSA P-256 (cheap handshakes),
written with mode 0600 in a directory of mode 0700; every file is written beside its final
name and renamed into place, so a coordinator reloading at that moment never reads half a file.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from proto.tls import CertificateFileError, read_key_pair

logger = logging.getLogger(__name__)

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
CA_DAYS = 3650
SERVER_DAYS = 365  # default validity of server and client certificates (--days)
# A little backdating, so a certificate is not "not yet valid" on a machine whose clock is slow.
_CLOCK_SKEW = timedelta(minutes=5)


@dataclass(frozen=True)
class TlsFiles:
    """What ``tls-init`` wrote (or reused) in one directory."""

    ca_cert: Path  # give it to miners (--coordinator-ca) and buyers' clients
    ca_created: bool  # False when an existing CA was reused
    server_cert: Path  # --tls-cert
    server_key: Path  # --tls-key
    clients: tuple[tuple[Path, Path], ...]  # (--tls-cert, --tls-key) per client, for mTLS


def client_files(directory: Path, name: str) -> tuple[Path, Path]:
    """Where ``tls-init --client NAME`` writes the client's certificate and key."""
    return directory / f"client-{name}.pem", directory / f"client-{name}.key"


def init_tls(
    directory: Path, *, hosts: Sequence[str], clients: Sequence[str] = (), days: int = SERVER_DAYS
) -> TlsFiles:
    """Writes (or reuses) the CA in ``directory`` and issues a server certificate for ``hosts``
    (DNS names or IP addresses, the first one its common name) and one client certificate per
    name in ``clients``, each valid for ``days``. Raises ValueError on bad arguments and
    :class:`CertificateFileError` when an existing CA cannot be used."""
    if not hosts:
        raise ValueError("tls-init needs at least one --host (a DNS name or an IP address)")
    if days < 1:
        raise ValueError(f"--days must be at least 1, got {days}")
    for name in clients:
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"--client must be a plain name, got {name!r}")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca_key, ca_cert, created = _load_or_create_ca(directory)
    now = datetime.now(UTC)
    # A certificate outliving its CA would fail verification after the CA's end anyway.
    until = min(now + timedelta(days=days), ca_cert.not_valid_after_utc)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _leaf(
        ca_key, ca_cert, server_key, hosts[0], hosts, ExtendedKeyUsageOID.SERVER_AUTH, until
    )
    _write_pair(directory / SERVER_CERT, directory / SERVER_KEY, server, server_key)
    written = []
    for name in clients:
        client_key = ec.generate_private_key(ec.SECP256R1())
        client = _leaf(
            ca_key, ca_cert, client_key, name, (), ExtendedKeyUsageOID.CLIENT_AUTH, until
        )
        cert_path, key_path = client_files(directory, name)
        _write_pair(cert_path, key_path, client, client_key)
        written.append((cert_path, key_path))
    logger.debug(
        "%s CA in %s; server certificate for %s valid until %s",
        "created a" if created else "reused the",
        directory,
        ", ".join(hosts),
        f"{until:%Y-%m-%d}",
    )
    return TlsFiles(
        ca_cert=directory / CA_CERT,
        ca_created=created,
        server_cert=directory / SERVER_CERT,
        server_key=directory / SERVER_KEY,
        clients=tuple(written),
    )


def _load_or_create_ca(
    directory: Path,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate, bool]:
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    if cert_path.exists() or key_path.exists():
        pair = read_key_pair(cert_path, key_path)
        key = serialization.load_pem_private_key(pair.key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CertificateFileError(f"{key_path}: not an ECDSA key written by tls-init")
        return key, pair.leaf, False
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "meshmint private CA")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_pair(cert_path, key_path, cert, key)
    return key, cert, True


def _leaf(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    common_name: str,
    hosts: Sequence[str],
    usage: x509.ObjectIdentifier,
    until: datetime,
) -> x509.Certificate:
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if hosts:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_general_name(host) for host in hosts]), critical=False
        )
    return builder.sign(ca_key, hashes.SHA256())


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return x509.DNSName(host)


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _write_pair(
    cert_path: Path, key_path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> None:
    # A reload between the two renames sees a key and a certificate that do not match, and
    # keeps serving the old pair (coordinator/tls.py); the next SIGHUP picks up both.
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write(key_path, key_pem, mode=0o600)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)


def _write(path: Path, data: bytes, *, mode: int) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.unlink(missing_ok=True)
    # O_EXCL with the final mode: the key is never readable by others, not even for a moment.
    with os.fdopen(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(temporary, path)
