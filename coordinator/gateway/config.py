"""The miner gateway's settings (apart from the servicer, so reading them imports no grpc)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GatewayConfig:
    heartbeat_interval_s: float = 1.0  # both sides send heartbeats this often (eviction ~3 s)
    missed_heartbeats: int = 3  # a miner silent for this many intervals is evicted
    handshake_timeout_s: float = 10.0  # time allowed for Hello and for the signed answer
