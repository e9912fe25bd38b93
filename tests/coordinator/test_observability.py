"""Health, readiness, Prometheus metrics and the OpenAPI document of the coordinator."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, TypeAlias, cast

import aiohttp
import asyncpg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from coordinator.api import (
    ChatMessage,
    CompletionRequest,
    PublicLedger,
    Readiness,
    TextDelta,
    Usage,
)
from coordinator.billing.job_log import JobLog
from coordinator.billing.keys import KeyStore
from coordinator.catalog import Catalog
from coordinator.dispatch.dispatcher import DispatchConfig, Dispatcher
from coordinator.dispatch.registry import MinerRegistry
from coordinator.dispatch.router import Router
from coordinator.http.app import create_app
from coordinator.http.ledger_routes import add_ledger_routes
from coordinator.http.openapi import OPENAPI
from coordinator.http.usage_routes import UsageReader, add_usage_routes
from coordinator.ops.metrics import CoordinatorMetrics
from coordinator.request_saga import BillingConfig, buyer_account, miner_account
from coordinator.service import MarketplaceService
from ledger.postgres import PostgresLedger
from tests.coordinator.core_fakes import (
    MODEL,
    WAIT_S,
    MinerKey,
    make_session,
    play_job,
    stop_id,
    text_ids,
)

from .fake_service import API_KEY, FakeInferenceService, serving

if TYPE_CHECKING:
    Pool: TypeAlias = asyncpg.Pool[asyncpg.Record]


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus text exposition; fails when it is missing."""
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == name and found.labels == labels:
                return float(found.value)
    raise AssertionError(f"no sample {name}{labels} in:\n{text}")


# --- the metrics themselves ---------------------------------------------------------------------


def test_each_metrics_object_has_its_own_registry() -> None:
    first, second = CoordinatorMetrics(), CoordinatorMetrics()
    first.http_response("/health", 200)
    counted = "meshmint_http_requests_total"
    assert sample(first.render().decode(), counted, endpoint="/health", status="2xx") == 1
    with pytest.raises(AssertionError):
        sample(second.render().decode(), counted, endpoint="/health", status="2xx")


def test_placeholders_are_exported_as_zero() -> None:
    text = CoordinatorMetrics().render().decode()
    assert sample(text, "meshmint_queue_depth") == 0
    assert "meshmint_spot_checks_total{" not in text  # no check has run yet
    assert sample(text, "meshmint_spot_checks_failed_total") == 0


def test_miner_counts_are_read_at_every_scrape() -> None:
    counts = {"tiny": 0, "big": 3}
    metrics = CoordinatorMetrics(miner_counts=lambda: counts)
    assert sample(metrics.render().decode(), "meshmint_miners_connected", model="tiny") == 0
    counts["tiny"] = 2
    text = metrics.render().decode()
    assert sample(text, "meshmint_miners_connected", model="tiny") == 2
    assert sample(text, "meshmint_miners_connected", model="big") == 3


async def test_a_timer_records_first_token_gaps_per_token_and_the_end() -> None:
    metrics = CoordinatorMetrics()
    timer = metrics.request("tiny")

    async def deltas() -> AsyncIterator[TextDelta]:
        await asyncio.sleep(0.02)
        yield TextDelta("a", 1)
        yield TextDelta("", 0)  # an incomplete character carries no token: not timed
        await asyncio.sleep(0.01)
        yield TextDelta("bc", 2)

    assert [delta.text async for delta in timer.timed(deltas())] == ["a", "", "bc"]
    timer.finished()
    text = metrics.render().decode()
    ttft = sample(text, "meshmint_time_to_first_token_seconds_sum", model="tiny")
    assert sample(text, "meshmint_time_to_first_token_seconds_count", model="tiny") == 1
    assert ttft >= 0.02
    # Two tokens arrived together after one gap: two observations of half the gap each.
    assert sample(text, "meshmint_inter_token_latency_seconds_count", model="tiny") == 2
    assert sample(text, "meshmint_inter_token_latency_seconds_sum", model="tiny") >= 0.01
    duration = sample(text, "meshmint_request_duration_seconds_sum", model="tiny")
    assert duration >= ttft + 0.01


def test_only_charged_usage_counts_as_billed() -> None:
    metrics = CoordinatorMetrics()
    metrics.billed("tiny", Usage(prompt_tokens=5, completion_tokens=0, cost=0))
    metrics.billed("tiny", Usage(prompt_tokens=7, completion_tokens=3, cost=11))
    text = metrics.render().decode()
    assert sample(text, "meshmint_tokens_billed_total", model="tiny", kind="prompt") == 7
    assert sample(text, "meshmint_tokens_billed_total", model="tiny", kind="completion") == 3


# --- the HTTP routes ----------------------------------------------------------------------------


@pytest.fixture
def service() -> FakeInferenceService:
    return FakeInferenceService()


@pytest.fixture
async def root(service: FakeInferenceService) -> AsyncIterator[str]:
    async with serving(service) as url:
        yield url.removesuffix("/v1")


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def test_health_is_alive_and_ready_follows_the_miners(
    root: str, service: FakeInferenceService, http: aiohttp.ClientSession
) -> None:
    for miners, ready_status in ((0, 503), (2, 200)):
        service.miners = miners
        expected = {"status": "ok", "ready": miners > 0, "miners": miners}
        async with http.get(f"{root}/health") as response:
            assert response.status == 200  # liveness never depends on the miners
            assert await response.json() == expected
        async with http.get(f"{root}/health/ready") as response:
            assert response.status == ready_status
            assert await response.json() == expected


async def test_metrics_count_responses_by_route_template_and_status_class(
    root: str, http: aiohttp.ClientSession
) -> None:
    for path in ("/v1/models/tiny", "/v1/models/huge", "/nowhere", "/health", "/health"):
        async with http.get(f"{root}{path}") as response:
            await response.read()
    async with http.get(f"{root}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}):
        pass
    async with http.get(f"{root}/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()
    counted = "meshmint_http_requests_total"
    assert sample(text, counted, endpoint="/v1/models/{model}", status="4xx") == 2  # no key
    assert sample(text, counted, endpoint="unmatched", status="4xx") == 1
    assert sample(text, counted, endpoint="/health", status="2xx") == 2
    assert sample(text, counted, endpoint="/v1/models", status="2xx") == 1


def _described_routes() -> set[tuple[str, str]]:
    return {
        (method.upper(), path)
        for path, operations in OPENAPI["paths"].items()
        for method in operations
    }


async def test_openapi_describes_every_route_of_the_app(
    root: str, http: aiohttp.ClientSession
) -> None:
    app = create_app(FakeInferenceService())
    add_ledger_routes(app, cast(PublicLedger, object()))  # only registered, never called
    add_usage_routes(app, auth=FakeInferenceService(), usage=cast(UsageReader, object()))
    registered = {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None and route.method != "HEAD"
    }
    assert len(registered) >= 15
    assert registered - _described_routes() == set()
    assert _described_routes() - registered == set()

    async with http.get(f"{root}/openapi.json") as response:
        assert response.status == 200
        document = await response.json()
    assert document == OPENAPI
    assert document["openapi"].startswith("3.1")
    error = document["components"]["schemas"]["Error"]["properties"]["error"]["properties"]
    assert set(error) == {"message", "type", "code", "param"}
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


# --- the service records into the metrics -------------------------------------------------------


async def test_a_completion_is_timed_and_its_tokens_billed(db_pool: Pool, catalog: Catalog) -> None:
    ledger = await PostgresLedger.create(db_pool)
    keys = await KeyStore.create(db_pool)
    registry = MinerRegistry()
    metrics = CoordinatorMetrics()
    dispatch = DispatchConfig(
        max_attempts=1, first_token_timeout_s=WAIT_S, token_timeout_s=WAIT_S, retry_after_s=1
    )
    service = MarketplaceService(
        BillingConfig(),
        catalog=catalog,
        keys=keys,
        ledger=ledger,
        registry=registry,
        dispatcher=Dispatcher(dispatch, registry=registry, router=Router(rng=random.Random(0))),
        job_log=await JobLog.create(db_pool),
        metrics=metrics,
    )
    assert (await service.readiness()).ready is False
    buyer = await service.authenticate((await keys.issue("alice")).secret)
    await ledger.open_account(buyer_account(buyer))
    await ledger.mint(buyer_account(buyer), 1_000_000)
    key = MinerKey()
    session = make_session(catalog, key=key)
    registry.add(session)
    await ledger.open_account(miner_account(session.miner_id))
    readiness = await service.readiness()
    assert readiness.ready and readiness.miners == 1

    entry = catalog.get(MODEL)
    answer = [*text_ids(entry, "Hi there!"), stop_id(entry)]
    request = CompletionRequest(
        model=MODEL,
        messages=(ChatMessage(role="user", content="Hello!"),),
        prompt=None,
        max_tokens=32,
        temperature=0.0,
        top_p=1.0,
        seed=1,
    )
    miner = asyncio.create_task(play_job(session, key, entry, answer))
    async with service.complete(buyer, request) as completion:
        deltas = [delta async for delta in completion]
    await miner
    usage = completion.usage
    assert usage.completion_tokens == len(answer) and usage.cost > 0

    text = metrics.render().decode()
    assert sample(text, "meshmint_time_to_first_token_seconds_count", model=MODEL) == 1
    timed_tokens = sum(delta.token_count for delta in deltas if delta.token_count)
    assert sample(text, "meshmint_inter_token_latency_seconds_count", model=MODEL) == (
        timed_tokens - deltas[0].token_count
    )
    assert sample(text, "meshmint_request_duration_seconds_count", model=MODEL) == 1
    billed = "meshmint_tokens_billed_total"
    assert sample(text, billed, model=MODEL, kind="prompt") == usage.prompt_tokens
    assert sample(text, billed, model=MODEL, kind="completion") == usage.completion_tokens

    registry.remove(session)
    assert await service.readiness() == Readiness(ready=False, miners=0)
