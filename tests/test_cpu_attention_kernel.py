"""The C++ paged decode-attention kernel against the numpy reference (cpu_attention_worker)."""

import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest

from cpu_attention_worker import _kernel, kernel, reference
from cpu_attention_worker.kernel import KV_DTYPES, KvDtype

TOLERANCE: dict[KvDtype, float] = {"float32": 1e-5, "float16": 1e-4, "bfloat16": 1e-4}
NUM_KV_HEADS = 2


@dataclass
class Problem:
    q: np.ndarray  # [num_rows, num_q_heads, head_dim] float32
    k_cache: np.ndarray  # [num_blocks, num_kv_heads, block_size, head_dim] storage dtype
    v_cache: np.ndarray  # [num_blocks, num_kv_heads, block_size, head_dim] storage dtype
    block_tables: np.ndarray  # [num_rows, max_blocks_per_row] int32, -1 past each row's blocks
    context_lens: np.ndarray  # [num_rows] int32
    kv_dtype: KvDtype

    def kernel_args(self) -> dict[str, object]:
        return {
            "q": self.q,
            "k_cache": self.k_cache,
            "v_cache": self.v_cache,
            "block_tables": self.block_tables,
            "context_lens": self.context_lens,
            "kv_dtype": self.kv_dtype,
        }

    def reference(self) -> np.ndarray:  # [num_rows, num_q_heads, head_dim]
        return reference.paged_decode_attention(
            self.q, self.k_cache, self.v_cache, self.block_tables, self.context_lens, kv_dtype=self.kv_dtype
        )


def make_problem(
    rng: np.random.Generator,
    context_lens: list[int],
    kv_dtype: KvDtype,
    group: int = 4,
    head_dim: int = 64,
    block_size: int = 16,
    num_kv_heads: int = NUM_KV_HEADS,
) -> Problem:
    """Caches with spare blocks; each row's blocks are drawn from a shuffled permutation."""
    blocks_per_row = [-(-n // block_size) for n in context_lens]
    num_blocks = sum(blocks_per_row) + 5
    block_ids = rng.permutation(num_blocks).astype(np.int32)
    block_tables = np.full((len(context_lens), max(blocks_per_row) + 1), -1, dtype=np.int32)
    start = 0
    for row, count in enumerate(blocks_per_row):
        block_tables[row, :count] = block_ids[start : start + count]
        start += count
    cache_shape = (num_blocks, num_kv_heads, block_size, head_dim)
    return Problem(
        q=rng.standard_normal((len(context_lens), num_kv_heads * group, head_dim), dtype=np.float32),
        k_cache=reference.encode_kv(rng.standard_normal(cache_shape), kv_dtype),
        v_cache=reference.encode_kv(rng.standard_normal(cache_shape), kv_dtype),
        block_tables=block_tables,
        context_lens=np.array(context_lens, dtype=np.int32),
        kv_dtype=kv_dtype,
    )


def random_context_lens(rng: np.random.Generator, num_rows: int) -> list[int]:
    """Edge lengths first (one token, a full block, one past a block, the longest), then random."""
    edges = [1, 16, 17, 600]
    return (edges + rng.integers(1, 601, size=num_rows).tolist())[:num_rows]


@pytest.mark.parametrize("num_threads", [1, 2])
@pytest.mark.parametrize("num_rows", [1, 16])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_matches_reference(kv_dtype: KvDtype, head_dim: int, group: int, num_rows: int, num_threads: int) -> None:
    rng = np.random.default_rng([KV_DTYPES.index(kv_dtype), head_dim, group, num_rows, num_threads])
    problem = make_problem(rng, random_context_lens(rng, num_rows), kv_dtype, group=group, head_dim=head_dim)
    out = kernel.paged_decode_attention(**problem.kernel_args(), num_threads=num_threads)
    assert out.shape == problem.q.shape and out.dtype == np.float32
    np.testing.assert_allclose(out, problem.reference(), rtol=0, atol=TOLERANCE[kv_dtype])


@pytest.mark.parametrize("block_size", [1, 5, 32])
def test_other_block_sizes_and_scale(block_size: int) -> None:
    rng = np.random.default_rng(block_size)
    problem = make_problem(rng, [1, 31, 64, 200], "float32", block_size=block_size, head_dim=80)
    out = kernel.paged_decode_attention(**problem.kernel_args(), scale=0.3)
    expected = reference.paged_decode_attention(
        problem.q, problem.k_cache, problem.v_cache, problem.block_tables, problem.context_lens, scale=0.3
    )
    np.testing.assert_allclose(out, expected, rtol=0, atol=TOLERANCE["float32"])


def test_thread_count_does_not_change_the_result() -> None:
    problem = make_problem(np.random.default_rng(0), [3, 600, 40], "bfloat16", group=8)
    single = kernel.paged_decode_attention(**problem.kernel_args(), num_threads=1)
    for num_threads in (2, 3, 64):  # 64 > rows x kv_heads tasks
        assert np.array_equal(kernel.paged_decode_attention(**problem.kernel_args(), num_threads=num_threads), single)


def test_reads_a_layer_slice_of_a_layered_cache() -> None:
    rng = np.random.default_rng(1)
    problem = make_problem(rng, [20, 33], "float16")
    layered_k = np.stack([reference.encode_kv(rng.standard_normal(problem.k_cache.shape), "float16"), problem.k_cache])
    layered_v = np.stack([problem.v_cache, problem.v_cache])  # [num_layers, num_blocks, kv_heads, block, dim]
    args = problem.kernel_args() | {"k_cache": layered_k[1], "v_cache": layered_v[1]}
    np.testing.assert_allclose(kernel.paged_decode_attention(**args), problem.reference(), rtol=0, atol=1e-4)


def test_numpy_float16_arrays_need_no_kv_dtype() -> None:
    problem = make_problem(np.random.default_rng(2), [9, 50], "float16")
    args = problem.kernel_args() | {
        "k_cache": problem.k_cache.view(np.float16),
        "v_cache": problem.v_cache.view(np.float16),
        "kv_dtype": None,
    }
    np.testing.assert_allclose(kernel.paged_decode_attention(**args), problem.reference(), rtol=0, atol=1e-4)


@pytest.mark.parametrize("kv_dtype", ["float16", "bfloat16"])
def test_every_half_value_decodes_exactly(kv_dtype: KvDtype) -> None:
    """With one token softmax is 1, so the output is V itself: all 65536 bit patterns round-trip."""
    head_dim = 64
    num_rows = 65536 // head_dim
    v_cache = np.arange(65536, dtype=np.uint16).reshape(num_rows, 1, 1, head_dim)
    out = kernel.paged_decode_attention(
        q=np.ones((num_rows, 1, head_dim), dtype=np.float32),
        k_cache=np.zeros_like(v_cache),
        v_cache=v_cache,
        block_tables=np.arange(num_rows, dtype=np.int32).reshape(num_rows, 1),
        context_lens=np.ones(num_rows, dtype=np.int32),
        kv_dtype=kv_dtype,
    )
    np.testing.assert_array_equal(out.reshape(-1), reference.decode_kv(v_cache, kv_dtype).reshape(-1))


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_append_kv_matches_reference(kv_dtype: KvDtype) -> None:
    rng = np.random.default_rng(KV_DTYPES.index(kv_dtype))
    problem = make_problem(rng, [40, 7, 100], kv_dtype, head_dim=128)
    num_blocks, num_kv_heads, block_size, head_dim = problem.k_cache.shape
    for num_rows in (1, 16):
        slot_mapping = rng.choice(num_blocks * block_size, size=num_rows, replace=False).astype(np.int64)
        k_new = reference.encode_kv(rng.standard_normal((num_rows, num_kv_heads, head_dim)), kv_dtype)
        v_new = reference.encode_kv(rng.standard_normal((num_rows, num_kv_heads, head_dim)), kv_dtype)
        expected_k, expected_v = problem.k_cache.copy(), problem.v_cache.copy()
        reference.append_kv(expected_k, expected_v, k_new, v_new, slot_mapping)
        kernel.append_kv(problem.k_cache, problem.v_cache, k_new, v_new, slot_mapping, kv_dtype=kv_dtype)
        assert np.array_equal(problem.k_cache, expected_k) and np.array_equal(problem.v_cache, expected_v)


def test_append_then_attend_sees_the_new_token() -> None:
    rng = np.random.default_rng(3)
    problem = make_problem(rng, [17, 40], "bfloat16")  # both rows have room left in their last block
    _, num_kv_heads, block_size, head_dim = problem.k_cache.shape
    positions = problem.context_lens.astype(np.int64)  # [num_rows] index of the new token
    rows = np.arange(len(positions))
    slot_mapping = problem.block_tables[rows, positions // block_size] * block_size + positions % block_size
    k_new = reference.encode_kv(rng.standard_normal((2, num_kv_heads, head_dim)), "bfloat16")
    v_new = reference.encode_kv(rng.standard_normal((2, num_kv_heads, head_dim)), "bfloat16")
    expected = Problem(**vars(problem) | {"k_cache": problem.k_cache.copy(), "v_cache": problem.v_cache.copy()})
    reference.append_kv(expected.k_cache, expected.v_cache, k_new, v_new, slot_mapping)
    kernel.append_kv(problem.k_cache, problem.v_cache, k_new, v_new, slot_mapping, kv_dtype="bfloat16")
    problem.context_lens += 1  # shared with expected
    out = kernel.paged_decode_attention(**problem.kernel_args())
    np.testing.assert_allclose(out, expected.reference(), rtol=0, atol=1e-4)


def test_kernel_info() -> None:
    assert kernel.kernel_info() == {"isa": "portable", "dtypes": ("float32", "float16", "bfloat16")}


def test_importing_the_kernel_does_not_import_torch() -> None:
    code = "import sys, cpu_attention_worker.kernel, cpu_attention_worker.reference; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


Mutation = Callable[[dict[str, object]], None]


def _set(name: str, value: Callable[[dict[str, object]], object]) -> Mutation:
    return lambda args: args.__setitem__(name, value(args))


ATTENTION_ERRORS: list[tuple[str, Mutation]] = [
    ("q", _set("q", lambda a: a["q"][0])),
    ("q", _set("q", lambda a: a["q"].astype(np.float64))),
    ("q", _set("q", lambda a: np.zeros((2, 8, 32), np.float32))),
    ("q", _set("q", lambda a: np.zeros((2, 3, 64), np.float32))),
    ("q", _set("q", lambda a: np.asfortranarray(a["q"]))),
    ("k_cache", _set("k_cache", lambda a: a["k_cache"][0])),
    ("k_cache", _set("k_cache", lambda a: a["k_cache"][:, :, ::2])),
    ("k_cache", _set("k_cache", lambda a: a["k_cache"].view(np.uint16))),
    ("v_cache", _set("v_cache", lambda a: a["v_cache"][:-1].copy())),
    ("v_cache", _set("v_cache", lambda a: a["v_cache"].astype(np.float16))),
    ("kv_dtype", _set("kv_dtype", lambda a: "int8")),
    ("block_tables", _set("block_tables", lambda a: a["block_tables"].astype(np.int64))),
    ("block_tables", _set("block_tables", lambda a: a["block_tables"][:1].copy())),
    ("block_tables", lambda a: a["block_tables"].__setitem__((1, 0), 10_000)),
    ("block_tables", lambda a: a["block_tables"].__setitem__((1, 0), -1)),
    ("context_lens", _set("context_lens", lambda a: a["context_lens"][:1].copy())),
    ("context_lens", lambda a: a["context_lens"].__setitem__(0, 0)),
    ("context_lens", lambda a: a["context_lens"].__setitem__(0, 10_000)),
    ("num_threads", _set("num_threads", lambda a: 0)),
    ("scale", _set("scale", lambda a: float("nan"))),
]


@pytest.mark.parametrize("name, mutate", ATTENTION_ERRORS)
def test_attention_rejects_bad_arguments_naming_them(name: str, mutate: Mutation) -> None:
    args = make_problem(np.random.default_rng(4), [5, 30], "float32").kernel_args() | {"num_threads": 1}
    mutate(args)
    with pytest.raises(ValueError, match=f"^{re.escape(name)}"):
        kernel.paged_decode_attention(**args)


def _append_args() -> dict[str, object]:
    problem = make_problem(np.random.default_rng(5), [5, 30], "bfloat16")
    _, num_kv_heads, _, head_dim = problem.k_cache.shape
    return {
        "k_cache": problem.k_cache,
        "v_cache": problem.v_cache,
        "k_new": np.zeros((2, num_kv_heads, head_dim), np.uint16),
        "v_new": np.zeros((2, num_kv_heads, head_dim), np.uint16),
        "slot_mapping": np.array([0, 3], np.int64),
        "kv_dtype": "bfloat16",
    }


def _read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


APPEND_ERRORS: list[tuple[str, Mutation]] = [
    ("k_new", _set("k_new", lambda a: a["k_new"][:, :1].copy())),
    ("k_new", _set("k_new", lambda a: a["k_new"].astype(np.float32))),
    ("v_new", _set("v_new", lambda a: a["v_new"][:1].copy())),
    ("slot_mapping", _set("slot_mapping", lambda a: a["slot_mapping"].astype(np.int32))),
    ("slot_mapping", _set("slot_mapping", lambda a: a["slot_mapping"][:1].copy())),
    ("slot_mapping", lambda a: a["slot_mapping"].__setitem__(1, 1 << 40)),
    ("slot_mapping", lambda a: a["slot_mapping"].__setitem__(1, -1)),
    ("k_cache", _set("k_cache", lambda a: _read_only(a["k_cache"]))),
    ("k_cache", _set("kv_dtype", lambda a: None)),
]


@pytest.mark.parametrize("name, mutate", APPEND_ERRORS)
def test_append_kv_rejects_bad_arguments_naming_them(name: str, mutate: Mutation) -> None:
    args = _append_args()
    mutate(args)
    with pytest.raises(ValueError, match=f"^{re.escape(name)}"):
        kernel.append_kv(**args)


def test_extension_validates_dtypes_itself() -> None:
    """Callers that skip the wrapper still get ValueErrors naming the argument."""
    problem = make_problem(np.random.default_rng(6), [5], "float32")
    args = (problem.q, problem.k_cache, problem.v_cache, problem.block_tables, problem.context_lens)
    with pytest.raises(ValueError, match="^dtype"):
        _kernel.paged_decode_attention(*args, dtype="float8")
    with pytest.raises(ValueError, match="^k_cache"):
        _kernel.paged_decode_attention(*args, dtype="bfloat16")
    with pytest.raises(ValueError, match="^context_lens"):
        _kernel.paged_decode_attention(*args[:4], problem.context_lens.astype(np.int64))
