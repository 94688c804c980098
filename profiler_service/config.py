"""profiler_service configuration."""

from dataclasses import dataclass

from apex_serve.flags import option


@dataclass(frozen=True)
class ProfilerConfig:
    address: str = option(
        "unix:///tmp/apex-serve/profiler.sock",
        help="gRPC address the profiler_service listens on (unix:///path or host:port)",
    )
    gpu_worker_address: str = option(
        "unix:///tmp/apex-serve/gpu_worker.sock",
        help="the gpu_worker's gRPC address (it times the accelerator's tables)",
    )
    cpu_worker_address: str = option(
        "unix:///tmp/apex-serve/cpu_attention_worker.sock",
        help="the cpu_attention_worker's gRPC address (it times the CPU attention table)",
    )
    profile_dir: str = option(".apex-profiles", help="directory of performance profiles, one JSON file per profile key")
    warmup: int = option(2, help="untimed runs before each measured grid point")
    repeats: int = option(5, help="timed runs per grid point (their median is kept)")

    def __post_init__(self) -> None:
        if self.warmup < 0:
            raise ValueError(f"warmup: must be >= 0, got {self.warmup}")
        if self.repeats < 1:
            raise ValueError(f"repeats: must be >= 1, got {self.repeats}")
        if not self.profile_dir:
            raise ValueError("profile_dir: must not be empty")
