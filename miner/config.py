"""The miner daemon's settings, and the parsers for their command-line spellings."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from miner.engine.base import DEFAULT_MAX_BATCH_TOKENS, BatchingConfig
from miner.tls import CoordinatorTls
from proto.gguf import is_gguf_path

DEFAULT_KEY_PATH = Path("~/.meshmint/miner/identity.key")
"""Where the identity key lives unless ``--key`` or ``MESHMINT_MINER_KEY`` says otherwise."""

DEVICES = ("cpu", "cuda", "mps")
DTYPES = ("float32", "bfloat16", "float16")
ENGINES = ("torch", "vllm")
"""``torch``: miner/engine/torch_engine.py (any device); ``vllm``: miner/engine/vllm_engine.py
(CUDA, ``pip install 'meshmint[vllm]'``)."""


@dataclass(frozen=True)
class ModelSpec:
    """One model to serve, as given by ``--model NAME=DIR`` or ``--model NAME=FILE.gguf``."""

    name: str  # catalog name the coordinator knows the model by
    # Hugging Face model directory (config.json, weights, tokenizer), or a GGUF file that the
    # engine converts once into cache_dir (miner/engine/gguf_cache.py).
    path: Path


@dataclass(frozen=True)
class MinerConfig:
    """Everything the daemon needs besides its identity and its loaded engines."""

    # "HOST:PORT" of the coordinator's miner gateway; the miner only ever dials out.
    coordinator: str
    # More gateways of the same marketplace (replicas, or a standby), tried in turn after
    # ``coordinator`` when a connection cannot be made or is lost (--coordinator A,B,...).
    fallback_coordinators: tuple[str, ...] = ()
    # Models to load and announce; the CLI loads them, the daemon serves what it is given.
    models: tuple[ModelSpec, ...] = ()
    # PEM file holding the Ed25519 identity; "~" is expanded when the key is loaded.
    key_path: Path = DEFAULT_KEY_PATH
    # Jobs run at once, and the largest batch each model's engine decodes in one forward pass.
    # Decoding is memory-bound, so a batch of 16 costs a GPU little more than one job; the
    # default stays 1 so a CPU-only box does not promise more than it can serve.
    max_concurrency: int = 1
    # Tokens one engine step feeds at most (decode rows plus prompt chunks): bounds how long a
    # long prompt's prefill holds up the jobs already decoding.
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS
    # Token positions each engine's KV cache holds, across its jobs (allocated at start); None:
    # room for max_concurrency jobs of min(context, 2048) tokens, at least one full context.
    kv_cache_tokens: int | None = None
    # Which engine runs the models (one of ENGINES): both sample with miner/sampler.py.
    engine: str = "torch"
    # "cpu", "cuda", "cuda:N" or "mps"; None lets the engine pick the best device present.
    device: str | None = None
    # "float32", "bfloat16" or "float16"; None lets the engine pick for the device.
    dtype: str | None = None
    # On shutdown, how long in-flight jobs may run before they are handed back unfinished.
    drain_timeout_s: float = 30.0
    # Reconnect delays grow from this (full jitter)...
    backoff_min_s: float = 0.5
    # ... doubling per failed attempt up to this; a Welcome resets the growth.
    backoff_max_s: float = 30.0
    # A coordinator that does not finish the handshake within this is treated as unreachable.
    handshake_timeout_s: float = 15.0
    # HTTP/2 keepalive ping period, so NAT boxes keep the idle connection open.
    keepalive_s: float = 20.0
    # Where verified credit receipts and the latest ledger checkpoint are kept
    # (miner/witness_store.py); None: receipts are not checked (the CLI always sets it).
    witness_dir: Path | None = None
    # Where GGUF models are converted into loadable directories, once per file; miners may share
    # one (miner/engine/gguf_cache.py). None: GGUF models cannot be served (the CLI sets it).
    cache_dir: Path | None = None
    # TLS to the coordinator: on by default off loopback (the rule is in miner/tls.py).
    tls: CoordinatorTls = field(default_factory=CoordinatorTls)
    # Declared in the hello: whether this miner may keep prompts or completions (logs,
    # datasets). True keeps it away from buyers who send provider.data_collection "deny".
    retains_data: bool = False

    @property
    def coordinators(self) -> tuple[str, ...]:
        """Every gateway to try, in order: ``coordinator``, then the fallbacks."""
        return (self.coordinator, *self.fallback_coordinators)

    def __post_init__(self) -> None:
        for address in self.coordinators:
            parse_coordinator(address)
        if len(set(self.coordinators)) != len(self.coordinators):
            raise ValueError(f"a coordinator is listed twice: {','.join(self.coordinators)}")
        if self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {self.max_concurrency}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        # The engine's own rules for these (one place for them).
        BatchingConfig(
            max_batch_size=self.max_concurrency,
            max_batch_tokens=self.max_batch_tokens,
            kv_cache_tokens=self.kv_cache_tokens,
        )
        if self.drain_timeout_s < 0:
            raise ValueError(f"drain_timeout_s must be >= 0, got {self.drain_timeout_s}")
        if not 0 < self.backoff_min_s <= self.backoff_max_s:
            raise ValueError(
                f"need 0 < backoff_min_s <= backoff_max_s, "
                f"got {self.backoff_min_s} and {self.backoff_max_s}"
            )
        if self.handshake_timeout_s <= 0 or self.keepalive_s <= 0:
            raise ValueError("handshake_timeout_s and keepalive_s must be positive")
        names = [spec.name for spec in self.models]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"model served twice: {', '.join(duplicates)}")


def parse_coordinators(text: str) -> tuple[str, tuple[str, ...]]:
    """``--coordinator A[,B,...]``: the first gateway and the fallbacks, each checked."""
    addresses = [address.strip() for address in text.split(",")]
    for address in addresses:
        parse_coordinator(address)
    return addresses[0], tuple(addresses[1:])


def parse_coordinator(address: str) -> tuple[str, int]:
    """Splits "HOST:PORT" (IPv6 as "[::1]:PORT"); raises ValueError when malformed."""
    host, separator, port_text = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not separator or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"coordinator must be HOST:PORT, got {address!r}")
    return host, int(port_text)


def parse_model_spec(text: str) -> ModelSpec:
    """Parses "NAME=DIR" or "NAME=FILE.gguf"; raises ValueError unless DIR is an existing
    directory or FILE.gguf an existing file (whether the model loads is the engine's to say)."""
    name, separator, location = text.partition("=")
    name = name.strip()
    if not separator or not name or not location:
        raise ValueError(f"--model must be NAME=DIR or NAME=FILE.gguf, got {text!r}")
    path = Path(location).expanduser()
    if path.is_dir():
        return ModelSpec(name=name, path=path)
    if is_gguf_path(path):
        if not path.is_file():
            raise ValueError(f"GGUF file for {name!r} does not exist: {path}")
        return ModelSpec(name=name, path=path)
    if path.exists():
        raise ValueError(f"model for {name!r} must be a directory or a .gguf file: {path}")
    raise ValueError(f"model directory for {name!r} does not exist: {path}")


def default_witness_dir(key_path: Path) -> Path:
    """Where a miner keeps its credit receipts and checkpoint: beside its key, named after it
    (``~/.meshmint/miner/identity.key`` -> ``~/.meshmint/miner/identity.ledger/``), so that
    several identities in one directory never share receipts."""
    path = Path(key_path).expanduser()
    beside = path.with_suffix(".ledger")
    return beside if beside != path else path.with_name(path.name + ".ledger")


def default_cache_dir(key_path: Path) -> Path:
    """Where a miner converts GGUF models: ``model-cache/`` in its key's directory
    (``~/.meshmint/miner/identity.key`` -> ``~/.meshmint/miner/model-cache/``). Unlike the
    witness directory it is shared by every identity there: entries are keyed by the GGUF
    file's digest, so sharing only saves conversions."""
    return Path(key_path).expanduser().parent / "model-cache"
