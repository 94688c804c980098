"""cpu_attention_worker configuration."""

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class CpuAttentionConfig:
    address: str = "unix:///tmp/apex-serve/cpu_attention_worker.sock"
    num_threads: int = 1  # attention threads of the serving loop (its own thread is one of them)
    kv_budget_bytes: int = 2**30  # CPU KV pool (shared memory) when SetupDataPlane asks for num_blocks 0
    spin_us: int = 50  # the serving thread spins this long for the next doorbell before it sleeps

    def __post_init__(self) -> None:
        cores = os.cpu_count() or 1
        if not 1 <= self.num_threads <= cores:
            raise ValueError(f"num_threads: must be in [1, {cores}], got {self.num_threads}")
        if self.kv_budget_bytes < 1:
            raise ValueError(f"kv_budget_bytes: must be positive, got {self.kv_budget_bytes}")
        if not 0 <= self.spin_us <= 1_000_000:
            raise ValueError(f"spin_us: must be in [0, 1000000], got {self.spin_us}")
