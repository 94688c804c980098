"""The model's forward pass over a step's sub-batches in the three execution modes and the two overlap layouts
(DESIGN §1, §3).

Every layer of a sub-batch runs in three stages:
- launch: norm, QKV and RoPE of the rows the layout projects first; the CPU rows' q/k/v staged and the doorbell
  rung (on CUDA the copies run on a side stream ordered after the QKV GEMM by an event, and a doorbell thread rings
  once they have landed, while this thread goes on to queue the window: gpu_worker.cpu_bridge);
- device: the work of the layer's window, the accelerator work done while the CPU attends: the accelerator rows'
  k/v written to their pool and their attention (prefill rows over their own tokens, a chunk also over the
  request's earlier KV, accelerator decode rows over the paged pool);
- complete: wait for the CPU's o (lazily, only now), then O-proj and MLP of the rows not yet done.

The layout (OverlapLayout, named by the plan) decides how a sub-batch with CPU rows splits its linear work:
- FUSED: launch runs one norm/QKV/RoPE over all rows and stages the CPU rows' slices (the sub-batch's tail); device
  is the accelerator rows' KV writes and attention; complete runs one O-proj and MLP over all rows. One pass over
  each weight per layer.
- SPLIT: launch runs the CPU rows' norm/QKV/RoPE only; device adds the other rows' norm/QKV/RoPE and, in a step
  with prefill rows, their O-proj and MLP to the window; complete runs the decode rows' O-proj and MLP. A second
  pass over the QKV weights (and over the O-proj and MLP weights when prefill rows are in the window).
A sub-batch without CPU rows runs the same either way: one norm/QKV/RoPE over all rows at launch.

GPU_ONLY and ASYNC_OVERLAP run launch, device, complete per layer on one sub-batch (GPU_ONLY has no CPU rows).
ASYM_PIPELINE runs two sub-batches one layer apart, so the CPU attends one while the accelerator works on the other.
A sub-batch of decode rows only, projected at once, may replay each layer's linear work from CUDA graphs captured at
its bucket of rows for its slot (gpu_worker.decode_graphs); attention and staging run between the replays as above.
The last layer's O-proj and MLP, and the LM head, run over a sub-batch's kept rows only (step_batch.SubBatch): the
sampling rows, and every position of a prefill row whose request asked for prompt logprobs (gpu_worker.lm_head).
"""

from concurrent.futures import Future
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from apex_serve.types import ExecutionMode, OverlapLayout
from gpu_worker.attention import ContextKV, DecodeKernel, PagedAttention
from gpu_worker.cpu_bridge import CpuAttentionBridge
from gpu_worker.decode_graphs import DecodeGraphs, GraphedLayers
from gpu_worker.kv_cache import PagedKVCache
from gpu_worker.layers import LayerWeights, post_attention, pre_attention, rms_norm
from gpu_worker.lm_head import StepLogits, lm_head
from gpu_worker.rope import Angles
from gpu_worker.step_batch import SubBatch
from gpu_worker.step_clock import StepClock
from gpu_worker.weights import ModelWeights


@dataclass
class _Flight:
    """A sub-batch between stages of one layer."""

    batch: SubBatch
    hidden: torch.Tensor  # [num_tokens, hidden]
    angles: Angles  # of the batch's positions, for every layer
    layout: OverlapLayout
    ticket: "Future[int] | None" = None  # the doorbell seq of the CPU rows' layer in flight, once rung
    device_qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # q, k, v [device_end, heads, head_dim]
    device_attn: torch.Tensor | None = None  # [device tokens not yet projected, num_heads, head_dim]
    done_prefill: torch.Tensor | None = None  # [kept prefill tokens, hidden] prefill rows already through the layer
    graphed: GraphedLayers | None = None  # the captured linear pieces a decode-only step replays (decode_graphs)

    @property
    def fused(self) -> bool:
        """One norm/QKV/RoPE over all rows at launch: the fused layout, or no CPU rows (both layouts are one then)."""
        return self.layout is OverlapLayout.FUSED or not self.batch.num_cpu_decodes


class Forward:
    def __init__(
        self,
        weights: ModelWeights,
        device_pool: PagedKVCache,
        bridge: CpuAttentionBridge | None,
        rms_norm_eps: float,
        decode: DecodeKernel,
        graphs: DecodeGraphs | None = None,
    ) -> None:
        self.weights = weights
        self.graphs = graphs
        self.device_pool = device_pool
        self.attention = PagedAttention(device_pool, decode)
        self.bridge = bridge
        self.rms_norm_eps = rms_norm_eps

    def logits(
        self,
        sub_batches: list[SubBatch],
        mode: ExecutionMode,
        layout: OverlapLayout,
        clock: StepClock,
        cpu_wait_s: float,
    ) -> StepLogits:
        """fp32 logits [num_sampling, vocab] in the order of the sub-batches' sampling_ids, concatenated, and the
        prompt logprobs of the prefill rows that ask for them; the sub-batches with CPU rows run in `layout`. Each
        layer of the CPU rows may take cpu_wait_s; past it (or when the worker died) CpuAttentionError escapes."""
        with torch.inference_mode():
            replays = [self._graphed(batch, layout) for batch in sub_batches]  # captured before the step's work
            flights = []
            for batch, graphed in zip(sub_batches, replays):
                if batch.num_cpu_decodes:
                    with clock.measure("staging", 0, batch.slot):
                        self._bridge().begin_step(batch)
                hidden = F.embedding(batch.input_ids, self.weights.embed_tokens)  # [num_tokens, hidden]
                angles = self.weights.rope.angles(batch.positions)
                if graphed is not None:
                    hidden, angles = graphed.load(hidden, angles)
                flights.append(_Flight(batch, hidden, angles, layout, graphed=graphed))
            if mode is ExecutionMode.ASYM_PIPELINE and len(flights) == 2:
                self._pipelined(flights[0], flights[1], clock, cpu_wait_s)
            else:
                for flight in flights:
                    for i in range(len(self.weights.layers)):
                        self._launch(flight, i, clock)
                        self._window(flight, i, clock)
                        self._complete(flight, i, clock, cpu_wait_s)
            with clock.measure("device_linear", len(self.weights.layers)):  # the LM head
                hidden = torch.cat([f.hidden for f in flights])  # [num_kept, hidden]
                normed = rms_norm(hidden, self.weights.final_norm, self.rms_norm_eps)  # [num_kept, hidden]
                logits = lm_head(sub_batches, normed, self.weights.lm_head)
            if self.bridge is not None and self.bridge.writing:  # prefill KV, swaps: in the CPU pool by the step's end
                with clock.measure("staging", len(self.weights.layers)):
                    self.bridge.flush()
            return logits

    def _pipelined(self, a: _Flight, b: _Flight, clock: StepClock, cpu_wait_s: float) -> None:
        """Two sub-batches one layer apart: the CPU attends A's layer i while the accelerator finishes B's layer
        i - 1 and runs B's layer i up to its attention, and the other way round."""
        last = len(self.weights.layers) - 1
        for i in range(last + 1):
            self._launch(a, i, clock)
            self._window(a, i, clock)
            if i > 0:
                self._complete(b, i - 1, clock, cpu_wait_s)
            self._launch(b, i, clock)
            self._window(b, i, clock)
            self._complete(a, i, clock, cpu_wait_s)
        self._complete(b, last, clock, cpu_wait_s)

    def _graphed(self, batch: SubBatch, layout: OverlapLayout) -> GraphedLayers | None:
        """The graphed layers for a sub-batch that can replay them (its slot's own buffers): decode rows only, all
        sampled, all projected at once (the fused layout, or no CPU rows)."""
        if self.graphs is None or batch.num_prefill_tokens or batch.kept_rows.shape[0] != batch.num_tokens:
            return None
        if layout is not OverlapLayout.FUSED and batch.num_cpu_decodes:
            return None
        return self.graphs.layers_for(batch.num_tokens, batch.slot)

    def _bridge(self) -> CpuAttentionBridge:
        if self.bridge is None:
            raise RuntimeError("a sub-batch has CPU rows but no cpu_attention_worker is attached")
        return self.bridge

    def _layer(self, i: int) -> LayerWeights:
        return self.weights.layers[i]

    def _is_last(self, i: int) -> bool:
        return i == len(self.weights.layers) - 1

    def _launch(self, flight: _Flight, i: int, clock: StepClock) -> None:
        batch = flight.batch
        end = batch.device_end
        rows = slice(0, batch.num_tokens) if flight.fused else slice(end, batch.num_tokens)
        with clock.measure("device_linear", i, batch.slot):
            if flight.graphed is not None:
                q, k, v = flight.graphed.pre(i, batch.num_tokens)
            else:
                q, k, v = pre_attention(self._layer(i), flight.hidden[rows], flight.angles[rows])
        if flight.fused:
            flight.device_qkv = (q[:end], k[:end], v[:end])
            q, k, v = q[end:], k[end:], v[end:]  # the CPU rows: the sub-batch's tail
        if batch.num_cpu_decodes:
            bridge = self._bridge()
            with clock.measure("staging", i, batch.slot, bridge.transfer.to_host_stream()):
                bridge.stage(batch.slot, q, k, v)
                flight.ticket = bridge.ring(batch.slot, i)

    def _window(self, flight: _Flight, i: int, clock: StepClock) -> None:
        """The layer's device stage: the accelerator work done while the CPU attends."""
        batch = flight.batch
        end = batch.device_end
        qkv, flight.device_qkv = flight.device_qkv, None
        if end == 0:
            flight.device_attn = None
            return
        layer = self._layer(i)
        if qkv is None:
            with clock.measure("device_linear", i, batch.slot):
                qkv = pre_attention(layer, flight.hidden[:end], flight.angles[:end])
        q, k, v = qkv
        split = batch.num_cpu_prefill_tokens
        loaded = self._load_cpu_contexts(batch, i, clock)
        with clock.measure("device_attention", i, batch.slot):  # prefill KV writes count here, either pool
            if split:
                self._bridge().write_kv(i, k[:split], v[:split], batch.cpu_prefill_blocks, batch.cpu_prefill_offsets)
            meta = batch.device_metadata
            self.device_pool.write(i, k[split:], v[split:], meta.slot_blocks, meta.slot_offsets)
            attn = self.attention.forward(i, q, k, v, meta, loaded)  # [end, num_heads, head_dim]
        prefill = batch.num_prefill_tokens
        if not flight.fused and prefill:  # split: the prefill rows' O-proj and MLP join the window
            keep = batch.kept_rows[: batch.num_prefill_kept] if self._is_last(i) else slice(0, prefill)
            with clock.measure("device_linear", i, batch.slot):
                flight.done_prefill = post_attention(layer, flight.hidden[keep], attn[keep])
            attn = attn[prefill:]
        flight.device_attn = attn

    def _load_cpu_contexts(self, batch: SubBatch, i: int, clock: StepClock) -> dict[int, ContextKV]:
        """Layer i's earlier KV of the sub-batch's CPU-placed chunks, gathered from the CPU pool and brought back to
        the accelerator, by prefill row. A chunk's attention is compute-bound (chunk x context multiply-adds per
        head), far too slow for the host's cores, while its context's KV crosses the host link in context x
        kv_bytes_per_token per layer; so the chunk attends on the accelerator, and the load counts as staging."""
        if not batch.cpu_context_loads:
            return {}
        bridge = self._bridge()
        loaded = {}
        with clock.measure("staging", i, batch.slot):
            for load in batch.cpu_context_loads:
                k, v = bridge.pool.gather_context(i, load.blocks, load.tokens)  # [kv_heads, tokens, head_dim], host
                loaded[load.row] = (bridge.transfer.to_device(k), bridge.transfer.to_device(v))
        return loaded

    def _complete(self, flight: _Flight, i: int, clock: StepClock, cpu_wait_s: float) -> None:
        batch = flight.batch
        parts = [] if flight.device_attn is None else [flight.device_attn]
        if batch.num_cpu_decodes:
            if flight.ticket is None:
                raise RuntimeError(f"layer {i}: sub-batch {batch.slot}'s CPU rows were not rung")
            parts.append(
                self._bridge().collect(batch.slot, i, flight.ticket, batch.num_cpu_decodes, cpu_wait_s, clock)
            )
            flight.ticket = None
        attn = torch.cat(parts) if len(parts) > 1 else parts[0]  # [rows not yet projected, num_heads, head_dim]
        hidden = flight.hidden
        if flight.done_prefill is not None:
            hidden = hidden[batch.num_prefill_tokens :]  # decode rows
        elif self._is_last(i):
            hidden, attn = hidden[batch.kept_rows], attn[batch.kept_rows]  # [num_kept, ...]
        with clock.measure("device_linear", i, batch.slot):
            if flight.graphed is not None:
                hidden = flight.graphed.post(i, hidden, attn)
            else:
                hidden = post_attention(self._layer(i), hidden, attn.to(hidden.dtype))
        if flight.done_prefill is not None:
            hidden = torch.cat([flight.done_prefill, hidden])
            flight.done_prefill = None
        flight.hidden = hidden
        flight.device_attn = None
