"""ledger.checkpoint against the Go signed-note vectors and a real sum.golang.org checkpoint,
plus round trips, key rotation, cosignatures, and strict rejection of malformed notes."""

from __future__ import annotations

import base64
import contextlib
import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.checkpoint import (
    MAX_NOTE_SIZE,
    Checkpoint,
    CheckpointError,
    CheckpointSigner,
    NoteSignature,
    Verifier,
    _signature_line,
    open_signed_checkpoint,
    parse_signed_checkpoint,
    parse_verifier_key,
    verifier_key,
)
from ledger.merkle import leaf_hash, root

# golang.org/x/mod/sumdb/note, note_test.go and the package example: a key pair and the note it
# signs. Ed25519 is deterministic, so our signature line must match byte for byte.
PETER_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
PETER_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
PETER_TEXT = (
    b"If you think cryptography is the answer to your problem,\n"
    b"then you don't know what your problem is.\n"
)
PETER_SIG = (
    "x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM="
)
# The example of an earlier c2sp.org/signed-note revision.
FOO_VKEY = "example.com/foo+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k"
FOO_TEXT = b"This is an example message.\n"
FOO_SIG = (
    "Uw2QOkn8srV1yJGh2VYRlL1Tnagv1YEq6TfXppzi2ONncAlTgK7Ztg1ERYNZXsYjOBH3mFXmRKuwHjG1Yu72IneyaQM="
)
# A real checkpoint served by https://sum.golang.org/latest (2024-09-23) and the Go checksum
# database key that cmd/go ships (src/cmd/go/internal/modfetch/key.go).
SUMDB_VKEY = "sum.golang.org+033de0ae+Ac4zctda0e5eza+HJyk9SxEdh+s3Ux18htTTAD8OuAn8"
SUMDB_NOTE = (
    "go.sum database tree\n30055305\nmXfgRcJ0bG0j3CPdKwgGWtUzBUbX67saZGRmFuJGGsM=\n\n"
    "\u2014 sum.golang.org Az3grpgEild5qw7+5dtV13Kf1C2Xurm8q4fhdxvcsDHnqNTaxL2AFjBY+2TyGKevucFcAA"
    "lWFJJYle3EJlDCrQ+y3A8=\n"
).encode()

ORIGIN = "meshmint.example/ledger"
TEST_KEY = Ed25519PrivateKey.from_private_bytes(
    hashlib.sha256(b"meshmint checkpoint test key").digest()
)
RFC_LEAVES = [bytes.fromhex(h) for h in ("", "00", "10", "2021", "3031")]
# Our own known answer (also the module docstring's example): catches any drift in the format.
KNOWN_NOTE = (
    "meshmint.example/ledger\n5\nTju7H3tHjc/nH7YxYxUZo7yhLJrvyhYSv85ME6hiZNQ=\n\n"
    "\u2014 meshmint.example/ledger aUdNH+SsSG+BgNimX82+Lhc86kNLU/IeFmxy//Wcr/S80eqkvOg5UkqTI++zh7"
    "VpvdIWhyatG/oY8yaPcrlmuymYqgo=\n"
).encode()
KNOWN_VKEY = "meshmint.example/ledger+69474d1f+AQFzVHBDVcVKLMAsxaSzZFF1ZBv5qtAwkLUPquNbmHbZ"


def signer(name: str = ORIGIN, seed: bytes = b"") -> CheckpointSigner:
    key = (
        TEST_KEY
        if not seed
        else Ed25519PrivateKey.from_private_bytes(hashlib.sha256(seed).digest())
    )
    return CheckpointSigner(name, key)


def sign_text(text: bytes, by: CheckpointSigner | None = None) -> bytes:
    """A note over arbitrary text, validly signed: isolates body parsing from signatures."""
    by = by or signer()
    return text + b"\n" + _signature_line(by.name, by.key_id, by._private_key, text)


def sample(size: int = 7) -> Checkpoint:
    return Checkpoint(ORIGIN, size, hashlib.sha256(b"root %d" % size).digest())


def test_go_signed_note_vectors() -> None:
    seed = base64.b64decode(PETER_SKEY.split("+", 4)[4])[1:]
    peter = CheckpointSigner("PeterNeumann", Ed25519PrivateKey.from_private_bytes(seed))
    assert peter.verifier_key == PETER_VKEY
    assert peter.key_id.hex() == "c74f20a3"
    line = _signature_line(peter.name, peter.key_id, peter._private_key, PETER_TEXT)
    assert line == f"\u2014 PeterNeumann {PETER_SIG}\n".encode()
    for vkey, text, sig in ((PETER_VKEY, PETER_TEXT, PETER_SIG), (FOO_VKEY, FOO_TEXT, FOO_SIG)):
        verifier = parse_verifier_key(vkey)
        assert verifier.vkey == vkey
        raw = base64.b64decode(sig)
        assert raw[:4] == verifier.key_id
        assert verifier.verify(text, raw[4:])
        assert not verifier.verify(text.replace(b".", b"!"), raw[4:])
        assert not verifier.verify(text, raw[4:-1])


def test_real_sum_golang_org_checkpoint() -> None:
    sumdb = parse_verifier_key(SUMDB_VKEY)
    checkpoint = parse_signed_checkpoint(SUMDB_NOTE, sumdb, origin="go.sum database tree")
    assert checkpoint.size == 30055305
    assert checkpoint.root_hash == base64.b64decode("mXfgRcJ0bG0j3CPdKwgGWtUzBUbX67saZGRmFuJGGsM=")
    assert checkpoint.body() + b"\n" == SUMDB_NOTE[: len(checkpoint.body()) + 1]
    with pytest.raises(CheckpointError, match="bad signature"):
        parse_signed_checkpoint(SUMDB_NOTE.replace(b"30055305", b"30055306"), sumdb)
    with pytest.raises(CheckpointError, match="origin"):
        parse_signed_checkpoint(SUMDB_NOTE, sumdb, origin="sum.golang.org")


def test_known_answer_note() -> None:
    head = Checkpoint(ORIGIN, 5, root([leaf_hash(d) for d in RFC_LEAVES]))
    assert signer().sign(head) == KNOWN_NOTE
    assert signer().verifier_key == KNOWN_VKEY
    assert parse_signed_checkpoint(KNOWN_NOTE, parse_verifier_key(KNOWN_VKEY)) == head


@settings(max_examples=60, deadline=None)
@given(
    origin=st.text(
        st.characters(min_codepoint=0x20, exclude_characters="\n", codec="utf-8"), min_size=1
    ),
    size=st.integers(0, 2**64 - 1),
    root_hash=st.binary(min_size=32, max_size=32),
    extensions=st.lists(
        st.text(st.characters(min_codepoint=0x21, codec="utf-8"), min_size=1), max_size=2
    ),
)
def test_sign_parse_round_trip(
    origin: str, size: int, root_hash: bytes, extensions: list[str]
) -> None:
    checkpoint = Checkpoint(origin, size, root_hash, tuple(extensions))
    note = signer().sign(checkpoint)
    assert note.startswith(checkpoint.body() + b"\n\xe2\x80\x94 " + ORIGIN.encode() + b" ")
    assert parse_signed_checkpoint(note, signer().verifier, origin=origin) == checkpoint


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_any_single_byte_change_is_rejected(data: st.DataObject) -> None:
    note = signer().sign(sample())
    position = data.draw(st.integers(0, len(note) - 1))
    flip = data.draw(st.integers(1, 255))
    tampered = note[:position] + bytes([note[position] ^ flip]) + note[position + 1 :]
    with pytest.raises(CheckpointError):
        parse_signed_checkpoint(tampered, signer().verifier)


def test_tampered_body_signature_or_key_name_is_rejected() -> None:
    note = signer().sign(sample(7))
    v = signer().verifier
    cases = {
        "bad signature": note.replace(b"\n7\n", b"\n8\n"),
        "no signature from a known key": note.replace(ORIGIN.encode() + b" ", b"other.example "),
    }
    for expected, tampered in cases.items():
        with pytest.raises(CheckpointError, match=expected):
            parse_signed_checkpoint(tampered, v)
    sig = base64.b64decode(note.rsplit(b" ", 1)[1])
    forged = bytes(sig[:4]) + bytes(64)  # right key id, garbage signature
    bad = note.rsplit(b" ", 1)[0] + b" " + base64.b64encode(forged) + b"\n"
    with pytest.raises(CheckpointError, match="bad signature"):
        parse_signed_checkpoint(bad, v)
    with pytest.raises(CheckpointError, match="no signature from a known key"):
        parse_signed_checkpoint(note, signer(seed=b"someone else").verifier)


def test_cosignatures_rotation_and_unknown_keys() -> None:
    old, new = signer(), signer(seed=b"rotated key")
    witness = signer("witness.example", seed=b"witness")
    assert old.key_id != new.key_id  # same name, new key: a distinct (name, key id)
    checkpoint = sample(9)
    note = old.sign(checkpoint)
    cosigned = note + new.sign(checkpoint)[len(checkpoint.body()) + 1 :]
    cosigned += witness.sign(checkpoint)[len(checkpoint.body()) + 1 :]
    opened = open_signed_checkpoint(cosigned, [old.verifier])
    assert opened.checkpoint == checkpoint and opened.verified_by == (old.verifier,)
    assert [(s.name, s.key_id) for s in opened.unverified] == [
        (ORIGIN, new.key_id),
        ("witness.example", witness.key_id),
    ]
    assert all(isinstance(s, NoteSignature) and len(s.signature) == 64 for s in opened.unverified)
    both = [old.verifier, new.verifier]
    assert open_signed_checkpoint(cosigned, both).verified_by == tuple(both)
    # After the switch, clients holding both keys accept new notes and still read old ones.
    assert parse_signed_checkpoint(new.sign(checkpoint), both) == checkpoint
    assert parse_signed_checkpoint(note, both) == checkpoint
    with pytest.raises(CheckpointError, match="no signature from a known key"):
        parse_signed_checkpoint(new.sign(checkpoint), old.verifier)
    # A known key whose signature fails spoils the note even when another known key verifies.
    line = new.sign(sample(10))[len(sample(10).body()) + 1 :]
    with pytest.raises(CheckpointError, match="bad signature"):
        parse_signed_checkpoint(note + line, both)
    with pytest.raises(CheckpointError, match="two signatures"):
        parse_signed_checkpoint(note + note[len(checkpoint.body()) + 1 :], both)
    impostor = Verifier(ORIGIN, bytes(32))
    with pytest.raises(CheckpointError, match="two verifiers"):
        object.__setattr__(impostor, "key_id", old.key_id)
        parse_signed_checkpoint(note, [old.verifier, impostor])


def test_verifier_key_round_trip_and_rejects() -> None:
    public = TEST_KEY.public_key()
    vkey = verifier_key(ORIGIN, public)
    assert vkey == KNOWN_VKEY
    parsed = parse_verifier_key(vkey)
    assert parsed == signer().verifier and parsed.vkey == vkey
    name, key_id, material = vkey.split("+", 2)
    assert parse_verifier_key(f"{name}+{key_id.upper()}+{material}") == parsed
    raw = base64.b64decode(material)

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    bad = [
        "",
        name,
        f"{name}+{key_id}",
        f"{name}+00000000+{material}",  # wrong id
        f"{name}+{key_id[:-1]}+{material}",
        f"{name}+{key_id}0+{material}",
        f"{name}+{key_id}+{material[:-1]}",
        f"{name}+{key_id}+{material}=",
        f"{name}+{key_id}+{b64(bytes([2]) + raw[1:])}",  # not Ed25519
        f"{name}+{key_id}+{b64(raw[:-1])}",
        f"{name}+{key_id}+{b64(raw + b'x')}",
        f"+{key_id}+{material}",
        f"bad name+{key_id}+{material}",
        f"{name}\u00a0+{key_id}+{material}",
        f"{name}+0x{key_id[2:]}+{material}",
        f"\ud800+{key_id}+{material}",
    ]
    for text in bad:
        with pytest.raises(CheckpointError):
            parse_verifier_key(text)


def _body(*lines: str) -> bytes:
    return "".join(line + "\n" for line in lines).encode()


ROOT_B64 = base64.b64encode(bytes(32)).decode()
BAD_BODIES = {
    "leading zero": _body(ORIGIN, "05", ROOT_B64),
    "plus sign": _body(ORIGIN, "+5", ROOT_B64),
    "trailing space on size": _body(ORIGIN, "5 ", ROOT_B64),
    "leading space on size": _body(ORIGIN, " 5", ROOT_B64),
    "unicode digit": _body(ORIGIN, "\uff15", ROOT_B64),
    "negative": _body(ORIGIN, "-1", ROOT_B64),
    "2^64": _body(ORIGIN, str(2**64), ROOT_B64),
    "5000 digits": _body(ORIGIN, "9" * 5000, ROOT_B64),
    "hex size": _body(ORIGIN, "0x5", ROOT_B64),
    "trailing space on root": _body(ORIGIN, "5", ROOT_B64 + " "),
    "root 31 bytes": _body(ORIGIN, "5", base64.b64encode(bytes(31)).decode()),
    "root 33 bytes": _body(ORIGIN, "5", base64.b64encode(bytes(33)).decode()),
    "root unpadded": _body(ORIGIN, "5", ROOT_B64.rstrip("=")),
    "root urlsafe": _body(ORIGIN, "5", base64.urlsafe_b64encode(b"\xff" * 32).decode()),
    "root noncanonical": _body(ORIGIN, "5", ROOT_B64[:-2] + "B="),
    "two lines": _body(ORIGIN, "5"),
    "empty origin": _body("", "5", ROOT_B64),
    "empty extension": _body(ORIGIN, "5", ROOT_B64, "ext", "", "ext"),
    "crlf": f"{ORIGIN}\r\n5\r\n{ROOT_B64}\r\n".encode(),
}


@pytest.mark.parametrize("body", BAD_BODIES.values(), ids=BAD_BODIES.keys())
def test_malformed_bodies_are_rejected_even_when_signed(body: bytes) -> None:
    with pytest.raises(CheckpointError):
        parse_signed_checkpoint(sign_text(body), signer().verifier)


GOOD = signer().sign(sample())
BODY, _, SIG_LINE = GOOD.partition(b"\n\n")
BAD_NOTES = {
    "no blank line": BODY + b"\n" + SIG_LINE,
    "two blank lines": BODY + b"\n\n\n" + SIG_LINE,
    "no final newline": GOOD[:-1],
    "no signature": BODY + b"\n\n",
    "only a body": BODY + b"\n",
    "ascii hyphen": GOOD.replace("\u2014".encode(), b"-"),
    "double space": GOOD.replace(b"\xe2\x80\x94 ", b"\xe2\x80\x94  "),
    "space after name": GOOD.replace(ORIGIN.encode() + b" ", ORIGIN.encode() + b"  "),
    "trailing space": GOOD[:-1] + b" \n",
    "tab": GOOD.replace(ORIGIN.encode() + b" ", ORIGIN.encode() + b"\t"),
    "nul": GOOD.replace(b"ledger\n", b"ledger\x00\n", 1),
    "bad utf-8": GOOD.replace(b"\xe2\x80\x94", b"\xe2\x80"),
    "bad base64": GOOD.replace(b"=\n", b"*\n"),
    "short signature": BODY + b"\n\n\xe2\x80\x94 " + ORIGIN.encode() + b" AAAA\n",
    "empty signature": BODY + b"\n\n\xe2\x80\x94 " + ORIGIN.encode() + b" \n",
    "plus in name": GOOD.replace(ORIGIN.encode() + b" ", b"a+b "),
    "huge": GOOD + SIG_LINE.replace(ORIGIN.encode(), b"x" * MAX_NOTE_SIZE),
    "101 signatures": GOOD
    + b"".join(
        sign_text(BODY, signer(f"w{i}.example", seed=b"%d" % i))[len(BODY) + 1 :]
        for i in range(100)
    ),
    "not bytes": GOOD.decode(),
}


@pytest.mark.parametrize("note", BAD_NOTES.values(), ids=BAD_NOTES.keys())
def test_malformed_notes_are_rejected(note: bytes) -> None:
    assert parse_signed_checkpoint(GOOD, signer().verifier) == sample()
    with pytest.raises(CheckpointError):
        parse_signed_checkpoint(note, signer().verifier)


NOTE_ALPHABET = st.sampled_from(
    ["\n", " ", "\u2014", "+", "/", "=", "0", "5", "A", "a", "\u00a0", "\x00", ORIGIN, ROOT_B64]
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=300), st.lists(NOTE_ALPHABET, max_size=40).map("".join)))
def test_garbage_only_ever_raises_checkpoint_error(junk: bytes | str) -> None:
    note = junk.encode() if isinstance(junk, str) else junk
    for candidate in (note, GOOD + note, BODY + b"\n\n" + note, note + b"\n" + SIG_LINE):
        with contextlib.suppress(CheckpointError):
            parse_signed_checkpoint(candidate, signer().verifier)


@pytest.mark.parametrize(
    ("origin", "size", "root_hash"),
    [
        ("", 1, bytes(32)),
        ("a\nb", 1, bytes(32)),
        ("a\rb", 1, bytes(32)),
        (ORIGIN, -1, bytes(32)),
        (ORIGIN, 2**64, bytes(32)),
        (ORIGIN, True, bytes(32)),
        (ORIGIN, 1, bytes(31)),
        (ORIGIN, 1, "0" * 32),
        ("\ud800", 1, bytes(32)),  # a lone surrogate has no UTF-8 encoding
    ],
)
def test_checkpoint_rejects_invalid_fields(origin: str, size: int, root_hash: bytes) -> None:
    with pytest.raises(CheckpointError):
        Checkpoint(origin, size, root_hash)


def test_largest_size_and_extensions_round_trip() -> None:
    checkpoint = Checkpoint(ORIGIN, 2**64 - 1, bytes(32), ("ext one", "ext two"))
    note = signer().sign(checkpoint)
    assert b"\n18446744073709551615\n" in note and b"\next two\n\n" in note
    assert parse_signed_checkpoint(note, [signer().verifier]) == checkpoint
    with pytest.raises(CheckpointError):
        Checkpoint(ORIGIN, 1, bytes(32), ("",))
