"""Gateway configuration."""

from dataclasses import dataclass
from pathlib import Path

from apex_serve.flags import option


@dataclass(frozen=True)
class GatewayConfig:
    model_dir: str = option(help="model directory whose tokenizer.json and chat template the gateway uses")
    model_name: str = option("", help="model name clients send and see; empty: the model directory's name")
    address: str = option("127.0.0.1:50051", help="public gRPC address (host:port)")
    http_address: str = option("", help="OpenAI-compatible HTTP address (host:port); empty: off")
    scheduler_address: str = option(
        "unix:///tmp/apex-serve/scheduler.sock",
        help="scheduler gRPC address; comma-separated: replicas, routed by load",
    )
    api_keys: str = option(
        "", help="accepted API keys, comma-separated (sent as 'authorization: Bearer <key>'); empty: no authentication"
    )
    tls_cert_file: str = option(
        "", help="PEM certificate chain; with --tls-key-file the public gRPC port speaks TLS; empty: plaintext"
    )
    tls_key_file: str = option("", help="PEM private key of --tls-cert-file; empty: plaintext")
    max_concurrent_requests: int = option(
        1024, help="requests in flight at once; more get RESOURCE_EXHAUSTED / HTTP 429"
    )
    max_prompt_bytes: int = option(
        1 << 20, help="largest prompt in bytes; larger ones get RESOURCE_EXHAUSTED / HTTP 429 before tokenizing"
    )
    drain_timeout_s: float = option(10.0, help="seconds in-flight requests get to finish after SIGTERM")
    startup_timeout_s: float = option(300.0, help="seconds to wait at start for every scheduler replica to be SERVING")

    def __post_init__(self) -> None:
        if not (Path(self.model_dir) / "tokenizer.json").is_file():
            raise ValueError(f"model_dir: no tokenizer.json in {self.model_dir}")
        addresses = [a.strip() for a in self.scheduler_address.split(",")]
        if not all(addresses):
            raise ValueError(f"scheduler_address: empty entry in {self.scheduler_address!r}")
        if len(set(addresses)) != len(addresses):
            raise ValueError(f"scheduler_address: a replica is listed twice in {self.scheduler_address!r}")
        if self.startup_timeout_s <= 0:
            raise ValueError(f"startup_timeout_s: must be > 0, got {self.startup_timeout_s}")
        if self.drain_timeout_s < 0:
            raise ValueError(f"drain_timeout_s: must be >= 0, got {self.drain_timeout_s}")
        if self.max_concurrent_requests < 1:
            raise ValueError(f"max_concurrent_requests: must be >= 1, got {self.max_concurrent_requests}")
        if self.max_prompt_bytes < 1:
            raise ValueError(f"max_prompt_bytes: must be >= 1, got {self.max_prompt_bytes}")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tls_cert_file, tls_key_file: give both or neither")
        for name in ("tls_cert_file", "tls_key_file"):
            if getattr(self, name) and not Path(getattr(self, name)).is_file():
                raise ValueError(f"{name}: {getattr(self, name)} does not exist")

    @property
    def served_model_name(self) -> str:
        return self.model_name or Path(self.model_dir).resolve().name

    @property
    def scheduler_addresses(self) -> tuple[str, ...]:
        return tuple(a.strip() for a in self.scheduler_address.split(","))

    @property
    def api_key_set(self) -> frozenset[str]:
        return frozenset(k.strip() for k in self.api_keys.split(",") if k.strip())
