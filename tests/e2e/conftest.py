"""Fixtures for end-to-end tests: tiny models, a database per module, a running marketplace."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from miner.test_model import create_test_model
from tests.e2e.harness import (
    Coordinator,
    create_key,
    running_coordinator,
    start_coordinator,
    start_miner,
    wait_for_miners,
)

# Prices for tests, in credits per million tokens = micro-units per token, so costs are exact.
INPUT_PRICE = 2
OUTPUT_PRICE = 5
FEE_BPS = 500


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two different tiny models: 'tiny' is served by miners, 'tiny-b' by nobody."""
    root = tmp_path_factory.mktemp("models")
    return {
        "tiny": create_test_model(root / "tiny", seed=0),
        "tiny-b": create_test_model(root / "tiny-b", seed=1),
    }


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


@pytest.fixture(scope="module")
def module_database_url(postgres_url: str) -> Iterator[str]:
    name = f"e2e_{uuid.uuid4().hex[:12]}"

    async def admin(sql: str) -> None:
        connection = await asyncpg.connect(postgres_url)
        try:
            await connection.execute(sql)
        finally:
            await connection.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    yield _with_database(postgres_url, name)
    asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


# Spot checks pay scorers from the fee account at moments of their own, which would blur the
# exact billing arithmetic these fixtures' tests check; test_spot_checks.py runs them on.
NO_SPOT_CHECKS = ["--no-spot-checks"]


def price_args() -> list[str]:
    return [
        "--input-price",
        str(INPUT_PRICE),
        "--output-price",
        str(OUTPUT_PRICE),
        "--fee-bps",
        str(FEE_BPS),
    ]


def tiny_coordinator(
    tmp: Path,
    *,
    database_url: str,
    model_dirs: dict[str, Path],
    extra: Sequence[str] = (),
    kill_miners: bool = False,
) -> AbstractContextManager[Coordinator]:
    """A coordinator of its own selling 'tiny' at the test prices, spot checks off (so billing
    is exact), no miners yet; ``extra`` are more ``serve`` arguments."""
    return running_coordinator(
        tmp,
        database_url=database_url,
        models={"tiny": model_dirs["tiny"]},
        extra=[*price_args(), *NO_SPOT_CHECKS, *extra],
        kill_miners=kill_miners,
    )


@pytest.fixture
def coordinator(
    database_url: str, model_dirs: dict[str, Path], tmp_path: Path
) -> Iterator[Coordinator]:
    """A coordinator of its own for one test, selling 'tiny'; the test starts the miners."""
    with tiny_coordinator(tmp_path, database_url=database_url, model_dirs=model_dirs) as running:
        yield running


@pytest.fixture(scope="module")
def marketplace(
    module_database_url: str, model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Coordinator]:
    """A coordinator selling 'tiny' and 'tiny-b', with two honest miners serving 'tiny'."""
    tmp = tmp_path_factory.mktemp("marketplace")
    coordinator = start_coordinator(
        tmp,
        database_url=module_database_url,
        models=model_dirs,
        extra=price_args() + NO_SPOT_CHECKS,
    )
    try:
        for name in ("alice", "bob"):
            start_miner(coordinator, tmp, name=name, models={"tiny": model_dirs["tiny"]})
        _, probe_key = create_key(module_database_url, credits_micro=0, name="probe")
        wait_for_miners(coordinator, probe_key, "tiny", 2)
        yield coordinator
    finally:
        for miner in coordinator.miners:
            miner.stop()
        coordinator.process.stop()
