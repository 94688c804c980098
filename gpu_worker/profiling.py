"""Times synthetic work of one layer on this worker's own hardware and weights (DESIGN §5): the profiler asks for a
table and its points, and gets the median ns of each point after warm-up. Tables here: t_lin (tokens), t_pref
(prefill tokens of one request, context tokens computed before them), t_gatt (decode rows, KV tokens over the rows),
t_xfer (bytes staged per layer), t_sync (doorbell round trip), t_step (requests: what a whole decode step of the
worker spends outside its layers' timed subtasks: the plan's checks and state, the layout, embedding, final norm, lm
head, sampling, the output, and the code between the subtasks of every layer, which no per-layer table times; per
iteration).
Layer work runs over every layer in turn and is divided by the layer count, so the weights and KV stream from
memory as in a real step instead of staying in cache. Requests live in the pool between steps: the blocks a
measurement writes are saved before and put back after it. t_pref writes scratch KV space of the pool's layout
instead, so a pool of a few blocks profiles prompts up to max_model_len."""

from collections.abc import Callable
from functools import partial

import torch

from apex_serve.errors import FailedPrecondition, InvalidArgument
from apex_serve.measurement import check_measure, median_ns, median_of
from apex_serve.types import CachedRequestData, Placement, SamplingParams, StepOutput, StepPlan
from gpu_worker.attention import AttentionMetadata, PagedAttention, causal_attention, chunk_attention, chunk_mask
from gpu_worker.cpu_bridge import CpuAttentionBridge
from gpu_worker.kv_cache import PagedKVCache
from gpu_worker.layers import post_attention, pre_attention
from gpu_worker.model_runner import ModelRunner
from gpu_worker.step_batch import RequestState

GPU_TABLES = ("t_lin", "t_pref", "t_gatt", "t_xfer", "t_sync", "t_step")
_OVER_LAYERS = ("t_lin", "t_gatt")  # timed over every layer, reported per layer
_GREEDY = SamplingParams(temperature=0.0)


class LayerProfiler:
    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.layer = runner.weights.layers[0]
        self.generator = torch.Generator(device="cpu").manual_seed(0)
        self._saved: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (blocks, k, v) to put back
        self._undo: list[Callable[[], None]] = []  # the runner's state to put back after a measurement

    def measure(self, table: str, points: list[tuple[int, int]], warmup: int, repeats: int) -> list[float]:
        """Median ns of each point of table; InvalidArgument for an unknown table or a point out of range."""
        check_measure(table, GPU_TABLES, points, warmup, repeats)
        build = getattr(self, f"_{table}")
        per = len(self.runner.weights.layers) if table in _OVER_LAYERS else 1
        value = self._outside_layers if table == "t_step" else None
        with torch.inference_mode():
            return [self._timed(partial(build, x, y), warmup, repeats, value) / per for x, y in points]

    def _timed(self, build: Callable[[], Callable[[], object]], warmup: int, repeats: int,
               value: Callable[[StepOutput], int] | None = None) -> float:
        """Median ns of the work build() makes: its wall time, or value() of what it returns where given; the pool
        blocks it saved are put back whatever happens."""
        try:
            work = build()
            if value is None:
                return median_ns(work, warmup, repeats, self.runner._synchronize)
            return median_of(lambda: value(work()), warmup, repeats)
        finally:
            self._restore()

    def _outside_layers(self, output: StepOutput) -> int:
        """ns of a step outside its layers' timed subtasks (the intervals of layers 0..L-1 it recorded; the final norm
        and lm head are timed as layer L, so they stay in)."""
        num_layers = len(self.runner.weights.layers)
        inside = sum(s.end_unix_ns - s.start_unix_ns for s in output.subtasks if s.layer < num_layers)
        return output.timings.total_ns - inside

    def _preserve(self, blocks: torch.Tensor) -> None:
        """Save blocks [n] of every layer of the pool, for _restore after the measurement writes them."""
        pool = self.runner.kv_cache
        self._saved.append((blocks, pool.k[:, blocks].clone(), pool.v[:, blocks].clone()))

    def _restore(self) -> None:
        while self._undo:
            self._undo.pop()()
        pool = self.runner.kv_cache
        while self._saved:
            blocks, k, v = self._saved.pop()
            pool.k[:, blocks] = k  # [layers, n, kv_heads, block_size, head_dim]
            pool.v[:, blocks] = v

    def _random(self, *shape: int) -> torch.Tensor:
        values = torch.randn(*shape, generator=self.generator)
        return values.to(self.runner.device, self.runner.dtype)

    def _positive(self, name: str, value: int, limit: int) -> int:
        if not 1 <= value <= limit:
            raise InvalidArgument(name, f"{value} is outside [1, {limit}]")
        return value

    def _t_lin(self, tokens: int, _: int) -> Callable[[], object]:
        self._positive("x", tokens, self.runner.max_model_len * 64)
        hidden = self._random(tokens, self.runner.model_config.hidden_size)  # [tokens, hidden]
        positions = torch.arange(tokens, device=self.runner.device) % self.runner.max_model_len
        angles = self.runner.weights.rope.angles(positions)  # once per step, as Forward gathers them
        attn = self._random(tokens, self.layer.num_heads, self.layer.head_dim)  # [tokens, num_heads, head_dim]

        def work() -> None:
            for layer in self.runner.weights.layers:
                pre_attention(layer, hidden, angles)
                post_attention(layer, hidden, attn)

        return work

    def _t_pref(self, tokens: int, context: int) -> Callable[[], object]:
        """One layer of a prefill row's attention and KV write, as a step runs it: a whole prompt (context 0) attends
        causally to itself; a chunk after context earlier tokens writes its KV, gathers the earlier KV from the
        paged blocks and attends over both under the causal mask. The KV lives in one-layer scratch space, not in
        the pool."""
        limit = self.runner.max_model_len
        self._positive("x", tokens, limit)
        if not 0 <= context <= limit - tokens:
            raise InvalidArgument("y", f"{context} is outside [0, {limit - tokens}] (max_model_len {limit} less x)")
        scratch = self._scratch(tokens + context)
        table = torch.randperm(scratch.num_blocks, generator=self.generator).to(self.runner.device)  # [blocks]
        positions = torch.arange(context, context + tokens, device=self.runner.device)  # [tokens]
        slot_blocks, slot_offsets = table[positions // scratch.block_size], positions % scratch.block_size
        q = self._random(tokens, self.layer.num_heads, self.layer.head_dim)
        kv = self._random(tokens, self.layer.num_kv_heads, self.layer.head_dim)
        mask = chunk_mask(context, tokens, self.runner.device)  # [tokens, context + tokens]
        context_table = table[: -(-context // scratch.block_size)]  # [blocks holding the context]

        def work() -> torch.Tensor:
            scratch.write(0, kv, kv, slot_blocks, slot_offsets)
            if context == 0:
                return causal_attention(q, kv, kv)
            return chunk_attention(q, kv, kv, scratch.gather_context(0, context_table, context), mask)

        return work

    def _scratch(self, num_tokens: int) -> PagedKVCache:
        """One layer of random KV in the pool's layout and dtype, blocks enough for num_tokens."""
        pool = self.runner.kv_cache
        blocks = -(-num_tokens // pool.block_size)
        shape = (1, blocks, self.layer.num_kv_heads, pool.block_size, self.layer.head_dim)
        return PagedKVCache.wrap(self._random(*shape), self._random(*shape))

    def _t_gatt(self, rows: int, kv_tokens: int) -> Callable[[], object]:
        pool = self.runner.kv_cache
        self._positive("x", rows, pool.num_blocks)
        context = max(1, kv_tokens // rows)
        per_row = -(-context // pool.block_size)
        self._positive("y", rows * per_row, pool.num_blocks)  # the pool must hold the point
        blocks = torch.randperm(pool.num_blocks, generator=self.generator)[: rows * per_row].reshape(rows, per_row)
        tables = blocks.tolist()
        positions = [context - 1] * rows
        metadata = AttentionMetadata.build(
            prefill_lens=[], slot_blocks=[t[p // pool.block_size] for t, p in zip(tables, positions)],
            slot_offsets=[p % pool.block_size for p in positions], decode_block_tables=tables,
            decode_context_lens=[context] * rows, block_size=pool.block_size, device=self.runner.device,
        )
        q = self._random(rows, self.layer.num_heads, self.layer.head_dim)
        kv = self._random(rows, self.layer.num_kv_heads, self.layer.head_dim)
        attention = PagedAttention(pool, self.runner.forward.attention.decode)  # the kernel the steps use
        self._preserve(metadata.slot_blocks.unique())

        def work() -> None:
            for i in range(len(self.runner.weights.layers)):
                pool.write(i, kv, kv, metadata.slot_blocks, metadata.slot_offsets)
                attention.forward(i, q, kv, kv, metadata)

        return work

    def _t_xfer(self, nbytes: int, _: int) -> Callable[[], object]:
        bridge = self._bridge()
        row_bytes = bridge.bytes_per_row()
        self._positive("x", nbytes, bridge.spec.max_rows * row_bytes)
        rows = max(1, nbytes // row_bytes)
        q = self._random(rows, self.layer.num_heads, self.layer.head_dim).float()
        kv = self._random(rows, self.layer.num_kv_heads, self.layer.head_dim)

        def work() -> None:
            bridge.stage(0, q, kv, kv)
            bridge.transfer.copied().synchronize()
            bridge.transfer.to_device(bridge.output(0, rows)).sum()

        return work

    def _t_sync(self, _: int, __: int) -> Callable[[], object]:
        bridge = self._bridge()
        bridge.client.write_no_rows(0)
        return lambda: bridge.client.wait(bridge.client.ring(0, 0), self.runner.config.cpu_wait_timeout_s)

    def _t_step(self, requests: int, _: int) -> Callable[[], StepOutput]:
        """The worker's own step (ModelRunner.execute) on a plan of `requests` decode rows of 64 tokens over every
        layer, recording its subtasks (measured by _outside_layers). The rows' blocks are saved and put back: the
        step writes the KV of position 63."""
        runner = self.runner
        self._positive("x", requests, 4096)
        block_size, num_blocks = runner.config.block_size, runner.kv_cache.num_blocks
        per_row = -(-64 // block_size)
        tables = [[(i * per_row + b) % num_blocks for b in range(per_row)] for i in range(requests)]
        states = {
            f"apex-profile-{i}": RequestState([1] * 64, 63, _GREEDY, table, Placement.GPU, num_computed_tokens=63)
            for i, table in enumerate(tables)
        }
        plan = StepPlan(step_id=0, cached_requests=tuple(CachedRequestData(rid) for rid in states),
                        record_subtasks=True)
        self._preserve(torch.tensor(sorted({b for table in tables for b in table}), device=runner.device))
        runner._requests.update(states)

        def undo() -> None:
            for rid in states:
                runner._requests.pop(rid, None)

        self._undo.append(undo)

        def work() -> StepOutput:
            for state in states.values():  # each run decodes position 63 again
                del state.token_ids[64:]
                state.num_computed_tokens = 63
            return runner.execute(plan)

        return work

    def _bridge(self) -> CpuAttentionBridge:
        if self.runner.bridge is None:
            raise FailedPrecondition("t_xfer and t_sync need a cpu_attention_worker attached to this gpu_worker")
        return self.runner.bridge
