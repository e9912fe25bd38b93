"""Trains the tiny demo language model: a Llama on the Python standard library's own sources.

``make demo`` needs a model whose answers look like something, and nothing can be downloaded, so
this trains one in about a minute on a 2-core CPU from text every machine with Python has: the
top-level ``*.py`` files of ``sysconfig.get_paths()["stdlib"]``. A few ChatML-formatted examples
(a user asks for a function or a class, the assistant answers with one from the corpus and
``<|im_end|>``) teach it to answer after ``<|im_start|>assistant\\n`` and to stop.

The output is a standard Hugging Face directory (``config.json``, ``model.safetensors``,
``generation_config.json``, ``tokenizer.json`` with the ChatML template of
``miner/test_model.py``), so the miner loads it exactly as it loads a real model. Beside it,
``training.json`` records what produced it; the same seed, steps, corpus, torch version and
machine give byte-identical weights, and a directory whose ``training.json`` matches the request
is reused without training.

Run: ``python examples/train_demo_model.py OUT_DIR [--seed N] [--steps N]``
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import hashlib
import json
import logging
import math
import random
import sysconfig
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from miner.test_model import (
    BOS_TOKEN,
    EOS_TOKEN,
    IM_END,
    IM_START,
    SPECIAL_TOKENS,
    write_tokenizer_config,
)

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from torch import Tensor

    # Corpus tokens, chat tokens, and where each chat example starts in the latter.
    _Streams = tuple[Tensor, Tensor, Tensor]

logger = logging.getLogger(__name__)

TRAINING_FILE = "training.json"
# Bump when the recipe changes in a way the recorded parameters do not show, to void old caches.
RECIPE_VERSION = 1
# Measured on the 2-core development CPU when idle: 0.073 s a step, so 62 s of training and
# about 70 s for the whole script (imports, corpus, tokenizer, saving) against a 100 s budget.
DEFAULT_STEPS = 850
_LOG_EVERY_S = 5.0
# What a user asks for; the answer is a top-level definition from the corpus. "{summary}" is the
# first line of its docstring and is only used when there is one.
_PROMPTS: dict[type[ast.stmt], tuple[str, ...]] = {
    ast.FunctionDef: (
        "Write a Python function.",
        "Write a Python function called {name}.",
        "Write a Python function that does this: {summary}",
    ),
    ast.ClassDef: (
        "Define a Python class.",
        "Define a class called {name}.",
        "Define a class for this: {summary}",
    ),
}


@dataclass(frozen=True)
class DemoModelConfig:
    """Corpus, model and optimiser settings. Changing any of them changes the weights."""

    # Stop reading stdlib files (in sorted order) once this many bytes are in: a fixed corpus
    # on a given Python, and a bounded one on a Python with a larger stdlib.
    corpus_max_bytes: int = 6_000_000
    # Byte-level BPE vocabulary, special tokens included.
    vocab_size: int = 2048
    # Width of the residual stream.
    hidden_size: int = 128
    # Width of each MLP (SwiGLU) block, about 8/3 of the hidden size as in Llama.
    intermediate_size: int = 352
    # Transformer blocks. Measured: two narrow blocks and more steps beat wider or deeper models
    # given the same minute.
    num_layers: int = 2
    # Query heads; head size is hidden_size / num_heads.
    num_heads: int = 4
    # Key/value heads (grouped-query attention, as in Llama 2/3).
    num_kv_heads: int = 2
    # Training window in tokens, and the model's maximum position.
    context_length: int = 256
    # Windows per optimiser step.
    batch_size: int = 8
    # How many of those windows start at a ChatML example instead of at a random corpus offset.
    chat_rows: int = 2
    # Peak AdamW learning rate (3e-3 and 1e-3 both did worse in this budget).
    learning_rate: float = 2e-3
    # Linear warm-up steps before the cosine decay.
    warmup_steps: int = 20
    # The cosine decays to this fraction of the peak learning rate.
    min_lr_ratio: float = 0.1
    # torch intra-op threads, fixed because the reduction order (and so the weights) depends on it.
    num_threads: int = 2


def stdlib_sources(max_bytes: int) -> list[tuple[str, bytes]]:
    """(file name, bytes) of the stdlib's top-level ``*.py`` files, sorted, up to ``max_bytes``.

    Top level only: subdirectories include ``site-packages`` and test data, which differ from
    one machine to the next.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    sources: list[tuple[str, bytes]] = []
    total = 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        if total + len(data) > max_bytes:
            break
        sources.append((path.name, data))
        total += len(data)
    return sources


def corpus_sha256(sources: Sequence[tuple[str, bytes]]) -> str:
    """Hex SHA-256 over each file's name and bytes, length-prefixed so no two corpora collide."""
    digest = hashlib.sha256()
    for name, data in sources:
        encoded = name.encode("utf-8")
        digest.update(len(encoded).to_bytes(4, "big") + encoded + len(data).to_bytes(8, "big"))
        digest.update(data)
    return digest.hexdigest()


def chat_examples(texts: Sequence[str], *, seed: int) -> list[str]:
    """ChatML exchanges whose answer is a short top-level function or class from ``texts``."""
    rng = random.Random(seed)
    examples: list[str] = []
    for text in texts:
        try:
            tree = ast.parse(text)
        except SyntaxError:  # a stdlib newer than the running parser; skip the file
            continue
        lines = text.splitlines()
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef | ast.ClassDef):
                continue
            code = "\n".join(lines[node.lineno - 1 : node.end_lineno])
            # Short enough that prompt and answer fit one training window.
            if not 80 <= len(code) <= 700:
                continue
            summary = (ast.get_docstring(node) or "").strip().split("\n")[0]
            templates = _PROMPTS[type(node)][: 3 if summary else 2]
            prompt = rng.choice(templates).format(name=node.name, summary=summary)
            examples.append(
                f"{IM_START}user\n{prompt}{IM_END}\n{IM_START}assistant\n{code}{IM_END}\n"
            )
    rng.shuffle(examples)
    return examples


def train_tokenizer(texts: Sequence[str], *, vocab_size: int) -> Tokenizer:
    """A byte-level BPE over ``texts`` whose special tokens are those of ``miner/test_model.py``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        # Every byte stays encodable, whatever the corpus holds.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    # Registered as added tokens so "<|im_end|>" in a prompt encodes as one id, never as text.
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer


def training_params(
    *, seed: int, steps: int, config: DemoModelConfig, corpus_digest: str
) -> dict[str, Any]:
    """Everything the weights depend on; a directory is reused only when these all match."""
    return {
        "recipe_version": RECIPE_VERSION,
        "seed": seed,
        "steps": steps,
        "config": dataclasses.asdict(config),
        "corpus_sha256": corpus_digest,
        # From the package metadata: a cache hit need not import torch.
        "versions": {name: version(name) for name in ("torch", "transformers", "tokenizers")},
    }


def is_trained(out_dir: Path, params: dict[str, Any]) -> bool:
    """Whether ``out_dir`` holds a finished model trained with exactly ``params``."""
    try:
        recorded = json.loads((Path(out_dir) / TRAINING_FILE).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(recorded, dict) or recorded.get("params") != params:
        return False
    required = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
    return all((Path(out_dir) / name).is_file() for name in required)


def train_demo_model(
    out_dir: Path,
    *,
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    max_seconds: float = 75.0,
    config: DemoModelConfig = DemoModelConfig(),  # frozen, so one shared default is safe
) -> Path:
    """Trains the demo model into ``out_dir`` (created if needed) and returns ``out_dir``.

    Returns at once when ``out_dir`` already holds a model trained with the same parameters.
    ``max_seconds`` bounds the training loop only as a safety stop: hitting it is logged and
    recorded, and the weights then depend on the machine's speed.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    sources = stdlib_sources(config.corpus_max_bytes)
    if not sources:
        raise RuntimeError("no Python sources found in the standard library directory")
    params = training_params(
        seed=seed, steps=steps, config=config, corpus_digest=corpus_sha256(sources)
    )
    if is_trained(out_dir, params):
        logger.info("%s already holds the demo model for these parameters", out_dir)
        if json.loads((out_dir / TRAINING_FILE).read_text())["result"]["stopped_by_time_limit"]:
            logger.warning("that model was cut short by the time limit; delete it to retrain")
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    # The marker goes first: a crash below must not leave an old, matching one behind.
    (out_dir / TRAINING_FILE).unlink(missing_ok=True)

    texts = [data.decode("utf-8", errors="replace") for _, data in sources]
    chats = chat_examples(texts, seed=seed)
    tokenizer = train_tokenizer([*texts, *chats], vocab_size=config.vocab_size)
    streams = _encode(tokenizer, texts, chats)
    corpus = {
        "bytes": sum(len(data) for _, data in sources),
        "tokens": len(streams[0]),
        "chat_examples": len(chats),
        "chat_tokens": len(streams[1]),
    }
    logger.info("%d files in %.1fs: %s", len(sources), time.perf_counter() - started, corpus)
    model, result = _train(
        tokenizer, streams, seed=seed, steps=steps, max_seconds=max_seconds, config=config
    )
    _save(out_dir, model=model, tokenizer=tokenizer, config=config)
    record = {
        "params": params,
        "result": result,
        "corpus": corpus | {"files": [name for name, _ in sources]},
        "wall_seconds": round(time.perf_counter() - started, 2),
    }
    # Written last and atomically: its presence means the directory is complete.
    partial = out_dir / (TRAINING_FILE + ".partial")
    partial.write_text(json.dumps(record, indent=2) + "\n")
    partial.replace(out_dir / TRAINING_FILE)
    logger.info(
        "trained %d steps, final loss %.3f, %.1fs in all",
        result["steps_completed"],
        result["final_loss"],
        record["wall_seconds"],
    )
    return out_dir


def _encode(tokenizer: Tokenizer, texts: list[str], chats: list[str]) -> _Streams:
    """Token streams: the corpus files, each closed by end-of-text, and the chat examples."""
    import torch

    end_of_text = _token_id(tokenizer, EOS_TOKEN)
    corpus = [i for e in tokenizer.encode_batch(texts) for i in [*e.ids, end_of_text]]
    chat: list[int] = []
    starts: list[int] = []
    for encoding in tokenizer.encode_batch(chats):
        starts.append(len(chat))
        chat.extend(encoding.ids)
    return torch.tensor(corpus), torch.tensor(chat), torch.tensor(starts)


def _sampler(streams: _Streams, *, seed: int, config: DemoModelConfig) -> Callable[[], Tensor]:
    """Draws batches of random windows: corpus rows first, then chat rows."""
    import torch

    corpus, chat, chat_starts = streams
    window = config.context_length
    offsets = torch.arange(window)
    # A chat window starts at an example's first token, so the model sees whole exchanges.
    starts = chat_starts[chat_starts + window <= len(chat)]
    if len(corpus) < window or len(starts) == 0:
        raise RuntimeError("the corpus is too small for one training window")
    generator = torch.Generator().manual_seed(seed)
    corpus_rows = config.batch_size - config.chat_rows

    def sample() -> Tensor:
        at = torch.randint(0, len(corpus) - window + 1, (corpus_rows,), generator=generator)
        picks = torch.randint(0, len(starts), (config.chat_rows,), generator=generator)
        return torch.cat([corpus[at[:, None] + offsets], chat[starts[picks][:, None] + offsets]])

    return sample


def _token_id(tokenizer: Tokenizer, token: str) -> int:
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise RuntimeError(f"the tokenizer lacks {token}")
    return int(token_id)


def _train(
    tokenizer: Tokenizer,
    streams: _Streams,
    *,
    seed: int,
    steps: int,
    max_seconds: float,
    config: DemoModelConfig,
) -> tuple[Any, dict[str, Any]]:
    """Trains a fresh model; returns it and a summary of the run."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    model_config = LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        max_position_embeddings=config.context_length,
        bos_token_id=_token_id(tokenizer, BOS_TOKEN),
        eos_token_id=[_token_id(tokenizer, IM_END), _token_id(tokenizer, EOS_TOKEN)],
        pad_token_id=_token_id(tokenizer, EOS_TOKEN),
        tie_word_embeddings=True,
    )
    sample = _sampler(streams, seed=seed, config=config)
    previous_threads = torch.get_num_threads()
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    # fork_rng: seeding the global generator for the init must not leak into the caller.
    with torch.random.fork_rng(devices=[]):
        torch.set_num_threads(config.num_threads)
        torch.use_deterministic_algorithms(True)
        try:
            torch.manual_seed(seed)
            # Any: transformers' own annotations confuse mypy.
            model: Any = LlamaForCausalLM(model_config)
            losses = _optimise(model, sample, steps=steps, max_seconds=max_seconds, config=config)
        finally:
            torch.set_num_threads(previous_threads)
            torch.use_deterministic_algorithms(previous_deterministic)
    model.eval()
    tail = losses[-10:]
    return model, {
        "steps_completed": len(losses),
        "stopped_by_time_limit": len(losses) < steps,
        "first_loss": losses[0] if losses else None,
        # Averaged: one batch's loss is noisy.
        "final_loss": sum(tail) / len(tail) if tail else None,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def _optimise(
    model: Any,
    sample: Callable[[], Tensor],
    *,
    steps: int,
    max_seconds: float,
    config: DemoModelConfig,
) -> list[float]:
    """Runs the AdamW steps; returns each step's loss. Stops early only at ``max_seconds``."""
    import torch

    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, betas=(0.9, 0.95), weight_decay=0.01
    )
    losses: list[float] = []
    started = last_log = time.perf_counter()
    for step in range(steps):
        if time.perf_counter() - started > max_seconds:
            logger.warning("time limit hit after %d of %d steps: not reproducible", step, steps)
            break
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, steps=steps, config=config)
        batch = sample()
        # The model shifts labels itself: a window of n tokens trains n - 1 predictions.
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # Clipped: keeps the early, high-learning-rate steps from blowing up.
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss.item()))
        now = time.perf_counter()
        if now - last_log >= _LOG_EVERY_S or step == steps - 1:
            last_log = now
            pace = (now - started) / (step + 1)
            logger.info("step %d/%d loss %.3f (%.3f s/step)", step + 1, steps, losses[-1], pace)
    return losses


def _learning_rate(step: int, *, steps: int, config: DemoModelConfig) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` of the peak."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, steps - config.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return config.learning_rate * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)


def _save(out_dir: Path, *, model: Any, tokenizer: Tokenizer, config: DemoModelConfig) -> None:
    """Writes weights, generation config and tokenizer files in Hugging Face layout."""
    from transformers import GenerationConfig

    generation: Any = GenerationConfig  # Any: transformers' own annotations confuse mypy.
    model.save_pretrained(out_dir, safe_serialization=True)
    generation(
        bos_token_id=model.config.bos_token_id,
        eos_token_id=model.config.eos_token_id,
        pad_token_id=model.config.pad_token_id,
    ).save_pretrained(out_dir)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    write_tokenizer_config(out_dir, context_length=config.context_length)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: trains (or reuses) the demo model and prints its directory."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="model directory to write")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument(
        "--steps", type=int, default=DEFAULT_STEPS, help="training steps (default: %(default)s)"
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=75.0,
        help="safety stop for the training loop; hitting it makes the weights machine-dependent",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    out_dir = train_demo_model(
        args.out_dir, seed=args.seed, steps=args.steps, max_seconds=args.max_seconds
    )
    print(out_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
