"""Configuration of the scheduler_service."""

from dataclasses import dataclass

POLICIES = ("gpu-only",)


@dataclass(frozen=True)
class SchedulerConfig:
    """What the scheduler is told at start-up; the KV pool size and context length come from the worker."""

    max_num_seqs: int = 64  # requests running at once
    max_num_batched_tokens: int = 8192  # tokens of one step (prefill + decode); bounds the prompt length too
    policy: str = "gpu-only"
    address: str = "unix:///tmp/apex-serve/scheduler.sock"
    worker_address: str = "unix:///tmp/apex-serve/gpu_worker.sock"
    max_queued_requests: int = 1024  # waiting requests beyond which add_request is refused

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
