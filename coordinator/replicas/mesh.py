"""Replicas over NATS: every replica routes to every miner, whichever replica it dialled.

Each replica publishes, several times a second, the miners connected to it and their load
(``meshmint.r.<replica>.capacity``); the others keep a :class:`RemoteWorker` for each, so their
routers see every miner. A job for a remote miner goes to its replica's ``job`` subject; the
events come back, in order, on the asking replica's ``ev.<job id>`` subject; ``cancel``,
``score`` (request and reply) and ``notify`` work the same way (``coordinator/replicas/relay.py``
serves them). NATS carries only this ephemeral routing: money and trust stay in PostgreSQL.

A replica not heard from for ``silent_after_s`` is gone: its miners leave routing here and its
jobs here are abandoned. When NATS itself is lost, remote miners leave routing (their jobs here
fail like a lost miner's: before the first token the dispatcher tries another, after it the
stream ends billed for what was delivered), local miners keep serving, and everything comes back
when the connection does (the client reconnects by itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg

from coordinator.dispatch.registry import MinerRegistry
from coordinator.errors import CoordinatorError
from coordinator.jobs import JobEvent
from coordinator.replicas import codec
from coordinator.replicas.codec import CodecError, Document, WorkerState
from coordinator.replicas.relay import Relay
from coordinator.replicas.remote_worker import RemoteWorker
from coordinator.worker import Worker

logger = logging.getLogger(__name__)

_PREFIX = "meshmint.r"


class ReplicaLinkError(CoordinatorError):
    """NATS cannot be reached (at start: the replica does not start)."""


@dataclass(frozen=True)
class MeshConfig:
    nats_url: str  # nats://HOST:PORT, or several separated by commas (a NATS cluster)
    replica_id: str  # this replica's name on the subjects; unique per process
    capacity_interval_s: float = 0.25  # how often the others hear of this replica's miners
    silent_after_s: float = 2.0  # a replica not heard from this long is gone
    score_timeout_s: float = 120.0  # longest a remote scorer may take (the spot check's own)
    connect_timeout_s: float = 2.0  # to reach NATS at start

    def __post_init__(self) -> None:
        if not self.nats_url.strip():
            raise ValueError("nats_url is empty")
        if "." in self.replica_id or not self.replica_id:
            raise ValueError(f"replica id {self.replica_id!r} must be a non-empty NATS token")
        if self.silent_after_s <= 2 * self.capacity_interval_s:
            raise ValueError("silent_after_s must exceed two capacity intervals")


def _subject(replica: str, kind: str) -> str:
    return f"{_PREFIX}.{replica}.{kind}"


class ReplicaMesh:
    """This replica's link to the others (see the module docstring)."""

    def __init__(self, config: MeshConfig, *, registry: MinerRegistry, client: Client) -> None:
        self.replica_id = config.replica_id
        self._config = config
        self._registry = registry
        self._client = client
        self._relay = Relay(
            registry=registry,
            publish_event=self._publish_event,
            score_timeout_s=config.score_timeout_s,
        )
        self._outbox: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        self._expected: dict[str, Callable[[JobEvent], None]] = {}
        self._heard: dict[str, float] = {}  # replica -> time.monotonic() of its last capacity
        self._tasks: set[asyncio.Task[None]] = set()

    @classmethod
    @contextlib.asynccontextmanager
    async def running(
        cls, config: MeshConfig, *, registry: MinerRegistry
    ) -> AsyncIterator[ReplicaMesh]:
        """Connects to NATS (or raises :class:`ReplicaLinkError`) and links this replica to the
        others while the block runs; on exit the others hear at once that its miners left."""
        holder: list[ReplicaMesh] = []

        async def disconnected() -> None:
            if holder:
                holder[0]._link_lost()

        async def reconnected() -> None:
            logger.info("NATS link back: routing to other replicas' miners resumes")

        async def error(exception: Exception) -> None:
            logger.warning("NATS: %s", exception)

        try:
            # With endless reconnects, nats-py also retries the first connection forever.
            async with asyncio.timeout(config.connect_timeout_s * 2):
                client = await nats.connect(
                    servers=[url.strip() for url in config.nats_url.split(",")],
                    name=f"meshmint-coordinator-{config.replica_id}",
                    connect_timeout=max(1, round(config.connect_timeout_s)),
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                    disconnected_cb=disconnected,
                    reconnected_cb=reconnected,
                    error_cb=error,
                )
        except TimeoutError:
            raise ReplicaLinkError(
                f"cannot reach NATS at {config.nats_url}: no connection within "
                f"{config.connect_timeout_s * 2:g} s"
            ) from None
        except Exception as failure:  # nats-py raises several unrelated types here
            raise ReplicaLinkError(
                f"cannot reach NATS at {config.nats_url}: {failure or type(failure).__name__}"
            ) from None
        mesh = cls(config, registry=registry, client=client)
        holder.append(mesh)
        try:
            await mesh._subscribe()
            mesh._spawn(mesh._send_loop(), "mesh-send")
            mesh._spawn(mesh._capacity_loop(), "mesh-capacity")
            logger.info(
                "replica %s linked to the others over NATS at %s",
                config.replica_id,
                config.nats_url,
            )
            yield mesh
        finally:
            with contextlib.suppress(Exception):
                await client.publish(
                    _subject(mesh.replica_id, "capacity"),
                    codec.dumps({"workers": [], "leaving": True}),
                )
            for task in mesh._tasks:
                task.cancel()
            await asyncio.gather(*mesh._tasks, return_exceptions=True)
            await mesh._relay.aclose()
            mesh._forget_every_replica("this replica is shutting down")
            holder.clear()  # the drain disconnects on purpose: no "NATS link lost" warning
            with contextlib.suppress(Exception):
                await client.drain()

    # --- MeshLink: what RemoteWorkers use -----------------------------------------------------

    def send(self, home: str, kind: str, document: Document) -> None:
        self._outbox.put_nowait(
            (_subject(home, kind), codec.dumps({**document, "origin": self.replica_id}))
        )

    async def ask(self, home: str, kind: str, document: Document) -> Document:
        reply = await self._client.request(
            _subject(home, kind),
            codec.dumps({**document, "origin": self.replica_id}),
            timeout=self._config.score_timeout_s + 5.0,
        )
        return codec.loads(reply.data)

    def expect_events(self, job_id: str, deliver: Callable[[JobEvent], None]) -> None:
        self._expected[job_id] = deliver

    def forget(self, job_id: str) -> None:
        self._expected.pop(job_id, None)

    # --- inbound ------------------------------------------------------------------------------

    async def _subscribe(self) -> None:
        me = self.replica_id
        await self._client.subscribe(f"{_PREFIX}.*.capacity", cb=self._on_capacity)
        await self._client.subscribe(_subject(me, "ev.*"), cb=self._on_event)
        await self._client.subscribe(_subject(me, "job"), cb=self._guarded(self._relay.start))
        await self._client.subscribe(_subject(me, "cancel"), cb=self._guarded(self._relay.cancel))
        await self._client.subscribe(_subject(me, "notify"), cb=self._guarded(self._relay.notify))
        await self._client.subscribe(_subject(me, "score"), cb=self._on_score)
        await self._client.flush()

    def _guarded(self, handle: Callable[[Document], None]) -> Callable[[Msg], Awaitable[None]]:
        async def callback(message: Msg) -> None:
            try:
                handle(codec.loads(message.data))
            except CodecError as error:
                logger.warning("dropped a malformed message on %s: %s", message.subject, error)

        return callback

    async def _on_event(self, message: Msg) -> None:
        job_id = message.subject.rsplit(".", 1)[-1]
        deliver = self._expected.get(job_id)
        if deliver is None:
            return  # a job given up on here: late events are dropped
        try:
            event = codec.event_from(codec.loads(message.data))
        except CodecError as error:
            logger.warning("dropped a malformed event of job %s: %s", job_id, error)
            return
        deliver(event)

    async def _on_score(self, message: Msg) -> None:
        async def answer() -> None:
            try:
                document = codec.loads(message.data)
            except CodecError as error:
                reply: Document = {"lost": f"malformed score request: {error}"}
            else:
                reply = await self._relay.score(document)
            with contextlib.suppress(Exception):
                await message.respond(codec.dumps(reply))

        self._spawn(answer(), "mesh-score")

    async def _on_capacity(self, message: Msg) -> None:
        home = message.subject.split(".")[2]
        if home == self.replica_id:
            return
        try:
            document = codec.loads(message.data)
            states = [WorkerState.of(state) for state in document["workers"]]
        except (CodecError, KeyError, TypeError) as error:
            logger.warning("dropped a malformed capacity message of replica %s: %s", home, error)
            return
        if document.get("leaving"):
            self._forget_replica(home, f"replica {home} is shutting down")
            return
        if home not in self._heard:
            logger.info("replica %s is linked (%d miners)", home, len(states))
        self._heard[home] = time.monotonic()
        seen = set()
        for state in states:
            seen.add(state.miner_id)
            current = self._registry.get(state.miner_id)
            if isinstance(current, RemoteWorker) and current.home == home:
                current.update(state)
                continue
            if current is not None and current.is_local:
                continue  # the miner's own connection here wins over another replica's word
            if current is not None:
                self._registry.remove(current)
                if isinstance(current, RemoteWorker):
                    current.detach(f"the miner moved to replica {home}")
            self._registry.add(RemoteWorker(state, home=home, link=self))
        for worker in self._remote_workers(home):
            if worker.miner_id not in seen:
                self._drop(worker, f"the miner left replica {home}")

    # --- outbound -----------------------------------------------------------------------------

    def _publish_event(self, origin: str, job_id: str, document: Document) -> None:
        self._outbox.put_nowait((_subject(origin, f"ev.{job_id}"), codec.dumps(document)))

    async def _send_loop(self) -> None:
        while True:
            subject, payload = await self._outbox.get()
            try:
                await self._client.publish(subject, payload)
            except Exception as error:  # closed or reconnecting past its buffer
                logger.warning("could not publish to %s: %s", subject, error)

    async def _capacity_loop(self) -> None:
        interval = self._config.capacity_interval_s
        while True:
            relayed = self._relay.jobs_by_origin()
            workers = [
                self._state(w, relayed.get(w.miner_id, {}))
                for w in self._registry.workers()
                if w.is_local and w.closed_reason is None
            ]
            self._outbox.put_nowait(
                (_subject(self.replica_id, "capacity"), codec.dumps({"workers": workers}))
            )
            now = time.monotonic()
            for home, heard in list(self._heard.items()):
                if now - heard > self._config.silent_after_s:
                    self._forget_replica(home, f"replica {home} went silent")
            await asyncio.sleep(interval)

    def _state(self, worker: Worker, relayed: Mapping[str, int]) -> Document:
        return WorkerState(
            miner_id=worker.miner_id,
            public_key=worker.public_key,
            models=tuple(sorted(worker.models)),
            device_name=worker.device_name,
            accelerator=worker.accelerator,
            retains_data=worker.retains_data,
            max_concurrency=worker.max_concurrency,
            active_jobs=worker.active_jobs,
            jobs_by_origin=relayed,
            draining=worker.draining,
            ttft_s=worker.speed.ttft_s,
            tokens_per_s=worker.speed.tokens_per_s,
            jobs_measured=worker.speed.jobs_measured,
            connected_for_s=time.monotonic() - worker.connected_at,
        ).document()

    # --- replicas coming and going ------------------------------------------------------------

    def _remote_workers(self, home: str | None = None) -> list[RemoteWorker]:
        return [
            worker
            for worker in self._registry.workers()
            if isinstance(worker, RemoteWorker) and (home is None or worker.home == home)
        ]

    def _drop(self, worker: RemoteWorker, reason: str) -> None:
        self._registry.remove(worker)
        worker.detach(reason)

    def _forget_replica(self, home: str, reason: str) -> None:
        logger.info("%s: its miners leave routing here", reason)
        self._heard.pop(home, None)
        for worker in self._remote_workers(home):
            self._drop(worker, reason)
        self._relay.origin_gone(home)

    def _forget_every_replica(self, reason: str) -> None:
        for home in {*self._heard, *(w.home for w in self._remote_workers())}:
            self._forget_replica(home, reason)

    def _link_lost(self) -> None:
        logger.warning("NATS link lost: other replicas' miners leave routing until it is back")
        self._forget_every_replica("the NATS link was lost")

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
