"""Writing a ledger dump: everything an offline audit needs, from the database, in one file.

The format is ``ledger.audit_source``'s (``write_dump``); ``meshmint-ledger audit --dump FILE``
reads it. Balances and checkpoints are read first and the entries after, so the dump holds at
least every entry those two refer to.
"""

from __future__ import annotations

from typing import BinaryIO

import asyncpg

from ledger.audit_source import OperatorKey, frame, write_dump
from ledger.interface import LedgerError
from ledger.log_reader import MAX_PAGE, LogReader
from ledger.public import PublishedLedger


class DumpError(LedgerError, ValueError):
    """The database holds no signed ledger to dump."""


async def dump_ledger(pool: asyncpg.Pool[asyncpg.Record], out: BinaryIO) -> int:
    """Writes the whole ledger to ``out``, streaming entries a page at a time; returns how many."""
    signer = await pool.fetchrow(
        "SELECT origin, verifier_key FROM ledger_signers ORDER BY first_used DESC LIMIT 1"
    )
    if signer is None:
        raise DumpError("no checkpoint signer is recorded: has a coordinator ever run here?")
    key = OperatorKey(origin=signer["origin"], verifier_key=signer["verifier_key"])
    published = PublishedLedger(pool, origin=key.origin, verifier_key=key.verifier_key)
    snapshot = await published.balances()
    reader = LogReader(pool)
    notes: list[bytes] = []
    while True:
        start = int(notes[-1].split(b"\n")[1]) + 1 if notes else 0
        page = await reader.checkpoints(start, MAX_PAGE)
        notes += [stored.note for stored in page]
        if len(page) < MAX_PAGE:
            break
    size = (await reader.head()).size
    # The header first (with the count), then the entries' frames page by page.
    write_dump(
        out,
        key=key,
        balances=snapshot.balances,
        balances_size=snapshot.size,
        checkpoints=notes,
        entries=(),
        entry_count=size,
    )
    written = 0
    for start in range(0, size, MAX_PAGE):
        page_entries = await reader.entries(start, min(MAX_PAGE, size - start))
        out.write(b"".join(frame(entry) for entry in page_entries))
        written += len(page_entries)
    return written
