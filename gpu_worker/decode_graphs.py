"""CUDA graphs of decode-only steps at bucketed row counts: each layer's linear work before attention (norm, QKV,
RoPE) and after it (O-proj, residual, norm, MLP) captured once per bucket and replayed, so a layer costs two graph
launches instead of some thirty kernel launches. Attention, KV writes, staging and the doorbell stay outside the
graphs (they change with each step's block tables and CPU rows).

A bucket's graphs read and write static buffers of the bucket's rows: the hidden state (the residual stream, updated
in place layer after layer), the angles, q/k/v and the attention output. Each sub-batch slot has its own buckets
(ASYM_PIPELINE interleaves two sub-batches layer by layer). A sub-batch of n rows uses the smallest bucket of at
least n rows; rows past n hold stale values that no real row reads (every piece is row-wise). The graphs are captured
on a bucket's first use, at the start of a step, before any of its work is queued. They take the device memory of
their static buffers and of one shared pool for their intermediates, beside the KV pool's sizing.

On the CPU device the same static-buffer path runs without graphs (a capture is the function itself), so it is
checked against the plain path where no GPU is.
"""

import logging
from collections.abc import Callable
from functools import partial

import torch

from gpu_worker.layers import LayerWeights, post_attention, pre_attention
from gpu_worker.rope import Angles
from gpu_worker.weights import ModelWeights

logger = logging.getLogger(__name__)

Capture = Callable[[Callable[[], None]], Callable[[], None]]  # a piece of work -> its replay
WARMUP_RUNS = 2  # eager runs on a side stream before a capture (lazy initialisation, cuBLAS workspaces)


def buckets(max_rows: int) -> tuple[int, ...]:
    """Row counts captured up to max_rows: 1, 2, 4, 8, then every 8, and max_rows itself."""
    sizes = {n for n in (1, 2, 4) if n < max_rows} | set(range(8, max_rows, 8)) | {max_rows}
    return tuple(sorted(sizes)) if max_rows > 0 else ()


def eager_capture(work: Callable[[], None]) -> Callable[[], None]:
    """The CPU device's capture: the work itself, run at each replay."""
    return work


def capture_for(device: torch.device) -> Capture:
    """CUDA graphs on a CUDA device, the eager stand-in elsewhere."""
    return cuda_capture(device) if device.type == "cuda" else eager_capture


def cuda_capture(device: torch.device) -> Capture:
    """Captures into CUDA graphs sharing one memory pool, each after WARMUP_RUNS eager runs on a side stream."""
    pool = torch.cuda.graph_pool_handle()

    def capture(work: Callable[[], None]) -> Callable[[], None]:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                work()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the doorbell thread may synchronise its events meanwhile, which is no part of the capture
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            work()
        return graph.replay

    return capture


class GraphedLayers:
    """Every layer's two pieces at one bucket of rows, captured: static buffers, and one replay per piece."""

    def __init__(self, weights: ModelWeights, rows: int, capture: Capture) -> None:
        first = weights.layers[0]
        hidden_size, heads, kv_heads = first.o_proj.shape[0], first.num_heads, first.num_kv_heads
        head_dim = first.head_dim
        like = {"dtype": first.o_proj.dtype, "device": first.o_proj.device}
        self.rows = rows
        self.hidden = torch.zeros(rows, hidden_size, **like)  # [rows, hidden], the residual stream
        self.cos = torch.zeros(rows, 1, head_dim, **like)  # [rows, 1, head_dim]
        self.sin = torch.zeros(rows, 1, head_dim, **like)
        self.q = torch.zeros(rows, heads, head_dim, **like)  # [rows, num_heads, head_dim]
        self.k = torch.zeros(rows, kv_heads, head_dim, **like)  # [rows, num_kv_heads, head_dim]
        self.v = torch.zeros(rows, kv_heads, head_dim, **like)
        self.attn = torch.zeros(rows, heads, head_dim, **like)  # [rows, num_heads, head_dim]
        self._pre = [capture(partial(self._pre_attention, layer)) for layer in weights.layers]
        self._post = [capture(partial(self._post_attention, layer)) for layer in weights.layers]

    def _pre_attention(self, layer: LayerWeights) -> None:
        q, k, v = pre_attention(layer, self.hidden, Angles(self.cos, self.sin))
        self.q.copy_(q)
        self.k.copy_(k)
        self.v.copy_(v)

    def _post_attention(self, layer: LayerWeights) -> None:
        self.hidden.copy_(post_attention(layer, self.hidden, self.attn))

    def load(self, hidden: torch.Tensor, angles: Angles) -> tuple[torch.Tensor, Angles]:
        """A step's hidden [n, hidden] and angles copied into the buffers; the views of them to go on with."""
        n = hidden.shape[0]
        self.hidden[:n] = hidden
        self.cos[:n] = angles.cos
        self.sin[:n] = angles.sin
        return self.hidden[:n], Angles(self.cos[:n], self.sin[:n])

    def pre(self, layer_idx: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """pre_attention of layer layer_idx over the loaded rows: q, k, v [n, heads, head_dim] (views of buffers)."""
        self._pre[layer_idx]()
        return self.q[:n], self.k[:n], self.v[:n]

    def post(self, layer_idx: int, hidden: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """post_attention of layer layer_idx: hidden [n, hidden] (the buffer's view, or rows to load into it) and
        attn [n, num_heads, head_dim] in any float dtype -> the new hidden [n, hidden] (the buffer's view)."""
        n = hidden.shape[0]
        if hidden.data_ptr() != self.hidden.data_ptr():
            self.hidden[:n] = hidden
        self.attn[:n] = attn
        self._post[layer_idx]()
        return self.hidden[:n]


class DecodeGraphs:
    """The buckets' graphed layers per sub-batch slot, each captured on first use; how many sub-batch steps each
    bucket served."""

    def __init__(self, weights: ModelWeights, max_rows: int, capture: Capture) -> None:
        self.weights = weights
        self.sizes = buckets(max_rows)
        self.capture = capture
        self.graphed: dict[tuple[int, int], GraphedLayers] = {}  # by (slot, bucket)
        self.replays: dict[int, int] = {}  # by bucket

    def bucket(self, rows: int) -> int | None:
        """The smallest bucket of at least `rows` rows (None: more rows than any)."""
        return next((size for size in self.sizes if size >= rows), None)

    def layers_for(self, rows: int, slot: int = 0) -> GraphedLayers | None:
        """The graphed layers serving a decode-only sub-batch of `rows` rows in `slot` (captured now if first used);
        None where no bucket holds them."""
        size = self.bucket(rows)
        if size is None:
            return None
        if (slot, size) not in self.graphed:
            logger.info("capturing the decode graphs of %d rows for sub-batch %d (%d layers)", size, slot,
                        len(self.weights.layers))
            self.graphed[slot, size] = GraphedLayers(self.weights, size, self.capture)
        self.replays[size] = self.replays.get(size, 0) + 1
        return self.graphed[slot, size]
