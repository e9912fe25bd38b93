"""The coordinator's configuration, built once by the CLI and passed down."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path

from coordinator.billing.limits import LimitsConfig
from coordinator.dispatch.dispatcher import DispatchConfig
from coordinator.gateway.config import GatewayConfig
from coordinator.replicas.lease import LeaseConfig
from coordinator.request_saga import BillingConfig
from coordinator.tls import TlsConfig
from coordinator.verification.policy import VerificationConfig


@dataclass(frozen=True)
class CatalogSource:
    """Where the model catalog comes from: --model NAME=DIR specs, or a TOML file."""

    model_specs: tuple[str, ...] = ()  # "NAME=DIR" pairs from --model
    catalog_file: Path | None = None  # --catalog TOML file; exclusive with model_specs
    input_price_per_mtok: int = (
        100_000  # default micro-units per million prompt tokens (0.1 credit)
    )
    output_price_per_mtok: int = 300_000  # default micro-units per million completion tokens


@dataclass(frozen=True)
class CoordinatorConfig:
    catalog: CatalogSource  # the models this coordinator sells
    data_dir: Path  # embedded PostgreSQL and other state live under here
    database_url: str | None = None  # external PostgreSQL; None starts the embedded server
    http_host: str = "127.0.0.1"  # buyers' OpenAI-compatible API
    http_port: int = 8000  # 0 lets the OS choose (tests)
    grpc_host: str = "127.0.0.1"  # miners dial this; use 0.0.0.0 to accept remote miners
    grpc_port: int = 50051  # 0 lets the OS choose (tests)
    gateway: GatewayConfig = field(default_factory=GatewayConfig)  # miner sessions
    dispatch: DispatchConfig = field(default_factory=DispatchConfig)  # failover and timeouts
    billing: BillingConfig = field(default_factory=BillingConfig)  # the operator's fee
    limits: LimitsConfig = field(default_factory=LimitsConfig)  # requests/tokens per minute per key
    verification: VerificationConfig = field(default_factory=VerificationConfig)  # spot checks
    max_body_bytes: int = 4 * 1024 * 1024  # largest HTTP request body accepted
    access_log: bool = False  # one log line per HTTP request (bench/load.py: ~2% of the CPU)
    ledger_key_path: Path | None = None  # Ed25519 checkpoint signing key; None: data_dir/ledger.key
    ledger_origin: str = "meshmint.local/ledger"  # the log's name in every checkpoint; never change
    checkpoint_interval_s: float = 0.5  # how often a new checkpoint is signed while entries arrive
    rotate_ledger_key: bool = False  # accept a signing key other than the last checkpoint's
    tls: TlsConfig = field(default_factory=TlsConfig)  # HTTPS, gRPC TLS, mTLS (coordinator/tls.py)
    # NATS that links replicas (nats://HOST:PORT, comma-separated for a cluster); None: this
    # process is the whole marketplace. Replicas share database_url and the ledger key.
    nats_url: str | None = None
    # This process's name among the replicas (a NATS subject token); fresh at every start, so a
    # restarted replica never inherits a dead one's leases.
    replica_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    lease: LeaseConfig = field(default_factory=LeaseConfig)  # who is alive among the replicas

    def __post_init__(self) -> None:
        # Refused before anything starts: plaintext off loopback must be asked for.
        self.tls.check_listeners(http_host=self.http_host, grpc_host=self.grpc_host)
        if not self.replica_id or not all(c.isalnum() or c in "-_" for c in self.replica_id):
            raise ValueError(f"replica id {self.replica_id!r}: letters, digits, - and _ only")

    @property
    def replicated(self) -> bool:
        """Whether other coordinator processes share this one's database and miners."""
        return self.nats_url is not None

    @property
    def signing_key_path(self) -> Path:
        return self.ledger_key_path or self.data_dir / "ledger.key"


def join_host_port(host: str, port: int) -> str:
    """``HOST:PORT`` as gRPC and URLs take it: an IPv6 address in brackets (``[::1]:50051``)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
