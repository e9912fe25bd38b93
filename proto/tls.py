"""TLS pieces both ends share: checking PEM files before use, and what counts as loopback.

Both the coordinator (its server certificate, the CA for miners' client certificates) and the
miner (the coordinator's CA, its own client certificate) read PEM files named on the command
line. Reading them here first turns an expired, mismatched or unreadable file into one
:class:`CertificateFileError` naming the file and the reason, instead of an OpenSSL error (or a
handshake that fails later, on every connection).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes


class CertificateFileError(ValueError):
    """A certificate, key or CA file cannot be used; the message names the file and why."""


@dataclass(frozen=True)
class KeyPair:
    """A checked certificate chain and its private key, as PEM bytes."""

    chain_pem: bytes  # the leaf first, then any intermediates
    key_pem: bytes  # the leaf's private key, unencrypted
    leaf: x509.Certificate  # the parsed leaf, for logs (subject, expiry, serial)


def is_loopback(host: str) -> bool:
    """True for "localhost" and loopback IP addresses (127.0.0.0/8, ::1).

    Other names count as remote even if they resolve to loopback today: a name can be
    re-pointed, an address cannot. An empty host or 0.0.0.0 means every interface: remote.
    """
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_certificates(
    path: Path, *, now: datetime | None = None
) -> tuple[bytes, list[x509.Certificate]]:
    """The file's bytes and its certificates; raises unless it holds at least one certificate,
    every one of them valid now (an expired CA or intermediate fails every handshake too)."""
    data = _read(path)
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise CertificateFileError(f"{path}: no PEM certificate in it") from None
    moment = now or datetime.now(UTC)
    for certificate in certificates:
        subject = certificate.subject.rfc4514_string() or "(no subject)"
        if certificate.not_valid_after_utc < moment:
            raise CertificateFileError(
                f"{path}: certificate {subject} expired on "
                f"{certificate.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
            )
        if certificate.not_valid_before_utc > moment:
            raise CertificateFileError(
                f"{path}: certificate {subject} is not valid before "
                f"{certificate.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
            )
    return data, certificates


def read_key_pair(cert_path: Path, key_path: Path, *, now: datetime | None = None) -> KeyPair:
    """Reads and checks a certificate chain (leaf first) and the leaf's private key."""
    chain_pem, chain = read_certificates(cert_path, now=now)
    key_pem = _read(key_path)
    key = _private_key(key_path, key_pem)
    leaf = chain[0]
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, spki) != leaf.public_key().public_bytes(der, spki):
        raise CertificateFileError(
            f"{key_path}: this private key does not belong to the certificate in {cert_path}"
        )
    return KeyPair(chain_pem=chain_pem, key_pem=key_pem, leaf=leaf)


def _private_key(path: Path, data: bytes) -> PrivateKeyTypes:
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise CertificateFileError(
            f"{path}: the private key is encrypted; give an unencrypted key (mode 0600)"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise CertificateFileError(f"{path}: no usable PEM private key in it") from None


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise CertificateFileError(f"{path}: cannot read it ({error.strerror})") from None
