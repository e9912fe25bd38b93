"""The miner daemon's exceptions (the engine has its own root, ``miner.engine.base.EngineError``).

MinerError
├── IdentityError        the key file is unreadable, malformed or open to other users
├── MinerRefusedError    the coordinator refused this miner for a reason retrying cannot fix
├── ConnectionLostError  one connection ended (never escapes ``MinerDaemon.run``: it reconnects)
│   └── TlsHandshakeError    ... because TLS failed (logged once a minute, miner/tls.py)
├── WitnessError         the ledger witness's files are unusable (miner/witness_store.py)
├── PackagedModelMissingError  a model wheel is not installed (miner/packaged_models.py)
└── _UsageError          a bad command-line value, exit status 2 (miner/cli.py)
"""

from __future__ import annotations

from proto import miner_pb2


class MinerError(Exception):
    """Root of everything the miner daemon raises on purpose."""


class IdentityError(MinerError):
    """The identity key file cannot be used; the message says what to do about it."""


class MinerRefusedError(MinerError):
    """The coordinator refused the miner permanently (bad weights, banned key, ...).

    ``reason`` is the ``RefusalReason`` enum value, ``detail`` the coordinator's explanation.
    """

    def __init__(self, reason: miner_pb2.RefusalReason.ValueType, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"coordinator refused this miner ({self.reason_name}): {detail}")

    @property
    def reason_name(self) -> str:
        """The reason without its enum prefix, e.g. ``"WEIGHTS_MISMATCH"``."""
        return miner_pb2.RefusalReason.Name(self.reason).removeprefix("REFUSAL_REASON_")


class ConnectionLostError(MinerError):
    """The connection to the coordinator failed or ended; the message says why."""


class TlsHandshakeError(ConnectionLostError):
    """The connection failed in its TLS handshake; the message says what to check."""
