"""A GGUF file served end to end: the coordinator sells it, miners convert and serve it.

The tiny random test model written as GGUF (``miner.test_model.create_test_gguf``) keeps this
fast; tests/e2e/test_real_model.py does the same on SmolLM2 (slow). The coordinator takes the
tokenizer, chat template and context length from the file and pins the file's digest; a miner
with other weights under the same name is refused at hello.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from openai import OpenAI

from miner.test_model import create_test_gguf
from proto.weights_digest import weights_sha256
from tests.e2e.conftest import NO_SPOT_CHECKS, price_args
from tests.e2e.harness import (
    Coordinator,
    balances,
    create_key,
    greedy_twice,
    running_coordinator,
    start_miner,
    wait_for_miners,
)

MODEL = "tiny-gguf"
MESSAGES = [{"role": "user", "content": "Say something, tiny model."}]


@pytest.fixture
def gguf_market(database_url: str, tmp_path: Path) -> Iterator[tuple[Coordinator, Path]]:
    """A coordinator selling the tiny model's GGUF file, no miners yet."""
    gguf = create_test_gguf(tmp_path / "files" / "tiny.gguf", seed=0)
    with running_coordinator(
        tmp_path,
        database_url=database_url,
        models={MODEL: gguf},
        extra=[*price_args(), *NO_SPOT_CHECKS],
    ) as coordinator:
        yield coordinator, gguf


def test_a_gguf_file_is_sold_served_and_billed(
    gguf_market: tuple[Coordinator, Path], tmp_path: Path
) -> None:
    coordinator, gguf = gguf_market
    # Two miners share the cache beside their keys: the file is converted once.
    for name in ("alice", "bob"):
        start_miner(coordinator, tmp_path, name=name, models={MODEL: gguf})
    key_id, key = create_key(coordinator.database_url, credits_micro=10_000_000)
    wait_for_miners(coordinator, key, MODEL, 2)
    client = OpenAI(base_url=coordinator.base_url, api_key=key, max_retries=0, timeout=60)

    cards = {card.id: card.model_dump() for card in client.models.list()}
    assert cards[MODEL]["context_length"] == 512  # from the file's llama.context_length

    before = balances(coordinator.database_url)
    whole, _, streamed = greedy_twice(client, model=MODEL, messages=MESSAGES, max_tokens=12)
    assert whole.usage is not None and whole.usage.completion_tokens > 0
    assert streamed == whole.choices[0].message.content
    after = balances(coordinator.database_url)
    assert before[f"buyer:{key_id}"] > after[f"buyer:{key_id}"]
    assert sum(after.values()) == 0

    digest = weights_sha256(gguf).hex()
    logs = [miner.output() for miner in coordinator.miners]
    assert all(digest in log for log in logs)


def test_a_miner_with_other_weights_under_the_gguf_name_is_refused(
    gguf_market: tuple[Coordinator, Path], model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    coordinator, gguf = gguf_market
    # The safetensors directory of a different seed: other weights, other digest.
    impostor = start_miner(
        coordinator, tmp_path, name="mallory", models={MODEL: model_dirs["tiny-b"]}
    )
    assert impostor.popen.wait(timeout=60) == 3  # EXIT_REFUSED
    output = impostor.output()
    assert "WEIGHTS_MISMATCH" in output
    assert weights_sha256(gguf).hex()[:16] in output
