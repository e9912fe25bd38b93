"""An operator's view of a real coordinator: readiness follows the miners, and /metrics shows
the latency of a real request and exactly the tokens the buyer was billed."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.harness import Coordinator, create_key, http, start_miner


def _metrics(root: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"{root}/metrics", timeout=30) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (found.name, tuple(sorted(found.labels.items()))): float(found.value)
        for family in text_string_to_metric_families(text)
        for found in family.samples
    }


def _wait_until_ready(root: str, timeout: float = 90) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, _, body = http(f"{root}/health/ready")
        if status == 200:
            assert isinstance(body, dict)
            return body
        time.sleep(0.2)
    raise AssertionError(f"{root}/health/ready never answered 200")


def test_readiness_and_metrics_of_a_real_request(
    coordinator: Coordinator, model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    root = coordinator.base_url.removesuffix("/v1")
    status, _, body = http(f"{root}/health/ready")
    assert (status, body) == (503, {"status": "ok", "ready": False, "miners": 0})
    status, _, body = http(f"{root}/health")
    assert (status, body) == (200, {"status": "ok", "ready": False, "miners": 0})

    start_miner(coordinator, tmp_path, name="alice", models={"tiny": model_dirs["tiny"]})
    assert _wait_until_ready(root) == {"status": "ok", "ready": True, "miners": 1}

    _, secret = create_key(coordinator.database_url, credits_micro=1_000_000)
    request = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Count for me."}],
        "max_tokens": 6,
        "temperature": 0,
    }
    status, _, answer = http(
        f"{coordinator.base_url}/chat/completions",
        api_key=secret,
        body=json.dumps(request).encode(),
    )
    assert status == 200, answer
    usage = answer["usage"]
    assert usage["completion_tokens"] > 0 and usage["cost_micro"] > 0

    # Settlement runs after the response; poll until the billed tokens show up.
    deadline = time.monotonic() + 10
    billed = ("meshmint_tokens_billed_total", (("kind", "completion"), ("model", "tiny")))
    metrics = _metrics(root)
    while billed not in metrics and time.monotonic() < deadline:
        time.sleep(0.1)
        metrics = _metrics(root)
    model = (("model", "tiny"),)
    assert metrics[("meshmint_time_to_first_token_seconds_count", model)] == 1
    assert metrics[("meshmint_time_to_first_token_seconds_sum", model)] > 0
    assert metrics[("meshmint_request_duration_seconds_count", model)] == 1
    assert metrics[billed] == usage["completion_tokens"]
    prompt = ("meshmint_tokens_billed_total", (("kind", "prompt"), ("model", "tiny")))
    assert metrics[prompt] == usage["prompt_tokens"]
    assert metrics[("meshmint_miners_connected", model)] == 1
    chat = (("endpoint", "/v1/chat/completions"), ("status", "2xx"))
    assert metrics[("meshmint_http_requests_total", chat)] == 1
