"""Gateway configuration."""

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class GatewayConfig:
    model_dir: str
    model_name: str = ""  # empty: the model directory's name
    address: str = "127.0.0.1:50051"
    scheduler_address: str = "unix:///tmp/apex-serve/scheduler.sock"
    drain_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if not (Path(self.model_dir) / "tokenizer.json").is_file():
            raise ValueError(f"model_dir: no tokenizer.json in {self.model_dir}")
        if self.drain_timeout_s < 0:
            raise ValueError(f"drain_timeout_s: must be >= 0, got {self.drain_timeout_s}")

    @property
    def served_model_name(self) -> str:
        return self.model_name or Path(self.model_dir).resolve().name
