"""Configuration of the scheduler_service."""

from dataclasses import dataclass

from apex_serve.flags import option

POLICIES = ("gpu-only", "neo", "apex")
HYBRID_POLICIES = ("neo", "apex")  # those that place requests on the CPU and need a cost model


@dataclass(frozen=True)
class SchedulerConfig:
    """What the scheduler is told at start-up; the KV pool sizes and context length come from the worker."""

    max_num_seqs: int = option(64, help="requests running at once")
    max_num_batched_tokens: int = option(
        8192, help="tokens one step computes: a decode row counts one, a prefill chunk its tokens (longer prompts are "
        "prefilled in chunks over several steps; apex, while requests wait and the pools are full, gives the prompts "
        "longer than the ridge of the step's decode work at most that many tokens a step)"
    )
    policy: str = option(
        "gpu-only", help="placement policy: gpu-only, neo or apex (neo and apex need --profiler-address)"
    )
    address: str = option(
        "unix:///tmp/apex-serve/scheduler.sock",
        help="gRPC address the scheduler listens on (unix:///path or host:port)",
    )
    worker_address: str = option("unix:///tmp/apex-serve/gpu_worker.sock", help="the gpu_worker's gRPC address")
    profiler_address: str = option(
        "",
        help="the profiler_service's gRPC address, where neo and apex get the performance model; empty: gpu-only only",
    )
    max_queued_requests: int = option(1024, help="waiting requests beyond which new requests are refused")
    max_sit_out: int = option(
        4, help="iterations a running CPU-resident request may go without decoding before it must run"
    )
    tpot_slo_ms: float = option(
        0.0, help="apex and neo: CPU rows and modes chosen so the running requests' predicted p99 TPOT stays under "
        "this, in ms; 0: no objective"
    )
    ttft_slo_ms: float = option(
        0.0, help="apex and neo: iterations chosen so waiting requests' predicted time to first token stays under "
        "this, in ms; 0: no objective"
    )
    async_scheduling: bool = option(
        True, help="plan each iteration while the gpu_worker runs the one before and send it before that one ends, "
        "so no iteration waits on a round trip or on the scheduler's bookkeeping (a token a finished request gets in "
        "the iteration planned ahead is dropped)"
    )
    max_swaps_per_step: int = option(
        2, help="swap-ins of one step (swap-outs that make room for growth are not capped)"
    )
    sample_layers_every: int = option(16, help="every Nth iteration records per-layer subtask intervals; 0: never")
    metrics_address: str = option("", help="Prometheus /metrics address (host:port); empty: off")
    cpu_deadline_factor: float = option(
        20.0, help="a step with CPU work gives each layer of its CPU rows this many times the step's estimated time "
        "before the cpu_attention_worker counts as lost (within cpu_deadline_min_s and cpu_deadline_max_s)"
    )
    cpu_deadline_min_s: float = option(1.0, help="the least time a layer of the CPU rows is given, in seconds")
    cpu_deadline_max_s: float = option(
        30.0, help="the most time a layer of the CPU rows is given, in seconds; also the time without a prediction"
    )

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
        for name in ("tpot_slo_ms", "ttft_slo_ms"):
            if not getattr(self, name) >= 0.0:
                raise ValueError(f"{name}: must be >= 0 (0: no objective), got {getattr(self, name)}")
        if self.sample_layers_every < 0:
            raise ValueError(f"sample_layers_every: must be >= 0 (0: never), got {self.sample_layers_every}")
        if not self.cpu_deadline_factor > 0.0:
            raise ValueError(f"cpu_deadline_factor: must be > 0, got {self.cpu_deadline_factor}")
        if not 0.0 < self.cpu_deadline_min_s <= self.cpu_deadline_max_s:
            raise ValueError(f"cpu_deadline_min_s, cpu_deadline_max_s: must satisfy 0 < min <= max, got "
                             f"{self.cpu_deadline_min_s} and {self.cpu_deadline_max_s}")
        if self.max_swaps_per_step < 0:
            raise ValueError(f"max_swaps_per_step: must be >= 0, got {self.max_swaps_per_step}")

    @property
    def hybrid(self) -> bool:
        return self.policy in HYBRID_POLICIES
