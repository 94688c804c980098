"""The C++ paged decode-attention kernel against the numpy reference (cpu_attention_worker).

Every instruction set this CPU runs is checked (`isa=` forces one; the others are skipped), on
1 and 2 threads (2 threads cut long rows into pieces merged by log-sum-exp)."""

import functools
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest

from cpu_attention_worker import _kernel, kernel, reference
from cpu_attention_worker.kernel import ISAS, KV_DTYPES, Isa, KvDtype

TOLERANCE: dict[KvDtype, float] = {"float32": 1e-5, "float16": 1e-4, "bfloat16": 1e-4}
NUM_KV_HEADS = 2
SUPPORTED_ISAS = kernel.kernel_info()["isas"]
EVERY_ISA = [
    pytest.param(isa, marks=pytest.mark.skipif(isa not in SUPPORTED_ISAS, reason=f"this CPU has no {isa}"))
    for isa in ISAS
]
# Context lengths per layout: one long row with a partial last block, and 64 rows of edge and
# random lengths (one token, a block less one, a full block, one past it, the longest).
LAYOUTS: dict[str, Callable[[np.random.Generator], list[int]]] = {
    "one-long-row": lambda rng: [4999],
    "64-rows": lambda rng: [1, 15, 16, 17, 5000] + rng.integers(1, 601, size=59).tolist(),
}


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

    def reference(self, scale: float | None = None) -> np.ndarray:  # [num_rows, num_q_heads, head_dim]
        return reference.paged_decode_attention(
            self.q, self.k_cache, self.v_cache, self.block_tables, self.context_lens, scale, self.kv_dtype
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


@functools.cache
def problem_and_expected(kv_dtype: KvDtype, head_dim: int, group: int, layout: str) -> tuple[Problem, np.ndarray]:
    rng = np.random.default_rng([KV_DTYPES.index(kv_dtype), head_dim, group, list(LAYOUTS).index(layout)])
    problem = make_problem(rng, LAYOUTS[layout](rng), kv_dtype, group=group, head_dim=head_dim)
    return problem, problem.reference()


@pytest.mark.parametrize("num_threads", [1, 2])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
@pytest.mark.parametrize("isa", EVERY_ISA)
def test_matches_reference(
    isa: Isa, kv_dtype: KvDtype, head_dim: int, group: int, layout: str, num_threads: int
) -> None:
    problem, expected = problem_and_expected(kv_dtype, head_dim, group, layout)
    out = kernel.paged_decode_attention(**problem.kernel_args(), num_threads=num_threads, isa=isa)
    assert out.shape == problem.q.shape and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=0, atol=TOLERANCE[kv_dtype])


@pytest.mark.parametrize("block_size", [1, 5, 32])
@pytest.mark.parametrize("head_dim", [16, 80, 256])
@pytest.mark.parametrize("isa", EVERY_ISA)
def test_other_head_dims_block_sizes_and_scale(isa: Isa, head_dim: int, block_size: int) -> None:
    """head_dim 16 and 80 are not multiples of 32: AVX-512 hands them to AVX2."""
    problem = make_problem(np.random.default_rng([head_dim, block_size]), [1, 31, 64, 200], "bfloat16",
                           head_dim=head_dim, block_size=block_size)
    out = kernel.paged_decode_attention(**problem.kernel_args(), scale=0.3, num_threads=2, isa=isa)
    np.testing.assert_allclose(out, problem.reference(scale=0.3), rtol=0, atol=TOLERANCE["bfloat16"])


@pytest.mark.parametrize("isa", EVERY_ISA)
def test_softmax_is_stable_for_large_and_rising_scores(isa: Isa) -> None:
    """Scores in the hundreds that grow along the row move the running max block after block."""
    problem = make_problem(np.random.default_rng(7), [700, 33], "float32", group=4)
    blocks = problem.block_tables[0, :44]  # row 0's blocks in order
    problem.k_cache[blocks] *= np.linspace(1.0, 5.0, len(blocks), dtype=np.float32)[:, None, None, None]
    problem.q *= 30.0
    out = kernel.paged_decode_attention(**problem.kernel_args(), num_threads=2, isa=isa)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, problem.reference(), rtol=0, atol=1e-4)


def test_thread_count_changes_the_result_by_rounding_only() -> None:
    problem = make_problem(np.random.default_rng(0), [3, 4000, 40, 2500], "bfloat16", group=8)
    single = kernel.paged_decode_attention(**problem.kernel_args(), num_threads=1)
    for num_threads in (2, 3, 64):  # 64 > pieces of work
        out = kernel.paged_decode_attention(**problem.kernel_args(), num_threads=num_threads)
        np.testing.assert_allclose(out, single, rtol=0, atol=2e-6)


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


def test_out_argument_is_filled_in_place() -> None:
    problem = make_problem(np.random.default_rng(8), [40, 7], "float32")
    out = np.full(problem.q.shape, np.nan, dtype=np.float32)
    result = kernel.paged_decode_attention(**problem.kernel_args(), out=out)
    assert result is out or np.shares_memory(result, out)
    np.testing.assert_allclose(out, problem.reference(), rtol=0, atol=TOLERANCE["float32"])


@pytest.mark.parametrize("kv_dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("isa", EVERY_ISA)
def test_every_half_value_decodes_exactly(isa: Isa, kv_dtype: KvDtype) -> None:
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
        isa=isa,
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


def test_concurrent_calls_from_python_threads_agree() -> None:
    """The GIL is released; calls from several threads share the pool one after the other."""
    problem = make_problem(np.random.default_rng(9), [900, 30, 300], "float32")
    expected = kernel.paged_decode_attention(**problem.kernel_args(), num_threads=2)
    results: list[np.ndarray] = []

    def call() -> None:
        for _ in range(20):
            results.append(kernel.paged_decode_attention(**problem.kernel_args(), num_threads=2))

    threads = [threading.Thread(target=call) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 80 and all(np.array_equal(r, expected) for r in results)


def test_pinned_helper_threads_give_the_same_result() -> None:
    problem = make_problem(np.random.default_rng(10), [2000, 100], "bfloat16")
    expected = kernel.paged_decode_attention(**problem.kernel_args(), num_threads=2)
    kernel.set_thread_cpus(sorted(os.sched_getaffinity(0))[-1:])
    try:
        assert np.array_equal(kernel.paged_decode_attention(**problem.kernel_args(), num_threads=2), expected)
    finally:
        kernel.set_thread_cpus(None)
    with pytest.raises(ValueError, match="^cpus"):
        kernel.set_thread_cpus([-1])


def test_kernel_info_names_the_default_and_every_runnable_isa() -> None:
    info = kernel.kernel_info()
    assert info["dtypes"] == ("float32", "float16", "bfloat16")
    assert "portable" in info["isas"] and set(info["isas"]) <= set(ISAS)
    assert info["isa"] in info["isas"] and info["isa"] != "avx512bf16"


@pytest.mark.parametrize("isa", EVERY_ISA)
def test_anchor_probes_report_positive_rates(isa: Isa) -> None:
    buffer = np.ones(1 << 18, dtype=np.float32)
    rates = kernel.read_bandwidth(buffer, num_threads=2, repeats=2, isa=isa)
    assert len(rates) == 2 and min(rates) > 0
    assert kernel.fma_throughput(num_threads=2, iterations=10_000, isa=isa) > 0


@pytest.mark.parametrize("isa", EVERY_ISA)
def test_paged_read_probe_reads_the_same_blocks_and_checks_arguments(isa: Isa) -> None:
    problem = make_problem(np.random.default_rng(11), [4999, 1, 30], "bfloat16")
    kernel.paged_read(**problem.kernel_args(), num_threads=2, isa=isa)
    args = problem.kernel_args()
    args["block_tables"][0, 3] = 10_000
    with pytest.raises(ValueError, match="^block_tables"):
        kernel.paged_read(**args, isa=isa)


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_allocate_kv_cache_puts_v_off_the_page_offset_of_k(kv_dtype: KvDtype) -> None:
    shape = (2, 37, 8, 16, 128)  # [num_layers, num_blocks, num_kv_heads, block_size, head_dim]
    k_cache, v_cache = kernel.allocate_kv_cache(shape, kv_dtype)
    assert k_cache.shape == v_cache.shape == shape and k_cache.dtype == v_cache.dtype
    assert k_cache.ctypes.data % kernel.PAGE_BYTES == 0
    assert (v_cache.ctypes.data - k_cache.ctypes.data) % kernel.PAGE_BYTES == kernel.V_POOL_OFFSET_BYTES
    assert v_cache.ctypes.data >= k_cache.ctypes.data + k_cache.nbytes
    assert not k_cache.any() and not v_cache.any() and k_cache.flags.writeable


def test_allocate_buffer_is_zeroed_page_aligned_and_checks_its_size() -> None:
    buffer = kernel.allocate_buffer(3 * kernel.PAGE_BYTES + 5)
    assert buffer.dtype == np.uint8 and buffer.size == 3 * kernel.PAGE_BYTES + 5 and not buffer.any()
    assert buffer.ctypes.data % kernel.PAGE_BYTES == 0 and buffer.flags.writeable
    with pytest.raises(ValueError, match="^nbytes"):
        kernel.allocate_buffer(0)


def test_importing_the_kernel_does_not_import_torch() -> None:
    code = "import sys, cpu_attention_worker.kernel, cpu_attention_worker.reference; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


Mutation = Callable[[dict[str, object]], None]


def _set(name: str, value: Callable[[dict[str, object]], object]) -> Mutation:
    return lambda args: args.__setitem__(name, value(args))


def _caches_with_head_dim(args: dict[str, object], head_dim: int) -> None:
    """Caches and q of an unsupported head_dim (not a multiple of 16, or above 512)."""
    args["k_cache"] = args["v_cache"] = np.zeros((40, NUM_KV_HEADS, 16, head_dim), np.float32)
    args["q"] = np.zeros((2, 8, head_dim), np.float32)


ATTENTION_ERRORS: list[tuple[str, Mutation]] = [
    ("q", _set("q", lambda a: a["q"][0])),
    ("q", _set("q", lambda a: a["q"].astype(np.float64))),
    ("q", _set("q", lambda a: np.zeros((2, 8, 32), np.float32))),
    ("q", _set("q", lambda a: np.zeros((2, 3, 64), np.float32))),
    ("q", _set("q", lambda a: np.asfortranarray(a["q"]))),
    ("k_cache", _set("k_cache", lambda a: a["k_cache"][0])),
    ("k_cache", _set("k_cache", lambda a: a["k_cache"][:, :, ::2])),
    ("k_cache", _set("k_cache", lambda a: a["k_cache"].view(np.uint16))),
    ("k_cache", lambda a: _caches_with_head_dim(a, 40)),
    ("k_cache", lambda a: _caches_with_head_dim(a, 1024)),
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
    ("num_threads", _set("num_threads", lambda a: 100_000)),
    ("scale", _set("scale", lambda a: float("nan"))),
    ("isa", _set("isa", lambda a: "neon")),
    ("out", _set("out", lambda a: np.zeros((2, 8, 32), np.float32))),
    ("out", _set("out", lambda a: np.zeros(a["q"].shape, np.float64))),
]


@pytest.mark.parametrize("name, mutate", ATTENTION_ERRORS)
def test_attention_rejects_bad_arguments_naming_them(name: str, mutate: Mutation) -> None:
    args = make_problem(np.random.default_rng(4), [5, 30], "float32").kernel_args() | {"num_threads": 1}
    mutate(args)
    with pytest.raises(ValueError, match=f"^{re.escape(name)}"):
        kernel.paged_decode_attention(**args)


@pytest.mark.skipif(set(SUPPORTED_ISAS) == set(ISAS), reason="this CPU runs every instruction set")
def test_an_isa_the_cpu_lacks_is_refused() -> None:
    missing = next(isa for isa in ISAS if isa not in SUPPORTED_ISAS)
    args = make_problem(np.random.default_rng(4), [5], "float32").kernel_args()
    with pytest.raises(ValueError, match="^isa"):
        kernel.paged_decode_attention(**args, isa=missing)


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
