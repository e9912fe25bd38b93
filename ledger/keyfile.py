"""Ed25519 private keys kept in one PEM file: created once (0600), refused when others can reach it.

Used for every long-lived identity in meshmint: a miner's key and the coordinator's ledger
signing key. Whoever can read such a file can sign as its owner, and whoever can replace it can
make the owner sign with a key of their choosing, so group/other permission bits are refused.
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

from ledger.interface import LedgerError

logger = logging.getLogger(__name__)

# Group/other permission bits. Write access matters as much as read access: whoever can replace
# the key file can make its owner sign with another key.
_OPEN_TO_OTHERS = stat.S_IRWXG | stat.S_IRWXO


class KeyFileError(LedgerError, ValueError):
    """The key file is unreadable, not an Ed25519 PEM key, or open to other users."""


def load_or_create_key(path: Path, *, what: str = "key") -> tuple[Ed25519PrivateKey, bool]:
    """The key at ``path``, created (mode 0600, parent 0700) on first use; and whether it was new.

    ``what`` names the key in error messages, e.g. "miner key".
    """
    path = Path(path).expanduser()
    if path.exists():
        return _load(path, what), False
    key = Ed25519PrivateKey.generate()
    write_atomically(path, _pem(key))
    return key, True


def _pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )


def _load(path: Path, what: str) -> Ed25519PrivateKey:
    try:
        info = path.stat()
    except OSError as err:
        raise KeyFileError(f"cannot read the {what} {path}: {err.strerror}") from err
    if not stat.S_ISREG(info.st_mode):
        raise KeyFileError(f"the {what} {path} is not a regular file")
    # POSIX permission bits mean nothing on Windows (every file reports 0o666 there).
    if os.name == "posix" and info.st_mode & _OPEN_TO_OTHERS:
        raise KeyFileError(
            f"the {what} {path} is accessible to other users "
            f"(mode {stat.S_IMODE(info.st_mode):o}); run `chmod 600 {path}`"
        )
    try:
        data = path.read_bytes()
    except OSError as err:
        raise KeyFileError(f"cannot read the {what} {path}: {err.strerror}") from err
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise KeyFileError(
            f"the {what} {path} is not an unencrypted PEM private key: {err}"
        ) from err
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"the {what} {path} is not an Ed25519 key")
    return key


def write_atomically(path: Path, data: bytes) -> None:
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
