"""A lost or hung cpu_attention_worker costs no request. 40 greedy streams, about half of them on the CPU pool, are hit
a third of the way through by a SIGKILL of the worker (or a 5 s SIGSTOP): every stream still ends with exactly its
max_tokens tokens, the same tokens as an undisturbed run on the same stack; the worker comes back (restarted by the
supervision, or resumed), hybrid placement runs again and no shared-memory segment is left behind."""

import asyncio
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from apex_serve.types import SamplingParams
from apex_serve.v1 import gateway_pb2_grpc
from apex_tools.bench.faults import (
    CPU_WORKER,
    StreamRecord,
    cpu_pool_back,
    generate,
    gpu_worker_address,
    hybrid_iterations,
    scheduler_address,
    scheduler_stats,
    segments_of,
    supervised,
    worker_info,
)
from apex_tools.launcher import Stack
from conftest import running_stack, wait_until_async

NUM_STREAMS = 40
MAX_TOKENS = [24 + i for i in range(NUM_STREAMS)]  # 24..63: each stream's exact length (ignore_eos)
PROMPTS = [f"Chaos stream {i}: " + "lorem ipsum " * (i % 7) for i in range(NUM_STREAMS)]
DEVICE_KV_BLOCKS = 40  # holds about half of the 40 streams; apex places the others on the CPU pool
MIN_CPU_RESIDENT = 15  # CPU-resident streams the fault must hit
FAULT_AT_FRACTION = 1 / 3  # of all tokens streamed
STOP_S = 5.0
RECOVERY_TIMEOUT_S = 30.0
STREAM_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def stack(default_model_dir: Path) -> Iterator[Stack]:
    with running_stack(default_model_dir, num_kv_blocks=DEVICE_KV_BLOCKS, policy="apex") as stack, supervised(stack):
        yield stack


class _Streamed:
    """Tokens the burst's streams received so far."""

    def __init__(self) -> None:
        self.tokens = 0

    def add(self, count: int) -> None:
        self.tokens += count


async def _burst(stack: Stack, streamed: _Streamed | None = None) -> list[StreamRecord]:
    """The 40 streams at once through the gateway."""
    async with grpc.aio.insecure_channel(stack.config.gateway_address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        return list(await asyncio.gather(*(
            generate(stub, prompt, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True),
                     timeout_s=STREAM_TIMEOUT_S, on_tokens=streamed.add if streamed else None)
            for prompt, n in zip(PROMPTS, MAX_TOKENS, strict=True))))


def _assert_every_stream_complete(records: list[StreamRecord], reference: list[list[int]], when: str) -> None:
    for i, (record, want) in enumerate(zip(records, reference, strict=True)):
        assert record.completed, f"{when}: stream {i} ended {record.error_code}: {record.error_message}"
        assert record.completion_tokens == len(record.token_ids) == MAX_TOKENS[i], f"{when}: stream {i} lost tokens"
        assert record.token_ids == want, f"{when}: stream {i}'s tokens differ from the undisturbed run"


@pytest.fixture(scope="module")
def reference(stack: Stack) -> list[list[int]]:
    """The 40 streams' tokens, undisturbed."""
    records = asyncio.run(_burst(stack))
    assert all(r.completed and len(r.token_ids) == n for r, n in zip(records, MAX_TOKENS, strict=True)), [
        (r.error_code, r.error_message) for r in records if not r.completed]
    return [r.token_ids for r in records]


async def _peak_cpu_resident_until_fault(scheduler: grpc.aio.Channel, streamed: _Streamed,
                                        burst: asyncio.Task) -> int:
    """Polls GetStats until the burst's streams received FAULT_AT_FRACTION of their tokens; the most streams seen on
    the CPU pool at once."""
    peak = 0
    while streamed.tokens < FAULT_AT_FRACTION * sum(MAX_TOKENS):
        assert not burst.done(), f"the burst ended before the fault: {[r.error_code for r in burst.result()]}"
        peak = max(peak, (await scheduler_stats(scheduler)).num_running_cpu)
        await asyncio.sleep(0.01)
    return peak


async def _assert_hybrid_placement_resumes(stack: Stack, reference: list[list[int]]) -> None:
    """A new burst after the recovery completes token for token, runs CPU rows again and frees every block."""
    async with grpc.aio.insecure_channel(scheduler_address(stack)) as scheduler:
        before = await scheduler_stats(scheduler)
        assert not before.cpu_pool_degraded
        _assert_every_stream_complete(await _burst(stack), reference, "after the recovery")
        after = await scheduler_stats(scheduler)
    assert hybrid_iterations(after) > hybrid_iterations(before), (
        f"no hybrid iteration after the CPU pool came back: {dict(after.iterations_by_mode)}")
    assert after.num_free_blocks == after.num_total_blocks, "accelerator KV blocks leaked"
    assert after.num_free_cpu_blocks == after.num_total_cpu_blocks > 0, "CPU KV blocks leaked"


async def test_sigkill_of_the_cpu_worker_mid_stream_loses_no_token_and_hybrid_placement_resumes(
    stack: Stack, reference: list[list[int]],
) -> None:
    old_pid = stack.pid(CPU_WORKER)
    assert segments_of(old_pid), "the cpu_attention_worker has no data-plane segment to leave behind"
    async with grpc.aio.insecure_channel(scheduler_address(stack)) as scheduler, \
            grpc.aio.insecure_channel(gpu_worker_address(stack)) as worker:
        generation = (await worker_info(worker)).cpu_pool_generation
        losses = (await scheduler_stats(scheduler)).cpu_pool_losses
        streamed = _Streamed()
        burst = asyncio.create_task(_burst(stack, streamed))
        peak = await _peak_cpu_resident_until_fault(scheduler, streamed, burst)
        assert peak >= MIN_CPU_RESIDENT, f"only {peak} streams lived on the CPU pool before the fault"
        os.kill(old_pid, signal.SIGKILL)
        _assert_every_stream_complete(await burst, reference, "through the SIGKILL")

        await wait_until_async(lambda: stack.pid(CPU_WORKER) != old_pid, RECOVERY_TIMEOUT_S,
                               "the supervision to restart the cpu_attention_worker")
        await wait_until_async(lambda: cpu_pool_back(stack, generation), RECOVERY_TIMEOUT_S,
                               "the restarted cpu_attention_worker's pool to be attached and placed on again")
        assert (await scheduler_stats(scheduler)).cpu_pool_losses == losses + 1
    await _assert_hybrid_placement_resumes(stack, reference)
    assert segments_of(old_pid) == set(), "the killed worker's shared-memory segments were left in /dev/shm"


async def test_sigstop_of_the_cpu_worker_for_5s_loses_no_token_and_hybrid_placement_resumes(
    stack: Stack, reference: list[list[int]],
) -> None:
    pid = stack.pid(CPU_WORKER)
    segments = segments_of(pid)
    assert segments, "the cpu_attention_worker has no data-plane segment to leak"
    async with grpc.aio.insecure_channel(scheduler_address(stack)) as scheduler, \
            grpc.aio.insecure_channel(gpu_worker_address(stack)) as worker:
        generation = (await worker_info(worker)).cpu_pool_generation
        losses = (await scheduler_stats(scheduler)).cpu_pool_losses
        streamed = _Streamed()
        burst = asyncio.create_task(_burst(stack, streamed))
        peak = await _peak_cpu_resident_until_fault(scheduler, streamed, burst)
        assert peak >= MIN_CPU_RESIDENT, f"only {peak} streams lived on the CPU pool before the fault"
        os.kill(pid, signal.SIGSTOP)
        try:
            at_stop = streamed.tokens
            await asyncio.sleep(STOP_S)  # the fault's length, not a wait for a condition
            while_stopped = streamed.tokens - at_stop
        finally:
            os.kill(pid, signal.SIGCONT)
        assert while_stopped > 0, "every stream stalled while the cpu_attention_worker hung"
        _assert_every_stream_complete(await burst, reference, "through the SIGSTOP")

        await wait_until_async(lambda: cpu_pool_back(stack, generation), RECOVERY_TIMEOUT_S,
                               "the resumed cpu_attention_worker's pool to be attached and placed on again")
        assert (await scheduler_stats(scheduler)).cpu_pool_losses == losses + 1, "the hang did not count as a loss"
    await _assert_hybrid_placement_resumes(stack, reference)
    live = stack.pid(CPU_WORKER)  # the same process, unless the supervision replaced the hung one
    await wait_until_async(lambda: len(segments_of(pid) | segments_of(live)) <= len(segments), RECOVERY_TIMEOUT_S,
                           "the lost data plane's shared-memory segments to be released")
