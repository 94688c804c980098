"""The paged KV pool of the accelerator. Block ids are owned by the scheduler; the worker only reads and writes."""

import logging

import numpy as np
import torch

from gpu_worker.model_config import ModelConfig

logger = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # by config name


def torch_view(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A tensor over the array's memory; 16-bit storage (numpy uint16 or float16) reinterpreted as dtype."""
    if array.dtype == np.float32:
        return torch.from_numpy(array)
    return torch.from_numpy(array.view(np.uint16)).view(dtype)


def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block id takes over all layers, K and V."""
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * config.num_key_value_heads * block_size * config.head_dim * element


class PagedKVCache:
    """K and V, each [num_layers, num_blocks, num_kv_heads, block_size, head_dim] (DESIGN §4).

    A request's token at position p lives in block block_ids[p // block_size], offset p % block_size.
    """

    def __init__(
        self, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        shape = (config.num_hidden_layers, num_blocks, config.num_key_value_heads, block_size, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # [layers, blocks, kv_heads, block_size, head_dim]
        self.v = torch.zeros(shape, dtype=dtype, device=device)  # [layers, blocks, kv_heads, block_size, head_dim]
        self.num_blocks = num_blocks
        self.block_size = block_size
        logger.info("KV pool: %d blocks of %d tokens, %.1f MiB", num_blocks, block_size, 2 * self.k.nbytes / 2**20)

    @classmethod
    def wrap(cls, k: torch.Tensor, v: torch.Tensor) -> "PagedKVCache":
        """A pool over existing K and V [layers, blocks, kv_heads, block_size, head_dim] (e.g. shared memory)."""
        cache = cls.__new__(cls)
        cache.k, cache.v = k, v
        cache.num_blocks, cache.block_size = k.shape[1], k.shape[3]
        return cache

    def write(
        self,
        layer_idx: int,
        k: torch.Tensor,
        v: torch.Tensor,
        slot_blocks: torch.Tensor,
        slot_offsets: torch.Tensor,
    ) -> None:
        """Store k, v [num_tokens, num_kv_heads, head_dim] at (slot_blocks, slot_offsets) [num_tokens]."""
        self.k[layer_idx][slot_blocks, :, slot_offsets] = k.to(self.k.dtype)  # [num_tokens, kv_heads, head_dim]
        self.v[layer_idx][slot_blocks, :, slot_offsets] = v.to(self.v.dtype)

    def head_index(self, block_tables: torch.Tensor) -> torch.Tensor:
        """[rows, kv_heads, max_blocks] indices into a layer viewed as [blocks x kv_heads, block_size, head_dim] of
        block_tables [rows, max_blocks]: what gather() reads, built once per step for every layer."""
        heads = self.k.shape[2]
        offsets = torch.arange(heads, device=block_tables.device)  # [kv_heads]
        return block_tables[:, None, :] * heads + offsets[None, :, None]  # [rows, kv_heads, max_blocks]

    def gather(self, layer_idx: int, block_tables: torch.Tensor, head_index: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V [rows, num_kv_heads, max_blocks * block_size, head_dim] of block_tables [rows, max_blocks]: one
        index of each layer's (block, head) rows and a view (head_index: head_index(block_tables), where built)."""
        index = self.head_index(block_tables) if head_index is None else head_index  # [rows, kv_heads, max_blocks]
        rows, heads, max_blocks = index.shape
        _, _, block_size, head_dim = self.k.shape[1:]
        slots = max_blocks * block_size
        k = self.k[layer_idx].view(-1, block_size, head_dim)[index]  # [rows, kv_heads, max_blocks, block, head_dim]
        v = self.v[layer_idx].view(-1, block_size, head_dim)[index]
        return k.view(rows, heads, slots, head_dim), v.view(rows, heads, slots, head_dim)

    def gather_context(self, layer_idx: int, blocks: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V [num_kv_heads, num_tokens, head_dim] of a request's positions [0, num_tokens), which blocks [n]
        (its first block ids, n >= ceil(num_tokens / block_size)) hold."""
        k, v = self.gather(layer_idx, blocks[None])  # [1, kv_heads, n * block_size, head_dim]
        return k[0, :, :num_tokens], v[0, :, :num_tokens]
