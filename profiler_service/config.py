"""profiler_service configuration."""

from dataclasses import dataclass


@dataclass(frozen=True)
class ProfilerConfig:
    address: str = "unix:///tmp/apex-serve/profiler.sock"
    gpu_worker_address: str = "unix:///tmp/apex-serve/gpu_worker.sock"
    cpu_worker_address: str = "unix:///tmp/apex-serve/cpu_attention_worker.sock"
    profile_dir: str = ".apex-profiles"  # one JSON file per profile key
    warmup: int = 2
    repeats: int = 5

    def __post_init__(self) -> None:
        if self.warmup < 0:
            raise ValueError(f"warmup: must be >= 0, got {self.warmup}")
        if self.repeats < 1:
            raise ValueError(f"repeats: must be >= 1, got {self.repeats}")
        if not self.profile_dir:
            raise ValueError("profile_dir: must not be empty")
