"""cpu_attention_worker configuration."""

import os
from dataclasses import dataclass

from apex_serve.flags import option


@dataclass(frozen=True)
class CpuAttentionConfig:
    address: str = option(
        "unix:///tmp/apex-serve/cpu_attention_worker.sock",
        help="gRPC address the cpu_attention_worker listens on (unix:///path or host:port)",
    )
    num_threads: int = option(
        1, help="attention threads of the serving loop, its own thread included (at most the cores)"
    )
    kv_budget_bytes: int = option(
        2**30, help="bytes of shared memory for the CPU KV pool when SetupDataPlane asks for num_blocks 0"
    )
    spin_us: int = option(50, help="microseconds the serving thread spins for the next doorbell before it sleeps")

    def __post_init__(self) -> None:
        cores = os.cpu_count() or 1
        if not 1 <= self.num_threads <= cores:
            raise ValueError(f"num_threads: must be in [1, {cores}], got {self.num_threads}")
        if self.kv_budget_bytes < 1:
            raise ValueError(f"kv_budget_bytes: must be positive, got {self.kv_budget_bytes}")
        if not 0 <= self.spin_us <= 1_000_000:
            raise ValueError(f"spin_us: must be in [0, 1000000], got {self.spin_us}")
