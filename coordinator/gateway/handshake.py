"""Admission of a miner: is its Hello acceptable, and does it hold the key it announced?"""

from __future__ import annotations

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from coordinator.catalog import Catalog
from proto import miner_pb2
from proto.limits import PROTOCOL_VERSION
from proto.signing import challenge_message

MAX_CONCURRENCY = 256

# Ed25519 public keys of small order (libsodium's blocklist, sign bit cleared). A signature
# under one of them can verify for every message, so such a key proves nothing.
_SMALL_ORDER_KEYS = frozenset(
    bytes.fromhex(key)
    for key in (
        "00" * 32,
        "01" + "00" * 31,
        "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
        "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
        "ec" + "ff" * 30 + "7f",
        "ed" + "ff" * 30 + "7f",
        "ee" + "ff" * 30 + "7f",
    )
)


def is_weak_key(public_key: bytes) -> bool:
    """True for a small-order Ed25519 key, whichever its sign bit."""
    return public_key[:31] + bytes([public_key[31] & 0x7F]) in _SMALL_ORDER_KEYS


_R = miner_pb2.RefusalReason


def refusal(reason: miner_pb2.RefusalReason.ValueType, message: str) -> miner_pb2.Refusal:
    return miner_pb2.Refusal(reason=reason, message=message)


def check_hello(hello: miner_pb2.Hello, catalog: Catalog) -> miner_pb2.Refusal | None:
    """The reason to refuse this Hello, or None when it is acceptable."""
    if hello.protocol_version != PROTOCOL_VERSION:
        return refusal(
            _R.REFUSAL_REASON_UNSUPPORTED_PROTOCOL,
            f"protocol version {hello.protocol_version} is not supported; this coordinator "
            f"speaks version {PROTOCOL_VERSION}: upgrade meshmint",
        )
    if len(hello.public_key) != 32:
        return refusal(_R.REFUSAL_REASON_PROTOCOL_VIOLATION, "public_key must be 32 raw bytes")
    if is_weak_key(hello.public_key):
        return refusal(
            _R.REFUSAL_REASON_PROTOCOL_VIOLATION,
            "public_key is a small-order Ed25519 point; generate a real key",
        )
    if not 1 <= hello.max_concurrency <= MAX_CONCURRENCY:
        return refusal(
            _R.REFUSAL_REASON_PROTOCOL_VIOLATION,
            f"max_concurrency must be between 1 and {MAX_CONCURRENCY}",
        )
    if not hello.models:
        return refusal(_R.REFUSAL_REASON_UNKNOWN_MODEL, "the miner announced no model")
    for model in hello.models:
        if model.name not in catalog:
            return refusal(
                _R.REFUSAL_REASON_UNKNOWN_MODEL,
                f"model '{model.name}' is not in this coordinator's catalog "
                f"(it serves: {', '.join(sorted(catalog.names())) or 'nothing'})",
            )
        expected = catalog.get(model.name).weights_sha256
        if model.weights_sha256 != expected:
            return refusal(
                _R.REFUSAL_REASON_WEIGHTS_MISMATCH,
                f"weights of model '{model.name}' do not match the catalog: the miner has "
                f"sha256 {model.weights_sha256.hex()[:16]}..., the coordinator expects "
                f"{expected.hex()[:16]}... (another model, another quantization of it, "
                "or modified weights)",
            )
    return None


def signature_is_valid(public_key: bytes, nonce: bytes, signature: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(
            signature, challenge_message(nonce, public_key)
        )
    except (InvalidSignature, ValueError):
        return False
    return True
