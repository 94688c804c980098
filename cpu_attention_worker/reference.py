"""Plain numpy reference of the paged decode-attention kernel, for tests and benchmarks only.

Same layout and arguments as cpu_attention_worker.kernel; by default computes in float64 on the
decoded stored values, so it measures the kernel's arithmetic error alone (the benchmark times
it in float32, as a naive numpy implementation).
"""

import numpy as np

from cpu_attention_worker.kernel import KvDtype


def decode_kv(stored: np.ndarray, kv_dtype: KvDtype) -> np.ndarray:
    """Stored cache values (float32, or float16/bfloat16 bits in uint16) as float32."""
    if kv_dtype == "float32":
        return stored.astype(np.float32)
    if kv_dtype == "float16":
        return stored.view(np.float16).astype(np.float32)
    if kv_dtype == "bfloat16":
        return (stored.astype(np.uint32) << 16).view(np.float32)
    raise ValueError(f"kv_dtype: unknown {kv_dtype!r}")


def encode_kv(values: np.ndarray, kv_dtype: KvDtype) -> np.ndarray:
    """Finite float values in their storage form: float32, or uint16 bits (round to nearest even)."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    if kv_dtype == "float32":
        return values
    if kv_dtype == "float16":
        return values.astype(np.float16).view(np.uint16)
    if kv_dtype == "bfloat16":
        bits = values.view(np.uint32)
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    raise ValueError(f"kv_dtype: unknown {kv_dtype!r}")


def paged_decode_attention(
    q: np.ndarray,  # [num_rows, num_q_heads, head_dim]
    k_cache: np.ndarray,  # [num_blocks, num_kv_heads, block_size, head_dim] stored values
    v_cache: np.ndarray,  # [num_blocks, num_kv_heads, block_size, head_dim] stored values
    block_tables: np.ndarray,  # [num_rows, max_blocks_per_row]
    context_lens: np.ndarray,  # [num_rows]
    scale: float | None = None,
    kv_dtype: KvDtype = "float32",
    compute_dtype: type[np.floating] = np.float64,
) -> np.ndarray:  # [num_rows, num_q_heads, head_dim] float32
    num_rows, num_q_heads, head_dim = q.shape
    _, num_kv_heads, block_size, _ = k_cache.shape
    group = num_q_heads // num_kv_heads
    scale = 1.0 / np.sqrt(head_dim) if scale is None else scale
    out = np.empty((num_rows, num_q_heads, head_dim), dtype=np.float32)
    for row in range(num_rows):
        length = int(context_lens[row])
        blocks = block_tables[row, : -(-length // block_size)]
        # each [num_kv_heads, length, head_dim]
        keys, values = (
            decode_kv(cache[blocks], kv_dtype).transpose(1, 0, 2, 3).reshape(num_kv_heads, -1, head_dim)[:, :length]
            for cache in (k_cache, v_cache)
        )
        queries = q[row].reshape(num_kv_heads, group, head_dim).astype(compute_dtype)
        scores = np.einsum("hgd,hnd->hgn", queries, keys.astype(compute_dtype)) * scale  # [kv_heads, group, length]
        probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        out[row] = np.einsum("hgn,hnd->hgd", probs, values.astype(compute_dtype)).reshape(num_q_heads, head_dim)
    return out


def append_kv(
    k_cache: np.ndarray,  # [num_blocks, num_kv_heads, block_size, head_dim], written in place
    v_cache: np.ndarray,  # [num_blocks, num_kv_heads, block_size, head_dim], written in place
    k_new: np.ndarray,  # [num_rows, num_kv_heads, head_dim]
    v_new: np.ndarray,  # [num_rows, num_kv_heads, head_dim]
    slot_mapping: np.ndarray,  # [num_rows]
) -> None:
    block_size = k_cache.shape[2]
    for row, slot in enumerate(slot_mapping):
        k_cache[slot // block_size, :, slot % block_size] = k_new[row]
        v_cache[slot // block_size, :, slot % block_size] = v_new[row]
