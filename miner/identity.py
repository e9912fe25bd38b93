"""The miner's identity: an Ed25519 key kept in one PEM file next to nothing else.

The public key *is* the miner on the coordinator (its hex is the miner id, and earnings are
credited to it), so the key file is created once, never overwritten, and refused when other users
could read or replace it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ledger.keyfile import KeyFileError, load_or_create_key
from miner.errors import IdentityError

logger = logging.getLogger(__name__)


class Identity:
    """An Ed25519 private key and the names derived from it."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private_key = private_key
        self._public_key = private_key.public_key().public_bytes(
            encoding=serialization.Encoding.Raw, format=serialization.PublicFormat.Raw
        )

    @classmethod
    def generate(cls) -> Identity:
        """A fresh identity that lives only in memory (tests, throwaway miners)."""
        return cls(Ed25519PrivateKey.generate())

    @property
    def public_key(self) -> bytes:
        """The raw 32-byte public key announced in Hello."""
        return self._public_key

    @property
    def miner_id(self) -> str:
        """The coordinator's name for this miner: the public key in lowercase hex."""
        return self._public_key.hex()

    def sign(self, data: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``data``."""
        return self._private_key.sign(data)

    def __repr__(self) -> str:
        return f"Identity(miner_id={self.miner_id!r})"


def load_or_create_identity(path: Path) -> Identity:
    """Loads the key at ``path``, creating it (mode 0600, parent 0700) on first use.

    Raises :class:`IdentityError` when the file is not a usable Ed25519 key or is accessible to
    other users.
    """
    try:
        key, created = load_or_create_key(path, what="miner key")
    except KeyFileError as error:
        raise IdentityError(str(error)) from error
    identity = Identity(key)
    if created:
        logger.info("created a new miner identity %s in %s", identity.miner_id, path)
    return identity
