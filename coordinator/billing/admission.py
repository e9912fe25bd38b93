"""Admitting requests against buyers' balances in memory, so the durable hold is off the path.

A request may cost up to its maximum (prompt plus max_tokens). The ledger's hold moves that much
into escrow in a durable transaction (about 5 ms here): waiting for it before dispatching the
job would put that commit in every request's time to first token. Instead the coordinator
admits the request against its own estimate of what the buyer can still spend, dispatches the
job, places the durable hold once the first delta was delivered (so a request that found no
miner or delivered nothing writes nothing to the ledger, and the commit's work on the event loop
never delays the first token), and settles against the hold once it committed.

The estimate per buyer account: the balance the ledger last reported, minus the maximum cost of
every request admitted since whose hold has not committed yet (``pending``), minus what
committed holds took since that read. Concretely, ``available`` is decreased by a request's
maximum at admission and increased by the unused part when it finishes. It is exact because one
coordinator process places every hold (a second single coordinator on the same database refuses
to start: docs/ledger.md; replicas do not use this estimate, they place the hold before
dispatch: ``SagaParts.hold_first``); money arriving from elsewhere (``credits add``, refunds)
only makes it low, and a request the estimate refuses re-reads the balance before it is refused.
A balance read that overlaps a settlement cannot tell whether the returned part is in it, so
that settlement marks the estimate stale instead of adding to it, and the next request reads
again. So:

- a buyer is never refused for want of credits it has;
- a buyer can never spend more than it has: the durable hold is still the authority (the
  ledger refuses to take a balance below zero), and a hold that fails anyway (the database is
  down, or a bug) ends the stream with an error, and nothing is billed for it.

The cost of that last case is what the buyer received before the failed hold was noticed
(the tokens of a few milliseconds), paid by nobody: the price of not waiting for a commit.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from coordinator.errors import CoordinatorError
from ledger.interface import AccountRef

logger = logging.getLogger(__name__)

MAX_ACCOUNTS = 100_000
"""Estimates kept; beyond it, idle accounts' are dropped and re-read at their next request."""


class CreditsShortError(CoordinatorError):
    """The buyer cannot cover a request's maximum cost; ``available`` is what it can."""

    def __init__(self, available: int) -> None:
        super().__init__(f"available {available}")
        self.available = available


@dataclass
class _Account:
    available: int  # the estimate: what the buyer can still commit to new requests
    pending: int = 0  # maximum costs admitted whose durable hold has not committed yet
    in_flight: int = 0  # admitted requests not finished yet
    commits: int = 0  # holds that committed so far: a balance read that saw one change re-reads
    reads: int = 0  # balance reads so far: a settlement in flight across one is ambiguous
    stale: bool = False  # a hold failed, so the estimate was wrong: read the balance again


@dataclass(frozen=True, eq=False)  # by identity: two requests may admit the same amount
class Admission:
    """One admitted request; hand it back to :meth:`CreditGuard.finished` exactly once."""

    account: AccountRef  # the buyer's ledger account
    amount: int  # the request's maximum cost, micro-units


class CreditGuard:
    """What each buyer can still spend, kept in memory; see the module docstring."""

    def __init__(
        self,
        read_balance: Callable[[AccountRef], Awaitable[int]],
        *,
        max_accounts: int = MAX_ACCOUNTS,
    ) -> None:
        """``read_balance``: the ledger's balance of an account (holds already deducted)."""
        self._read_balance = read_balance
        self._max_accounts = max_accounts
        self._accounts: dict[AccountRef, _Account] = {}
        self._lock = asyncio.Lock()  # one balance read at a time: reads and admissions interleave
        # Admissions whose hold is being settled or released, with their account's read count
        # when that began (see finished()).
        self._settling: dict[Admission, int] = {}

    async def available(self, account: AccountRef) -> int:
        """What the account can commit to a new request now, from a fresh read of its balance.

        For sizing a request by the balance (no max_tokens): the estimate may be low after money
        arrived from elsewhere, and a request sized by it would be cut short for no reason.
        """
        return (await self._refresh(account)).available

    async def admit(self, account: AccountRef, amount: int) -> Admission:
        """Takes ``amount`` from the estimate, reading the balance first when it looks short.

        Raises :class:`CreditsShortError` when even the balance just read cannot cover it.
        """
        state = self._accounts.get(account)
        if state is None or state.stale or state.available < amount:
            state = await self._refresh(account)
            if state.available < amount:
                raise CreditsShortError(state.available)
        state.available -= amount
        state.pending += amount
        state.in_flight += 1
        return Admission(account, amount)

    def held(self, admission: Admission) -> None:
        """The request's durable hold committed: the ledger's balance now reflects it."""
        state = self._accounts.get(admission.account)
        if state is not None:
            state.pending -= admission.amount
            state.commits += 1

    def settling(self, admission: Admission) -> None:
        """The request's hold is about to be settled or released in the ledger; call
        :meth:`finished` once that is over."""
        state = self._accounts.get(admission.account)
        if state is not None:
            self._settling[admission] = state.reads

    def cancel(self, admission: Admission) -> None:
        """The request ended before its durable hold was placed: all of it is free again."""
        state = self._accounts.get(admission.account)
        if state is None:
            return
        state.in_flight -= 1
        state.pending -= admission.amount
        state.available += admission.amount

    def finished(self, admission: Admission, *, charged: int, held: bool) -> None:
        """The request is over: ``charged`` of its maximum was billed, the rest is free again.

        ``held`` False: its durable hold never committed (refused or failed); the estimate was
        wrong, so it is dropped and the next request reads the balance again.
        """
        reads_before = self._settling.pop(admission, None)
        state = self._accounts.get(admission.account)
        if state is None:
            return
        state.in_flight -= 1
        if held and reads_before is not None and reads_before != state.reads:
            # A balance read ran while the ledger settled: it may already count the unused part
            # (adding it again would admit beyond the balance) or not. Read again instead.
            state.stale = True
        elif held:
            state.available += admission.amount - charged
        else:
            state.pending -= admission.amount
            state.stale = True
        # A stale estimate stays in place (its next request reads the balance first): dropping
        # it here could orphan the very object a concurrent read is about to fill in, and the
        # request admitted from that read would then be missing from the estimate that replaces
        # it. Idle estimates are dropped only under the read lock (_evict_idle).

    async def _refresh(self, account: AccountRef) -> _Account:
        async with self._lock:
            state = self._accounts.get(account)
            if state is None:
                self._evict_idle()
                state = self._accounts[account] = _Account(available=0, stale=True)
            while True:
                # A hold that commits during the read may or may not be in the balance read;
                # read again rather than count it twice or not at all.
                commits = state.commits
                balance = await self._read_balance(account)
                if state.commits == commits:
                    break
            # Holds that committed are in the balance; the ones still pending are not.
            state.available = balance - state.pending
            state.stale = False
            state.reads += 1
            logger.debug("balance of %s read: %d, available %d", account, balance, state.available)
            return state

    def _evict_idle(self) -> None:
        if len(self._accounts) < self._max_accounts:
            return
        idle = [account for account, state in self._accounts.items() if state.in_flight == 0]
        for account in idle[: max(1, len(idle) // 2)]:
            del self._accounts[account]
