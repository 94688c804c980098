"""CPU paged decode-attention kernel benchmark.

Decode attention is bound by memory bandwidth, so each row compares the kernel's effective KV read
bandwidth (K + V bytes the attention must read / median time of a call) with this machine's
streaming read bandwidth, measured by a C++ read loop in the same extension right before and after
the row (the anchor), on the same thread count. Beside it: the same reads as the kernel without its
arithmetic (paged read: the ceiling of the paged layout, 16-token blocks scattered over the pool;
anchor, kernel and paged read alternate round by round), the kernel on a cache-resident working set
(its arithmetic ceiling), torch SDPA in its best form (the query heads of a GQA group folded into
the query length, K/V dense and read once), torch SDPA in the form a paged cache forces on it
(gather the blocks, then SDPA), and the naive numpy reference (one call, float32, single-threaded
numpy einsum, only on the first thread count and up to the grid's numpy_max_mib of KV).

The KV pools are allocated once per shape and dtype (at least the grid's pool_mib for K + V, by
kernel.allocate_kv_cache: transparent huge pages, V off K's page offset; the anchor's buffer is
allocated the same way) and every call reads another set of blocks, in random order, so the KV comes
from DRAM. torch's dense K/V are views of the same memory, rotated the same way.
"""

import argparse
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from apex_serve.logs import configure_logging
from apex_tools.bench.common import write_result
from cpu_attention_worker import kernel, reference
from cpu_attention_worker.kernel import KvDtype

logger = logging.getLogger(__name__)

BLOCK_SIZE = 16
MIB = 1 << 20
HOT_BYTES_PER_THREAD = 4 * MIB  # the compute-ceiling working set: resident in L2/L3


@dataclass(frozen=True)
class Shape:
    num_q_heads: int
    num_kv_heads: int
    head_dim: int


SHAPES: dict[str, Shape] = {
    "llama3-8b": Shape(32, 8, 128),
    "llama2-7b": Shape(32, 32, 128),
    "tiny": Shape(4, 2, 64),
}


@dataclass(frozen=True)
class Grid:
    shapes: tuple[str, ...]
    dtypes: tuple[KvDtype, ...]
    points: tuple[tuple[int, int], ...]  # (batch, context)
    threads: tuple[int, ...]
    pool_mib: int  # K + V pools at least this large
    anchor_mib: int  # the streaming-read buffer
    repeats: int  # rounds per row, each an anchor pass, a kernel call and a paged read
    baseline_repeats: int  # timed torch calls per row
    numpy_max_mib: int  # numpy only up to this much KV per call


GRIDS: dict[str, Grid] = {
    "full": Grid(("llama3-8b", "llama2-7b"), ("bfloat16", "float32"),
                 ((1, 512), (1, 4096), (1, 16384), (8, 4096), (32, 512), (32, 1024)), (1, 2), 1024, 1024, 15, 3, 160),
    "quick": Grid(("llama3-8b",), ("bfloat16", "float32"), ((1, 4096), (8, 4096)), (1, 2), 512, 512, 8, 2, 40),
    "tiny": Grid(("tiny",), ("bfloat16", "float32"), ((2, 300),), (1, 2), 16, 16, 3, 1, 4),
}


@dataclass
class Row:
    shape: str
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    batch: int
    context: int
    threads: int
    isa: str
    kv_mib: float  # K + V bytes one call reads
    anchor_gbs: float
    paged_read_gbs: float
    kernel_gbs: float
    kernel_hot_gbs: float
    torch_folded_gbs: float
    torch_paged_gbs: float
    numpy_gbs: float | None
    kernel_ms: float
    max_abs_diff_vs_torch_paged: float
    ratios: dict[str, float | None] = field(default_factory=dict)

    def fill_ratios(self) -> None:
        def over(a: float | None, b: float) -> float | None:
            return None if a is None else a / b

        self.ratios = {
            "kernel_vs_anchor": self.kernel_gbs / self.anchor_gbs,
            "paged_read_vs_anchor": self.paged_read_gbs / self.anchor_gbs,
            "kernel_vs_paged_read": self.kernel_gbs / self.paged_read_gbs,
            "kernel_vs_hot": self.kernel_gbs / self.kernel_hot_gbs,
            "torch_folded_vs_anchor": self.torch_folded_gbs / self.anchor_gbs,
            "torch_paged_vs_anchor": self.torch_paged_gbs / self.anchor_gbs,
            "numpy_vs_anchor": over(self.numpy_gbs, self.anchor_gbs),
            "kernel_vs_torch_folded": self.kernel_gbs / self.torch_folded_gbs,
            "kernel_vs_torch_paged": self.kernel_gbs / self.torch_paged_gbs,
        }


def _element_size(dtype: KvDtype) -> int:
    return 4 if dtype == "float32" else 2


def _median_seconds(call: Callable[[int], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of call(i) for i in [warmup, warmup + repeats), after `warmup` untimed calls."""
    for i in range(warmup):
        call(i)
    times = []
    for i in range(warmup, warmup + repeats):
        start = time.perf_counter()
        call(i)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class Pools:
    """K and V pools of one shape and dtype, filled with finite values from a random tile."""

    def __init__(self, shape: Shape, dtype: KvDtype, min_bytes: int, seed: int = 0) -> None:
        self.shape, self.dtype = shape, dtype
        self.block_bytes = shape.num_kv_heads * BLOCK_SIZE * shape.head_dim * _element_size(dtype)
        self.num_blocks = max(1, min_bytes // 2 // self.block_bytes)
        cache_shape = (self.num_blocks, shape.num_kv_heads, BLOCK_SIZE, shape.head_dim)
        self.k, self.v = kernel.allocate_kv_cache(cache_shape, dtype)  # [num_blocks, kv_heads, block, dim]
        rng = np.random.default_rng(seed)
        for pool in (self.k, self.v):
            flat = pool.reshape(-1)
            tile = reference.encode_kv(rng.standard_normal(min(flat.size, MIB), dtype=np.float32), dtype)
            for start in range(0, flat.size, tile.size):
                flat[start : start + tile.size] = tile[: flat.size - start]
        self.permutation = rng.permutation(self.num_blocks).astype(np.int32)

    def block_tables(self, batch: int, context: int) -> list[np.ndarray]:
        """Disjoint sets of [batch, blocks_per_row] block tables covering the pool, random order."""
        per_row = -(-context // BLOCK_SIZE)
        per_set = batch * per_row
        if per_set > self.num_blocks:
            raise ValueError(f"pool: {self.num_blocks} blocks cannot hold {batch} x {context} tokens")
        return [self.permutation[i * per_set : (i + 1) * per_set].reshape(batch, per_row)
                for i in range(self.num_blocks // per_set)]

    def dense(self, pool: np.ndarray, batch: int, context: int) -> list[np.ndarray]:
        """Disjoint dense [batch, kv_heads, context, head_dim] views of a pool's memory."""
        shape = (batch, self.shape.num_kv_heads, context, self.shape.head_dim)
        size = int(np.prod(shape))
        flat = pool.reshape(-1)
        return [flat[i * size : (i + 1) * size].reshape(shape) for i in range(flat.size // size)]


def _torch_tensor(array: np.ndarray, dtype: KvDtype) -> "torch.Tensor":  # noqa: F821
    from gpu_worker.kv_cache import TORCH_DTYPES, torch_view

    return torch_view(array, TORCH_DTYPES[dtype])


def kernel_hot_gbs(shape: Shape, dtype: KvDtype, threads: int, repeats: int) -> float:
    """The kernel's rate on a working set that stays in the caches: its arithmetic ceiling."""
    token_bytes = 2 * shape.num_kv_heads * shape.head_dim * _element_size(dtype)
    context = max(BLOCK_SIZE, HOT_BYTES_PER_THREAD // token_bytes // BLOCK_SIZE * BLOCK_SIZE)
    pools = Pools(shape, dtype, 2 * threads * context * token_bytes + 4 * MIB, seed=1)
    (tables, *_) = pools.block_tables(threads, context)
    q = np.random.default_rng(2).standard_normal((threads, shape.num_q_heads, shape.head_dim), dtype=np.float32)
    lens = np.full(threads, context, dtype=np.int32)
    out = np.empty_like(q)

    def call(_: int) -> np.ndarray:
        return kernel.paged_decode_attention(q, pools.k, pools.v, tables, lens, num_threads=threads, kv_dtype=dtype,
                                             out=out)

    seconds = _median_seconds(call, repeats * 10, warmup=3)
    return threads * context * token_bytes / seconds / 1e9


@dataclass
class Case:
    """One row's inputs: rotating sets of block tables over the pools, queries and output."""

    name: str
    pools: Pools
    batch: int
    context: int
    threads: int

    def __post_init__(self) -> None:
        shape = self.pools.shape
        self.tables = self.pools.block_tables(self.batch, self.context)  # each [batch, blocks_per_row]
        self.lens = np.full(self.batch, self.context, dtype=np.int32)
        rng = np.random.default_rng(3)
        self.q = rng.standard_normal((self.batch, shape.num_q_heads, shape.head_dim), dtype=np.float32)
        self.out = np.empty_like(self.q)  # [batch, num_q_heads, head_dim]
        self.kv_bytes = 2 * self.batch * self.context * shape.num_kv_heads * shape.head_dim * _element_size(
            self.pools.dtype)

    def run_kernel(self, i: int) -> np.ndarray:
        return kernel.paged_decode_attention(self.q, self.pools.k, self.pools.v, self.tables[i % len(self.tables)],
                                             self.lens, num_threads=self.threads, kv_dtype=self.pools.dtype,
                                             out=self.out)

    def run_paged_read(self, i: int) -> None:
        kernel.paged_read(self.q, self.pools.k, self.pools.v, self.tables[-1 - i % len(self.tables)], self.lens,
                          num_threads=self.threads, kv_dtype=self.pools.dtype)

    def run_numpy(self, i: int) -> np.ndarray:
        return reference.paged_decode_attention(self.q, self.pools.k, self.pools.v, self.tables[i % len(self.tables)],
                                                self.lens, kv_dtype=self.pools.dtype, compute_dtype=np.float32)


def torch_rates(case: Case, repeats: int) -> tuple[float, float, float]:
    """GB/s of torch SDPA folded and after a paged gather, and its largest difference from the kernel."""
    import torch
    import torch.nn.functional as F

    shape, dtype, batch, context = case.pools.shape, case.pools.dtype, case.batch, case.context
    torch.set_num_threads(case.threads)
    group = shape.num_q_heads // shape.num_kv_heads
    # [batch, kv_heads, group, head_dim]: a group's query heads folded into the query length
    q = _torch_tensor(case.q, "float32").view(batch, shape.num_kv_heads, group, shape.head_dim)
    q = q.to(_torch_tensor(case.pools.k[:1], dtype).dtype)
    dense_k = case.pools.dense(case.pools.k, batch, context)  # each [batch, kv_heads, context, head_dim]
    dense_v = case.pools.dense(case.pools.v, batch, context)
    k_pool = _torch_tensor(case.pools.k, dtype)  # [num_blocks, kv_heads, block_size, head_dim]
    v_pool = _torch_tensor(case.pools.v, dtype)

    def folded(i: int) -> "torch.Tensor":
        k, v = (_torch_tensor(dense[i % len(dense)], dtype) for dense in (dense_k, dense_v))
        return F.scaled_dot_product_attention(q, k, v)

    def paged(i: int) -> "torch.Tensor":
        table = torch.from_numpy(case.tables[i % len(case.tables)]).long()  # [batch, blocks_per_row]
        # each [batch, blocks_per_row, kv_heads, block_size, head_dim] -> [batch, kv_heads, context, head_dim]
        k, v = (pool[table].permute(0, 2, 1, 3, 4).reshape(batch, shape.num_kv_heads, -1, shape.head_dim)
                for pool in (k_pool, v_pool))
        return F.scaled_dot_product_attention(q, k[:, :, :context], v[:, :, :context])

    with torch.inference_mode():
        folded_seconds = _median_seconds(folded, repeats)
        paged_seconds = _median_seconds(paged, repeats)
        diff = (torch.from_numpy(case.run_kernel(0)) - paged(0).float().reshape(case.q.shape)).abs().max()
    return case.kv_bytes / folded_seconds / 1e9, case.kv_bytes / paged_seconds / 1e9, float(diff)


def interleaved_rates(case: Case, anchor: np.ndarray, rounds: int) -> tuple[float, float, float, float]:
    """Anchor GB/s, paged-read GB/s, kernel GB/s and kernel seconds (medians), measured round by
    round so that the three see the same machine (the bandwidth left to this VM drifts as its
    neighbours come and go). A round: an anchor pass, an untimed kernel call (it wakes the pool's
    helpers, asleep after the anchor pass, as back-to-back calls would find them), a timed one, a
    timed paged read; every call reads another set of blocks."""
    anchors, reads, kernels = [], [], []
    for i in range(rounds):
        anchors += kernel.read_bandwidth(anchor, num_threads=case.threads)
        case.run_kernel(2 * i)
        start = time.perf_counter()
        case.run_kernel(2 * i + 1)
        kernels.append(time.perf_counter() - start)
        start = time.perf_counter()
        case.run_paged_read(i)
        reads.append(time.perf_counter() - start)
    seconds = statistics.median(kernels)
    return (statistics.median(anchors), case.kv_bytes / statistics.median(reads) / 1e9,
            case.kv_bytes / seconds / 1e9, seconds)


def measure_row(case: Case, grid: Grid, anchor: np.ndarray, hot: float, with_numpy: bool) -> Row:
    anchor_gbs, paged_read_gbs, kernel_gbs, kernel_seconds = interleaved_rates(case, anchor, grid.repeats)
    folded_gbs, paged_gbs, diff = torch_rates(case, grid.baseline_repeats)
    numpy_gbs = None
    if with_numpy and case.kv_bytes <= grid.numpy_max_mib * MIB:
        numpy_gbs = case.kv_bytes / _median_seconds(case.run_numpy, 1, warmup=0) / 1e9
    time.sleep(0.2)  # let torch's idle OpenMP threads stop spinning before the next kernel timing
    shape = case.pools.shape
    row = Row(shape=case.name, num_q_heads=shape.num_q_heads, num_kv_heads=shape.num_kv_heads,
              head_dim=shape.head_dim, dtype=case.pools.dtype, batch=case.batch, context=case.context,
              threads=case.threads, isa=kernel.kernel_info()["isa"], kv_mib=case.kv_bytes / MIB,
              anchor_gbs=anchor_gbs, paged_read_gbs=paged_read_gbs, kernel_gbs=kernel_gbs, kernel_hot_gbs=hot,
              torch_folded_gbs=folded_gbs,
              torch_paged_gbs=paged_gbs, numpy_gbs=numpy_gbs, kernel_ms=kernel_seconds * 1e3,
              max_abs_diff_vs_torch_paged=diff)
    row.fill_ratios()
    return row


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def measure_peaks(threads: Sequence[int], anchor: np.ndarray) -> dict[str, object]:
    """Machine figures: read bandwidth and FMA throughput per thread count (and per ISA)."""
    info = kernel.kernel_info()
    peaks: dict[str, object] = {"cpu": _cpu_model(), "cpus": os.cpu_count(), "isa": info["isa"],
                                "isas": info["isas"]}
    for n in threads:
        peaks[f"read_gbs_{n}t"] = statistics.median(kernel.read_bandwidth(anchor, num_threads=n, repeats=5))
        for isa in kernel.kernel_info()["isas"]:
            iterations = 2_000_000 if isa == "portable" else 20_000_000
            peaks[f"fma_gflops_{isa}_{n}t"] = kernel.fma_throughput(num_threads=n, iterations=iterations, isa=isa)
    return peaks


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def report(rows: list[Row]) -> str:
    head = (f"{'shape':<10}{'dtype':<9}{'batch':>5}{'ctx':>6}{'thr':>4}{'KV MiB':>7}{'anchor':>7}{'p-read':>7}"
            f"{'kernel':>7}{'hot':>6}{'fold':>6}{'paged':>6}{'numpy':>6}{'k/anch':>7}{'p-r/a':>6}{'k/p-r':>6}"
            f"{'fold/a':>7}{'paged/a':>8}{'k/fold':>7}{'k/paged':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        ratio = r.ratios
        lines.append(
            f"{r.shape:<10}{r.dtype:<9}{r.batch:>5}{r.context:>6}{r.threads:>4}{r.kv_mib:>7.0f}{r.anchor_gbs:>7.1f}"
            f"{r.paged_read_gbs:>7.1f}{r.kernel_gbs:>7.1f}{r.kernel_hot_gbs:>6.1f}{r.torch_folded_gbs:>6.2f}"
            f"{r.torch_paged_gbs:>6.2f}{_fmt(r.numpy_gbs, 2):>6}{ratio['kernel_vs_anchor']:>7.2f}"
            f"{ratio['paged_read_vs_anchor']:>6.2f}{ratio['kernel_vs_paged_read']:>6.2f}"
            f"{ratio['torch_folded_vs_anchor']:>7.2f}{ratio['torch_paged_vs_anchor']:>8.2f}"
            f"{ratio['kernel_vs_torch_folded']:>7.1f}{ratio['kernel_vs_torch_paged']:>8.1f}"
        )
    return "\n".join(lines)


def scaling(rows: list[Row]) -> list[dict[str, object]]:
    """Kernel and read-test speed-up from the fewest to the most threads, per case."""
    cases: dict[tuple, dict[int, Row]] = {}
    for r in rows:
        cases.setdefault((r.shape, r.dtype, r.batch, r.context), {})[r.threads] = r
    result = []
    for (shape, dtype, batch, context), by_threads in cases.items():
        low, high = by_threads[min(by_threads)], by_threads[max(by_threads)]
        if low is not high:
            result.append({"shape": shape, "dtype": dtype, "batch": batch, "context": context,
                           "threads": f"{low.threads}->{high.threads}",
                           "kernel_speedup": high.kernel_gbs / low.kernel_gbs,
                           "read_speedup": high.anchor_gbs / low.anchor_gbs})
    return result


def run(grid: Grid) -> tuple[dict[str, object], list[Row]]:
    anchor = kernel.allocate_buffer(grid.anchor_mib * MIB).view(np.float32)  # like the pools: huge pages
    anchor[:] = 1.0
    peaks = measure_peaks(grid.threads, anchor)
    rows: list[Row] = []
    for name in grid.shapes:
        shape = SHAPES[name]
        for dtype in grid.dtypes:
            hot = {n: kernel_hot_gbs(shape, dtype, n, grid.repeats) for n in grid.threads}
            token_bytes = 2 * shape.num_kv_heads * shape.head_dim * _element_size(dtype)
            largest = max(b * -(-c // BLOCK_SIZE) * BLOCK_SIZE for b, c in grid.points) * token_bytes
            pools = Pools(shape, dtype, max(grid.pool_mib * MIB, largest))
            for batch, context in grid.points:
                for n in grid.threads:
                    case = Case(name, pools, batch, context, n)
                    rows.append(measure_row(case, grid, anchor, hot[n], with_numpy=n == grid.threads[0]))
                    logger.info("%s %s batch %d context %d threads %d: kernel %.1f GB/s = %.2f x read %.1f GB/s",
                                name, dtype, batch, context, n, rows[-1].kernel_gbs,
                                rows[-1].ratios["kernel_vs_anchor"], rows[-1].anchor_gbs)
            del pools
    return peaks, rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="apex-serve bench-kernel", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a small grid (under a minute)")
    size.add_argument("--tiny", action="store_true", help="a tiny grid for smoke tests (seconds)")
    parser.add_argument("--threads", help="comma-separated thread counts (default: the grid's, 1,2)")
    parser.add_argument("--dtypes", help="comma-separated KV dtypes (default: bfloat16,float32)")
    parser.add_argument("--pin", action="store_true",
                        help="pin kernel helper thread k to the k-th cpu this process may use")
    parser.add_argument("--out", default="bench_results/kernel.json")
    args = parser.parse_args(argv)
    configure_logging("bench-kernel")
    grid = GRIDS["tiny" if args.tiny else "quick" if args.quick else "full"]
    if args.threads:
        grid = Grid(**asdict(grid) | {"threads": tuple(int(n) for n in args.threads.split(","))})
    if args.dtypes:
        grid = Grid(**asdict(grid) | {"dtypes": tuple(args.dtypes.split(","))})
    if args.pin:
        kernel.set_thread_cpus(sorted(os.sched_getaffinity(0)))
    started = time.perf_counter()
    peaks, rows = run(grid)
    logger.info("machine: %s", json.dumps(peaks))
    logger.info("paged decode attention, effective KV GB/s (median) and ratios to the read anchor of the same row\n%s",
                report(rows))
    speedups = scaling(rows)
    for s in speedups:
        logger.info("scaling %s %s batch %d context %d threads %s: kernel x%.2f, read test x%.2f", s["shape"],
                    s["dtype"], s["batch"], s["context"], s["threads"], s["kernel_speedup"], s["read_speedup"])
    write_result(args.out, {"machine": peaks, "grid": asdict(grid), "rows": [asdict(r) for r in rows],
                            "scaling": speedups, "seconds": time.perf_counter() - started})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
