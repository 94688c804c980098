"""Layout contract of the shared-memory data plane between the gpu_worker and the cpu_attention_worker
(DESIGN.md sections 2-4). Both processes compute the same layout() from the same DataPlaneSpec, so
their views of the four regions agree:

- "kv": K then V, each [num_layers, num_blocks, num_kv_heads, block_size, head_dim] in the storage
  dtype (16-bit storage viewed as uint16); V starts 2048 bytes past a page boundary (kernel.py).
- "staging": per slot, q and o [max_rows, num_q_heads, head_dim] float32, k and v [max_rows,
  num_kv_heads, head_dim] storage dtype.
- "meta": per slot, num_rows int32, block_tables [max_rows, max_blocks_per_row] int32,
  context_lens [max_rows] int32 (tokens including the current one), slot_mapping [max_rows] int64
  (block * block_size + offset where the new token's k/v is appended).
- "doorbell": one page of control words (csrc/doorbell.h), each on its own 64-byte line.

Tensors are named "<name>.<slot>" in the per-slot regions; every tensor is 64-byte aligned.
"""

import dataclasses
from dataclasses import dataclass
from typing import get_args

import numpy as np

from cpu_attention_worker import _kernel
from cpu_attention_worker.kernel import PAGE_BYTES, V_POOL_OFFSET_BYTES, KvDtype

KV_DTYPES: tuple[KvDtype, ...] = get_args(KvDtype)
REGIONS = ("kv", "staging", "meta", "doorbell")
ALIGN_BYTES = 64
MAX_SLOTS: int = _kernel.DOORBELL_MAX_SLOTS
MAX_HEAD_DIM = 512
HEAD_DIM_MULTIPLE = 16
INT32_MAX = 2**31 - 1


class DataPlaneSpecError(ValueError):
    """A DataPlaneSpec field is out of range; the message names the field and the limit."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def _check_range(field: str, value: int, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise DataPlaneSpecError(field, f"must be an integer in [{low}, {high}], got {value!r}")


@dataclass(frozen=True)
class DataPlaneSpec:
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    num_blocks: int  # CPU KV pool; 0 in a request: the cpu_attention_worker sizes it from its budget
    kv_dtype: str  # "float32" | "bfloat16" | "float16"
    max_rows: int  # CPU rows per sub-batch
    max_blocks_per_row: int
    num_slots: int = 2  # sub-batches (double-buffered staging)

    def __post_init__(self) -> None:
        _check_range("num_layers", self.num_layers, 1, 4096)
        _check_range("num_q_heads", self.num_q_heads, 1, 4096)
        _check_range("num_kv_heads", self.num_kv_heads, 1, self.num_q_heads)
        if self.num_q_heads % self.num_kv_heads:
            raise DataPlaneSpecError(
                "num_kv_heads", f"must divide num_q_heads={self.num_q_heads}, got {self.num_kv_heads}"
            )
        _check_range("head_dim", self.head_dim, HEAD_DIM_MULTIPLE, MAX_HEAD_DIM)
        if self.head_dim % HEAD_DIM_MULTIPLE:
            raise DataPlaneSpecError("head_dim", f"must be a multiple of {HEAD_DIM_MULTIPLE}, got {self.head_dim}")
        _check_range("block_size", self.block_size, 1, 4096)
        _check_range("num_blocks", self.num_blocks, 0, INT32_MAX)
        if self.kv_dtype not in KV_DTYPES:
            raise DataPlaneSpecError("kv_dtype", f"must be one of {KV_DTYPES}, got {self.kv_dtype!r}")
        _check_range("max_rows", self.max_rows, 1, 65536)
        _check_range("max_blocks_per_row", self.max_blocks_per_row, 1, INT32_MAX // self.block_size)
        _check_range("num_slots", self.num_slots, 1, MAX_SLOTS)

    @property
    def storage_dtype(self) -> np.dtype:
        return np.dtype(np.float32 if self.kv_dtype == "float32" else np.uint16)

    @property
    def block_bytes(self) -> int:
        """Bytes of one block of the pool: K and V, every layer."""
        return 2 * self.num_layers * self.num_kv_heads * self.block_size * self.head_dim * self.storage_dtype.itemsize

    def with_num_blocks(self, num_blocks: int) -> "DataPlaneSpec":
        return dataclasses.replace(self, num_blocks=num_blocks)


@dataclass(frozen=True)
class TensorLayout:
    offset: int  # bytes from the start of its region
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class RegionLayout:
    nbytes: int
    tensors: dict[str, TensorLayout]


def _align(offset: int, alignment: int = ALIGN_BYTES) -> int:
    return -(-offset // alignment) * alignment


def _packed(fields: list[tuple[str, tuple[int, ...], str]]) -> tuple[dict[str, TensorLayout], int]:
    """Consecutive 64-byte aligned tensors from offset 0, and their aligned total size."""
    tensors, offset = {}, 0
    for name, shape, dtype in fields:
        tensor = TensorLayout(offset, shape, dtype)
        tensors[name] = tensor
        offset = _align(offset + tensor.nbytes)
    return tensors, offset


def _staging_slot(spec: DataPlaneSpec) -> tuple[dict[str, TensorLayout], int]:
    storage = spec.storage_dtype.name
    return _packed([
        ("q", (spec.max_rows, spec.num_q_heads, spec.head_dim), "float32"),
        ("k", (spec.max_rows, spec.num_kv_heads, spec.head_dim), storage),
        ("v", (spec.max_rows, spec.num_kv_heads, spec.head_dim), storage),
        ("o", (spec.max_rows, spec.num_q_heads, spec.head_dim), "float32"),
    ])


def _meta_slot(spec: DataPlaneSpec) -> tuple[dict[str, TensorLayout], int]:
    return _packed([
        ("num_rows", (1,), "int32"),
        ("block_tables", (spec.max_rows, spec.max_blocks_per_row), "int32"),
        ("context_lens", (spec.max_rows,), "int32"),
        ("slot_mapping", (spec.max_rows,), "int64"),
    ])


def _per_slot(spec: DataPlaneSpec, slot: tuple[dict[str, TensorLayout], int]) -> RegionLayout:
    tensors, slot_bytes = slot
    return RegionLayout(
        nbytes=slot_bytes * spec.num_slots,
        tensors={
            f"{name}.{s}": dataclasses.replace(t, offset=s * slot_bytes + t.offset)
            for s in range(spec.num_slots)
            for name, t in tensors.items()
        },
    )


def _kv(spec: DataPlaneSpec) -> RegionLayout:
    shape = (spec.num_layers, spec.num_blocks, spec.num_kv_heads, spec.block_size, spec.head_dim)
    k_cache = TensorLayout(0, shape, spec.storage_dtype.name)
    v_offset = _align(k_cache.nbytes - V_POOL_OFFSET_BYTES, PAGE_BYTES) + V_POOL_OFFSET_BYTES
    v_cache = TensorLayout(v_offset, shape, spec.storage_dtype.name)
    nbytes = _align(v_offset + v_cache.nbytes, PAGE_BYTES)
    return RegionLayout(nbytes=nbytes, tensors={"k_cache": k_cache, "v_cache": v_cache})


def _doorbell(spec: DataPlaneSpec) -> RegionLayout:
    tensors = {}
    for name, (offset, dtype) in _kernel.DOORBELL_WORDS.items():
        if name.startswith("busy_ns.") and int(name.split(".")[1]) >= spec.num_slots:
            continue
        tensors[name] = TensorLayout(offset, (1,), dtype)
    return RegionLayout(nbytes=_kernel.DOORBELL_BYTES, tensors=tensors)


def layout(spec: DataPlaneSpec) -> dict[str, RegionLayout]:
    """Sizes and named tensors of the four regions (keys REGIONS); spec.num_blocks must be resolved (> 0)."""
    if spec.num_blocks < 1:
        raise DataPlaneSpecError("num_blocks", "must be resolved to >= 1 before computing a layout, got 0")
    return {
        "kv": _kv(spec),
        "staging": _per_slot(spec, _staging_slot(spec)),
        "meta": _per_slot(spec, _meta_slot(spec)),
        "doorbell": _doorbell(spec),
    }


def geometry(spec: DataPlaneSpec) -> dict[str, int]:
    """Shape, slot strides and slot-0 offsets, as the C++ serving loop takes them."""
    kv = _kv(spec).tensors
    staging, staging_slot_bytes = _staging_slot(spec)
    meta, meta_slot_bytes = _meta_slot(spec)
    shape = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.name != "kv_dtype"}
    return {
        **shape,
        "k_cache": kv["k_cache"].offset,
        "v_cache": kv["v_cache"].offset,
        "staging_slot_bytes": staging_slot_bytes,
        **{name: t.offset for name, t in staging.items()},
        "meta_slot_bytes": meta_slot_bytes,
        **{name: t.offset for name, t in meta.items()},
    }


def view(buffer: np.ndarray, tensor: TensorLayout) -> np.ndarray:
    """The tensor inside a region's uint8 buffer (shares its memory)."""
    return buffer[tensor.offset : tensor.offset + tensor.nbytes].view(tensor.dtype).reshape(tensor.shape)
