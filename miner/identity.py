"""The miner's identity: an Ed25519 key kept in one PEM file next to nothing else.

The public key *is* the miner on the coordinator (its hex is the miner id, and earnings are
credited to it), so the key file is created once, never overwritten, and refused when other users
could read or replace it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import tempfile
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from miner.errors import IdentityError

logger = logging.getLogger(__name__)

# Group/other permission bits. Write access matters as much as read access: whoever can replace
# the key file can make the miner earn for their identity.
_OPEN_TO_OTHERS = stat.S_IRWXG | stat.S_IRWXO


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
    path = Path(path).expanduser()
    if path.exists():
        return _load(path)
    key = Ed25519PrivateKey.generate()
    _write_atomically(path, _pem(key))
    identity = Identity(key)
    logger.info("created a new miner identity %s in %s", identity.miner_id, path)
    return identity


def _pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )


def _load(path: Path) -> Identity:
    try:
        info = path.stat()
    except OSError as err:
        raise IdentityError(f"cannot read the miner key {path}: {err.strerror}") from err
    if not stat.S_ISREG(info.st_mode):
        raise IdentityError(f"the miner key {path} is not a regular file")
    # POSIX permission bits mean nothing on Windows (every file reports 0o666 there).
    if os.name == "posix" and info.st_mode & _OPEN_TO_OTHERS:
        raise IdentityError(
            f"the miner key {path} is accessible to other users "
            f"(mode {stat.S_IMODE(info.st_mode):o}); run `chmod 600 {path}`"
        )
    try:
        data = path.read_bytes()
    except OSError as err:
        raise IdentityError(f"cannot read the miner key {path}: {err.strerror}") from err
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise IdentityError(
            f"the miner key {path} is not an unencrypted PEM private key: {err}"
        ) from err
    if not isinstance(key, Ed25519PrivateKey):
        raise IdentityError(f"the miner key {path} is not an Ed25519 key")
    return Identity(key)


def _write_atomically(path: Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` so that no reader ever sees a partial or over-open file."""
    parent = path.parent
    if not parent.exists():
        parent.mkdir(parents=True, mode=0o700)
        # mkdir's mode is filtered by the umask; the directory must end up 0700 regardless.
        parent.chmod(0o700)
    # mkstemp creates the file 0600, so the key is never readable by others, not even briefly.
    descriptor, temp_name = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp_name)
        raise
    _fsync_directory(parent)


def _fsync_directory(directory: Path) -> None:
    """Makes the rename durable; not every platform can open a directory, which is fine."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
