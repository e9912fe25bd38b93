"""Admission of a miner: check_hello against the catalog, and the challenge signature."""

from __future__ import annotations

import dataclasses
import hashlib
import os

import pytest

from coordinator.catalog import Catalog, CatalogEntry
from coordinator.gateway.handshake import MAX_CONCURRENCY, check_hello, signature_is_valid
from proto import miner_pb2
from proto.limits import PROTOCOL_VERSION
from proto.signing import challenge_message
from tests.coordinator.core_fakes import MODEL, MinerKey, build_catalog, make_hello

_R = miner_pb2.RefusalReason
# The identity point of Ed25519 (y = 1): a public key of small order that nobody holds.
_IDENTITY_POINT = b"\x01" + b"\x00" * 31


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> Catalog:
    """Two models (the second a renamed copy of the first), so refusals can list both."""
    tiny = build_catalog(tmp_path_factory.mktemp("handshake")).get(MODEL)
    return Catalog([tiny, dataclasses.replace(tiny, name="another-model")])


@pytest.fixture
def hello(catalog: Catalog, key: MinerKey) -> miner_pb2.Hello:
    return make_hello(catalog.entries(), key=key, max_concurrency=4)


def refused(
    hello: miner_pb2.Hello, catalog: Catalog, reason: miner_pb2.RefusalReason.ValueType
) -> str:
    refusal = check_hello(hello, catalog)
    assert refusal is not None, "the Hello was accepted"
    assert refusal.reason == reason, _R.Name(refusal.reason)
    return refusal.message


# --- check_hello --------------------------------------------------------------------------------


def test_a_correct_hello_is_accepted(hello: miner_pb2.Hello, catalog: Catalog) -> None:
    assert check_hello(hello, catalog) is None
    del hello.models[1]  # serving part of the catalog is fine
    assert check_hello(hello, catalog) is None


@pytest.mark.parametrize("version", [0, PROTOCOL_VERSION + 1])
def test_other_protocol_versions_are_refused(
    hello: miner_pb2.Hello, catalog: Catalog, version: int
) -> None:
    hello.protocol_version = version
    message = refused(hello, catalog, _R.REFUSAL_REASON_UNSUPPORTED_PROTOCOL)
    assert f"protocol version {version}" in message and f"version {PROTOCOL_VERSION}" in message


@pytest.mark.parametrize("length", [0, 31, 33, 64])
def test_public_key_must_be_32_bytes(hello: miner_pb2.Hello, catalog: Catalog, length: int) -> None:
    hello.public_key = os.urandom(length)
    assert "32 raw bytes" in refused(hello, catalog, _R.REFUSAL_REASON_PROTOCOL_VIOLATION)


@pytest.mark.parametrize("slots", [0, MAX_CONCURRENCY + 1, 10_000])
def test_max_concurrency_out_of_range_is_refused(
    hello: miner_pb2.Hello, catalog: Catalog, slots: int
) -> None:
    hello.max_concurrency = slots
    message = refused(hello, catalog, _R.REFUSAL_REASON_PROTOCOL_VIOLATION)
    assert "max_concurrency" in message and str(MAX_CONCURRENCY) in message


@pytest.mark.parametrize("slots", [1, MAX_CONCURRENCY])
def test_max_concurrency_bounds_are_accepted(
    hello: miner_pb2.Hello, catalog: Catalog, slots: int
) -> None:
    hello.max_concurrency = slots
    assert check_hello(hello, catalog) is None


def test_a_miner_without_models_is_refused(hello: miner_pb2.Hello, catalog: Catalog) -> None:
    del hello.models[:]
    assert "no model" in refused(hello, catalog, _R.REFUSAL_REASON_UNKNOWN_MODEL)


def test_unknown_model_is_refused_listing_what_is_served(
    hello: miner_pb2.Hello, catalog: Catalog
) -> None:
    hello.models.add(name="gpt-17", weights_sha256=b"\x00" * 32)
    message = refused(hello, catalog, _R.REFUSAL_REASON_UNKNOWN_MODEL)
    assert "'gpt-17'" in message
    assert f"another-model, {MODEL}" in message  # every served name, sorted


def test_weights_mismatch_is_refused_with_both_hashes(
    hello: miner_pb2.Hello, catalog: Catalog, entry: CatalogEntry
) -> None:
    wrong = hashlib.sha256(b"fine-tuned").digest()
    hello.models[0].weights_sha256 = wrong
    message = refused(hello, catalog, _R.REFUSAL_REASON_WEIGHTS_MISMATCH)
    assert f"'{hello.models[0].name}'" in message
    assert wrong.hex()[:16] in message and entry.weights_sha256.hex()[:16] in message


def test_any_bad_model_refuses_the_whole_hello(hello: miner_pb2.Hello, catalog: Catalog) -> None:
    hello.models[1].weights_sha256 = b""
    refused(hello, catalog, _R.REFUSAL_REASON_WEIGHTS_MISMATCH)


# --- the challenge ------------------------------------------------------------------------------


def test_a_signed_challenge_is_valid(key: MinerKey) -> None:
    nonce = os.urandom(32)
    assert signature_is_valid(key.public, nonce, key.sign(challenge_message(nonce, key.public)))


def test_signature_over_another_nonce_is_invalid(key: MinerKey) -> None:
    nonce, other = os.urandom(32), os.urandom(32)
    signature = key.sign(challenge_message(other, key.public))
    assert not signature_is_valid(key.public, nonce, signature)


def test_signature_by_another_key_is_invalid(key: MinerKey) -> None:
    nonce, thief = os.urandom(32), MinerKey()
    # The thief announces key's public key but signs with its own.
    assert not signature_is_valid(
        key.public, nonce, thief.sign(challenge_message(nonce, key.public))
    )
    assert not signature_is_valid(
        key.public, nonce, thief.sign(challenge_message(nonce, thief.public))
    )


def test_signature_of_the_bare_nonce_is_invalid(key: MinerKey) -> None:
    nonce = os.urandom(32)
    assert not signature_is_valid(key.public, nonce, key.sign(nonce))


@pytest.mark.parametrize(
    ("public_key", "signature"),
    [
        (b"", b""),
        (b"\x01" * 31, b"\x00" * 64),
        (b"\xff" * 32, bytes(range(64))),
        (bytes(range(32)), b""),
        (bytes(range(32)), b"\x07" * 10),
        (bytes(range(32)), b"\x07" * 100),
    ],
    ids=["empty", "short-key", "off-curve-key", "no-signature", "short-sig", "long-sig"],
)
def test_garbage_is_invalid_and_never_raises(public_key: bytes, signature: bytes) -> None:
    assert signature_is_valid(public_key, os.urandom(32), signature) is False


def test_small_order_public_key_is_refused(hello: miner_pb2.Hello, catalog: Catalog) -> None:
    hello.public_key = _IDENTITY_POINT
    forged = _IDENTITY_POINT + b"\x00" * 32
    nonces = [os.urandom(32) for _ in range(5)]
    admitted = check_hello(hello, catalog) is None and any(
        signature_is_valid(_IDENTITY_POINT, nonce, forged) for nonce in nonces
    )
    assert not admitted
