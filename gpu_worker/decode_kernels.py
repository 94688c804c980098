"""The decode attention kernels behind attention.DecodeKernel, and which one a device gets.

- `flashinfer`: FlashInfer's paged decode (BatchDecodeWithPagedKVCacheWrapper in the HND layout, which is the pool's
  per-layer [blocks, kv_heads, block_size, head_dim]): reads each row's pages in place, GQA native. FlashInfer
  supports compute capability 7.5 (T4) and newer, in float16 and bfloat16; it is an optional dependency
  (`pip install flashinfer-python`, which builds its kernels for the device on first use).
- `sdpa`: the portable path everywhere else (the CPU, float32, no FlashInfer): each row's context gathered with one
  index into a padded [rows, kv_heads, slots, head_dim], attended by SDPA's fused kernels (attention.decode_attention).

`--decode-attention auto` takes FlashInfer where the device allows it, it is installed and its warm-up decode runs
(without a CUDA toolkit for its JIT build, install flashinfer-jit-cache for the device's CUDA), else SDPA; naming
`flashinfer` where it cannot run is refused with the reason.
"""

import importlib
import logging
import subprocess
from types import ModuleType
from typing import Any

import torch

from gpu_worker.attention import LIVE_PLANS, AttentionMetadata, DecodePlan, additive_mask, decode_attention
from gpu_worker.config import DECODE_KERNELS
from gpu_worker.kv_cache import PagedKVCache
from gpu_worker.model_config import ModelConfig

logger = logging.getLogger(__name__)

FLASHINFER_MIN_CAPABILITY = (7, 5)  # FlashInfer's README: SM75 and later
FLASHINFER_DTYPES = (torch.float16, torch.bfloat16)
WORKSPACE_BYTES = 128 * 2**20  # FlashInfer's recommended float workspace for split-KV decode


class _SdpaPlan:
    def __init__(self, cache: PagedKVCache, metadata: AttentionMetadata, dtype: torch.dtype) -> None:
        self.cache = cache
        self.tables = metadata.decode_block_tables  # [rows, max_blocks]
        self.head_index = cache.head_index(self.tables)  # [rows, kv_heads, max_blocks]
        self.bias = additive_mask(metadata.decode_mask, dtype)  # [rows, 1, 1, slots]

    def run(self, layer_idx: int, q: torch.Tensor) -> torch.Tensor:
        k, v = self.cache.gather(layer_idx, self.tables, self.head_index)  # [rows, kv_heads, slots, head_dim]
        return decode_attention(q, k, v, self.bias)  # [rows, num_heads, head_dim]


class SdpaDecode:
    """The portable decode attention: gathered and padded context, SDPA's fused kernels."""

    name = "sdpa"

    def plan(self, cache: PagedKVCache, metadata: AttentionMetadata, dtype: torch.dtype) -> DecodePlan:
        return _SdpaPlan(cache, metadata, dtype)


class _FlashInferPlan:
    def __init__(self, wrapper: Any, cache: PagedKVCache) -> None:
        self.wrapper = wrapper
        self.cache = cache

    def run(self, layer_idx: int, q: torch.Tensor) -> torch.Tensor:
        # the layer's pages in place: K and V [blocks, kv_heads, block_size, head_dim] (HND)
        return self.wrapper.run(q, (self.cache.k[layer_idx], self.cache.v[layer_idx]))


class FlashInferDecode:
    """FlashInfer's paged decode: one wrapper per live plan (a wrapper holds one plan), sharing one workspace."""

    name = "flashinfer"

    def __init__(self, flashinfer: ModuleType, device: torch.device, num_heads: int) -> None:
        self.num_heads = num_heads
        # made before the KV pool is sized, so the sizing counts it with the weights
        self.workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self._wrappers = [flashinfer.BatchDecodeWithPagedKVCacheWrapper(self.workspace, kv_layout="HND")
                          for _ in range(LIVE_PLANS)]
        self._next = 0

    def plan(self, cache: PagedKVCache, metadata: AttentionMetadata, dtype: torch.dtype) -> DecodePlan:
        wrapper = self._wrappers[self._next]
        self._next = (self._next + 1) % LIVE_PLANS
        pages = metadata.decode_pages
        _, _, kv_heads, block_size, head_dim = cache.k.shape
        wrapper.plan(
            pages.indptr, pages.indices, pages.last_page_lens, self.num_heads, kv_heads, head_dim, block_size,
            pos_encoding_mode="NONE", q_data_type=dtype, kv_data_type=cache.k.dtype,
        )
        return _FlashInferPlan(wrapper, cache)

    def warm_up(self, kv_heads: int, block_size: int, head_dim: int, dtype: torch.dtype) -> None:
        """Plan and run one decode over a one-block pool: FlashInfer builds (or loads) its kernel for these shapes
        and dtypes now, so one that cannot be built fails at start-up, not in a step."""
        device = self.workspace.device
        shape = (1, 1, kv_heads, block_size, head_dim)  # [layers, blocks, kv_heads, block_size, head_dim]
        cache = PagedKVCache.wrap(torch.zeros(shape, dtype=dtype, device=device),
                                  torch.zeros(shape, dtype=dtype, device=device))
        metadata = AttentionMetadata.build([], [], [], [[0]], [1], block_size, device)
        self.plan(cache, metadata, dtype).run(0, torch.zeros(1, self.num_heads, head_dim, dtype=dtype, device=device))


def flashinfer_refusal(device: torch.device, dtype: torch.dtype, capability: tuple[int, int] | None) -> str | None:
    """Why FlashInfer's decode cannot serve this device and dtype (None: it can, if installed); capability is the
    CUDA device's (None on other devices)."""
    if device.type != "cuda" or capability is None:
        return f"FlashInfer runs on CUDA devices, this one is {device.type}"
    if capability < FLASHINFER_MIN_CAPABILITY:
        return (f"FlashInfer needs compute capability {'.'.join(map(str, FLASHINFER_MIN_CAPABILITY))}, "
                f"this device is {capability[0]}.{capability[1]}")
    if dtype not in FLASHINFER_DTYPES:
        return f"FlashInfer's decode takes float16 or bfloat16, the model runs in {str(dtype).removeprefix('torch.')}"
    return None


def import_flashinfer() -> ModuleType | None:
    """The flashinfer module, or None where it is not installed."""
    try:
        return importlib.import_module("flashinfer")
    except ImportError:
        return None


def decode_kernel_for(
    choice: str, device: torch.device, dtype: torch.dtype, config: ModelConfig, block_size: int,
    capability: tuple[int, int] | None = None, flashinfer: ModuleType | None = None,
) -> SdpaDecode | FlashInferDecode:
    """The kernel `choice` (one of DECODE_KERNELS) names for the device: auto takes FlashInfer where it can run, is
    installed (`flashinfer`, else imported) and passes its warm-up, else SDPA; `flashinfer` where it cannot is a
    ValueError naming why."""
    if choice not in DECODE_KERNELS:
        raise ValueError(f"decode_attention: must be one of {DECODE_KERNELS}, got {choice!r}")
    if choice == "sdpa":
        return SdpaDecode()
    kernel = _flashinfer_or_why(device, dtype, config, block_size, capability, flashinfer)
    if isinstance(kernel, FlashInferDecode):
        return kernel
    if choice == "flashinfer":
        raise ValueError(f"decode_attention: flashinfer cannot run here: {kernel}")
    logger.info("decode attention: sdpa (%s)", kernel)
    return SdpaDecode()


def _flashinfer_or_why(
    device: torch.device, dtype: torch.dtype, config: ModelConfig, block_size: int,
    capability: tuple[int, int] | None, flashinfer: ModuleType | None,
) -> FlashInferDecode | str:
    """FlashInfer's decode, warmed up, or why it cannot serve here."""
    refusal = flashinfer_refusal(device, dtype, capability)
    if refusal is not None:
        return refusal
    module = flashinfer or import_flashinfer()
    if module is None:
        return "flashinfer is not installed (pip install flashinfer-python)"
    try:
        kernel = FlashInferDecode(module, device, config.num_attention_heads)
        kernel.warm_up(config.num_key_value_heads, block_size, config.head_dim, dtype)
    except (RuntimeError, OSError, ValueError, subprocess.SubprocessError) as exc:
        return f"flashinfer failed its warm-up: {exc}"
    logger.info("decode attention: flashinfer %s", getattr(module, "__version__", ""))
    return kernel
