"""Nothing keeps a buyer's prompt or completion: no log line at any level, no table, no file.

Real processes, every one at DEBUG: the coordinator CLI (with its access log, every job
spot-checked so the prompt also reaches a scorer) and two miner CLIs; the `openai` SDK sends a
canary string through chat and completions, streamed and not, plus a request refused as
malformed. Then every log and every file under the test's directory (the coordinator's data
dir, the miners' keys, receipts and caches) and every text, JSON and bytea column of every
table of the database are searched for the canary and for the completions' text.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import openai
import pytest
from openai import OpenAI

from tests.e2e.harness import (
    create_key,
    eventually,
    fetch,
    running_coordinator,
    start_miner,
    wait_for_miners,
)

# Long enough that no completion of the random test model contains one by chance.
_MIN_COMPLETION_CHARS = 12
_SEARCHED_TYPES = ("text", "character varying", "jsonb", "json", "bytea", "ARRAY")


def _tables_holding(url: str, needle: str) -> list[str]:
    """``table.column`` of every text-like column in which ``needle`` occurs."""
    columns = fetch(
        url,
        "SELECT table_name, column_name, data_type FROM information_schema.columns"
        " WHERE table_schema = 'public' AND data_type = ANY($1::text[])",
        list(_SEARCHED_TYPES),
    )
    assert columns, "no column to search: the database is not the coordinator's"
    found = []
    for column in columns:
        table, name = column["table_name"], column["column_name"]
        if column["data_type"] == "bytea":
            condition = f"position(convert_to($1, 'UTF8') in \"{name}\") > 0"
        else:
            condition = f'strpos("{name}"::text, $1) > 0'
        hits = fetch(url, f'SELECT count(*) AS n FROM "{table}" WHERE {condition}', needle)
        if hits[0]["n"]:
            found.append(f"{table}.{name}")
    return found


def _files_holding(root: Path, needles: list[bytes]) -> list[str]:
    found = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            found += [f"{path}: {needle!r}" for needle in needles if needle in data]
    return found


def test_no_process_keeps_a_prompt_or_a_completion(
    database_url: str, model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    canary = f"canary-{uuid.uuid4().hex}"
    extra = ["--log-level", "DEBUG", "--access-log", "--spot-check-floor", "1"]
    with running_coordinator(
        tmp_path, database_url=database_url, models={"tiny": model_dirs["tiny"]}, extra=extra
    ) as coordinator:
        for name in ("alice", "bob"):
            start_miner(
                coordinator,
                tmp_path,
                name=name,
                models={"tiny": model_dirs["tiny"]},
                extra=["--log-level", "DEBUG"],
            )
        _, key = create_key(database_url, credits_micro=10_000_000)
        wait_for_miners(coordinator, key, "tiny", 2)
        completions: list[str] = []
        with OpenAI(base_url=coordinator.base_url, api_key=key, max_retries=0) as sdk:
            messages = [{"role": "user", "content": f"Remember {canary} for me."}]
            answer = sdk.chat.completions.create(model="tiny", messages=messages, max_tokens=24)
            completions.append(answer.choices[0].message.content or "")
            streamed = sdk.chat.completions.create(
                model="tiny", messages=messages, max_tokens=24, stream=True, logprobs=True
            )
            completions.append(
                "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
            )
            text = sdk.completions.create(model="tiny", prompt=f"{canary}:", max_tokens=24)
            completions.append(text.choices[0].text)
            streamed_text = sdk.completions.create(
                model="tiny", prompt=f"{canary}:", max_tokens=24, stream=True
            )
            completions.append("".join(c.choices[0].text for c in streamed_text if c.choices))
            with pytest.raises(openai.BadRequestError):
                sdk.chat.completions.create(
                    model="tiny", messages=messages, max_tokens=24, temperature=9.0
                )

        def checked() -> bool:
            rows = fetch(database_url, "SELECT count(*) AS n FROM verification_checks")
            return bool(rows[0]["n"] >= 4)

        eventually(checked, "the spot checks (which send the prompt to a scorer) ran")
    # Every process has stopped: its logs and files are complete.
    long_completions = [c for c in completions if len(c) >= _MIN_COMPLETION_CHARS]
    needles = [canary.encode(), *(c.encode() for c in long_completions)]
    assert (tmp_path / "coordinator.log").stat().st_size > 0
    assert len(list(tmp_path.glob("miner-*.log"))) == 2
    assert _files_holding(tmp_path, needles) == []
    # PostgreSQL text cannot hold NUL (the random model emits some): search the longest run
    # without one.
    runs = [max(c.split("\x00"), key=len) for c in long_completions]
    for needle in [canary, *(run for run in runs if len(run) >= _MIN_COMPLETION_CHARS)]:
        assert _tables_holding(database_url, needle) == [], needle
