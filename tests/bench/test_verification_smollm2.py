"""bench/verification_smollm2.py's traffic: fixed, within the prompt cap, chats left whole.

Only the tokenizer is read (no model is loaded); figures are in docs/benchmarks.md.
"""

from __future__ import annotations

from pathlib import Path

from bench.verification_models import MAX_PROMPT_TOKENS, Vocab
from bench.verification_smollm2 import MAX_MAX_TOKENS, MIN_MAX_TOKENS, QUESTIONS, make_jobs
from coordinator.api import ChatMessage
from coordinator.text.tokenization import ModelTokenizer

VOCAB = Vocab(size=49152, context_length=8192, stop_ids=(2,), pad_id=2)


def test_jobs_are_seeded_capped_and_keep_every_chat_whole(smollm2_gguf: Path) -> None:
    tokenizer = ModelTokenizer.from_gguf(smollm2_gguf)
    first = tokenizer.encode_chat([ChatMessage(role="user", content="hi")])[0]
    jobs = make_jobs(VOCAB, count=12, seed=0)
    assert jobs == make_jobs(VOCAB, count=12, seed=0)
    assert jobs != make_jobs(VOCAB, count=12, seed=1)
    assert len({job.job_id for job in jobs}) == 12
    for index, job in enumerate(jobs):
        assert 0 < len(job.prompt) <= MAX_PROMPT_TOKENS
        assert MIN_MAX_TOKENS <= job.params.max_tokens <= MAX_MAX_TOKENS
        assert job.params.stop_token_ids == VOCAB.stop_ids
        if index % 2 == 0:  # a chat, rendered whole: it ends with the assistant's header
            assert tokenizer.decode(job.prompt).rstrip().endswith("assistant")
            assert job.prompt[0] == first


def test_every_question_fits_the_prompt_cap(smollm2_gguf: Path) -> None:
    tokenizer = ModelTokenizer.from_gguf(smollm2_gguf)
    assert len(set(QUESTIONS)) == len(QUESTIONS) >= 40
    for question in QUESTIONS:
        chat = tokenizer.encode_chat([ChatMessage(role="user", content=question)])
        assert len(chat) <= MAX_PROMPT_TOKENS, question
