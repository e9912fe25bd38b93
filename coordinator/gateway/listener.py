"""The gRPC server miners dial: started and stopped around the gateway servicer."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc

from coordinator.dispatch.registry import MinerRegistry
from coordinator.gateway.servicer import MinerGateway
from proto import miner_pb2_grpc
from proto.limits import MAX_COORDINATOR_MESSAGE_BYTES, MAX_MINER_MESSAGE_BYTES

_STOP_GRACE_S = 2.0  # for the miners' streams to see their sessions end


@asynccontextmanager
async def listening(
    gateway: MinerGateway,
    *,
    address: str,
    credentials: grpc.ServerCredentials | None,
    registry: MinerRegistry,
) -> AsyncIterator[int]:
    """Serves ``gateway`` on ``address`` (TLS with ``credentials``, plaintext without) and
    yields the bound port. On exit every miner's session ends, then the server stops."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MINER_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_COORDINATOR_MESSAGE_BYTES),
            ("grpc.keepalive_time_ms", 20_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ]
    )
    miner_pb2_grpc.add_MinerGatewayServicer_to_server(gateway, server)
    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    await server.start()
    try:
        yield port
    finally:
        for worker in registry.workers():
            if worker.is_local:  # other replicas' miners stay with them
                worker.close("coordinator shutting down")
        await server.stop(grace=_STOP_GRACE_S)
