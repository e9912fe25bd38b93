"""Starting and stopping a whole coordinator: database, ledger, gRPC gateway, HTTP API."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

from aiohttp import web

from coordinator.billing.job_log import JobLog
from coordinator.billing.keys import KeyStore
from coordinator.billing.limits import (
    LocalRateLimits,
    RateLimits,
    drop_spend_reservations,
)
from coordinator.billing.receipts import LedgerReceipts
from coordinator.billing.shared_limits import SharedRateLimits
from coordinator.billing.usage import UsageService
from coordinator.catalog import Catalog, catalog_from_specs, load_catalog
from coordinator.config import CatalogSource, CoordinatorConfig, join_host_port
from coordinator.dispatch.dispatcher import Dispatcher
from coordinator.dispatch.privacy import VettedMiners
from coordinator.dispatch.registry import MinerRegistry
from coordinator.dispatch.router import Router, trust_from_record
from coordinator.gateway.listener import listening
from coordinator.gateway.servicer import MinerGateway
from coordinator.http.app import create_app
from coordinator.http.ledger_routes import add_ledger_routes
from coordinator.http.usage_routes import add_usage_routes
from coordinator.ops.metrics import CoordinatorMetrics
from coordinator.ops.miner_snapshot import MinerSnapshots, delete_replica_miners
from coordinator.replicas.lease import ReplicaLease
from coordinator.replicas.mesh import MeshConfig, ReplicaMesh
from coordinator.request_saga import miner_account
from coordinator.service import MarketplaceService
from coordinator.tls import ServerTls
from coordinator.verification.checker import SpotChecker
from coordinator.verification.penalties import Penalties
from coordinator.verification.scoring import Scoring
from coordinator.verification.trust import TrustStore
from coordinator.worker import Worker
from ledger.checkpoint import CheckpointSigner
from ledger.checkpointer import Checkpointer, CheckpointerConfig
from ledger.database import connect
from ledger.keyfile import load_or_create_key
from ledger.postgres import PostgresLedger
from ledger.public import PublishedLedger

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunningCoordinator:
    """Handles on a started coordinator (tests and the demo use the ports and stores)."""

    http_port: int  # where buyers connect
    grpc_port: int  # where miners connect
    catalog: Catalog  # models on sale
    ledger: PostgresLedger  # balances
    keys: KeyStore  # API keys
    registry: MinerRegistry  # connected miners
    service: MarketplaceService  # what the HTTP layer calls
    checker: SpotChecker  # spot checks of finished jobs
    trust: TrustStore  # what spot checks found, per identity
    tls: ServerTls  # the listeners' certificates; reload() rotates them (SIGHUP)
    # Set when another replica swept this one's lease (it was paused too long): its holds were
    # released under it, so it must stop (the CLI drains and exits).
    lease_lost: asyncio.Event


def build_catalog(source: CatalogSource) -> Catalog:
    if source.catalog_file is not None:
        return load_catalog(source.catalog_file)
    return catalog_from_specs(
        source.model_specs,
        input_price_per_mtok=source.input_price_per_mtok,
        output_price_per_mtok=source.output_price_per_mtok,
    )


@asynccontextmanager
async def run_coordinator(config: CoordinatorConfig) -> AsyncIterator[RunningCoordinator]:
    """Runs a coordinator until the block exits, then shuts it down gracefully."""
    # First: a bad certificate file should fail the start before the database spins up.
    tls = await asyncio.to_thread(ServerTls.load, config.tls)
    catalog = await asyncio.to_thread(build_catalog, config.catalog)
    # Each resource is registered as it starts: a start that fails half-way tears down what
    # already runs, in reverse order, and so does the normal shutdown.
    async with AsyncExitStack() as stack:
        pool = await stack.enter_async_context(
            connect(database_url=config.database_url, data_dir=config.data_dir)
        )
        ledger = await PostgresLedger.create(pool)
        stack.push_async_callback(ledger.aclose)
        signing_key, created = load_or_create_key(
            config.signing_key_path, what="ledger signing key"
        )
        if created:
            logger.info("created a ledger signing key in %s", config.signing_key_path)
        signer = CheckpointSigner(config.ledger_origin, signing_key)
        keys = await KeyStore.create(pool)
        job_log = await JobLog.create(pool)
        stack.push_async_callback(job_log.aclose)
        # Entered before the listeners, so it ends after them: what this replica owns (its
        # holds, its miners' rows, its spend reservations) is cleaned up once nothing uses it.
        lease = ReplicaLease(pool, config.lease, replica_id=config.replica_id)
        lease.add_cleanup("ledger holds", functools.partial(_release_holds, ledger))
        lease.add_cleanup("miner snapshot", functools.partial(delete_replica_miners, pool))
        lease.add_cleanup("spend reservations", functools.partial(drop_spend_reservations, pool))
        await stack.enter_async_context(lease)
        limits: RateLimits = LocalRateLimits(config.limits)
        if config.replicated:  # the replicas' buckets agree: they are rows, not memory
            shared = await SharedRateLimits.create(pool, config.limits)
            await stack.enter_async_context(shared.running())
            limits = shared
        registry = MinerRegistry()
        metrics = CoordinatorMetrics(
            miner_counts=lambda: {name: len(registry.serving(name)) for name in catalog.names()}
        )
        trust = await TrustStore.create(pool)
        vetted = await VettedMiners.create(pool)
        router = Router(trust=lambda miner_id: trust_from_record(trust.get(miner_id)))
        dispatcher = Dispatcher(config.dispatch, registry=registry, router=router, metrics=metrics)
        checker = SpotChecker(
            config.verification,
            catalog=catalog,
            trust=trust,
            scoring=Scoring(
                registry=registry,
                is_banned=trust.is_banned,
                timeout_s=config.verification.score_timeout_s,
                is_vetted=vetted.is_vetted,
            ),
            penalties=Penalties(
                config.verification,
                catalog=catalog,
                ledger=ledger,
                trust=trust,
                registry=registry,
                metrics=metrics,
            ),
            metrics=metrics,
        )
        receipts = LedgerReceipts(
            pool, registry=registry, origin=config.ledger_origin, verifier_key=signer.verifier_key
        )
        service = MarketplaceService(
            config.billing,
            catalog=catalog,
            keys=keys,
            ledger=ledger,
            registry=registry,
            dispatcher=dispatcher,
            job_log=job_log,
            on_credit=receipts.credited,
            metrics=metrics,
            limits=limits,
            on_finished=checker.submit,
            is_vetted=vetted.is_vetted,
            hold_first=config.replicated,
            replica_id=lease.replica_id,
        )
        # Unwound after the listeners stop and before the lease ends: a settlement still running
        # keeps its hold until it has closed it.
        stack.push_async_callback(service.settled)
        if config.nats_url is not None:
            await stack.enter_async_context(
                ReplicaMesh.running(
                    MeshConfig(
                        nats_url=config.nats_url,
                        replica_id=config.replica_id,
                        score_timeout_s=config.verification.score_timeout_s,
                    ),
                    registry=registry,
                )
            )

        async def open_miner_account(worker: Worker) -> None:
            await ledger.open_account(miner_account(worker.miner_id))

        gateway = MinerGateway(
            config.gateway,
            catalog=catalog,
            registry=registry,
            on_welcome=open_miner_account,
            receipts=receipts,
            is_banned=trust.is_banned,
        )
        grpc_port = await stack.enter_async_context(
            listening(
                gateway,
                address=join_host_port(config.grpc_host, config.grpc_port),
                credentials=tls.grpc_credentials,
                registry=registry,
            )
        )
        app = create_app(service, max_body_bytes=config.max_body_bytes, metrics=metrics)
        published = PublishedLedger(
            pool, origin=config.ledger_origin, verifier_key=signer.verifier_key
        )
        add_ledger_routes(app, published)
        add_usage_routes(
            app, auth=service, usage=UsageService(pool, keys=keys, ledger=ledger, jobs=job_log)
        )
        access_logger = logging.getLogger("aiohttp.access") if config.access_log else None
        runner = web.AppRunner(app, access_log=access_logger)
        checkpoints = Checkpointer.running(
            pool,
            signer,
            CheckpointerConfig(
                config.ledger_origin,
                config.checkpoint_interval_s,
                allow_key_rotation=config.rotate_ledger_key,
            ),
            # Replicas: one signs, the others stand by and take over when it dies.
            standby=config.replicated,
        )
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        site = web.TCPSite(runner, config.http_host, config.http_port, ssl_context=tls.http_context)
        await site.start()
        http_port = int(runner.addresses[0][1])
        stack.callback(logger.info, "coordinator shutting down")
        snapshots = MinerSnapshots(
            pool, registry=registry, interval_s=2.0, replica_id=lease.replica_id
        )
        for running in (
            keys.watching(),  # authentications served from memory, revocations heard at once
            vetted.watching(),  # `miners vet`/`unvet` from any process, heard at once
            checkpoints,
            receipts.running(),
            checker.running(),
            snapshots.running(),
            *([trust.watching()] if config.replicated else []),  # bans by other replicas
        ):
            await stack.enter_async_context(running)
        # Fenced now: no other coordinator runs, so open holds belong to dead requests.
        if not config.replicated:
            # Fenced now: no other coordinator runs, so whatever another one left is a dead
            # run's (also holds from before holds named their replica).
            await lease.sweep(everyone_else=True)
            await _release_holds(ledger, None)
        logger.info(
            "coordinator ready: %s on %s:%d, miners on %s:%d (%s), models %s, ledger key %s",
            tls.http_scheme.upper(),
            config.http_host,
            http_port,
            config.grpc_host,
            grpc_port,
            tls.grpc_transport,
            sorted(catalog.names()),
            signer.verifier_key,
        )
        yield RunningCoordinator(
            http_port=http_port,
            grpc_port=grpc_port,
            catalog=catalog,
            ledger=ledger,
            keys=keys,
            registry=registry,
            service=service,
            checker=checker,
            trust=trust,
            tls=tls,
            lease_lost=lease.lost,
        )


async def _release_holds(ledger: PostgresLedger, replica_id: str | None) -> int:
    """Releases the open holds a dead replica (or, None, a coordinator before replicas) left."""
    released = await ledger.release_open_holds(holder=replica_id)
    if released:
        owner = f" (replica {replica_id})" if replica_id else ""
        logger.warning("released %d holds left open by a previous run%s", released, owner)
    return released
