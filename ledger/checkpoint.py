"""C2SP checkpoints (c2sp.org/tlog-checkpoint) as Ed25519 signed notes (c2sp.org/signed-note).

Standalone: only the standard library and ``cryptography``, no I/O; third parties can copy this
file with ``merkle.py`` to check the ledger's tree heads (out of the package, CheckpointError
derives from a stand-in for ``ledger.interface.LedgerError``).

A checkpoint commits to the log's Merkle tree at one size. Its *body* (the note text) is::

    <origin>\\n<tree size, decimal, no leading zeros>\\n<root hash, standard base64>\\n

optionally followed by non-empty extension lines (accepted when parsing, never added by this
module). The signed note is the body, a blank line, then one line per signature::

    — <key name> <base64(4-byte key ID ‖ 64-byte Ed25519 signature of the body)>\\n

with an EM DASH (U+2014) and single spaces. For example, the first five RFC 6962 test leaves
signed with the test key whose 32-byte seed is SHA-256("meshmint checkpoint test key")::

    meshmint.example/ledger
    5
    Tju7H3tHjc/nH7YxYxUZo7yhLJrvyhYSv85ME6hiZNQ=

    — meshmint.example/ledger aUdNH+SsSG+BgNimX82+Lhc86kNLU/IeFmxy//Wcr/S80eqkvOg5UkqTI++zh7VpvdIWhyatG/oY8yaPcrlmuymYqgo=

verified with the verifier key ``meshmint.example/ledger+69474d1f+AQFzVHBDVcVKLMAsxaSzZFF1ZBv5qtAwkLUPquNbmHbZ``.

The key ID is ``SHA-256(key name ‖ 0x0A ‖ 0x01 ‖ 32-byte public key)[:4]`` and the verifier key
that clients configure is ``<name>+<key ID as 8 hex digits>+<base64(0x01 ‖ public key)>``.
Parsing is strict: valid UTF-8, no control characters but newline, canonical base64, single
spaces, at most ``MAX_NOTE_SIZE`` bytes and ``MAX_SIGNATURES`` signature lines. Signatures from
unknown keys are ignored (they may be witness cosignatures); a known key's signature that fails
rejects the whole note; a note with no verified signature from a known key is rejected.

Key rotation: a new key gets a new key ID even under the same name (keeping the key name equal
to the origin is recommended; a new name such as ``<origin>/2`` also works). Publish the new
verifier key next to the old one and give clients an overlap period to configure both (they
pass both ``Verifier``s to ``parse_signed_checkpoint``, which accepts a note signed by either);
only then sign new checkpoints with the new key. Keep publishing the old verifier key: the
checkpoints it signed stay verifiable with it, and the new tree must stay consistent with them.
"""  # noqa: E501 - the example note and key are single lines

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

try:
    from ledger.interface import LedgerError
except ImportError:  # pragma: no cover - this file copied out of meshmint, as it may be

    class LedgerError(Exception):  # type: ignore[no-redef]
        """Stands in for ledger.interface.LedgerError, the root of the ledger's errors."""


MAX_NOTE_SIZE = 1 << 20  # bytes; a checkpoint is ~150 bytes, cosignatures add ~100 each
MAX_SIGNATURES = 100  # signature lines per note; the spec asks verifiers to accept >= 16
MAX_TREE_SIZE = 2**64 - 1  # RFC 9162 tree sizes are uint64
HASH_SIZE = 32  # SHA-256 root hash

_ED25519_TYPE = b"\x01"  # signed-note signature type identifier for Ed25519
_KEY_ID_SIZE = 4
_SIGNATURE_SIZE = 64  # Ed25519
_SIG_PREFIX = "\u2014 "  # EM DASH, space
_DECIMAL = re.compile(r"0|[1-9][0-9]{0,19}")  # ASCII only; 20 digits already exceed uint64
_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f]")  # control characters other than newline


class CheckpointError(LedgerError, ValueError):
    """A note, checkpoint or verifier key is malformed, unsigned, or signed by the wrong key."""


def _b64decode(text: str, what: str) -> bytes:
    """Standard base64 with padding, in its one canonical spelling."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise CheckpointError(f"{what} is not valid base64") from exc
    # b64decode ignores nonzero padding bits; re-encoding rejects such malleable spellings.
    if base64.b64encode(raw).decode("ascii") != text:
        raise CheckpointError(f"{what} is not canonical base64")
    return raw


def _check_key_name(name: str) -> None:
    # Non-empty, no Unicode spaces (they separate the fields of a signature line), no '+' (it
    # separates those of a verifier key), and no control characters (none are allowed in notes).
    if not name or "+" in name or any(ch.isspace() or ch < " " for ch in name):
        raise CheckpointError(f"invalid key name {name!r}")
    _check_utf8(name)


def _check_utf8(text: str) -> None:
    # A str may hold lone surrogates, which no UTF-8 note can carry.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise CheckpointError(f"{text!r} is not encodable as UTF-8") from exc


def ed25519_key_id(name: str, public_key: bytes) -> bytes:
    """SHA-256(name ‖ 0x0A ‖ 0x01 ‖ public key)[:4], per signed-note."""
    digest = hashlib.sha256(name.encode("utf-8") + b"\n" + _ED25519_TYPE + public_key).digest()
    return digest[:_KEY_ID_SIZE]


def _raw_public_key(public_key: Ed25519PublicKey | bytes) -> bytes:
    if isinstance(public_key, Ed25519PublicKey):
        return public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return bytes(public_key)


@dataclass(frozen=True)
class Verifier:
    """A trusted Ed25519 note key: its name, raw public key, and derived 4-byte key ID."""

    name: str  # the key name on signature lines; by convention the log's origin
    public_key: bytes  # the raw 32-byte Ed25519 public key
    key_id: bytes = field(init=False)  # SHA-256(name ‖ 0x0A ‖ 0x01 ‖ public_key)[:4]
    _key: Ed25519PublicKey = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_key_name(self.name)
        if not isinstance(self.public_key, bytes) or len(self.public_key) != 32:
            raise CheckpointError("an Ed25519 public key is 32 bytes")
        try:
            key = Ed25519PublicKey.from_public_bytes(self.public_key)
        except ValueError as exc:
            raise CheckpointError("not an Ed25519 public key") from exc
        object.__setattr__(self, "key_id", ed25519_key_id(self.name, self.public_key))
        object.__setattr__(self, "_key", key)

    @property
    def vkey(self) -> str:
        """This key in verifier-key form, ``<name>+<hex key ID>+<base64(0x01 ‖ key)>``."""
        material = base64.b64encode(_ED25519_TYPE + self.public_key).decode("ascii")
        return f"{self.name}+{self.key_id.hex()}+{material}"

    def verify(self, text: bytes, signature: bytes) -> bool:
        """Whether ``signature`` (64 bytes, without the key ID) signs the note ``text``."""
        if len(signature) != _SIGNATURE_SIZE:
            return False
        try:
            self._key.verify(signature, text)
        except InvalidSignature:
            return False
        return True


def verifier_key(name: str, public_key: Ed25519PublicKey | bytes) -> str:
    """The verifier key string clients configure, e.g. ``log.example+1a2b3c4d+AQ...``."""
    return Verifier(name, _raw_public_key(public_key)).vkey


def parse_verifier_key(text: str) -> Verifier:
    """Inverse of ``verifier_key``; raises CheckpointError for anything else."""
    # The base64 part may itself contain '+', so split at the first two only.
    parts = text.split("+", 2)
    if len(parts) != 3:
        raise CheckpointError("a verifier key is <name>+<key id>+<base64 key>")
    name, key_id_hex, material = parts
    if len(key_id_hex) != 2 * _KEY_ID_SIZE or not re.fullmatch(r"[0-9a-fA-F]+", key_id_hex):
        raise CheckpointError("the key id of a verifier key is 8 hex digits")
    raw = _b64decode(material, "verifier key")
    if len(raw) != 33 or raw[:1] != _ED25519_TYPE:
        raise CheckpointError("only Ed25519 verifier keys (type 0x01, 32 bytes) are supported")
    verifier = Verifier(name, raw[1:])
    if verifier.key_id != bytes.fromhex(key_id_hex):
        raise CheckpointError("the verifier key's id does not match its name and key")
    return verifier


@dataclass(frozen=True)
class Checkpoint:
    """A log's tree head: its identity, size and RFC 6962 root hash."""

    origin: str  # unique name of the log, first line of the body; not empty, no newline
    size: int  # number of leaves, 0..2^64-1
    root_hash: bytes  # RFC 6962 root of those leaves, 32 bytes
    extensions: tuple[str, ...] = ()  # opaque non-empty lines after the root; parsed, not made

    def __post_init__(self) -> None:
        for line in (self.origin, *self.extensions):
            if not isinstance(line, str) or not line or "\n" in line or _CONTROL.search(line):
                raise CheckpointError(f"invalid checkpoint line {line!r}")
            _check_utf8(line)
        if type(self.size) is not int or not 0 <= self.size <= MAX_TREE_SIZE:
            raise CheckpointError(f"tree size {self.size!r} is not in 0..2^64-1")
        if not isinstance(self.root_hash, bytes) or len(self.root_hash) != HASH_SIZE:
            raise CheckpointError("the root hash is 32 bytes")

    def body(self) -> bytes:
        """The note text that is signed."""
        root = base64.b64encode(self.root_hash).decode("ascii")
        lines = (self.origin, str(self.size), root, *self.extensions)
        return "".join(line + "\n" for line in lines).encode("utf-8")


def _parse_body(text: str) -> Checkpoint:
    """The checkpoint in a (verified) note text."""
    if not text.endswith("\n"):
        raise CheckpointError("a checkpoint ends with a newline")
    lines = text[:-1].split("\n")
    if len(lines) < 3 or not all(lines):
        raise CheckpointError("a checkpoint is at least three non-empty lines")
    origin, size_text, root_text, *extensions = lines
    if not _DECIMAL.fullmatch(size_text):
        raise CheckpointError(f"tree size {size_text!r} is not a canonical decimal")
    return Checkpoint(origin, int(size_text), _b64decode(root_text, "root hash"), tuple(extensions))


@dataclass(frozen=True)
class NoteSignature:
    """A signature line whose key was not among the verifiers (a cosigner, a rotated key)."""

    name: str  # key name on the line
    key_id: bytes  # the 4-byte key ID it claims
    signature: bytes  # the rest of the decoded signature, unverified


@dataclass(frozen=True)
class OpenedCheckpoint:
    """What ``open_signed_checkpoint`` found in a note."""

    checkpoint: Checkpoint  # the verified body
    verified_by: tuple[Verifier, ...]  # every known key whose signature checked out
    unverified: tuple[NoteSignature, ...]  # signatures from keys not given, in note order


def _signature_line(name: str, key_id: bytes, private_key: Ed25519PrivateKey, text: bytes) -> bytes:
    signature = base64.b64encode(key_id + private_key.sign(text)).decode("ascii")
    return f"{_SIG_PREFIX}{name} {signature}\n".encode()


class CheckpointSigner:
    """Signs checkpoints with one Ed25519 key under one key name.

    Signs whatever it is given: never hand it two checkpoints that are inconsistent with each
    other (check ``merkle.verify_consistency`` against the last signed one first).
    """

    def __init__(self, name: str, private_key: Ed25519PrivateKey) -> None:
        self._private_key = private_key
        self._verifier = Verifier(name, _raw_public_key(private_key.public_key()))

    @property
    def name(self) -> str:
        return self._verifier.name

    @property
    def key_id(self) -> bytes:
        """The 4-byte key ID that prefixes each signature."""
        return self._verifier.key_id

    @property
    def verifier(self) -> Verifier:
        return self._verifier

    @property
    def verifier_key(self) -> str:
        """What to publish so that clients can verify this signer's checkpoints."""
        return self._verifier.vkey

    def sign(self, checkpoint: Checkpoint) -> bytes:
        """The signed note: body, blank line, one signature line."""
        body = checkpoint.body()
        return body + b"\n" + _signature_line(self.name, self.key_id, self._private_key, body)


def _split_note(note: bytes) -> tuple[str, list[tuple[str, bytes, bytes]]]:
    """(text, [(key name, key ID, signature)]) of a structurally valid signed note."""
    if not isinstance(note, bytes):
        raise CheckpointError("a signed note is bytes")
    if len(note) > MAX_NOTE_SIZE:
        raise CheckpointError(f"a signed note is at most {MAX_NOTE_SIZE} bytes")
    try:
        decoded = note.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointError("a signed note is UTF-8") from exc
    if _CONTROL.search(decoded):
        raise CheckpointError("a signed note has no control characters but newline")
    # The text ends at the last blank line; the text itself may contain blank lines.
    split = decoded.rfind("\n\n")
    if split < 0:
        raise CheckpointError("a signed note has a blank line before its signatures")
    text, block = decoded[: split + 1], decoded[split + 2 :]
    if not block.endswith("\n"):
        raise CheckpointError("a signed note ends with a signature line and a newline")
    lines = block[:-1].split("\n")
    if len(lines) > MAX_SIGNATURES:
        raise CheckpointError(f"a signed note has at most {MAX_SIGNATURES} signatures")
    signatures = []
    for line in lines:
        if not line.startswith(_SIG_PREFIX):
            raise CheckpointError("a signature line starts with an em dash and a space")
        fields = line[len(_SIG_PREFIX) :].split(" ")
        if len(fields) != 2:
            raise CheckpointError("a signature line is '— <name> <base64>'")
        name, encoded = fields
        _check_key_name(name)
        raw = _b64decode(encoded, "signature")
        if len(raw) <= _KEY_ID_SIZE:
            raise CheckpointError("a signature is a key ID and at least one byte")
        signatures.append((name, raw[:_KEY_ID_SIZE], raw[_KEY_ID_SIZE:]))
    return text, signatures


def open_signed_checkpoint(
    note: bytes, verifiers: Verifier | Sequence[Verifier], *, origin: str | None = None
) -> OpenedCheckpoint:
    """Verify and parse a signed checkpoint, keeping the signatures of unknown keys.

    ``verifiers`` are the trusted keys (several during a key rotation); ``origin``, when given,
    must equal the checkpoint's. Raises CheckpointError for a malformed note, a failing
    signature from a known key, no signature from a known key, or a bad checkpoint body.
    """
    known: dict[tuple[str, bytes], Verifier] = {}
    for verifier in (verifiers,) if isinstance(verifiers, Verifier) else verifiers:
        if not isinstance(verifier, Verifier):
            raise TypeError(f"expected Verifier objects, got {type(verifier).__name__}")
        key = (verifier.name, verifier.key_id)
        if known.get(key, verifier) != verifier:
            raise CheckpointError(f"two verifiers share name and key id {key!r}")
        known[key] = verifier
    text, signatures = _split_note(note)
    signed = text.encode("utf-8")
    seen: set[tuple[str, bytes]] = set()
    verified: list[Verifier] = []
    unverified: list[NoteSignature] = []
    for name, key_id, signature in signatures:
        if (name, key_id) in seen:
            raise CheckpointError(f"two signatures from key {name} {key_id.hex()}")
        seen.add((name, key_id))
        trusted = known.get((name, key_id))
        if trusted is None:
            unverified.append(NoteSignature(name, key_id, signature))
        elif trusted.verify(signed, signature):
            verified.append(trusted)
        else:
            raise CheckpointError(f"bad signature from key {name} {key_id.hex()}")
    if not verified:
        raise CheckpointError("no signature from a known key")
    checkpoint = _parse_body(text)
    if origin is not None and checkpoint.origin != origin:
        raise CheckpointError(f"checkpoint origin {checkpoint.origin!r}, expected {origin!r}")
    return OpenedCheckpoint(checkpoint, tuple(verified), tuple(unverified))


def parse_signed_checkpoint(
    note: bytes, verifiers: Verifier | Sequence[Verifier], *, origin: str | None = None
) -> Checkpoint:
    """The checkpoint of a note signed by one of ``verifiers``; see ``open_signed_checkpoint``."""
    return open_signed_checkpoint(note, verifiers, origin=origin).checkpoint
