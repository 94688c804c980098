"""Configuration of the scheduler_service."""

from dataclasses import dataclass

POLICIES = ("gpu-only", "neo", "apex")
HYBRID_POLICIES = ("neo", "apex")  # those that place requests on the CPU and need a cost model


@dataclass(frozen=True)
class SchedulerConfig:
    """What the scheduler is told at start-up; the KV pool sizes and context length come from the worker."""

    max_num_seqs: int = 64  # requests running at once
    max_num_batched_tokens: int = 8192  # tokens of one step (prefill + decode); bounds the prompt length too
    policy: str = "gpu-only"
    address: str = "unix:///tmp/apex-serve/scheduler.sock"
    worker_address: str = "unix:///tmp/apex-serve/gpu_worker.sock"
    profiler_address: str = ""  # where neo and apex get the performance model; empty: gpu-only only
    max_queued_requests: int = 1024  # waiting requests beyond which add_request is refused
    max_sit_out: int = 4  # iterations a running CPU request may go without decoding before it must run
    tpot_target_ms: float = 0.0  # apex: keep each iteration's predicted time under this; 0: no target
    max_swaps_per_step: int = 2  # swap-ins of one step (swap-outs that make room for growth are not capped)
    sample_layers_every: int = 16  # every Nth iteration records per-layer subtask intervals; 0: never
    metrics_address: str = ""  # Prometheus /metrics (host:port); empty: off

    def __post_init__(self) -> None:
        if self.max_num_seqs <= 0:
            raise ValueError(f"max_num_seqs: must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens: must be >= max_num_seqs ({self.max_num_seqs}) so every running "
                f"request can decode in one step, got {self.max_num_batched_tokens}"
            )
        if self.policy not in POLICIES:
            raise ValueError(f"policy: must be one of {POLICIES}, got {self.policy!r}")
        if not self.address:
            raise ValueError("address: must not be empty")
        if not self.worker_address:
            raise ValueError("worker_address: must not be empty")
        if self.max_queued_requests <= 0:
            raise ValueError(f"max_queued_requests: must be >= 1, got {self.max_queued_requests}")
        if self.max_sit_out < 0:
            raise ValueError(f"max_sit_out: must be >= 0, got {self.max_sit_out}")
        if not self.tpot_target_ms >= 0.0:
            raise ValueError(f"tpot_target_ms: must be >= 0 (0: no target), got {self.tpot_target_ms}")
        if self.sample_layers_every < 0:
            raise ValueError(f"sample_layers_every: must be >= 0 (0: never), got {self.sample_layers_every}")
        if self.max_swaps_per_step < 0:
            raise ValueError(f"max_swaps_per_step: must be >= 0, got {self.max_swaps_per_step}")

    @property
    def hybrid(self) -> bool:
        return self.policy in HYBRID_POLICIES
