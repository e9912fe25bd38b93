"""The identity key file: created private, reused, refused when others can read it."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from miner.errors import IdentityError
from miner.identity import Identity, load_or_create_identity


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_key_is_created_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "fresh" / "nested" / "identity.key"
    first = load_or_create_identity(path)
    assert mode(path) == 0o600
    assert mode(path.parent) == 0o700
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert [entry.name for entry in path.parent.iterdir()] == ["identity.key"], "no temp file left"
    second = load_or_create_identity(path)
    assert second.miner_id == first.miner_id == first.public_key.hex()
    assert len(first.public_key) == 32


def test_an_existing_parent_directory_keeps_its_mode(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    load_or_create_identity(tmp_path / "identity.key")
    assert mode(tmp_path) == 0o755


def test_signatures_verify_against_the_public_key(tmp_path: Path) -> None:
    identity = load_or_create_identity(tmp_path / "identity.key")
    signature = identity.sign(b"receipt bytes")
    Ed25519PublicKey.from_public_bytes(identity.public_key).verify(signature, b"receipt bytes")
    other = Identity.generate()
    assert other.miner_id != identity.miner_id


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
@pytest.mark.parametrize("open_mode", [0o640, 0o604, 0o620, 0o660])
def test_a_key_other_users_can_access_is_refused(tmp_path: Path, open_mode: int) -> None:
    path = tmp_path / "identity.key"
    load_or_create_identity(path)
    path.chmod(open_mode)
    with pytest.raises(IdentityError, match="chmod 600"):
        load_or_create_identity(path)
    path.chmod(0o600)
    load_or_create_identity(path)


def test_a_file_that_is_not_a_key_is_refused_not_replaced(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    path.write_bytes(b"not a key\n")
    path.chmod(0o600)
    with pytest.raises(IdentityError, match="not an unencrypted PEM private key"):
        load_or_create_identity(path)
    assert path.read_bytes() == b"not a key\n"


def test_a_non_ed25519_key_is_refused(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    path = tmp_path / "identity.key"
    path.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    with pytest.raises(IdentityError, match="not an Ed25519 key"):
        load_or_create_identity(path)
