"""Typed numpy wrapper over the C++ paged decode-attention kernel (`_kernel`); needs no torch.

Cache layout (DESIGN.md section 4), one layer: K and V each [num_blocks, num_kv_heads, block_size,
head_dim]. Storage is float32, or float16/bfloat16 held in uint16 arrays (numpy float16 arrays
are accepted too and passed on as their bits). Arithmetic is fp32. The instruction set (AVX-512,
AVX2+FMA+F16C or portable C++) is picked at run time; `isa` forces one, e.g. for tests, and
"avx512bf16" (bf16 K read by AVX512_BF16 dot products against bf16 hi + lo query pairs) is
selectable but not the default: slower with the KV in DRAM here. Work is split over `num_threads`
threads (a persistent pool whose idle threads sleep) by KV bytes, so one long request uses every
thread.
"""

import mmap
from collections.abc import Sequence
from typing import Literal, TypedDict, get_args

import numpy as np

from cpu_attention_worker import _kernel

KvDtype = Literal["float32", "float16", "bfloat16"]
KV_DTYPES: tuple[KvDtype, ...] = get_args(KvDtype)
Isa = Literal["portable", "avx2", "avx512", "avx512bf16"]
ISAS: tuple[Isa, ...] = get_args(Isa)
PAGE_BYTES = 4096
V_POOL_OFFSET_BYTES = 2048  # K and V chunks at the same page offset would share cache sets


class KernelInfo(TypedDict):
    isa: str  # what runs by default: the fastest (measured) instruction set this CPU has
    isas: tuple[str, ...]  # every instruction set this CPU can run
    dtypes: tuple[str, ...]


def kernel_info() -> KernelInfo:
    return KernelInfo(isa=_kernel.ISA, isas=tuple(_kernel.ISAS), dtypes=tuple(_kernel.DTYPES))


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
    isa: Isa | None = None,
    out: np.ndarray | None = None,  # [num_rows, num_q_heads, head_dim] float32, written in place
) -> np.ndarray:  # [num_rows, num_q_heads, head_dim] float32
    """Decode attention of each row's query over its paged K/V. scale defaults to 1/sqrt(head_dim);
    q head h reads kv head h // (num_q_heads // num_kv_heads). head_dim: a multiple of 16 up to 512.
    isa: None for the default (kernel_info()["isa"]); the AVX-512 ones hand head dims that are not a
    multiple of 32 to AVX2."""
    k_cache, kv_dtype = _storage("k_cache", k_cache, kv_dtype)
    v_cache, _ = _storage("v_cache", v_cache, kv_dtype)
    _require("q", q, np.float32)
    _require("block_tables", block_tables, np.int32)
    _require("context_lens", context_lens, np.int32)
    return _kernel.paged_decode_attention(
        q, k_cache, v_cache, block_tables, context_lens,
        scale=scale, num_threads=num_threads, dtype=kv_dtype, isa=isa, out=out,
    )


def paged_read(
    q: np.ndarray,  # [num_rows, num_q_heads, head_dim] float32
    k_cache: np.ndarray,  # [num_blocks, num_kv_heads, block_size, head_dim]
    v_cache: np.ndarray,  # [num_blocks, num_kv_heads, block_size, head_dim]
    block_tables: np.ndarray,  # [num_rows, max_blocks_per_row] int32
    context_lens: np.ndarray,  # [num_rows] int32
    num_threads: int = 1,
    kv_dtype: KvDtype | None = None,
    isa: Isa | None = None,
) -> None:
    """Read every K and V line paged_decode_attention would read, split over threads, ordered and
    prefetched the same way, with no arithmetic: the memory ceiling of the paged layout (a
    benchmark probe; same argument checks)."""
    k_cache, kv_dtype = _storage("k_cache", k_cache, kv_dtype)
    v_cache, _ = _storage("v_cache", v_cache, kv_dtype)
    _require("q", q, np.float32)
    _require("block_tables", block_tables, np.int32)
    _require("context_lens", context_lens, np.int32)
    _kernel.paged_read(
        q, k_cache, v_cache, block_tables, context_lens, num_threads=num_threads, dtype=kv_dtype, isa=isa
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


def allocate_buffer(nbytes: int, huge_pages: bool = True) -> np.ndarray:  # [nbytes] uint8, page-aligned
    """Zeroed private anonymous memory; with huge_pages, advised to use transparent huge pages
    (where THP is enabled or in madvise mode): KV blocks scattered over a pool then cost no TLB
    walk per 4 KiB page (measured here: about +5% on the kernel's rate from DRAM)."""
    if nbytes <= 0:
        raise ValueError(f"nbytes: must be positive, got {nbytes}")
    memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if huge_pages and hasattr(mmap, "MADV_HUGEPAGE"):
        memory.madvise(mmap.MADV_HUGEPAGE)
    return np.frombuffer(memory, dtype=np.uint8)


def allocate_kv_cache(
    shape: tuple[int, ...],  # [..., num_blocks, num_kv_heads, block_size, head_dim] of K and of V
    kv_dtype: KvDtype,
    huge_pages: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Zeroed K and V caches in one allocate_buffer, K page-aligned and V V_POOL_OFFSET_BYTES past a
    page boundary, so that a K chunk and its V chunk never sit at the same page offset (same cache
    sets). Insurance: this kernel reads a block's K chunks and then its V chunks as two separate
    runs, and measured no difference here with or without the offset. Float16/bfloat16 come as
    uint16."""
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv_dtype: expected one of {KV_DTYPES}, got {kv_dtype!r}")
    dtype = np.dtype(np.float32 if kv_dtype == "float32" else np.uint16)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    gap = (V_POOL_OFFSET_BYTES - nbytes) % PAGE_BYTES
    raw = allocate_buffer(2 * nbytes + gap, huge_pages)
    k_cache = raw[:nbytes].view(dtype).reshape(shape)
    v_cache = raw[nbytes + gap : 2 * nbytes + gap].view(dtype).reshape(shape)
    return k_cache, v_cache


def set_thread_cpus(cpus: Sequence[int] | None) -> None:
    """Pin helper thread k (k >= 1) to cpus[k % len(cpus)]; None unpins. The calling thread is
    worker 0 and is left alone: pin it with os.sched_setaffinity if it needs pinning."""
    _kernel.set_thread_cpus(list(cpus or ()))


def set_spin_us(spin_us: int) -> None:
    """How long a helper thread spins for the next call before it sleeps (default 50 us)."""
    _kernel.set_spin_us(spin_us)


def read_bandwidth(buffer: np.ndarray, num_threads: int = 1, repeats: int = 1, isa: Isa | None = None) -> list[float]:
    """GB/s of each of `repeats` streaming reads of a float32 buffer split over num_threads threads
    (eight independent accumulator chains each): the memory-bandwidth anchor of the benchmark."""
    _require("buffer", buffer, np.float32)
    return list(_kernel.read_bandwidth(buffer.reshape(-1), num_threads=num_threads, repeats=repeats, isa=isa))


def fma_throughput(num_threads: int = 1, iterations: int = 10_000_000, isa: Isa | None = None) -> float:
    """GFLOP/s of independent fp32 FMA chains in registers on num_threads threads: the arithmetic peak."""
    return float(_kernel.fma_throughput(num_threads=num_threads, iterations=iterations, isa=isa))
