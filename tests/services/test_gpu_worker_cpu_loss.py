"""The gpu_worker outlives its cpu_attention_worker: a real worker process is killed or stopped between hybrid steps.
The step with CPU rows fails fast with CpuPoolLost, the accelerator's requests keep their state (a retry built per the
CpuPoolLost contract gives the tokens of a GPU-only run), a dead worker's segments go at once, and a fresh data plane
is attached once a worker answers at the address again. Reset drops every request."""

import os
import random
import shutil
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import pytest

from apex_serve import convert, rpc
from apex_serve.errors import CpuPoolLost, InvalidArgument
from apex_serve.types import CachedRequestData, ExecutionMode, NewRequestData, Placement, StepPlan, SwapData
from apex_serve.v1 import gpu_worker_pb2, gpu_worker_pb2_grpc
from apex_tools.bench.scripted_scheduler import GREEDY, ScriptedScheduler
from apex_tools.processes import Service, ServiceGroup
from conftest import start_cpu_worker, wait_until
from cpu_attention_worker import shm
from gpu_worker.config import GpuWorkerConfig
from gpu_worker.model_runner import ModelRunner
from gpu_worker.servicer import GpuWorkerServicer

BLOCK_SIZE = 4
PROMPT_LENS = (5, 9, 13, 17)  # 1 mod BLOCK_SIZE: every request takes a new block in step WARM_STEPS
PLACEMENTS = (Placement.GPU, Placement.CPU, Placement.GPU, Placement.CPU)
WARM_STEPS = 4
REFERENCE_STEPS = 12
ASYNC = ExecutionMode.ASYNC_OVERLAP


def prompts() -> dict[str, list[int]]:
    rng = random.Random(5)
    return {f"r{i}": [256] + [rng.randrange(256) for _ in range(n - 1)] for i, n in enumerate(PROMPT_LENS)}


def make_runner(model_dir: Path, cpu_address: str, **overrides: object) -> ModelRunner:
    settings: dict[str, object] = {
        "model_dir": str(model_dir), "device": "cpu", "dtype": "float32",  # exact against fp32 references
        "block_size": BLOCK_SIZE, "num_kv_blocks": 128,
        "num_threads": 1, "cpu_worker_address": cpu_address, "cpu_num_kv_blocks": 128, "cpu_max_rows": 8,
        "cpu_reattach_interval_s": 0.1,
    }
    return ModelRunner(GpuWorkerConfig(**(settings | overrides)))


@pytest.fixture(scope="module", params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request: pytest.FixtureRequest) -> str:
    """The gpu_worker's device: on CUDA the data plane is pinned host memory, registered again on each re-attach."""
    return request.param


@pytest.fixture(scope="module")
def reference(mha_model_dir: Path, device: str) -> dict[str, list[int]]:
    """Greedy continuation of each prompt, GPU-only, without a cpu_attention_worker."""
    runner = make_runner(mha_model_dir, "", cpu_num_kv_blocks=0, device=device)
    scheduler = ScriptedScheduler(runner)
    for rid, prompt in prompts().items():
        scheduler.add(rid, prompt, Placement.GPU)
    for _ in range(REFERENCE_STEPS):
        scheduler.step(ExecutionMode.GPU_ONLY)
    runner.close()
    return scheduler.tokens()


@dataclass
class Hybrid:
    worker: Service
    runner: ModelRunner
    scheduler: ScriptedScheduler


@pytest.fixture
def hybrid(mha_model_dir: Path, device: str) -> Iterator[tuple[ServiceGroup, str, Hybrid]]:
    """A cpu_attention_worker process and a runner attached to it, WARM_STEPS hybrid steps into four requests (two
    on each pool). The worker is sent SIGCONT at the end, so no stopped process outlives the test."""
    run_dir = tempfile.mkdtemp(prefix="apex-", dir="/tmp")  # short: a socket path has a length limit
    address = rpc.unix_address(run_dir, "cpu")
    with ServiceGroup(stop_timeout_s=30.0) as services:
        worker = start_cpu_worker(services, address)
        runner = make_runner(mha_model_dir, address, device=device)
        try:
            scheduler = ScriptedScheduler(runner)
            for (rid, prompt), placement in zip(prompts().items(), PLACEMENTS):
                scheduler.add(rid, prompt, placement)
            for _ in range(WARM_STEPS):
                scheduler.step(ASYNC)
            yield services, address, Hybrid(worker, runner, scheduler)
        finally:
            runner.close()
            for service in services.services:
                if service.process.poll() is None:
                    os.kill(service.pid, signal.SIGCONT)
    shutil.rmtree(run_dir, ignore_errors=True)
    shm.remove_stale()


def segments(pid: int) -> set[str]:
    return {name for name in os.listdir(shm.SHM_DIR) if name.startswith(f"{shm.PREFIX}.{pid}.")}


def mapped_here(names: set[str]) -> set[str]:
    """Those of the segments that this process still maps."""
    maps = Path("/proc/self/maps").read_text()
    return {name for name in names if name in maps}


def stop(pid: int) -> None:
    """SIGSTOP, and wait until every thread is stopped (the signal is delivered asynchronously)."""
    os.kill(pid, signal.SIGSTOP)
    wait_until(lambda: {p.read_text().rsplit(")", 1)[1].split()[0] for p in Path(f"/proc/{pid}/task").glob("*/stat")}
               == {"T"}, 5.0, f"process {pid} to stop")


def fail_fast(runner: ModelRunner, plan: StepPlan, within_s: float) -> str:
    """Runs plan, which must fail with CpuPoolLost within within_s; the error's message."""
    start = time.monotonic()
    with pytest.raises(CpuPoolLost) as lost:
        runner.execute(plan)
    elapsed = time.monotonic() - start
    assert elapsed < within_s, f"the loss took {elapsed:.2f} s to surface"
    return str(lost.value)


def retry(scheduler: ScriptedScheduler, failed: StepPlan) -> dict[str, int]:
    """The scheduler's answer to CpuPoolLost: every request of the CPU pool is requeued (dropped here, returned as
    {rid: tokens produced}); the failed plan's accelerator rows run again GPU_ONLY with their new blocks, except that
    each cached row gets a different new block than the failed plan gave it (so a block growth the worker failed to
    undo would put the token's KV in the wrong block). Checks that every new block holds its token's KV."""
    requeued = {rid: len(r.outputs) for rid, r in scheduler.requests.items() if r.placement is Placement.CPU}
    for rid in requeued:
        scheduler.finish(rid)
    cached, written = [], []
    for entry in failed.cached_requests:
        if entry.request_id not in scheduler.requests:
            continue
        request = scheduler.requests[entry.request_id]
        blocks = tuple(scheduler.free[Placement.GPU].pop() for _ in entry.new_block_ids)
        scheduler.free[Placement.GPU].extend(entry.new_block_ids)
        request.blocks[len(request.blocks) - len(blocks):] = blocks
        cached.append(CachedRequestData(entry.request_id, blocks))
        position = request.num_tokens - 1
        written.append((request.blocks[position // BLOCK_SIZE], position % BLOCK_SIZE))
    new = tuple(replace(r, sub_batch=0) for r in failed.new_requests if r.placement is Placement.GPU)
    plan = StepPlan(scheduler.step_id, new, tuple(cached), tuple(requeued), mode=ExecutionMode.GPU_ONLY)
    scheduler.step_id += 1
    scheduler.run(plan)
    pool = scheduler.runner.kv_cache
    for block, offset in written:
        assert bool(pool.k[:, block, :, offset].abs().amax(dim=(1, 2)).gt(0).all()), \
            f"block {block} does not hold its token's KV: the failed plan's block growth was not undone"
    return requeued


def assert_reference_tokens(scheduler: ScriptedScheduler, reference: dict[str, list[int]],
                            offsets: dict[str, int] | None = None) -> None:
    for rid, tokens in scheduler.tokens().items():
        start = (offsets or {}).get(rid, 0)
        assert tokens == reference[rid][start:start + len(tokens)], f"{rid} diverges from the GPU-only run"


def resume_hybrid(h: Hybrid, reference: dict[str, list[int]], requeued: dict[str, int]) -> None:
    """Recompute the requeued requests on the CPU pool (prompt + the tokens they had produced) and decode in hybrid
    steps: every request gives the GPU-only run's tokens."""
    for rid, produced in requeued.items():
        h.scheduler.add(rid, prompts()[rid] + reference[rid][:produced], Placement.CPU)
    h.scheduler.step(ASYNC)  # their prefill writes the CPU pool
    for _ in range(3):
        output = h.scheduler.step(ASYNC)
        assert output.timings.cpu_attention_ns > 0, "the hybrid step ran no CPU attention"
    offsets = {rid: produced for rid, produced in requeued.items()}
    assert_reference_tokens(h.scheduler, reference, offsets)


def wait_attached(runner: ModelRunner, generation: int) -> None:
    wait_until(lambda: runner.info.cpu_pool_attached, 10.0, "the CPU pool to be re-attached")
    assert runner.info.cpu_pool_generation == generation


def test_a_killed_cpu_worker_fails_the_step_fast_keeps_the_accelerator_rows_and_reattaches_to_a_new_worker(
    hybrid: tuple[ServiceGroup, str, Hybrid], reference: dict[str, list[int]]
) -> None:
    services, address, h = hybrid
    assert (h.runner.info.cpu_pool_attached, h.runner.info.cpu_pool_generation) == (True, 1)
    num_cpu_blocks = h.runner.info.num_cpu_kv_blocks
    dead = segments(h.worker.pid)
    assert dead, "the cpu_attention_worker made no shared-memory segment"
    h.worker.process.kill()
    h.worker.process.wait()
    failed = h.scheduler.plan(ASYNC)
    assert all(entry.new_block_ids for entry in failed.cached_requests)
    message = fail_fast(h.runner, failed, within_s=1.5)
    assert f"(pid {h.worker.pid}) died" in message
    assert segments(h.worker.pid) == set(), "the dead worker's segments outlived the loss"
    assert mapped_here(dead) == set(), "the lost data plane is still mapped"
    info = h.runner.info
    assert (info.cpu_pool_attached, info.cpu_pool_generation, info.num_cpu_kv_blocks) == (False, 1, num_cpu_blocks)

    requeued = retry(h.scheduler, failed)
    assert set(requeued) == {"r1", "r3"}
    h.scheduler.step(ExecutionMode.GPU_ONLY)
    assert_reference_tokens(h.scheduler, reference)

    start_cpu_worker(services, address)
    wait_attached(h.runner, generation=2)
    resume_hybrid(h, reference, requeued)


def test_a_stopped_cpu_worker_fails_the_step_at_the_plans_deadline_and_a_fresh_plane_follows_sigcont(
    hybrid: tuple[ServiceGroup, str, Hybrid], reference: dict[str, list[int]]
) -> None:
    _, _, h = hybrid
    old = segments(h.worker.pid)
    stop(h.worker.pid)
    failed = replace(h.scheduler.plan(ASYNC), cpu_wait_timeout_s=0.3)  # the runner's own timeout is 30 s
    assert "timed out" in fail_fast(h.runner, failed, within_s=2.0)
    assert segments(h.worker.pid) == old, "a stopped worker's segments must stay until it tears its plane down"
    requeued = retry(h.scheduler, failed)
    assert_reference_tokens(h.scheduler, reference)

    os.kill(h.worker.pid, signal.SIGCONT)
    wait_attached(h.runner, generation=2)
    fresh = segments(h.worker.pid)
    assert fresh and not fresh & old, "the re-attached plane is not a fresh one"
    assert mapped_here(old) == set(), "the lost data plane is still mapped"
    resume_hybrid(h, reference, requeued)


def test_a_plan_that_uses_the_cpu_pool_while_it_is_detached_fails_and_changes_nothing(
    hybrid: tuple[ServiceGroup, str, Hybrid], reference: dict[str, list[int]]
) -> None:
    _, _, h = hybrid
    h.worker.process.kill()
    h.worker.process.wait()
    failed = h.scheduler.plan(ASYNC)
    fail_fast(h.runner, failed, within_s=1.5)
    requeued = retry(h.scheduler, failed)
    assert not h.runner.info.cpu_pool_attached
    for _ in range(BLOCK_SIZE - 1):  # to the next step that grows the accelerator rows by a block
        h.scheduler.step(ExecutionMode.GPU_ONLY)

    h.scheduler.add("late", prompts()["r1"], Placement.CPU)
    touching = h.scheduler.plan(ASYNC)
    assert any(r.request_id == "late" for r in touching.new_requests)
    assert all(entry.new_block_ids for entry in touching.cached_requests)
    with pytest.raises(CpuPoolLost, match="'late' is placed on the CPU, but the CPU pool is detached"):
        h.runner.execute(touching)
    with pytest.raises(CpuPoolLost, match="'r0' is swapped"):
        h.runner.execute(StepPlan(h.scheduler.step_id, swap_out=(SwapData("r0", (0, 1, 2, 3, 4)),), mode=ASYNC))
    h.scheduler.step_id += 1
    with pytest.raises(InvalidArgument, match="'late' is not known"):
        h.runner.execute(StepPlan(h.scheduler.step_id, cached_requests=(CachedRequestData("late"),)))
    h.scheduler.step_id += 1

    h.scheduler.finish("late")
    retry(h.scheduler, touching)  # the accelerator rows are where they were before the refused plan
    h.scheduler.step(ExecutionMode.GPU_ONLY)
    assert_reference_tokens(h.scheduler, reference)
    assert set(requeued) == {"r1", "r3"}


@pytest.fixture
async def stub(mha_model_dir: Path) -> AsyncIterator[gpu_worker_pb2_grpc.GpuWorkerStub]:
    runner = make_runner(mha_model_dir, "", cpu_num_kv_blocks=0)
    server = rpc.create_server()
    gpu_worker_pb2_grpc.add_GpuWorkerServicer_to_server(GpuWorkerServicer(runner), server)
    run_dir = tempfile.mkdtemp(prefix="apex-", dir="/tmp")
    address = rpc.bind(server, rpc.unix_address(run_dir, "gpu_worker"))
    await server.start()
    try:
        async with rpc.channel(address) as channel:
            yield gpu_worker_pb2_grpc.GpuWorkerStub(channel)
    finally:
        await server.stop(None)
        runner.close()
        shutil.rmtree(run_dir)


async def test_reset_drops_every_request_and_a_later_decode_of_one_is_unknown(
    stub: gpu_worker_pb2_grpc.GpuWorkerStub,
) -> None:
    admit = StepPlan(0, tuple(NewRequestData(f"r{i}", (256, 1, 2), GREEDY, (i,)) for i in range(2)))
    await stub.Step(convert.plan_to_pb(admit))
    reply = await stub.Reset(gpu_worker_pb2.ResetRequest())
    assert reply.num_dropped == 2
    decode = StepPlan(1, cached_requests=(CachedRequestData("r0"),))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Step(convert.plan_to_pb(decode))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'r0' is not known" in err.value.details()
    assert (await stub.Reset(gpu_worker_pb2.ResetRequest())).num_dropped == 0
