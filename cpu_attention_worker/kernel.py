"""Typed numpy wrapper over the C++ paged decode-attention kernel (`_kernel`); needs no torch.

Cache layout (DESIGN.md section 4), one layer: K and V each [num_blocks, num_kv_heads, block_size,
head_dim]. Storage is float32, or float16/bfloat16 held in uint16 arrays (numpy float16 arrays
are accepted too and passed on as their bits). Arithmetic is fp32.
"""

from typing import Literal, TypedDict, get_args

import numpy as np

from cpu_attention_worker import _kernel

KvDtype = Literal["float32", "float16", "bfloat16"]
KV_DTYPES: tuple[KvDtype, ...] = get_args(KvDtype)


class KernelInfo(TypedDict):
    isa: str
    dtypes: tuple[str, ...]


def kernel_info() -> KernelInfo:
    return KernelInfo(isa=_kernel.ISA, dtypes=tuple(_kernel.DTYPES))


def _require(name: str, array: np.ndarray, dtype: type[np.generic]) -> None:
    if not isinstance(array, np.ndarray):
        raise TypeError(f"{name}: expected a numpy array, got {type(array).__name__}")
    if array.dtype != dtype:
        raise ValueError(f"{name}: expected dtype {np.dtype(dtype)}, got {array.dtype}")
    if not array.flags.c_contiguous:
        raise ValueError(f"{name}: must be C-contiguous")


def _storage(name: str, array: np.ndarray, kv_dtype: KvDtype | None) -> tuple[np.ndarray, KvDtype]:
    """The array as the C++ kernel reads it (float32, or uint16 bits) and its storage dtype name."""
    if not isinstance(array, np.ndarray):
        raise TypeError(f"{name}: expected a numpy array, got {type(array).__name__}")
    if kv_dtype is None:
        if array.dtype == np.uint16:
            raise ValueError(f"{name}: uint16 storage needs kv_dtype='float16' or 'bfloat16'")
        kv_dtype = "float16" if array.dtype == np.float16 else "float32"
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv_dtype: expected one of {KV_DTYPES}, got {kv_dtype!r}")
    if kv_dtype == "float16" and array.dtype == np.float16:
        array = array.view(np.uint16)
    _require(name, array, np.float32 if kv_dtype == "float32" else np.uint16)
    return array, kv_dtype


def paged_decode_attention(
    q: np.ndarray,  # [num_rows, num_q_heads, head_dim] float32
    k_cache: np.ndarray,  # [num_blocks, num_kv_heads, block_size, head_dim]
    v_cache: np.ndarray,  # [num_blocks, num_kv_heads, block_size, head_dim]
    block_tables: np.ndarray,  # [num_rows, max_blocks_per_row] int32
    context_lens: np.ndarray,  # [num_rows] int32, tokens in the cache including the current one
    scale: float | None = None,
    num_threads: int = 1,
    kv_dtype: KvDtype | None = None,
) -> np.ndarray:  # [num_rows, num_q_heads, head_dim] float32
    """Decode attention of each row's query over its paged K/V. scale defaults to 1/sqrt(head_dim);
    q head h reads kv head h // (num_q_heads // num_kv_heads)."""
    k_cache, kv_dtype = _storage("k_cache", k_cache, kv_dtype)
    v_cache, _ = _storage("v_cache", v_cache, kv_dtype)
    _require("q", q, np.float32)
    _require("block_tables", block_tables, np.int32)
    _require("context_lens", context_lens, np.int32)
    return _kernel.paged_decode_attention(
        q, k_cache, v_cache, block_tables, context_lens, scale=scale, num_threads=num_threads, dtype=kv_dtype
    )


def append_kv(
    k_cache: np.ndarray,  # [num_blocks, num_kv_heads, block_size, head_dim], written in place
    v_cache: np.ndarray,  # [num_blocks, num_kv_heads, block_size, head_dim], written in place
    k_new: np.ndarray,  # [num_rows, num_kv_heads, head_dim], the caches' storage dtype
    v_new: np.ndarray,  # [num_rows, num_kv_heads, head_dim]
    slot_mapping: np.ndarray,  # [num_rows] int64, slot = block * block_size + offset
    kv_dtype: KvDtype | None = None,
) -> None:
    """Write each row's new token k/v into its cache slot."""
    k_cache, kv_dtype = _storage("k_cache", k_cache, kv_dtype)
    v_cache, _ = _storage("v_cache", v_cache, kv_dtype)
    k_new, _ = _storage("k_new", k_new, kv_dtype)
    v_new, _ = _storage("v_new", v_new, kv_dtype)
    _require("slot_mapping", slot_mapping, np.int64)
    _kernel.append_kv(k_cache, v_cache, k_new, v_new, slot_mapping, dtype=kv_dtype)
