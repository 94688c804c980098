"""Configuration of the gpu_worker service."""

import re
from dataclasses import dataclass

from apex_serve.flags import option

DTYPES = ("float32", "bfloat16", "float16")
DECODE_KERNELS = ("auto", "flashinfer", "sdpa")
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


@dataclass(frozen=True)
class GpuWorkerConfig:
    """What the gpu_worker is told at start-up; measured values (block counts) are results, not config."""

    model_dir: str = option(help="model directory (config.json and safetensors weights)")
    dtype: str = option(
        "auto", help="dtype of weights and activations: auto (float16 on CUDA, float32 on the CPU), float32, bfloat16 "
        "(CUDA compute capability 8.0 or newer) or float16"
    )
    device: str = option("auto", help="torch device: auto (cuda when available, else cpu), cpu, cuda or cuda:N")
    block_size: int = option(16, help="tokens per KV cache block")
    num_kv_blocks: int | None = option(
        None, help="blocks of the device KV pool; unset: on CUDA from --gpu-memory-utilization, on the CPU from "
        "--device-kv-budget-bytes"
    )
    device_kv_budget_bytes: int = option(
        64 * 2**20, help="the CPU device: bytes of memory for the KV pool (K and V of all layers)"
    )
    gpu_memory_utilization: float = option(
        0.9, help="CUDA: the share of the device's memory for the weights, a step's activations and the KV pool, "
        "which gets what the weights and a worst-case forward (--max-num-batched-tokens, --max-num-seqs) leave"
    )
    max_num_batched_tokens: int = option(
        8192, help="CUDA: tokens of the worst-case forward that sizes the KV pool (the scheduler's step budget)"
    )
    max_num_seqs: int = option(
        64, help="CUDA: rows of the worst-case forward's LM head (the scheduler's requests running at once)"
    )
    decode_attention: str = option(
        "auto", help="decode attention kernel: auto (flashinfer on CUDA compute capability 7.5+ in float16/bfloat16 "
        "where flashinfer-python is installed, else sdpa), flashinfer (refused where it cannot run) or sdpa"
    )
    cuda_graph_max_rows: int = option(
        0, help="CUDA graphs of decode-only steps of up to this many rows, captured per bucket (1, 2, 4, 8, then "
        "every 8) on first use; 0: none. On the CPU device the same static-buffer path runs without graphs"
    )
    max_model_len: int | None = option(
        None, help="longest sequence in tokens (prompt + output); unset: the model's max_position_embeddings"
    )
    num_threads: int = option(1, help="torch threads when the device is the CPU")
    address: str = option(
        "unix:///tmp/apex-serve/gpu_worker.sock",
        help="gRPC address the gpu_worker listens on (unix:///path or host:port)",
    )
    seed: int = option(0, help="seed of the sampling generator for requests that bring no seed of their own")
    cpu_worker_address: str = option(
        "", help="the cpu_attention_worker's gRPC address; empty: no CPU-resident requests"
    )
    cpu_kv_dtype: str = option(
        "auto", help="storage dtype of the CPU KV pool: auto (the model's dtype), float32, bfloat16 or float16"
    )
    cpu_num_kv_blocks: int = option(
        0, help="blocks of the CPU KV pool; 0: as many as the cpu_attention_worker's KV budget holds"
    )
    cpu_max_rows: int = option(64, help="CPU decode rows per sub-batch (sizes the staging buffers)")
    cpu_wait_timeout_s: float = option(
        30.0, help="seconds one layer of CPU attention may take before the cpu_attention_worker counts as lost "
        "(a step's plan may set its own)"
    )
    cpu_reattach_interval_s: float = option(
        0.5, help="seconds between attempts to attach a fresh data plane after the cpu_attention_worker was lost"
    )

    def __post_init__(self) -> None:
        if not self.model_dir:
            raise ValueError("model_dir: must be a model directory, got an empty string")
        if self.dtype not in ("auto", *DTYPES):
            raise ValueError(f"dtype: must be auto or one of {DTYPES}, got {self.dtype!r}")
        if not _DEVICE_RE.match(self.device):
            raise ValueError(f"device: must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.block_size <= 0:
            raise ValueError(f"block_size: must be >= 1, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks <= 0:
            raise ValueError(f"num_kv_blocks: must be >= 1 or None, got {self.num_kv_blocks}")
        if self.device_kv_budget_bytes <= 0:
            raise ValueError(f"device_kv_budget_bytes: must be >= 1, got {self.device_kv_budget_bytes}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization: must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_num_batched_tokens < 1 or not 1 <= self.max_num_seqs <= self.max_num_batched_tokens:
            raise ValueError(f"max_num_seqs: must be in [1, max_num_batched_tokens ({self.max_num_batched_tokens})], "
                             f"got {self.max_num_seqs}")
        if self.decode_attention not in DECODE_KERNELS:
            raise ValueError(f"decode_attention: must be one of {DECODE_KERNELS}, got {self.decode_attention!r}")
        if self.cuda_graph_max_rows < 0:
            raise ValueError(f"cuda_graph_max_rows: must be >= 0, got {self.cuda_graph_max_rows}")
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
        if self.cpu_reattach_interval_s <= 0:
            raise ValueError(f"cpu_reattach_interval_s: must be > 0, got {self.cpu_reattach_interval_s}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed: must be in [0, 2^63), got {self.seed}")
