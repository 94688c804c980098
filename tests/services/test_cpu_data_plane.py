"""The shared-memory data plane: a real cpu_attention_worker over real gRPC (in-process, on its own
event-loop thread, or a subprocess), the Python client, the C++ serving loop behind the doorbell."""

import asyncio
import os
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from queued_transfer import QueuedTransfer

from apex_serve import rpc
from apex_serve.v1 import cpu_attention_pb2, cpu_attention_pb2_grpc
from apex_tools.processes import ServiceGroup
from cpu_attention_worker import reference, shm
from cpu_attention_worker.client import CpuAttentionError, DataPlaneClient
from cpu_attention_worker.config import CpuAttentionConfig
from cpu_attention_worker.data_plane import DataPlaneSpec, DataPlaneSpecError, layout
from cpu_attention_worker.data_plane_registry import DataPlaneRegistry
from cpu_attention_worker.server import create_server
from gpu_worker import cpu_pool
from gpu_worker.host_transfer import CpuHostTransfer
from gpu_worker.step_clock import StepClock

pytestmark = pytest.mark.timeout(120)


def _spec(kv_dtype: str = "float32", **overrides: int) -> DataPlaneSpec:
    fields = {"num_layers": 2, "num_q_heads": 4, "num_kv_heads": 2, "head_dim": 32, "block_size": 4,
              "num_blocks": 24, "max_rows": 3, "max_blocks_per_row": 4, "num_slots": 2}
    return DataPlaneSpec(kv_dtype=kv_dtype, **{**fields, **overrides})


def _own_segments() -> list[str]:
    return sorted(p.name for p in shm.SHM_DIR.glob(f"{shm.PREFIX}.{os.getpid()}.*"))


@dataclass
class Worker:
    address: str
    registry: DataPlaneRegistry

    def stub(self, channel: grpc.Channel) -> cpu_attention_pb2_grpc.CpuAttentionWorkerStub:
        return cpu_attention_pb2_grpc.CpuAttentionWorkerStub(channel)


@pytest.fixture
def worker() -> Iterator[Worker]:
    """The cpu_attention_worker's gRPC server on an event loop of its own thread, so that the sync
    client (as the gpu_worker uses it) can call it from the test's thread."""
    config = CpuAttentionConfig(kv_budget_bytes=2**20, spin_us=20)
    run_dir = tempfile.TemporaryDirectory(prefix="apex-dp-", dir="/tmp")  # short: a socket path has a length limit
    address = rpc.unix_address(run_dir.name, "cpu")
    registry = DataPlaneRegistry(config)
    loop = asyncio.new_event_loop()
    started, stop = threading.Event(), threading.Event()

    async def run() -> None:
        server = create_server(config, registry)
        rpc.bind(server, address)
        await server.start()
        started.set()
        while not stop.is_set():
            await asyncio.sleep(0.01)
        await server.stop(0)
        registry.teardown()

    thread = threading.Thread(target=loop.run_until_complete, args=(run(),), daemon=True)
    thread.start()
    assert started.wait(10)
    yield Worker(address, registry)
    stop.set()
    thread.join(10)
    loop.close()
    run_dir.cleanup()
    assert _own_segments() == []


def _random_rows(spec: DataPlaneSpec, rng: np.random.Generator, lens: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Block tables with distinct random blocks per row ([rows, blocks used]) and slot mapping of the last token."""
    blocks = rng.permutation(spec.num_blocks)
    used = [-(-n // spec.block_size) for n in lens]
    width = max(used)
    tables = np.zeros((len(lens), width), dtype=np.int32)
    start = 0
    for row, count in enumerate(used):
        tables[row, :count] = blocks[start : start + count]
        start += count
    slots = np.array([tables[r, (n - 1) // spec.block_size] * spec.block_size + (n - 1) % spec.block_size
                      for r, n in enumerate(lens)], dtype=np.int64)
    return tables, slots


def _attend_through_doorbell(client: DataPlaneClient, kv_dtype: str, seed: int) -> None:
    """Prefill random history straight into the shared cache, then per slot and layer stage q/k/v, ring,
    wait, and compare o with the reference over a private copy that got the same appends."""
    spec, rng = client.spec, np.random.default_rng(seed)
    client.k_cache[...] = reference.encode_kv(rng.standard_normal(client.k_cache.shape), kv_dtype)
    client.v_cache[...] = reference.encode_kv(rng.standard_normal(client.v_cache.shape), kv_dtype)
    k_ref, v_ref = client.k_cache.copy(), client.v_cache.copy()
    for slot in range(spec.num_slots):
        lens = [int(n) for n in rng.integers(1, spec.max_blocks_per_row * spec.block_size // 2 + 1, spec.max_rows)]
        tables, slots = _random_rows(spec, rng, lens)
        context_lens = np.array(lens, dtype=np.int32)
        client.write_metadata(slot, tables, context_lens, slots)
        views = client.staging(slot)
        for layer in range(spec.num_layers):
            rows = len(lens)
            views.q[:rows] = rng.standard_normal(views.q[:rows].shape)
            views.k[:rows] = reference.encode_kv(rng.standard_normal(views.k[:rows].shape), kv_dtype)
            views.v[:rows] = reference.encode_kv(rng.standard_normal(views.v[:rows].shape), kv_dtype)
            client.wait(client.ring(slot, layer), timeout_s=10.0)
            reference.append_kv(k_ref[layer], v_ref[layer], views.k[:rows], views.v[:rows], slots)
            expected = reference.paged_decode_attention(
                views.q[:rows], k_ref[layer], v_ref[layer], tables, context_lens, kv_dtype=kv_dtype
            )
            np.testing.assert_allclose(views.o[:rows], expected, rtol=2e-4, atol=2e-4)
    np.testing.assert_array_equal(client.k_cache, k_ref)
    np.testing.assert_array_equal(client.v_cache, v_ref)
    assert all(client.busy_ns(slot) > 0 for slot in range(spec.num_slots))


@pytest.mark.parametrize("kv_dtype", ["float32", "bfloat16"])
def test_doorbell_appends_and_attends_like_the_reference(worker: Worker, kv_dtype: str) -> None:
    client = DataPlaneClient.connect(worker.address, _spec(kv_dtype))
    try:
        assert client.k_cache.dtype == (np.float32 if kv_dtype == "float32" else np.uint16)
        assert client.k_cache.shape == (2, 24, 2, 4, 32)
        _attend_through_doorbell(client, kv_dtype, seed=1)
    finally:
        client.close()


def test_two_outstanding_requests_complete_in_order(worker: Worker) -> None:
    client = DataPlaneClient.connect(worker.address, _spec())
    try:
        spec, rng = client.spec, np.random.default_rng(2)
        client.k_cache[...] = rng.standard_normal(client.k_cache.shape)
        client.v_cache[...] = rng.standard_normal(client.v_cache.shape)
        k_ref, v_ref = client.k_cache.copy(), client.v_cache.copy()
        expected = []
        for slot, lens in enumerate([[5, 9], [3, 16, 1]]):
            tables, slots = _random_rows(spec, rng, lens)
            context_lens = np.array(lens, dtype=np.int32)
            client.write_metadata(slot, tables, context_lens, slots)
            views = client.staging(slot)
            rows = len(lens)
            views.q[:rows] = rng.standard_normal(views.q[:rows].shape)
            views.k[:rows] = rng.standard_normal(views.k[:rows].shape)
            views.v[:rows] = rng.standard_normal(views.v[:rows].shape)
            reference.append_kv(k_ref[1], v_ref[1], views.k[:rows], views.v[:rows], slots)
            expected.append((rows, views.q[:rows].copy(), tables, context_lens))
        tickets = [client.ring(0, 1), client.ring(1, 1)]
        client.wait(tickets[1], timeout_s=10.0)
        client.wait(tickets[0], timeout_s=10.0)
        for slot, (rows, q, tables, context_lens) in enumerate(expected):
            want = reference.paged_decode_attention(q, k_ref[1], v_ref[1], tables, context_lens)
            np.testing.assert_allclose(client.staging(slot).o[:rows], want, rtol=2e-4, atol=2e-4)
    finally:
        client.close()


def test_bad_metadata_is_a_clear_error_and_the_loop_keeps_serving(worker: Worker) -> None:
    client = DataPlaneClient.connect(worker.address, _spec())
    try:
        client.write_metadata(0, np.array([[99]], dtype=np.int32), np.array([1], dtype=np.int32),
                              np.array([0], dtype=np.int64))
        with pytest.raises(CpuAttentionError, match=r"rejected layer 1 .*block_tables\[0, 0\] block id 99 outside"):
            client.wait(client.ring(0, 1), timeout_s=10.0)
        with pytest.raises(ValueError, match="layer"):
            client.ring(0, 2)
        client.write_metadata(0, np.array([[3]], dtype=np.int32), np.array([1], dtype=np.int32),
                              np.array([12], dtype=np.int64))
        client.wait(client.ring(0, 1), timeout_s=10.0)
    finally:
        client.close()


def test_empty_doorbell_round_trips_complete(worker: Worker) -> None:
    client = DataPlaneClient.connect(worker.address, _spec())
    try:
        client.write_metadata(0, np.zeros((0, 1), dtype=np.int32), np.zeros(0, dtype=np.int32),
                              np.zeros(0, dtype=np.int64))
        for _ in range(200):
            client.wait(client.ring(0, 0), timeout_s=10.0)
        time.sleep(0.05)  # past the serving thread's spin: the next ring wakes it from the futex
        client.wait(client.ring(0, 0), timeout_s=10.0)
    finally:
        client.close()


def test_segments_registry_and_teardown(worker: Worker) -> None:
    client = DataPlaneClient.connect(worker.address, _spec(num_blocks=0))
    block_bytes = _spec().block_bytes
    assert client.num_blocks == 2**20 // block_bytes
    names = _own_segments()
    assert len(names) == 4
    for name in names:
        assert stat.S_IMODE((shm.SHM_DIR / name).stat().st_mode) == 0o600
        assert name.startswith(f"apex-serve.{os.getpid()}.")
    with grpc.insecure_channel(worker.address) as channel:
        stub = worker.stub(channel)
        status = stub.RegionStatus(cpu_attention_pb2.RegionStatusRequest())
        assert sorted(r.name for r in status.regions) == names
        one = stub.RegionStatus(cpu_attention_pb2.RegionStatusRequest(name=names[0]))
        assert [r.nbytes for r in one.regions] == [(shm.SHM_DIR / names[0]).stat().st_size]
        again = DataPlaneClient.connect(worker.address, _spec(num_blocks=0))  # same spec: the same regions
        again.close()
        assert _own_segments() == names
        stub.UnregisterRegion(cpu_attention_pb2.UnregisterRegionRequest(name=names[0]))
        assert _own_segments() == names[1:]
        with pytest.raises(grpc.RpcError) as info:
            stub.UnregisterRegion(cpu_attention_pb2.UnregisterRegionRequest(name=names[0]))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as info:
            stub.RegionStatus(cpu_attention_pb2.RegionStatusRequest(name="apex-serve.1.ab.kv"))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        stub.TeardownDataPlane(cpu_attention_pb2.TeardownDataPlaneRequest())
        assert _own_segments() == []
        with pytest.raises(CpuAttentionError, match="stopped"):
            client.wait(client.ring(0, 0), timeout_s=5.0)
        client.close()


def test_a_different_spec_recreates_the_data_plane(worker: Worker) -> None:
    first = DataPlaneClient.connect(worker.address, _spec())
    names = _own_segments()
    second = DataPlaneClient.connect(worker.address, _spec("bfloat16"))
    try:
        assert set(_own_segments()).isdisjoint(names)
        second.write_metadata(1, np.array([[0]], dtype=np.int32), np.array([1], dtype=np.int32),
                              np.array([0], dtype=np.int64))
        second.wait(second.ring(1, 0), timeout_s=10.0)
    finally:
        first.close()
        second.close()


@pytest.mark.parametrize(
    ("field", "value"),
    [("head_dim", 24), ("kv_dtype", "int8"), ("num_kv_heads", 3), ("max_rows", 0), ("num_slots", 9)],
)
def test_setup_with_a_bad_field_is_invalid_argument_naming_it(worker: Worker, field: str, value: object) -> None:
    message = cpu_attention_pb2.DataPlaneSpec(
        num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=32, block_size=4, num_blocks=8, kv_dtype="float32",
        max_rows=2, max_blocks_per_row=2,
    )
    setattr(message, field, value)
    with grpc.insecure_channel(worker.address) as channel, pytest.raises(grpc.RpcError) as info:
        worker.stub(channel).SetupDataPlane(message)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(f"{field}:")


def test_a_budget_under_one_block_is_invalid_argument(worker: Worker) -> None:
    with pytest.raises(ValueError, match="num_blocks: .*kv_budget_bytes"):
        DataPlaneClient.connect(worker.address, _spec(num_blocks=0, num_layers=64, head_dim=512, block_size=64))


def test_spec_validation_and_layout() -> None:
    with pytest.raises(DataPlaneSpecError, match="^max_blocks_per_row: ") as info:
        _spec(max_blocks_per_row=0)
    assert info.value.field == "max_blocks_per_row"
    regions = layout(_spec("bfloat16"))
    kv = regions["kv"].tensors
    assert kv["v_cache"].offset % 4096 == 2048 and kv["v_cache"].offset >= kv["k_cache"].nbytes
    for region in regions.values():
        assert all(t.offset % 64 == 0 and t.offset + t.nbytes <= region.nbytes for t in region.tensors.values())
    assert regions["staging"].tensors["k.1"].dtype == "uint16"


def test_remove_stale_removes_segments_of_dead_processes() -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = shm.SHM_DIR / f"apex-serve.{dead.pid}.00ff.kv"
    stale.write_bytes(b"x")
    mine = shm.create_region("meta", 4096)
    try:
        assert stale.name in shm.remove_stale()
        assert not stale.exists() and mine.path.exists()
    finally:
        stale.unlink(missing_ok=True)
        mine.close()
    assert not mine.path.exists()


def _stop(pid: int) -> None:
    """SIGSTOP, and wait until every thread is stopped (the signal is delivered asynchronously)."""
    os.kill(pid, signal.SIGSTOP)
    for _ in range(1000):
        states = {p.read_text().rsplit(")", 1)[1].split()[0] for p in Path(f"/proc/{pid}/task").glob("*/stat")}
        if states == {"T"}:
            return
        time.sleep(0.001)
    raise AssertionError(f"process {pid} did not stop")


@pytest.fixture
def worker_process() -> Iterator[tuple[subprocess.Popen, str]]:
    with tempfile.TemporaryDirectory(prefix="apex-dp-", dir="/tmp") as run_dir:
        address = rpc.unix_address(run_dir, "cpu")
        try:
            with ServiceGroup(startup_timeout_s=60.0, stop_timeout_s=1.0) as services:
                worker = services.start("cpu_attention_worker", address,
                                        ["--address", address, "--kv-budget-bytes", str(2**20)])
                yield worker.process, address
        finally:
            shm.remove_stale()


def test_wait_on_a_stalled_then_killed_worker_raises_instead_of_hanging(
    worker_process: tuple[subprocess.Popen, str],
) -> None:
    process, address = worker_process
    client = DataPlaneClient.connect(address, _spec())
    try:
        client.write_metadata(0, np.array([[0]], dtype=np.int32), np.array([1], dtype=np.int32),
                              np.array([0], dtype=np.int64))
        client.wait(client.ring(0, 0), timeout_s=10.0)
        _stop(process.pid)
        with pytest.raises(CpuAttentionError, match=r"timed out on layer 1 \(slot 0"):
            client.wait(client.ring(0, 1), timeout_s=0.2)

        def kill() -> None:
            process.kill()
            process.wait()

        timer = threading.Timer(0.3, kill)
        timer.start()
        start = time.monotonic()
        with pytest.raises(CpuAttentionError, match=rf"\(pid {process.pid}\) died before layer 1"):
            client.wait(client.ring(0, 1), timeout_s=30.0)
        assert time.monotonic() - start < 5.0
        timer.join()
    finally:
        client.close()


class RecordingTransfer(CpuHostTransfer):
    """The CPU device's transfer, recording what the bridge registers and whether it was closed."""

    def __init__(self) -> None:
        self.registered: list[int] = []  # bytes of each registered buffer
        self.closed = False

    def register(self, host: torch.Tensor) -> bool:
        self.registered.append(host.numel() * host.element_size())
        return True

    def close(self) -> None:
        self.closed = True


def test_the_bridge_registers_only_the_staging_region_dma_touches(worker: Worker,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    transfer = RecordingTransfer()
    monkeypatch.setattr(cpu_pool, "host_transfer_for", lambda device: transfer)
    bridge = cpu_pool.open_bridge(worker.address, _spec(), torch.device("cpu"), 10.0)
    try:
        assert transfer.registered == [bridge.client.region_buffer("staging").nbytes]
        assert bridge.client.region_buffer("kv").nbytes not in transfer.registered
    finally:
        bridge.close()
    assert transfer.closed


def test_a_bridge_failing_after_its_registration_undoes_it_before_unmapping(worker: Worker,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    transfer = RecordingTransfer()
    monkeypatch.setattr(cpu_pool, "host_transfer_for", lambda device: transfer)

    def lost(self: DataPlaneClient, slot: int) -> None:
        raise RuntimeError("staging views unavailable")

    monkeypatch.setattr(DataPlaneClient, "staging", lost)
    with pytest.raises(RuntimeError, match="staging views unavailable"):
        cpu_pool.open_bridge(worker.address, _spec(), torch.device("cpu"), 10.0)
    assert transfer.registered and transfer.closed


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pipelined=st.booleans(), seed=st.integers(0, 2**16), delay_ms=st.sampled_from([0.0, 0.5, 3.0]))
def test_each_ring_waits_for_its_staged_copies_and_the_slots_last_o_off_the_enqueuing_thread(
        worker: Worker, monkeypatch: pytest.MonkeyPatch, pipelined: bool, seed: int, delay_ms: float) -> None:
    """Two sub-batches over two layers, rung one sub-batch after the other (ASYNC_OVERLAP's order) or pipelined (a's
    layer i rung before b's layer i - 1 is collected, ASYM_PIPELINE's). Every ring must come after its staging
    copies landed and after the slot's previous o reached the device, those waits must be the doorbell thread's (the
    enqueuing thread never blocks on a copy), and o must equal the reference attention over what was staged."""
    transfer = QueuedTransfer(delay_ms / 1e3)
    monkeypatch.setattr(cpu_pool, "host_transfer_for", lambda device: transfer)
    spec, rng = _spec(), np.random.default_rng(seed)
    bridge = cpu_pool.open_bridge(worker.address, spec, torch.device("cpu"), 10.0)
    ring = bridge.client.ring

    def logged_ring(slot: int, layer: int) -> int:
        transfer._note("ring", (slot, layer))
        return ring(slot, layer)

    monkeypatch.setattr(bridge.client, "ring", logged_ring)
    try:
        client = bridge.client
        client.k_cache[...] = rng.standard_normal(client.k_cache.shape)
        client.v_cache[...] = rng.standard_normal(client.v_cache.shape)
        k_ref, v_ref = client.k_cache.copy(), client.v_cache.copy()
        lens = [int(n) for n in rng.integers(1, spec.block_size + 1, 2 * spec.max_rows)]
        tables, slots = _random_rows(spec, rng, lens)  # distinct blocks for both sub-batches
        rows = spec.max_rows
        for slot in (0, 1):
            part = slice(slot * rows, (slot + 1) * rows)
            client.write_metadata(slot, tables[part], np.array(lens[part], dtype=np.int32), slots[part])
        expected, tickets, made = {}, {}, {}

        def launch(slot: int, layer: int) -> None:
            part = slice(slot * rows, (slot + 1) * rows)
            q = torch.randn(rows, spec.num_q_heads, spec.head_dim, generator=torch.Generator().manual_seed(layer))
            k = torch.from_numpy(rng.standard_normal((rows, spec.num_kv_heads, spec.head_dim)).astype(np.float32))
            v = torch.from_numpy(rng.standard_normal((rows, spec.num_kv_heads, spec.head_dim)).astype(np.float32))
            bridge.stage(slot, q, k, v)
            tickets[slot, layer] = bridge.ring(slot, layer)
            made["copied", slot, layer] = transfer.last_made("copied")
            reference.append_kv(k_ref[layer], v_ref[layer], k.numpy(), v.numpy(), slots[part])
            expected[slot, layer] = reference.paged_decode_attention(
                q.numpy(), k_ref[layer], v_ref[layer], tables[part], np.array(lens[part]))

        def collect(slot: int, layer: int) -> None:
            o = bridge.collect(slot, layer, tickets.pop((slot, layer)), rows, 10.0, StepClock())
            made["landed", slot, layer] = transfer.last_made("landed")
            np.testing.assert_allclose(o.numpy(), expected[slot, layer], rtol=2e-4, atol=2e-4)

        if pipelined:
            for layer in range(spec.num_layers):
                launch(0, layer)
                if layer:
                    collect(1, layer - 1)
                launch(1, layer)
                collect(0, layer)
            collect(1, spec.num_layers - 1)
        else:
            for slot in (0, 1):
                for layer in range(spec.num_layers):
                    launch(slot, layer)
                    collect(slot, layer)
    finally:
        bridge.close()
    position = {(what, id(subject) if what != "ring" else subject): i
                for i, (what, subject, _) in enumerate(transfer.log)}
    never = len(transfer.log)
    for (kind, slot, layer), marker in made.items():
        synchronized = position.get(("synchronized", id(marker)), never)
        if kind == "copied":
            assert synchronized < position["ring", (slot, layer)], f"{slot}/{layer} rung before its copies landed"
        elif layer + 1 < spec.num_layers:
            assert synchronized < position["ring", (slot, layer + 1)], f"{slot}/{layer + 1} rung over o in flight"
    main = threading.current_thread().name
    assert all(thread != main for what, _, thread in transfer.log if what in ("synchronized", "ring"))
