"""The verification benchmark's model, its traffic, and the altered copies cheats run.

The model is the demo model of ``examples/train_demo_model.py`` (a small Llama trained on the
standard library, cached in ``demo-data/stdlib-coder`` as ``make demo`` does), with
``--model tiny`` the random test model of ``miner.test_model``, or with ``--model smollm2``
SmolLM2-135M-Instruct (``bench/verification_smollm2.py``). The traffic is a fixed-seed mix of
chat requests (ChatML, as the coordinator renders them) and raw code continuations, sampled with
the temperatures, top-p and top-k that buyers send.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from miner.engine.base import SamplingParams
from miner.test_model import EOS_TOKEN, IM_END, IM_START, create_test_model

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
TRAINER = ROOT / "examples" / "train_demo_model.py"
MAX_PROMPT_TOKENS = 64
TEMPERATURES = (0.0, 0.7, 1.0)
TOP_PS = (1.0, 1.0, 0.95, 0.9)
TOP_KS = (0, 0, 40, 50)
INT4_GROUP = 32  # input columns sharing one int4 scale, as in common GPTQ/AWQ checkpoints


@dataclass(frozen=True)
class Job:
    """One buyer request, as the coordinator sends it to a miner."""

    job_id: str  # keys the Gumbel noise
    prompt: tuple[int, ...]  # token ids
    params: SamplingParams  # temperature, top-p, top-k, max_tokens, seed, stop tokens


@dataclass(frozen=True)
class Vocab:
    """What the judge needs to know of the model."""

    size: int  # valid ids are [0, size)
    context_length: int  # prompt plus completion
    stop_ids: tuple[int, ...]  # e.g. <|im_end|> and <|end_of_text|>
    pad_id: int  # fed to left-padded rows of a batch (masked out)


def _trainer() -> ModuleType:
    # examples/ is a folder of scripts, not a package.
    spec = importlib.util.spec_from_file_location("train_demo_model", TRAINER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def prepare_model_dir(kind: str, work_dir: Path) -> Path:
    """The model directory for ``kind`` ("demo", "tiny" or "smollm2"), trained, written or
    converted on first use."""
    if kind == "smollm2":
        from bench import verification_smollm2

        return verification_smollm2.prepare_model_dir(work_dir)
    if kind == "tiny":
        return create_test_model(work_dir / "tiny-model")
    model_dir = work_dir / "stdlib-coder"
    trained: Path = _trainer().train_demo_model(model_dir)
    return trained


def load_model(model_dir: Path, kind: str = "demo") -> tuple[Any, Vocab]:
    """The fp32 reference model (eval mode, CPU) and its vocabulary facts."""
    if kind == "smollm2":
        from bench import verification_smollm2

        return verification_smollm2.load_model(model_dir)
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(
        model_dir, local_files_only=True, dtype=torch.float32
    )
    model.eval()
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    stop_ids = tuple(_token_id(tokenizer, t) for t in (IM_END, EOS_TOKEN))
    vocab = Vocab(
        size=int(model.config.vocab_size),
        context_length=int(model.config.max_position_embeddings),
        stop_ids=stop_ids,
        pad_id=stop_ids[1],
    )
    return model, vocab


def _token_id(tokenizer: Any, token: str) -> int:
    found = tokenizer.token_to_id(token)
    if found is None:
        raise ValueError(f"the tokenizer has no {token!r}")
    return int(found)


def make_jobs(
    model_dir: Path, vocab: Vocab, *, count: int, seed: int, kind: str = "demo"
) -> list[Job]:
    """``count`` requests: half chat, half code continuation, with mixed sampling parameters."""
    if kind == "smollm2":
        from bench import verification_smollm2

        return verification_smollm2.make_jobs(vocab, count=count, seed=seed)
    from tokenizers import Tokenizer

    trainer = _trainer()
    sources = trainer.stdlib_sources(trainer.DemoModelConfig().corpus_max_bytes)
    texts = [data.decode("utf-8", errors="replace") for _, data in sources]
    chats = [
        c.split(f"{IM_START}assistant\n")[0] + f"{IM_START}assistant\n"
        for c in trainer.chat_examples(texts, seed=seed)
    ]
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    rng = random.Random(seed)
    jobs = []
    for index in range(count):
        if index % 2 == 0:
            text = rng.choice(chats)
        else:
            source = rng.choice(texts)
            start = rng.randrange(max(1, len(source) - 400))
            text = source[start : start + rng.randint(60, 300)]
        prompt = tuple(tokenizer.encode(text).ids[-MAX_PROMPT_TOKENS:]) or (vocab.pad_id,)
        params = SamplingParams(
            temperature=rng.choice(TEMPERATURES),
            top_p=rng.choice(TOP_PS),
            top_k=rng.choice(TOP_KS),
            max_tokens=rng.randint(32, 128),
            seed=rng.getrandbits(64),
            stop_token_ids=vocab.stop_ids,
        )
        jobs.append(Job(job_id=f"bench-{seed}-{index}", prompt=prompt, params=params))
    return jobs


def bf16_compute(model: Any) -> Any:
    """An honest miner whose device computes in bfloat16."""
    return copy.deepcopy(model).to(torch.bfloat16)


def fp16_compute(model: Any) -> Any:
    """An honest miner whose device computes in float16."""
    return copy.deepcopy(model).to(torch.float16)


@torch.no_grad()
def bf16_weights(model: Any) -> Any:
    """An honest miner that stores the weights in bfloat16 and computes in float32."""
    rounded = copy.deepcopy(model)
    for parameter in rounded.parameters():
        parameter.copy_(parameter.to(torch.bfloat16).float())
    return rounded


@torch.no_grad()
def int4_weights(model: Any) -> Any:
    """A cheat: every linear layer's weights quantized to int4, symmetric, per group of
    ``INT4_GROUP`` input columns (embeddings and norms kept), computed in float32."""
    quantized = copy.deepcopy(model)
    for module in quantized.modules():
        if isinstance(module, torch.nn.Linear):
            weight = module.weight
            rows, cols = weight.shape
            groups = weight.reshape(rows, cols // INT4_GROUP, INT4_GROUP)
            scale = groups.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / 7.0
            q = torch.clamp(torch.round(groups / scale), -8, 7)
            weight.copy_((q * scale).reshape(rows, cols))
    return quantized


@torch.no_grad()
def noisy_weights(model: Any, *, fraction: float, seed: int) -> Any:
    """A cheat: Gaussian noise of ``fraction`` times each tensor's standard deviation added to
    every weight tensor (norm scales included)."""
    noisy = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    for _, parameter in sorted(noisy.named_parameters()):
        if parameter.numel() > 1:
            noise = torch.randn(parameter.shape, generator=generator) * parameter.std()
            parameter.add_(noise * fraction)
    return noisy


def fewer_layers(model: Any) -> Any:
    """A cheat: the model without its last transformer block (a cheaper, smaller model)."""
    smaller = copy.deepcopy(model)
    smaller.model.layers = smaller.model.layers[:-1]
    smaller.config.num_hidden_layers = len(smaller.model.layers)
    return smaller
