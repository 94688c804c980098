"""Configuration of the gpu_worker service."""

import re
from dataclasses import dataclass

DTYPES = ("float32", "bfloat16", "float16")
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


@dataclass(frozen=True)
class GpuWorkerConfig:
    """What the gpu_worker is told at start-up; measured values (block counts) are results, not config."""

    model_dir: str
    dtype: str = "float32"
    device: str = "auto"  # auto: cuda when available, else cpu
    block_size: int = 16
    num_kv_blocks: int | None = None  # explicit KV pool size; overrides device_kv_budget_bytes
    device_kv_budget_bytes: int = 64 * 2**20  # K and V of all layers
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    num_threads: int = 1  # torch threads when the device is the CPU
    address: str = "unix:///tmp/apex-serve/gpu_worker.sock"
    seed: int = 0  # generator of unseeded sampling
    cpu_worker_address: str = ""  # the cpu_attention_worker's gRPC address; empty: no CPU-resident requests
    cpu_kv_dtype: str = "auto"  # storage of the CPU KV pool; auto: the model's dtype
    cpu_num_kv_blocks: int = 0  # 0: as many as the cpu_attention_worker's KV budget holds
    cpu_max_rows: int = 64  # CPU decode rows per sub-batch (staging buffer size)
    cpu_wait_timeout_s: float = 30.0  # longest wait for one layer of CPU attention before the step fails

    def __post_init__(self) -> None:
        if not self.model_dir:
            raise ValueError("model_dir: must be a model directory, got an empty string")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: must be one of {DTYPES}, got {self.dtype!r}")
        if not _DEVICE_RE.match(self.device):
            raise ValueError(f"device: must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.block_size <= 0:
            raise ValueError(f"block_size: must be >= 1, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks <= 0:
            raise ValueError(f"num_kv_blocks: must be >= 1 or None, got {self.num_kv_blocks}")
        if self.device_kv_budget_bytes <= 0:
            raise ValueError(f"device_kv_budget_bytes: must be >= 1, got {self.device_kv_budget_bytes}")
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ValueError(f"max_model_len: must be >= 1 or None, got {self.max_model_len}")
        if self.num_threads <= 0:
            raise ValueError(f"num_threads: must be >= 1, got {self.num_threads}")
        if not self.address:
            raise ValueError("address: must not be empty")
        if self.cpu_kv_dtype not in ("auto", *DTYPES):
            raise ValueError(f"cpu_kv_dtype: must be auto or one of {DTYPES}, got {self.cpu_kv_dtype!r}")
        if self.cpu_num_kv_blocks < 0:
            raise ValueError(f"cpu_num_kv_blocks: must be >= 0, got {self.cpu_num_kv_blocks}")
        if self.cpu_max_rows <= 0:
            raise ValueError(f"cpu_max_rows: must be >= 1, got {self.cpu_max_rows}")
        if self.cpu_wait_timeout_s <= 0:
            raise ValueError(f"cpu_wait_timeout_s: must be > 0, got {self.cpu_wait_timeout_s}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed: must be in [0, 2^63), got {self.seed}")
