"""The coordinator's half: real ledger, real checkpointer, real LedgerReceipts, and the miner's
real witness on the other end of a MinerSession (no gRPC: the session's outbox is pumped to the
witness, the witness's messages go through ``MinerSession.deliver``)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator.billing.receipts import CreditedJob, LedgerReceipts, ReceiptConfig
from coordinator.dispatch.registry import MinerRegistry
from coordinator.gateway.session import MinerSession
from ledger.checkpoint import CheckpointSigner
from ledger.checkpointer import Checkpointer, CheckpointerConfig
from ledger.interface import AccountKind, AccountRef
from ledger.log_reader import StoredCheckpoint
from ledger.merkle import leaf_hash, verify_inclusion
from ledger.postgres import PostgresLedger
from miner.identity import Identity
from miner.witness import Witness, WitnessLink
from miner.witness_store import WitnessStore
from proto import miner_pb2
from proto.limits import PROTOCOL_VERSION

ORIGIN = "receipts.test/ledger"
BUYER = AccountRef(AccountKind.BUYER, "key_buyer")
WAIT_S = 10.0


@dataclass
class Market:
    ledger: PostgresLedger
    receipts: LedgerReceipts
    registry: MinerRegistry
    signer: CheckpointSigner
    pool: asyncpg.Pool[asyncpg.Record]

    def session(self, identity: Identity) -> MinerSession:
        hello = miner_pb2.Hello(protocol_version=PROTOCOL_VERSION, public_key=identity.public_key)
        session = MinerSession(
            hello,
            miner_id=identity.miner_id,
            vocab_sizes={},
            witness_desk=self.receipts,
        )
        self.registry.add(session)
        return session

    def welcome(self) -> miner_pb2.Welcome:
        return miner_pb2.Welcome(
            ledger_origin=ORIGIN, ledger_verifier_key=self.receipts.verifier_key
        )

    async def pay(self, miner_id: str, job_id: str, *, credit: int, fee: int) -> int:
        """Holds, settles and hands the credit over as the service does; returns the hold id."""
        hold = await self.ledger.hold(BUYER, credit + fee + 5, reference=bytes(32))
        miner = AccountRef(AccountKind.MINER, miner_id)
        await self.ledger.open_account(miner)
        await self.ledger.settle(
            hold,
            miner=miner,
            miner_credit=credit,
            fee=fee,
            reference=hashlib.sha256(job_id.encode()).digest(),
        )
        self.receipts.credited(CreditedJob(job_id, miner_id, hold.hold_id))
        return hold.hold_id


@pytest.fixture
async def market(db_pool: asyncpg.Pool[asyncpg.Record]) -> AsyncIterator[Market]:
    ledger = await PostgresLedger.create(db_pool)
    await ledger.open_account(BUYER)
    await ledger.mint(BUYER, 1_000_000)
    signer = CheckpointSigner(ORIGIN, Ed25519PrivateKey.generate())
    registry = MinerRegistry()
    receipts = LedgerReceipts(
        db_pool,
        registry=registry,
        origin=ORIGIN,
        verifier_key=signer.verifier_key,
        config=ReceiptConfig(poll_interval_s=0.02),
    )
    checkpointer = Checkpointer.running(db_pool, signer, CheckpointerConfig(ORIGIN, 0.05))
    async with checkpointer, receipts.running():
        yield Market(ledger, receipts, registry, signer, db_pool)
    await ledger.aclose()


@contextlib.asynccontextmanager
async def witnessing(
    market: Market, session: MinerSession, directory: Path, miner_id: str
) -> AsyncIterator[WitnessLink]:
    """The miner's witness, wired to ``session`` in both directions."""
    witness = Witness(WitnessStore.open(directory), miner_id=miner_id, proof_timeout_s=5.0)

    def to_coordinator(message: miner_pb2.MinerMessage) -> None:
        assert session.deliver(message) is None

    link = witness.attach(market.welcome(), to_coordinator)
    assert link is not None

    async def pump() -> None:
        while (message := await session.outbox.get()) is not None:
            link.handle(message)

    pumping = asyncio.create_task(pump())
    try:
        yield link
    finally:
        pumping.cancel()
        await link.aclose()


async def eventually(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(WAIT_S):
        while True:
            if condition():
                return
            await asyncio.sleep(0.02)


async def stored_count(directory: Path, count: int) -> None:
    path = directory / "receipts.jsonl"
    await eventually(lambda: path.exists() and len(path.read_text().splitlines()) >= count)


async def test_credits_arrive_as_receipts_that_verify_and_add_up(
    market: Market, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    identity = Identity.generate()
    session = market.session(identity)
    directory = tmp_path / "witness"
    with caplog.at_level(logging.WARNING):
        async with witnessing(market, session, directory, identity.miner_id) as link:
            for number, credit in enumerate((600, 250, 1234)):
                await market.pay(identity.miner_id, f"job-{number}", credit=credit, fee=40)
                await stored_count(directory, number + 1)
                await asyncio.wait_for(link.drained(), WAIT_S)
    store = WitnessStore.open(directory)
    records = [record for record in store.records() if not isinstance(record, str)]
    assert [r.job_id for r in records] == ["job-0", "job-1", "job-2"]
    balance = await market.ledger.balance(AccountRef(AccountKind.MINER, identity.miner_id))
    assert sum(r.amount for r in records) == balance == 600 + 250 + 1234
    # The pinned checkpoint advanced through verified consistency proofs to the last receipt's.
    assert store.pinned is not None and store.pinned.checkpoint.size == records[-1].tree_size
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_an_offline_miner_gets_no_receipt_and_nothing_waits_for_it(
    market: Market, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="coordinator.billing.receipts"):
        await market.pay("ab" * 32, "job-gone", credit=100, fee=5)
        await eventually(lambda: any("offline" in r.getMessage() for r in caplog.records))
    assert market.receipts._pending == []


async def test_a_witness_alarm_is_logged_critical(
    market: Market, caplog: pytest.LogCaptureFixture
) -> None:
    session = market.session(Identity.generate())
    alarm = miner_pb2.WitnessAlarm(message="roots differ", old_checkpoint=b"a", new_checkpoint=b"b")
    with caplog.at_level(logging.CRITICAL, logger="coordinator.billing.receipts"):
        assert session.deliver(miner_pb2.MinerMessage(witness_alarm=alarm)) is None
    [record] = caplog.records
    assert record.levelno == logging.CRITICAL and "roots differ" in record.getMessage()


async def test_consistency_requests_are_answered_and_impossible_ones_refused(
    market: Market,
) -> None:
    session = market.session(Identity.generate())
    for number in range(5):
        await market.pay("cd" * 32, f"job-{number}", credit=10, fee=1)
    head = await market.pool.fetchval("SELECT size FROM ledger_head")
    for old, new in ((3, head), (head, head + 1)):
        request = miner_pb2.ConsistencyRequest(old_size=old, new_size=new)
        assert session.deliver(miner_pb2.MinerMessage(consistency_request=request)) is None
        message = await asyncio.wait_for(session.outbox.get(), WAIT_S)
        assert message is not None
        proof = message.consistency_proof
        assert (proof.old_size, proof.new_size) == (old, new)
        if new <= head:
            assert proof.hashes and not proof.error
        else:
            assert "beyond the log" in proof.error and not proof.hashes


async def test_a_round_of_receipts_costs_the_same_queries_for_one_job_or_many(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    statements: list[str] = []

    async def init(conn: asyncpg.Connection[asyncpg.Record]) -> None:
        conn.add_query_logger(lambda logged: statements.append(logged.query))

    # One connection, so the warm-up round leaves no cold one (asyncpg introspects types on a
    # connection's first use of them, which would count as queries).
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1, init=init)
    try:
        ledger = await PostgresLedger.create(pool)
        await ledger.open_account(BUYER)
        await ledger.mint(BUYER, 1_000_000)
        signer = CheckpointSigner(ORIGIN, Ed25519PrivateKey.generate())
        checkpointer = Checkpointer(pool, signer, CheckpointerConfig(ORIGIN))
        registry = MinerRegistry()
        receipts = LedgerReceipts(
            pool, registry=registry, origin=ORIGIN, verifier_key=signer.verifier_key
        )
        market = Market(ledger, receipts, registry, signer, pool)
        identities = [Identity.generate() for _ in range(3)]
        sessions = {identity.miner_id: market.session(identity) for identity in identities}
        miners = list(sessions)
        offline = "ef" * 32

        async def round_of(jobs: list[tuple[str, str]]) -> tuple[int, StoredCheckpoint]:
            await asyncio.gather(
                *(
                    market.pay(miner, job, credit=10 + n, fee=1)
                    for n, (miner, job) in enumerate(jobs)
                )
            )
            checkpoint = await checkpointer.checkpoint()
            assert checkpoint is not None
            await asyncio.sleep(0)  # asyncpg logs each query from a call_soon callback
            before = len(statements)
            await receipts._send_ready()  # the loop's step, without its polling
            await asyncio.sleep(0)
            return len(statements) - before, checkpoint

        alone = [(miners[0], "job-alone")]
        crowd = [(miners[n % 3], f"job-{n}") for n in range(60)] + [(offline, "job-offline")]
        with caplog.at_level(logging.INFO, logger="coordinator.billing.receipts"):
            _, warm_up = await round_of([(miners[1], "job-warm-up")])
            one, first = await round_of(alone)
            many, second = await round_of(crowd)
        assert one == many
        assert receipts._pending == []
        assert [r.getMessage() for r in caplog.records if "offline" in r.getMessage()] == [
            f"miner {offline[:12]} is offline: no receipt for job job-offline"
        ]
        checkpoints = {c.size: c for c in (warm_up, first, second)}
        delivered: dict[str, str] = {}
        for miner, session in sessions.items():
            while not session.outbox.empty():
                message = session.outbox.get_nowait()
                assert message is not None and message.WhichOneof("body") == "credit_receipt"
                receipt = message.credit_receipt
                checkpoint = checkpoints[receipt.tree_size]
                assert receipt.checkpoint == checkpoint.note
                assert receipt.index < checkpoint.size
                assert verify_inclusion(
                    leaf_hash(receipt.entry),
                    receipt.index,
                    receipt.tree_size,
                    list(receipt.inclusion_proof),
                    checkpoint.root,
                )
                delivered[receipt.job_id] = miner
        paid = [(miners[1], "job-warm-up"), *alone, *crowd]
        assert delivered == {job: miner for miner, job in paid if miner != offline}
        await ledger.aclose()
    finally:
        await pool.close()
