"""The miner daemon: stays connected to the coordinator and serves its jobs until shut down.

It dials out (miners sit behind home routers), reconnects with capped exponential backoff and
full jitter whenever the connection ends, and stops for good only on :meth:`MinerDaemon.shutdown`
(after draining) or on a refusal that retrying cannot fix (:class:`MinerRefusedError`).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging
import random
from collections.abc import Sequence

from miner.config import MinerConfig, parse_coordinator
from miner.engine.base import Engine
from miner.errors import ConnectionLostError, TlsHandshakeError
from miner.hardware import detect_hardware
from miner.identity import Identity
from miner.session import Session
from miner.tls import FailureLog, channel_credentials
from miner.witness import Witness
from miner.witness_store import WitnessStore
from proto import miner_pb2
from proto.limits import PROTOCOL_VERSION

logger = logging.getLogger(__name__)


def software_version() -> str:
    """The installed meshmint version, announced in Hello."""
    try:
        return importlib.metadata.version("meshmint")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def backoff_delay(
    attempt: int, *, minimum: float, maximum: float, rng: random.Random | None = None
) -> float:
    """Full-jitter delay before reconnect ``attempt`` (0-based): uniform in [0, cap]."""
    cap = min(maximum, minimum * 2 ** min(attempt, 32))
    return (rng or random).uniform(0, cap)


class MinerDaemon:
    """Serves ``engines`` to the coordinator in ``config``. Call :meth:`run` once."""

    def __init__(
        self,
        config: MinerConfig,
        *,
        identity: Identity,
        engines: Sequence[Engine],
        hardware: miner_pb2.Hardware | None = None,
    ) -> None:
        """``hardware`` defaults to :func:`detect_hardware` on the first engine's device."""
        self._config = config
        self._identity = identity
        self._engines = {engine.info.name: engine for engine in engines}
        if len(self._engines) != len(engines):
            raise ValueError("two engines serve the same model name")
        if not self._engines:
            raise ValueError("a miner needs at least one engine")
        self._hardware = hardware
        self._stopping = asyncio.Event()
        self._started = False

    @property
    def identity(self) -> Identity:
        """The key this miner signs with."""
        return self._identity

    @property
    def stopping(self) -> bool:
        """True once :meth:`shutdown` was called."""
        return self._stopping.is_set()

    def shutdown(self) -> None:
        """Asks :meth:`run` to drain and return. Call it from the event loop's thread."""
        if not self._stopping.is_set():
            logger.info("shutting down: finishing jobs in flight, taking no new ones")
        self._stopping.set()

    def hello(self) -> miner_pb2.Hello:
        """The Hello this miner opens every connection with."""
        if self._hardware is None:
            first = next(iter(self._engines.values()))
            self._hardware = detect_hardware(first.info.device)
        models = [
            miner_pb2.ServedModel(
                name=engine.info.name,
                weights_sha256=engine.info.weights_sha256,
                dtype=engine.info.dtype,
                engine=engine.info.engine,
            )
            for engine in self._engines.values()
        ]
        return miner_pb2.Hello(
            protocol_version=PROTOCOL_VERSION,
            public_key=self._identity.public_key,
            software_version=software_version(),
            hardware=self._hardware,
            models=models,
            max_concurrency=self._config.max_concurrency,
            data_retention=miner_pb2.DATA_RETENTION_RETAINS
            if self._config.retains_data
            else miner_pb2.DATA_RETENTION_NONE,
        )

    async def run(self) -> None:
        """Serves until shutdown; raises :class:`MinerRefusedError` on a permanent refusal."""
        if self._started:
            raise RuntimeError("MinerDaemon.run() may be called only once")
        self._started = True
        hello = await asyncio.to_thread(self.hello)
        witness: Witness | None = None
        if self._config.witness_dir is not None:
            # Raises WitnessError when the stored checkpoint is damaged: better not to start.
            store = await asyncio.to_thread(WitnessStore.open, self._config.witness_dir)
            witness = Witness(store, miner_id=self._identity.miner_id)
        addresses = self._config.coordinators
        credentials = {
            address: await asyncio.to_thread(
                channel_credentials, self._config.tls, parse_coordinator(address)[0]
            )
            for address in addresses
        }
        tls_failures = FailureLog()
        attempt = 0  # rounds of every address failed since the last welcome: the backoff's
        failed_in_round = 0  # addresses failed one after the other, since a welcome or a pause
        index = 0
        while not self._stopping.is_set():
            address = addresses[index]
            transport = "TLS" if credentials[address] is not None else "plaintext"
            logger.log(
                # After the first failure, the failure's own report says what is going on.
                logging.INFO if attempt == 0 and failed_in_round == 0 else logging.DEBUG,
                "connecting to %s (%s)",
                address,
                transport,
            )
            session = Session(
                self._config,
                hello=hello,
                identity=self._identity,
                engines=self._engines,
                stopping=self._stopping,
                witness=witness,
                credentials=credentials[address],
                address=address,
            )
            tls_failure = False
            try:
                await session.run()
                return
            except TlsHandshakeError as failed:
                reason, tls_failure = str(failed), True
            except ConnectionLostError as lost:
                reason = str(lost)
            if session.welcome is not None:
                attempt = failed_in_round = 0
            if self._stopping.is_set():
                logger.info("connection ended during shutdown: %s", reason)
                return
            # The next gateway at once while some of this round's are untried: a replica that
            # died must not cost its miners a backoff when another one is up.
            index = (index + 1) % len(addresses)
            failed_in_round += 1
            pause = failed_in_round >= len(addresses)
            delay = 0.0
            if pause:
                delay = backoff_delay(
                    attempt, minimum=self._config.backoff_min_s, maximum=self._config.backoff_max_s
                )
                attempt += 1
                failed_in_round = 0
            then = f"retrying in {delay:.1f} s" if pause else f"trying {addresses[index]}"
            if tls_failure:
                # Retried like any lost connection (the coordinator may be mid-rotation), but a
                # misconfigured miner would otherwise log the same handshake error every few s.
                tls_failures.report(address, reason)
                logger.debug("%s", then)
            else:
                logger.warning(
                    "%s %s (%s); %s",
                    "lost the connection to"
                    if session.welcome is not None
                    else "cannot connect to",
                    address,
                    reason,
                    then,
                )
            if pause:
                await self._sleep_unless_stopping(delay)

    async def _sleep_unless_stopping(self, delay: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), delay)
