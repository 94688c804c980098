"""The gpu_worker's side of the data plane to the cpu_attention_worker: the CPU KV pool (shared memory, mapped
here for prefill writes and swaps), per-slot staging of the CPU rows' q/k/v and o, and the doorbell.

A slot is rung for a layer only once (a) its staged q/k/v have landed in host memory and (b) the o the CPU wrote for
the slot's previous layer has been copied to the device (the CPU overwrites it when rung). Both are markers of the
transfer (HostTransfer.copied, .landed). On a device that queues its work (CUDA) one doorbell thread waits for them
and rings, in the order ring() was called, so the thread that enqueues the device's work never blocks on a copy; the
ticket ring() returns gives the doorbell's seq to collect(). On the CPU device both markers are done: ring at once.
The KV of a CPU-placed prefill and the blocks of a swap out take the same way: copied to pinned host buffers on the
side stream, written into the CPU pool by the doorbell thread once landed, all before flush() returns (the step's
end). A swap in is read from the CPU pool at once and copied to the device in the device's order of work.
"""

import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from apex_serve.types import SubtaskKind
from cpu_attention_worker.client import DataPlaneClient
from cpu_attention_worker.data_plane import DataPlaneSpec
from gpu_worker.host_transfer import HostTransfer, Marker
from gpu_worker.kv_cache import TORCH_DTYPES, PagedKVCache, torch_view
from gpu_worker.step_batch import SubBatch
from gpu_worker.step_clock import StepClock

logger = logging.getLogger(__name__)

BlockMove = tuple[list[int], list[int]]  # (source block ids, destination block ids) of one request's swap


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
        # the marker after the slot's last o went to the device; None: nothing of the slot's o is in flight
        self._landed: list[Marker | None] = [None] * spec.num_slots
        self._doorbell = ThreadPoolExecutor(1, "apex-doorbell") if transfer.queued else None
        self._writes: list[Future[None]] = []  # CPU-pool writes the doorbell thread has yet to finish
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
        staging (done at return on the CPU device; on CUDA ring() has them waited for)."""
        rows = q.shape[0]
        q_host, k_host, v_host, _ = self._staging[slot]
        self.transfer.to_host(q_host[:rows], q)
        self.transfer.to_host(k_host[:rows], k)
        self.transfer.to_host(v_host[:rows], v)

    def write_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor, blocks: torch.Tensor,
                 offsets: torch.Tensor) -> None:
        """Write k/v [tokens, num_kv_heads, head_dim] (on the device) of a CPU-placed prefill into the CPU pool at
        (blocks, offsets) [tokens]: at once on the CPU device, else once their copy lands, before flush() returns."""
        k_host, v_host = self._to_host(k), self._to_host(v)
        self._once_landed(lambda: self.pool.write(layer, k_host, v_host, blocks, offsets))

    def swap(self, device_pool: PagedKVCache, outs: list[BlockMove], ins: list[BlockMove]) -> None:
        """Move blocks of every layer between device_pool and the CPU pool: `outs` (device to CPU) and `ins` (CPU to
        device), each (source blocks, destination blocks). Every source is read before any destination is written,
        so a move may reuse blocks another in the same call leaves. Outs are gathered in the device's order of work
        into host buffers (pinned on CUDA) and written into the CPU pool once landed, before flush() returns; ins are
        read from the CPU pool now, a layer at a time into host buffers, and copied in the device's order of work,
        ahead of the step's attention, without the host waiting for either."""
        device = device_pool.k.device
        leaving = []  # per out: its CPU destination and its blocks on the host, by layer
        for src, dst in outs:
            index = torch.tensor(src, dtype=torch.long, device=device)
            staged = [(self._to_host(device_pool.k[layer, index]), self._to_host(device_pool.v[layer, index]))
                      for layer in range(device_pool.k.shape[0])]  # [n, kv_heads, block_size, head_dim] each
            leaving.append((torch.tensor(dst, dtype=torch.long), staged))
        arriving = []  # per in: its device destination and its blocks in host buffers, by layer
        for src, dst in ins:
            index = torch.tensor(src, dtype=torch.long)
            staged = [(self._gather(self.pool.k[layer], index), self._gather(self.pool.v[layer], index))
                      for layer in range(self.pool.k.shape[0])]
            arriving.append((torch.tensor(dst, dtype=torch.long, device=device), staged))

        def write() -> None:
            for dst, staged in leaving:
                for layer, (k, v) in enumerate(staged):
                    self.pool.k[layer, dst] = k.to(self.pool.k.dtype)
                    self.pool.v[layer, dst] = v.to(self.pool.v.dtype)

        if leaving:
            self._once_landed(write)
        for dst, staged in arriving:
            for layer, (k, v) in enumerate(staged):
                device_pool.k[layer, dst] = self.transfer.to_device(k).to(device_pool.k.dtype)
                device_pool.v[layer, dst] = self.transfer.to_device(v).to(device_pool.v.dtype)

    def _gather(self, layer: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The blocks `index` [n] of one layer of the CPU pool [blocks, ...] in a host buffer (pinned on CUDA)."""
        staged = self.transfer.host_buffer(layer[: len(index)])  # [n, kv_heads, block_size, head_dim]
        return torch.index_select(layer, 0, index, out=staged)

    def _to_host(self, t: torch.Tensor) -> torch.Tensor:
        """t (on the device) in host memory: itself on the CPU device, else a host buffer its copy lands in."""
        if self._doorbell is None:
            return t
        host = self.transfer.host_buffer(t)
        self.transfer.to_host(host, t)
        return host

    def _once_landed(self, write: Callable[[], None]) -> None:
        """Run write (into the CPU pool) once every copy started so far has landed: at once on the CPU device, else
        on the doorbell thread, ahead of every later ring, before flush() returns."""
        if self._doorbell is None:
            write()
            return
        copied = self.transfer.copied()

        def run() -> None:  # in the forward's inference mode (it is per thread)
            copied.synchronize()
            with torch.inference_mode():
                write()

        self._writes.append(self._doorbell.submit(run))

    @property
    def writing(self) -> bool:
        """Whether CPU-pool writes are queued that flush() has not waited for."""
        return bool(self._writes)

    def flush(self) -> None:
        """Block until every queued CPU-pool write (prefill KV, swapped-out blocks) is done (its error, if one
        failed)."""
        writes, self._writes = self._writes, []
        for write in writes:
            write.result()

    def output(self, slot: int, rows: int) -> torch.Tensor:  # [rows, num_q_heads, head_dim] float32, host
        return self._staging[slot][3][:rows]

    def ring(self, slot: int, layer_idx: int) -> "Future[int]":
        """Ring for one layer of the slot's CPU rows once its staged copies have landed and its last o reached the
        device (the module docstring); the ticket to collect."""
        markers = (self.transfer.copied(), self._landed[slot])
        self._landed[slot] = None
        if self._doorbell is None:
            ticket: Future[int] = Future()
            ticket.set_result(self._ring_after(markers, slot, layer_idx))
            return ticket
        return self._doorbell.submit(self._ring_after, markers, slot, layer_idx)

    def _ring_after(self, markers: tuple[Marker | None, ...], slot: int, layer_idx: int) -> int:
        for marker in markers:
            if marker is not None:
                marker.synchronize()
        return self.client.ring(slot, layer_idx)

    def collect(
        self, slot: int, layer: int, ticket: "Future[int]", rows: int, timeout_s: float, clock: StepClock
    ) -> torch.Tensor:
        """Wait up to timeout_s for a launched layer (CpuAttentionError past it, when the worker died, or when the
        doorbell could not ring); o [rows, num_q_heads, head_dim] float32 on the device."""
        with clock.measure("wait"):
            seq = ticket.result(timeout_s)
            self.client.wait(seq, timeout_s)
        if clock.record:
            clock.add_interval(SubtaskKind.CPU_ATTENTION, layer, slot, *self.client.served_interval(seq))
        with clock.measure("staging", layer, slot):
            o = self.transfer.to_device(self.output(slot, rows))
            self._landed[slot] = self.transfer.landed()
            return o

    def busy_ns(self) -> int:
        """The CPU serving thread's cumulative busy time over all slots."""
        return sum(self.client.busy_ns(slot) for slot in range(self.spec.num_slots))

    def close(self) -> None:
        """Stop the doorbell thread, unregister and drop every view of the shared memory, then unmap it."""
        if self._doorbell is not None:
            self._doorbell.shutdown(wait=True, cancel_futures=True)
        self.transfer.close()
        self._staging.clear()
        del self.pool
        self.client.close()
