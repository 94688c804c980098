"""t_catt: the paged attention kernel's time on this worker's cores, over the live data plane's KV pool (every
layer in turn, so the KV comes from memory as in a real step; read only: nothing a request owns is written), x
decode rows and y KV tokens over the rows, median of repeats, per layer."""

import numpy as np

from apex_serve.errors import FailedPrecondition, InvalidArgument
from apex_serve.measurement import check_measure, median_ns
from cpu_attention_worker import kernel
from cpu_attention_worker.data_plane import view
from cpu_attention_worker.data_plane_registry import DataPlane

CPU_TABLES = ("t_catt",)


def measure(
    plane: DataPlane | None, table: str, points: list[tuple[int, int]], warmup: int, repeats: int, num_threads: int
) -> list[float]:
    check_measure(table, CPU_TABLES, points, warmup, repeats)
    if plane is None:
        raise FailedPrecondition("t_catt is measured on the data plane's KV pool: call SetupDataPlane first")
    spec = plane.spec
    buffer = plane.regions["kv"].buffer
    k_cache = view(buffer, plane.layout["kv"].tensors["k_cache"])  # [layers, num_blocks, num_kv_heads, block, dim]
    v_cache = view(buffer, plane.layout["kv"].tensors["v_cache"])
    rng = np.random.default_rng(0)
    medians = []
    for rows, kv_tokens in points:
        context = max(1, kv_tokens // max(rows, 1))
        per_row = -(-context // spec.block_size)
        if not 1 <= rows <= spec.max_rows or rows * per_row > spec.num_blocks:
            raise InvalidArgument("points", f"({rows}, {kv_tokens}) needs 1..{spec.max_rows} rows and at most "
                                  f"{spec.num_blocks} blocks of {spec.block_size} tokens")
        tables = rng.permutation(spec.num_blocks)[: rows * per_row].astype(np.int32).reshape(rows, per_row)
        lens = np.full(rows, context, dtype=np.int32)
        q = rng.standard_normal((rows, spec.num_q_heads, spec.head_dim), dtype=np.float32)
        out = np.empty_like(q)

        def work() -> None:
            for layer in range(spec.num_layers):
                kernel.paged_decode_attention(q, k_cache[layer], v_cache[layer], tables, lens,
                                              num_threads=num_threads, kv_dtype=spec.kv_dtype, out=out)

        medians.append(median_ns(work, warmup, repeats) / spec.num_layers)
    return medians
