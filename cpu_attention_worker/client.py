"""The gpu_worker's side of the data plane (needs no torch): asks the cpu_attention_worker for the
regions of a spec over gRPC once, maps them, and then talks through shared memory only: write a
slot's metadata once per step, stage q/k/v, ring(slot, layer), wait(seq), read o."""

import dataclasses
import logging
from dataclasses import dataclass

import grpc
import numpy as np

from apex_serve import errors
from apex_serve.v1 import cpu_attention_pb2, cpu_attention_pb2_grpc
from cpu_attention_worker import _kernel, shm
from cpu_attention_worker.data_plane import REGIONS, DataPlaneSpec, RegionLayout, layout, view

logger = logging.getLogger(__name__)

WAIT_SPIN_US = 50  # wait() spins this long before it sleeps on the futex


class CpuAttentionError(errors.Unavailable):
    """A layer did not complete on the cpu_attention_worker: a timeout, a dead or stopped server, a
    request it rejected (bad metadata), or a failed setup. The message names the layer and the
    reason. Maps to UNAVAILABLE at a gRPC edge."""


@dataclass(frozen=True)
class StagingViews:
    q: np.ndarray  # [max_rows, num_q_heads, head_dim] float32
    k: np.ndarray  # [max_rows, num_kv_heads, head_dim] storage dtype (uint16 for 16-bit)
    v: np.ndarray  # [max_rows, num_kv_heads, head_dim] storage dtype
    o: np.ndarray  # [max_rows, num_q_heads, head_dim] float32


@dataclass(frozen=True)
class _MetaViews:
    num_rows: np.ndarray  # [1] int32
    block_tables: np.ndarray  # [max_rows, max_blocks_per_row] int32
    context_lens: np.ndarray  # [max_rows] int32
    slot_mapping: np.ndarray  # [max_rows] int64


def remove_stale_segments() -> list[str]:
    """Unlinks the data-plane segments whose creating worker is gone (a client that lost its worker calls this, so
    a dead worker's memory goes at once rather than when the next worker starts); their names."""
    return shm.remove_stale()


def _spec_proto(spec: DataPlaneSpec) -> cpu_attention_pb2.DataPlaneSpec:
    return cpu_attention_pb2.DataPlaneSpec(**dataclasses.asdict(spec))


def _setup(address: str, spec: DataPlaneSpec, timeout_s: float, fresh: bool) -> cpu_attention_pb2.DataPlaneLayout:
    with grpc.insecure_channel(address) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=timeout_s)
            stub = cpu_attention_pb2_grpc.CpuAttentionWorkerStub(channel)
            if fresh:
                stub.TeardownDataPlane(cpu_attention_pb2.TeardownDataPlaneRequest(), timeout=timeout_s)
            return stub.SetupDataPlane(_spec_proto(spec), timeout=timeout_s)
        except grpc.FutureTimeoutError as exc:
            raise CpuAttentionError(f"cpu_attention_worker at {address} not reachable within {timeout_s} s") from exc
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise ValueError(exc.details()) from exc
            raise CpuAttentionError(
                f"data plane setup at {address} failed: {exc.code().name}: {exc.details()}"
            ) from exc


def _check_layout(reply: cpu_attention_pb2.DataPlaneLayout, expected: dict[str, RegionLayout]) -> None:
    """The server's tensors must be where this process's layout() puts them (same code version)."""
    for key, region in expected.items():
        for name, tensor in region.tensors.items():
            ref = reply.tensors.get(name)
            if ref is None or (ref.offset, tuple(ref.shape), ref.dtype) != (tensor.offset, tensor.shape, tensor.dtype):
                raise CpuAttentionError(f"data plane layout mismatch in {key}/{name}: server {ref}, here {tensor}")


class DataPlaneClient:
    """One gpu_worker's handle on a cpu_attention_worker data plane (one client rings a data plane)."""

    def __init__(self, spec: DataPlaneSpec, regions: dict[str, shm.Region]) -> None:
        self.spec = spec  # num_blocks resolved
        self.num_blocks = spec.num_blocks
        self._regions = regions
        self._layout = layout(spec)
        kv = self._tensors("kv")
        self.k_cache: np.ndarray = kv["k_cache"]  # [num_layers, num_blocks, num_kv_heads, block_size, head_dim]
        self.v_cache: np.ndarray = kv["v_cache"]  # [num_layers, num_blocks, num_kv_heads, block_size, head_dim]
        staging, meta = self._tensors("staging"), self._tensors("meta")
        self._staging = [
            StagingViews(**{name: staging[f"{name}.{s}"] for name in ("q", "k", "v", "o")})
            for s in range(spec.num_slots)
        ]
        self._meta = [
            _MetaViews(**{f.name: meta[f"{f.name}.{s}"] for f in dataclasses.fields(_MetaViews)})
            for s in range(spec.num_slots)
        ]
        self._doorbell: _kernel.DoorbellClient | None = _kernel.DoorbellClient(
            regions["doorbell"].buffer, spec.num_slots, spec.num_layers, WAIT_SPIN_US
        )

    @classmethod
    def connect(
        cls, address: str, spec: DataPlaneSpec, timeout_s: float = 10.0, fresh: bool = False
    ) -> "DataPlaneClient":
        """SetupDataPlane at address (spec.num_blocks 0: the worker sizes the pool), then maps the regions.
        fresh: TeardownDataPlane first, so the regions and doorbell state are new even when the worker still has
        a plane of the same spec (one it served before a stop, or to a gpu_worker that is gone)."""
        reply = _setup(address, spec, timeout_s, fresh)
        resolved = spec.with_num_blocks(reply.spec.num_blocks)
        expected = layout(resolved)
        _check_layout(reply, expected)
        names = {region.key: region.name for region in reply.regions}
        regions: dict[str, shm.Region] = {}
        try:
            for key in REGIONS:
                regions[key] = shm.open_region(names[key], expected[key].nbytes, huge_pages=key == "kv")
            client = cls(resolved, regions)
        except BaseException as exc:
            for region in regions.values():
                region.close()
            if isinstance(exc, _kernel.DataPlaneError):
                raise CpuAttentionError(str(exc)) from exc
            raise
        logger.info("data plane at %s: %d CPU KV blocks, %d slots", address, resolved.num_blocks, resolved.num_slots)
        return client

    def _tensors(self, key: str) -> dict[str, np.ndarray]:
        buffer = self._regions[key].buffer
        return {name: view(buffer, tensor) for name, tensor in self._layout[key].tensors.items()}

    def region_buffer(self, key: str) -> np.ndarray:  # [nbytes] uint8
        """A whole mapped region ("kv", "staging", ...), e.g. to register it as pinned memory once."""
        return self._regions[key].buffer

    def staging(self, slot: int) -> StagingViews:
        return self._staging[slot]

    def write_metadata(
        self,
        slot: int,
        block_tables: np.ndarray,  # [rows, <= max_blocks_per_row] int32, padded with 0 here
        context_lens: np.ndarray,  # [rows] int32, tokens including the current one
        slot_mapping: np.ndarray,  # [rows] int64, block * block_size + offset of the new token
    ) -> None:
        """The slot's rows for every layer of the step (written once per step, before the first ring)."""
        spec = self.spec
        if not 0 <= slot < spec.num_slots:
            raise ValueError(f"slot: must be in [0, {spec.num_slots}), got {slot}")
        rows = len(context_lens)
        if context_lens.ndim != 1 or rows > spec.max_rows:
            raise ValueError(f"context_lens: expected [rows <= max_rows={spec.max_rows}], got {context_lens.shape}")
        if block_tables.ndim != 2 or block_tables.shape[0] != rows or block_tables.shape[1] > spec.max_blocks_per_row:
            raise ValueError(f"block_tables: expected [{rows}, <= max_blocks_per_row={spec.max_blocks_per_row}], "
                             f"got {block_tables.shape}")
        if slot_mapping.shape != (rows,):
            raise ValueError(f"slot_mapping: expected [{rows}], got {slot_mapping.shape}")
        meta = self._meta[slot]
        width = block_tables.shape[1]
        meta.block_tables[:rows, :width] = block_tables
        meta.block_tables[:rows, width:] = 0
        meta.context_lens[:rows] = context_lens
        meta.slot_mapping[:rows] = slot_mapping
        meta.num_rows[0] = rows

    def write_no_rows(self, slot: int) -> None:
        """An empty slot: a ring of it is then a bare doorbell round trip."""
        empty = np.zeros(0, dtype=np.int32)
        self.write_metadata(slot, empty.reshape(0, 1), empty, np.zeros(0, dtype=np.int64))

    def ring(self, slot: int, layer: int) -> int:
        """Publishes (slot, layer): staging and metadata of the slot must be written. Returns the seq to wait for."""
        try:
            return self._live().ring(slot, layer)
        except _kernel.DataPlaneError as exc:
            raise CpuAttentionError(str(exc)) from exc

    def wait(self, seq: int, timeout_s: float) -> None:
        """Blocks (GIL released) until request seq is served; CpuAttentionError otherwise."""
        try:
            self._live().wait(seq, timeout_s)
        except _kernel.DataPlaneError as exc:
            raise CpuAttentionError(str(exc)) from None

    def busy_ns(self, slot: int) -> int:
        """The serving thread's cumulative append + attention time for the slot."""
        return self._live().busy_ns(slot)

    def served_interval(self, seq: int) -> tuple[int, int]:
        """(start, end) of a served request on the monotonic clock (time.monotonic_ns); read it right after wait."""
        return self._live().served_interval(seq)

    def _live(self) -> _kernel.DoorbellClient:
        if self._doorbell is None:
            raise CpuAttentionError("the data plane client is closed")
        return self._doorbell

    def close(self) -> None:
        """Unmaps the regions (the server owns and unlinks them); views handed out keep their
        mapping alive until they are dropped."""
        self._doorbell = None
        self._staging, self._meta = [], []
        self.k_cache = self.v_cache = None
        for region in self._regions.values():
            region.close()
        self._regions = {}
