"""Random paged KV pools and block tables for the decode attention tests."""

import torch

from gpu_worker.kv_cache import PagedKVCache

BLOCK = 16


def random_pool(heads: tuple[int, int, int], dtype: torch.dtype, device: str, blocks: int = 48) -> PagedKVCache:
    """Two layers of random K and V [layers, blocks, kv_heads, BLOCK, head_dim] for heads (q, kv, head_dim)."""
    _, kv_heads, head_dim = heads
    generator = torch.Generator().manual_seed(7)
    shape = (2, blocks, kv_heads, BLOCK, head_dim)
    k = torch.randn(shape, generator=generator).to(device, dtype)
    v = torch.randn(shape, generator=generator).to(device, dtype)
    return PagedKVCache.wrap(k, v)


def disjoint_tables(contexts: list[int], blocks: int = 48) -> list[list[int]]:
    """Block tables of decode rows of these contexts over disjoint, shuffled blocks of the pool."""
    order = torch.randperm(blocks, generator=torch.Generator().manual_seed(3)).tolist()
    tables = []
    for context in contexts:
        n = -(-context // BLOCK)
        tables.append(order[:n])
        order = order[n:]
    return tables
