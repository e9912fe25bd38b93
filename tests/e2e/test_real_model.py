"""The marketplace on a real instruct model: SmolLM2-135M-Instruct from its GGUF file.

Real processes throughout: the coordinator CLI selling the GGUF file (tokenizer and chat
template from the file), three miner CLIs converting it once into a shared weights cache, spot
checks on as shipped, the official `openai` SDK as the buyer, PostgreSQL, and the installed
`meshmint-ledger audit`. Slow: the first conversion and three 135M-parameter models on two cores.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from openai import OpenAI

from miner.packaged_models import SMOLLM2_NAME, smollm2_gguf
from proto.weights_digest import weights_sha256
from tests.e2e.conftest import price_args
from tests.e2e.harness import (
    Coordinator,
    create_key,
    fetch,
    greedy_twice,
    ledger_audit,
    open_holds,
    running_coordinator,
    start_miner,
    wait_for_miners,
)

pytestmark = pytest.mark.slow

MINERS = ("alice", "bob", "carol")
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smollm2_market(
    module_database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Coordinator, str, str]]:
    """A coordinator selling SmolLM2 with spot checks on, three honest miners sharing one cache;
    yields it with a funded buyer key (id, secret)."""
    tmp = tmp_path_factory.mktemp("smollm2")
    cache = tmp_path_factory.mktemp("model-cache")
    source = smollm2_gguf()
    with running_coordinator(
        tmp,
        database_url=module_database_url,
        models={SMOLLM2_NAME: source},
        extra=price_args(),
    ) as coordinator:
        for name in MINERS:
            start_miner(
                coordinator,
                tmp,
                name=name,
                models={SMOLLM2_NAME: source},
                max_concurrency=1,
                extra=["--cache-dir", str(cache)],
            )
        key_id, key = create_key(module_database_url, credits_micro=50_000_000)
        wait_for_miners(coordinator, key, SMOLLM2_NAME, len(MINERS), timeout=600)
        yield coordinator, key_id, key


def _sdk(market: tuple[Coordinator, str, str]) -> OpenAI:
    coordinator, _, key = market
    return OpenAI(base_url=coordinator.base_url, api_key=key, max_retries=0, timeout=120)


def test_miners_announce_the_gguf_files_digest_and_convert_it_once(
    smollm2_market: tuple[Coordinator, str, str],
) -> None:
    coordinator, _, _ = smollm2_market
    digest = weights_sha256(smollm2_gguf()).hex()
    logs = [miner.output() for miner in coordinator.miners]
    assert all(digest in log for log in logs), logs[0][-2000:]
    conversions = sum(log.count("converting") for log in logs)
    assert conversions <= 1, [log[-1500:] for log in logs]


def test_greedy_chat_answers_paris(smollm2_market: tuple[Coordinator, str, str]) -> None:
    reply = _sdk(smollm2_market).chat.completions.create(
        model=SMOLLM2_NAME, messages=FRANCE, max_tokens=30, temperature=0
    )
    content = reply.choices[0].message.content or ""
    assert "Paris" in content, content
    assert reply.usage is not None and reply.usage.completion_tokens > 0


def test_streaming_and_non_streaming_give_the_same_answer_and_bill(
    smollm2_market: tuple[Coordinator, str, str],
) -> None:
    client = _sdk(smollm2_market)
    # Greedy: a seed does not repeat a sampled answer across requests (the noise is keyed by the
    # job id as well), so only temperature 0 must give the same text twice.
    messages = [{"role": "user", "content": "Name three colours of the rainbow."}]
    whole, chunks, streamed = greedy_twice(
        client, model=SMOLLM2_NAME, messages=messages, max_tokens=40
    )
    assert streamed == whole.choices[0].message.content
    assert streamed.strip()
    usage = chunks[-1].usage
    assert usage is not None and whole.usage is not None
    assert usage.prompt_tokens == whole.usage.prompt_tokens
    assert usage.completion_tokens == whole.usage.completion_tokens


def test_spot_checked_honest_miners_are_never_slashed(
    smollm2_market: tuple[Coordinator, str, str],
) -> None:
    coordinator, _, _ = smollm2_market
    client = _sdk(smollm2_market)
    prompts = [
        "Write one sentence about the sea.",
        "What is 12 plus 30?",
        "Give a synonym for happy.",
        "Describe a cat in five words.",
        "Why is the sky blue? Answer briefly.",
        "Say hello in Spanish.",
    ]
    for index, prompt in enumerate(prompts):
        client.chat.completions.create(
            model=SMOLLM2_NAME,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=32,
            temperature=0.8,
            seed=index,
        )
    jobs = fetch(coordinator.database_url, "SELECT job_id, miner_id FROM coordinator_jobs")
    assert len({row["miner_id"] for row in jobs}) >= 2, "the jobs all went to one miner"

    # Every job of a new identity is checked; wait until each has been decided.
    def decided() -> list[dict[str, object]]:
        return fetch(
            coordinator.database_url,
            "SELECT job_id, outcome, reasons FROM verification_checks WHERE outcome <> 'skipped'",
        )

    deadline = time.monotonic() + 300
    while len({row["job_id"] for row in decided()}) < len(jobs) and time.monotonic() < deadline:
        time.sleep(1)
    checks = decided()
    assert len({row["job_id"] for row in checks}) >= len(jobs), checks
    assert {row["outcome"] for row in checks} == {"passed"}, checks
    penalties = fetch(
        coordinator.database_url,
        "SELECT count(*) AS n FROM ledger_entries WHERE kind IN ('slash', 'refund')",
    )
    assert penalties[0]["n"] == 0
    audited = ledger_audit(coordinator)
    assert audited.returncode == 0, audited.stdout + audited.stderr
    assert open_holds(coordinator.database_url) == 0


def test_the_model_card_comes_from_the_gguf_metadata(
    smollm2_market: tuple[Coordinator, str, str],
) -> None:
    cards = {model.id: model.model_dump() for model in _sdk(smollm2_market).models.list()}
    assert cards[SMOLLM2_NAME]["context_length"] == 8192  # llama.context_length in the file
    assert cards[SMOLLM2_NAME]["miners"] == len(MINERS)
