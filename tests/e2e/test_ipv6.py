"""A coordinator on an IPv6 loopback address serves buyers and miners (``[::1]:PORT``)."""

from __future__ import annotations

from pathlib import Path

from openai import OpenAI

from tests.e2e.harness import create_key, running_coordinator, start_miner, wait_for_miners


def test_buyers_and_miners_reach_a_coordinator_on_ipv6_loopback(
    database_url: str, model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    models = {"tiny": model_dirs["tiny"]}
    # The last --http/--grpc wins over the harness's IPv4 ones.
    extra = ["--http", "[::1]:0", "--grpc", "[::1]:0"]
    with running_coordinator(
        tmp_path, database_url=database_url, models=models, extra=extra
    ) as coordinator:
        assert coordinator.base_url.startswith("http://[::1]:")
        assert coordinator.grpc_address.startswith("[::1]:")
        start_miner(coordinator, tmp_path, name="six", models=models)
        _, key = create_key(database_url, credits_micro=1_000_000)
        wait_for_miners(coordinator, key, "tiny", 1)
        with OpenAI(base_url=coordinator.base_url, api_key=key, max_retries=0) as sdk:
            answer = sdk.completions.create(model="tiny", prompt="Hello", max_tokens=4)
        assert answer.usage is not None and answer.usage.completion_tokens >= 1
