"""The gpu_worker's side of the data plane to the cpu_attention_worker: the CPU KV pool (shared memory, mapped
here for prefill writes and swaps), per-slot staging of the CPU rows' q/k/v and o, and the doorbell."""

import logging

import torch

from apex_serve.types import SubtaskKind
from cpu_attention_worker.client import DataPlaneClient
from cpu_attention_worker.data_plane import DataPlaneSpec
from gpu_worker.host_transfer import HostTransfer
from gpu_worker.kv_cache import TORCH_DTYPES, PagedKVCache, torch_view
from gpu_worker.step_batch import SubBatch
from gpu_worker.step_clock import StepClock

logger = logging.getLogger(__name__)


class CpuAttentionBridge:
    """Launches one layer of a sub-batch's CPU rows on the cpu_attention_worker and collects the result."""

    def __init__(self, client: DataPlaneClient, transfer: HostTransfer) -> None:
        self.client = client
        self.transfer = transfer
        spec: DataPlaneSpec = client.spec
        storage = TORCH_DTYPES[spec.kv_dtype]
        self.pool = PagedKVCache.wrap(torch_view(client.k_cache, storage), torch_view(client.v_cache, storage))
        # the region DMA touches (the staging copies), whole: its tensors share pages. The KV region is written and
        # read through pageable intermediates (prefill KV, swaps), so pinning its gigabytes would buy nothing.
        transfer.register(torch.from_numpy(client.region_buffer("staging")))
        self._staging = []
        for slot in range(spec.num_slots):
            views = client.staging(slot)
            # q, o [max_rows, num_q_heads, head_dim] float32; k, v [max_rows, num_kv_heads, head_dim]
            self._staging.append((
                torch_view(views.q, storage), torch_view(views.k, storage),
                torch_view(views.v, storage), torch_view(views.o, storage),
            ))

    @property
    def spec(self) -> DataPlaneSpec:
        return self.client.spec

    def begin_step(self, sub_batch: SubBatch) -> None:
        """Write the sub-batch's CPU-row metadata (block tables, context lengths, slots) once for the step."""
        self.client.write_metadata(
            sub_batch.slot, sub_batch.cpu_block_tables, sub_batch.cpu_context_lens, sub_batch.cpu_slot_mapping
        )

    def bytes_per_row(self) -> int:
        """Staged per CPU row per layer: q and o in fp32, k and v in the CPU KV dtype."""
        return sum(t[0].numel() * t.element_size() for t in self._staging[0])

    def stage(self, slot: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Start copying q [rows, num_q_heads, head_dim] and k/v [rows, num_kv_heads, head_dim] into the slot's
        staging (done at return on the CPU device; on CUDA ring, or transfer.ready(), waits for them)."""
        rows = q.shape[0]
        q_host, k_host, v_host, _ = self._staging[slot]
        self.transfer.to_host(q_host[:rows], q)
        self.transfer.to_host(k_host[:rows], k)
        self.transfer.to_host(v_host[:rows], v)

    def output(self, slot: int, rows: int) -> torch.Tensor:  # [rows, num_q_heads, head_dim] float32, host
        return self._staging[slot][3][:rows]

    def ring(self, slot: int, layer_idx: int) -> int:
        """Once the slot's staged copies have landed, ring for one layer of its CPU rows; the ticket to collect."""
        self.transfer.ready()
        return self.client.ring(slot, layer_idx)

    def collect(
        self, slot: int, layer: int, ticket: int, rows: int, timeout_s: float, clock: StepClock
    ) -> torch.Tensor:
        """Wait up to timeout_s for a launched layer (CpuAttentionError past it, or when the worker died);
        o [rows, num_q_heads, head_dim] float32 on the device."""
        with clock.measure("wait"):
            self.client.wait(ticket, timeout_s)
        if clock.record:
            clock.add_interval(SubtaskKind.CPU_ATTENTION, layer, slot, *self.client.served_interval(ticket))
        with clock.measure("staging", layer, slot):
            return self.transfer.to_device(self.output(slot, rows))

    def busy_ns(self) -> int:
        """The CPU serving thread's cumulative busy time over all slots."""
        return sum(self.client.busy_ns(slot) for slot in range(self.spec.num_slots))

    def close(self) -> None:
        """Unregister and drop every view of the shared memory, then unmap it."""
        self.transfer.close()
        self._staging.clear()
        del self.pool
        self.client.close()
