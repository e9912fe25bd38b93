"""Where an audit's data comes from: a coordinator's public endpoints, or a database dump file.

Both sources hand ``ledger.audit.audit`` an ``AuditInput`` whose entries are streamed, plus the
operator's published key (which an auditor should pin rather than take from the operator).
Failures to get the data -- unreachable, HTTP errors, malformed responses, a corrupt file --
raise ``AuditSourceError``: the audit could not be done, which is not a finding. Entries that
arrive but do not decode are passed on as they are: those *are* findings.

Entry framing, shared by the entries endpoint and the dump: each entry is a u32 big-endian
length followed by that many bytes of canonical entry encoding (``ledger/entry.py``).

Dump file format (``write_dump`` writes it; streamable, no SQL in it)::

    b"meshmint-ledger-dump 1\\n"         magic line, with the format version
    u32 length, then that many bytes of UTF-8 JSON, the header:
        {"origin": str, "verifier_key": str,
         "entries": int,                  how many entry frames the writer meant to write
         "balances": {"kind:owner": int}, published balances (AccountRef spelling), micro-units
         "balances_size": int,            the log size those balances were read at
         "checkpoints": [str, ...]}       signed checkpoint notes, in size order
    entry frames, in seq order, to the end of the file

Exceptions::

    LedgerError (ledger.interface, where the whole tree is)
    └── AuditSourceError    the data to audit could not be fetched or read
"""

from __future__ import annotations

import json
import logging
import ssl
import struct
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Protocol

from ledger.audit import AuditInput
from ledger.interface import LedgerError

logger = logging.getLogger(__name__)

# The coordinator's public auditor endpoints, all GET, relative to its base URL: the one place to
# change them. Responses are JSON unless noted.
KEY_PATH = "/ledger/key"  # {"origin": str, "verifier_key": str}
BALANCES_PATH = "/ledger/balances"  # {"balances": {"kind:owner": int}, "size": int}
CHECKPOINTS_PATH = "/ledger/checkpoints"  # ?start=N&limit=M (sizes >= N) -> {"checkpoints": [note]}
LATEST_CHECKPOINT_PATH = "/ledger/checkpoint"  # the latest signed note, text/plain
ENTRIES_PATH = "/ledger/entries"  # ?start=N&limit=M (N: seq) -> octet-stream of entry frames
ENTRIES_PAGE = 10_000  # entries asked for per request
CHECKPOINTS_PAGE = 1_000  # checkpoints asked for per request

DUMP_MAGIC = b"meshmint-ledger-dump 1\n"
MAX_FRAME = 1 << 20  # bytes; a valid entry is under 1.5 KiB, so a bigger frame is corruption
MAX_DOCUMENT = 256 << 20  # bytes of one JSON response or dump header
MAX_ENTRIES_BODY = 64 << 20  # bytes of one page of entries
READ_CHUNK = 1 << 20  # bytes read from a dump file at a time
_U32 = struct.Struct(">I")


class AuditSourceError(LedgerError):
    """The data to audit could not be fetched or read."""


@dataclass(frozen=True)
class OperatorKey:
    """The log's name and checkpoint key, as the operator publishes them."""

    origin: str  # the checkpoints' first line
    verifier_key: str  # signed-note verifier key, ``<name>+<key id>+<base64>``


class AuditSource(Protocol):
    """What the CLI audits: ``with`` it, read ``key()``, then ``audit_input()`` once."""

    @property
    def description(self) -> str: ...

    def key(self) -> OperatorKey: ...

    def audit_input(self) -> AuditInput: ...

    def __enter__(self) -> AuditSource: ...

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...


def frame(entry: bytes) -> bytes:
    """One entry as it travels: u32 big-endian length, then the bytes."""
    return _U32.pack(len(entry)) + entry


def split_frames(buffer: bytes, *, at: int = 0) -> tuple[list[bytes], int]:
    """The complete frames in ``buffer`` from ``at``, and where the first incomplete one starts."""
    entries: list[bytes] = []
    end = len(buffer)
    while end - at >= 4:
        (length,) = _U32.unpack_from(buffer, at)
        if length > MAX_FRAME:
            raise AuditSourceError(f"an entry frame claims {length} bytes; at most {MAX_FRAME}")
        if end - at - 4 < length:
            break
        entries.append(buffer[at + 4 : at + 4 + length])
        at += 4 + length
    return entries, at


def _document(raw: bytes, what: str) -> dict[str, object]:
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AuditSourceError(f"{what} is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise AuditSourceError(f"{what} is not a JSON object")
    return value


def _field(document: Mapping[str, object], name: str, kind: type, what: str) -> object:
    value = document.get(name)
    # bool is an int to Python but never a size or an amount.
    if not isinstance(value, kind) or isinstance(value, bool):
        raise AuditSourceError(f"{what}: {name!r} is missing or not a {kind.__name__}")
    if isinstance(value, int) and value < 0:
        raise AuditSourceError(f"{what}: {name!r} is negative")
    return value


def _key(document: Mapping[str, object], what: str) -> OperatorKey:
    origin = _field(document, "origin", str, what)
    verifier_key = _field(document, "verifier_key", str, what)
    assert isinstance(origin, str) and isinstance(verifier_key, str)
    return OperatorKey(origin, verifier_key)


def _balances(document: Mapping[str, object], what: str) -> dict[str, int]:
    raw = _field(document, "balances", dict, what)
    assert isinstance(raw, dict)
    for name, amount in raw.items():
        if type(amount) is not int:
            raise AuditSourceError(f"{what}: the balance of {name!r} is not an integer")
    return raw


def _notes(values: object, what: str) -> list[bytes]:
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise AuditSourceError(f"{what}: checkpoints are not a list of strings")
    return [v.encode("utf-8") for v in values]


def _note_size(note: bytes) -> int:
    """The tree size a note claims, unverified (0 if it has none): how far to download."""
    lines = note.split(b"\n", 2)
    return int(lines[1]) if len(lines) > 2 and lines[1].isdigit() and len(lines[1]) < 21 else 0


class HttpAuditSource:
    """A coordinator's public auditor endpoints (see the ``*_PATH`` constants).

    Reads are synchronous (urllib); the next page of entries downloads in a thread while the
    auditor checks the current one. Snapshot order: balances first, then checkpoints, so the
    entries fetched -- up to the bigger of the balances' size and the latest checkpoint's --
    cover both.
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float = 30.0,
        page_size: int = ENTRIES_PAGE,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """``ssl_context`` verifies an ``https://`` coordinator (e.g. one trusting a private
        CA); None: the system's trust store."""
        if "://" not in base_url:
            base_url = "http://" + base_url
        self._base = base_url.rstrip("/")
        self._timeout_s = timeout_s
        self._ssl_context = ssl_context
        self._page_size = page_size
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit-download")

    @property
    def description(self) -> str:
        return self._base

    def __enter__(self) -> HttpAuditSource:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _get(self, path: str, *, max_bytes: int = MAX_DOCUMENT, **query: int) -> bytes:
        url = self._base + path + ("?" + urllib.parse.urlencode(query) if query else "")
        logger.debug("GET %s", url)
        try:
            with urllib.request.urlopen(
                url, timeout=self._timeout_s, context=self._ssl_context
            ) as response:
                body: bytes = response.read(max_bytes + 1)
        except urllib.error.HTTPError as exc:
            raise AuditSourceError(f"GET {url}: HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise AuditSourceError(f"GET {url}: {reason}") from None
        if len(body) > max_bytes:
            raise AuditSourceError(f"GET {url}: response larger than {max_bytes} bytes")
        return body

    def _json(self, path: str, **query: int) -> dict[str, object]:
        return _document(self._get(path, **query), f"GET {path}")

    def key(self) -> OperatorKey:
        return _key(self._json(KEY_PATH), f"GET {KEY_PATH}")

    def audit_input(self) -> AuditInput:
        published = self._json(BALANCES_PATH)
        balances = _balances(published, f"GET {BALANCES_PATH}")
        balances_size = _field(published, "size", int, f"GET {BALANCES_PATH}")
        assert isinstance(balances_size, int)
        notes: list[bytes] = []
        while True:
            # Pages are keyed by tree size: the next page starts after the last size seen.
            start = _note_size(notes[-1]) + 1 if notes else 0
            page = self._json(CHECKPOINTS_PATH, start=start, limit=CHECKPOINTS_PAGE)
            got = _notes(page.get("checkpoints"), f"GET {CHECKPOINTS_PATH}")
            notes += got
            if len(got) < CHECKPOINTS_PAGE:
                break
        latest = self._get(LATEST_CHECKPOINT_PATH)
        if latest not in notes:
            notes.append(latest)
        target = max([balances_size, *(_note_size(note) for note in notes)])
        logger.info("auditing %s: %d entries, %d checkpoints", self._base, target, len(notes))
        return AuditInput(
            entries=self._entries(target),
            checkpoints=notes,
            balances=balances,
            balances_size=balances_size,
            claimed_size=target,
        )

    def _page(self, start: int, count: int) -> list[bytes]:
        body = self._get(ENTRIES_PATH, max_bytes=MAX_ENTRIES_BODY, start=start, limit=count)
        entries, used = split_frames(body)
        if used != len(body):
            raise AuditSourceError(f"GET {ENTRIES_PATH}?start={start}: a frame is cut short")
        return entries

    def _entries(self, target: int) -> Iterator[bytes]:
        start = 0
        ahead: Future[list[bytes]] | None = None
        while start < target:
            count = min(self._page_size, target - start)
            if ahead is None:
                ahead = self._pool.submit(self._page, start, count)
            page = ahead.result()[:count]
            ahead = None
            if not page:
                return  # the log ends here: the audit reports what is missing
            start += len(page)
            if len(page) == count and start < target:
                # Fetch the next page while this one is audited (a short page means the server
                # pages differently, so the next start is only known now).
                ahead = self._pool.submit(self._page, start, min(self._page_size, target - start))
            yield from page


class DumpAuditSource:
    """A dump file in the format of the module docstring, read in one streaming pass."""

    def __init__(self, path: Path | str) -> None:
        self._path = Path(path)
        self._file: BinaryIO | None = None
        self._header: dict[str, object] | None = None

    @property
    def description(self) -> str:
        return str(self._path)

    def __enter__(self) -> DumpAuditSource:
        try:
            self._file = self._path.open("rb")
        except OSError as exc:
            raise AuditSourceError(f"cannot open {self._path}: {exc.strerror or exc}") from None
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _read(self, count: int) -> bytes:
        if self._file is None:
            raise RuntimeError("use DumpAuditSource in a with statement")
        try:
            return self._file.read(count)
        except OSError as exc:
            raise AuditSourceError(f"cannot read {self._path}: {exc.strerror or exc}") from None

    def _read_header(self) -> dict[str, object]:
        if self._header is None:
            if self._read(len(DUMP_MAGIC)) != DUMP_MAGIC:
                raise AuditSourceError(f"{self._path} is not a meshmint ledger dump (version 1)")
            head = self._read(4)
            length = _U32.unpack(head)[0] if len(head) == 4 else MAX_DOCUMENT + 1
            raw = self._read(length) if length <= MAX_DOCUMENT else b""
            if len(raw) != length:
                raise AuditSourceError(f"{self._path}: the dump header is cut short or too big")
            self._header = _document(raw, f"{self._path} header")
        return self._header

    def key(self) -> OperatorKey:
        return _key(self._read_header(), f"{self._path} header")

    def audit_input(self) -> AuditInput:
        header, what = self._read_header(), f"{self._path} header"
        balances_size = _field(header, "balances_size", int, what)
        claimed = _field(header, "entries", int, what)
        assert isinstance(balances_size, int) and isinstance(claimed, int)
        return AuditInput(
            entries=self._entries(),
            checkpoints=_notes(header.get("checkpoints"), what),
            balances=_balances(header, what),
            balances_size=balances_size,
            claimed_size=claimed,
        )

    def _entries(self) -> Iterator[bytes]:
        buffer, at = b"", 0
        while chunk := self._read(READ_CHUNK):
            buffer = buffer[at:] + chunk
            entries, at = split_frames(buffer)
            yield from entries
        if at != len(buffer):
            raise AuditSourceError(f"{self._path} ends inside an entry frame")


def write_dump(
    out: BinaryIO,
    *,
    key: OperatorKey,
    balances: Mapping[str, int],
    balances_size: int,
    checkpoints: Sequence[bytes],
    entries: Iterable[bytes],
    entry_count: int,
) -> int:
    """Write a dump (module docstring format) of ``entries`` in seq order; returns how many.

    Take the balances and checkpoints first, then stream the entries up to at least the bigger
    of ``balances_size`` and the latest checkpoint's size.
    """
    header = json.dumps(
        {
            "origin": key.origin,
            "verifier_key": key.verifier_key,
            "entries": entry_count,
            "balances": dict(balances),
            "balances_size": balances_size,
            "checkpoints": [note.decode("utf-8") for note in checkpoints],
        },
        separators=(",", ":"),
    ).encode("utf-8")
    out.write(DUMP_MAGIC + frame(header))
    written = 0
    batch: list[bytes] = []
    for entry in entries:
        batch.append(frame(entry))
        written += 1
        if len(batch) >= 4096:
            out.write(b"".join(batch))
            batch.clear()
    out.write(b"".join(batch))
    return written
