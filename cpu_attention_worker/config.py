"""cpu_attention_worker configuration."""

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class CpuAttentionConfig:
    address: str = "unix:///tmp/apex-serve/cpu_attention_worker.sock"
    num_threads: int = 1

    def __post_init__(self) -> None:
        cores = os.cpu_count() or 1
        if not 1 <= self.num_threads <= cores:
            raise ValueError(f"num_threads: must be in [1, {cores}], got {self.num_threads}")
