"""Startup composes its resources on one exit stack: a start that fails half-way leaves nothing
running, and a clean shutdown stops everything it started."""

from __future__ import annotations

import socket
from pathlib import Path

import asyncpg
import pytest

from coordinator.config import CatalogSource, CoordinatorConfig
from coordinator.server import run_coordinator
from miner.test_model import create_test_model


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _can_bind(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


async def _connections(database_url: str) -> int:
    connection = await asyncpg.connect(database_url)
    try:
        count = await connection.fetchval(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        return int(count)
    finally:
        await connection.close()


def _config(
    tmp_path: Path, database_url: str, *, http_port: int, grpc_port: int
) -> CoordinatorConfig:
    model = create_test_model(tmp_path / "tiny")
    return CoordinatorConfig(
        catalog=CatalogSource(model_specs=(f"tiny={model}",)),
        data_dir=tmp_path / "data",
        database_url=database_url,
        http_port=http_port,
        grpc_port=grpc_port,
    )


async def test_a_start_that_fails_half_way_stops_what_already_started(
    tmp_path: Path, database_url: str
) -> None:
    grpc_port = _free_port()
    with socket.socket() as taken:  # the HTTP port is in use: the start fails after gRPC is up
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = _config(
            tmp_path, database_url, http_port=taken.getsockname()[1], grpc_port=grpc_port
        )
        with pytest.raises(OSError):
            async with run_coordinator(config):
                pytest.fail("the coordinator started on a port in use")
    assert _can_bind(grpc_port), "the gRPC listener was left running"
    assert await _connections(database_url) == 0, "database connections were left open"


async def test_a_clean_shutdown_frees_both_ports_and_the_database(
    tmp_path: Path, database_url: str
) -> None:
    config = _config(tmp_path, database_url, http_port=_free_port(), grpc_port=_free_port())
    async with run_coordinator(config) as running:
        assert running.http_port == config.http_port and not _can_bind(config.grpc_port)
    assert _can_bind(config.http_port) and _can_bind(config.grpc_port)
    assert await _connections(database_url) == 0


async def test_a_failure_right_after_the_gateway_starts_stops_it(
    tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_app(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the HTTP app could not be built")

    monkeypatch.setattr("coordinator.server.create_app", broken_app)
    config = _config(tmp_path, database_url, http_port=_free_port(), grpc_port=_free_port())
    with pytest.raises(RuntimeError, match="could not be built"):
        async with run_coordinator(config):
            pytest.fail("the coordinator started without its HTTP app")
    assert _can_bind(config.grpc_port), "the gRPC listener was left running"
    assert await _connections(database_url) == 0, "database connections were left open"
