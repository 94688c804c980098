"""What the chaos and soak benchmarks (and the chaos tests) share: a stack under supervision in a thread, a service's
/dev/shm segments and resident memory, what the scheduler and the gpu_worker report about the CPU pool, and gateway
streams recorded token by token with how each one ended."""

import asyncio
import logging
import os
import re
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from apex_serve import convert, rpc
from apex_serve.sdk.errors import status_code
from apex_serve.types import SamplingParams, WorkerInfo
from apex_serve.v1 import (
    gateway_pb2,
    gateway_pb2_grpc,
    gpu_worker_pb2,
    gpu_worker_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
)
from apex_tools.default_model import BENCH_SPEC, DEFAULT_SPEC, write_random_llama
from apex_tools.launcher import Stack, StackConfig

logger = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
CPU_WORKER = "cpu_attention_worker"
GPU_WORKER = "gpu_worker"
SCHEDULER = "scheduler_service"
SERVICES = (CPU_WORKER, "profiler_service", GPU_WORKER, SCHEDULER, "gateway")  # Stack's modules, in start order
MODELS = {"tiny": DEFAULT_SPEC, "bench": BENCH_SPEC}  # random LLaMAs with a byte-level tokenizer
BLOCK_SIZE = 16
_VM_RSS = re.compile(r"^VmRSS:\s+(\d+) kB$", re.MULTILINE)
_RSS_SHMEM = re.compile(r"^RssShmem:\s+(\d+) kB$", re.MULTILINE)


@contextmanager
def supervised(stack: Stack) -> Iterator[Stack]:
    """The started stack, every service that exits restarted by Stack.supervise in a thread until the block ends; an
    error of the supervision is raised when the block ends."""
    stop = threading.Event()
    failure: list[BaseException] = []

    def supervise() -> None:
        try:
            stack.supervise(stop)
        except BaseException as exc:
            logger.exception("supervision failed")
            failure.append(exc)

    thread = threading.Thread(target=supervise, name="supervise", daemon=True)
    thread.start()
    try:
        yield stack
    finally:
        stop.set()
        thread.join()
    if failure:
        raise failure[0]


@contextmanager
def supervised_stack(config: StackConfig) -> Iterator[Stack]:
    """The five services started, supervised for the block, then stopped."""
    with Stack(config) as stack, supervised(stack):
        yield stack


@contextmanager
def bench_stack(model: str, num_kv_blocks: int, max_num_seqs: int, profile_dir: str) -> Iterator[Stack]:
    """A supervised stack (policy apex, no HTTP or metrics port) serving the random model `model` of MODELS, written
    to a fresh directory, with num_kv_blocks blocks in the accelerator's KV pool; everything removed on exit."""
    with tempfile.TemporaryDirectory(prefix="apex-faults-", dir="/tmp") as tmp:
        spec = MODELS[model]
        model_dir = write_random_llama(Path(tmp) / spec.name, spec)
        config = StackConfig(
            model_dir=str(model_dir), port=rpc.free_tcp_port(), http_port=0, metrics_port=0, run_dir=f"{tmp}/run",
            profile_dir=profile_dir, num_kv_blocks=num_kv_blocks, max_num_seqs=max_num_seqs, policy="apex",
        )
        with supervised_stack(config) as stack:
            yield stack


def request_blocks(prompt: str, max_tokens: int) -> int:
    """KV blocks a request of the random models holds at its end: <s>, a token per prompt byte, its output."""
    return -(-(1 + len(prompt.encode()) + max_tokens) // BLOCK_SIZE)


def scheduler_address(stack: Stack) -> str:
    return rpc.unix_address(stack.config.run_dir, "scheduler")


def gpu_worker_address(stack: Stack) -> str:
    return rpc.unix_address(stack.config.run_dir, "gpu_worker")


def segments_of(pid: int) -> set[str]:
    """Names of the /dev/shm data-plane segments process pid created (apex-serve.<pid>.<hex>.<region>)."""
    return {p.name for p in SHM_DIR.glob(f"apex-serve.{pid}.*")}


def memory_kib(pid: int) -> tuple[int, int] | None:
    """(VmRSS, RssShmem) of process pid in KiB: its resident memory, and the part of it that is shared memory (a
    data-plane segment's pages count once touched); None once the process is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    rss, shmem = _VM_RSS.search(status), _RSS_SHMEM.search(status)
    return (int(rss.group(1)), int(shmem.group(1)) if shmem else 0) if rss else None


def hybrid_iterations(stats: scheduler_pb2.SchedulerStats) -> int:
    """Iterations that ran CPU rows (every mode but gpu_only)."""
    return sum(n for mode, n in stats.iterations_by_mode.items() if mode != "gpu_only")


async def scheduler_stats(channel: grpc.aio.Channel, timeout_s: float = 5.0) -> scheduler_pb2.SchedulerStats:
    return await scheduler_pb2_grpc.SchedulerStub(channel).GetStats(scheduler_pb2.GetStatsRequest(), timeout=timeout_s)


async def worker_info(channel: grpc.aio.Channel, timeout_s: float = 5.0) -> WorkerInfo:
    """What the gpu_worker reports now (the CPU pool attached or not, its generation)."""
    stub = gpu_worker_pb2_grpc.GpuWorkerStub(channel)
    return convert.worker_info_from_pb(await stub.GetWorkerInfo(gpu_worker_pb2.GetWorkerInfoRequest(),
                                                                timeout=timeout_s))


async def cpu_pool_back(stack: Stack, generation: int) -> bool:
    """Whether the CPU pool serves again after a loss: the gpu_worker attached a data plane past `generation` and the
    scheduler no longer runs degraded. False while either cannot be asked."""
    try:
        async with grpc.aio.insecure_channel(gpu_worker_address(stack)) as worker, \
                grpc.aio.insecure_channel(scheduler_address(stack)) as scheduler:
            info = await worker_info(worker)
            if not (info.cpu_pool_attached and info.cpu_pool_generation > generation):
                return False
            return not (await scheduler_stats(scheduler)).cpu_pool_degraded
    except grpc.aio.AioRpcError:
        return False


@dataclass
class StreamRecord:
    """One Generate stream as the client saw it: each token with its arrival time (perf_counter ns), how it ended."""

    submitted_ns: int
    token_ids: list[int] = field(default_factory=list)
    token_ns: list[int] = field(default_factory=list)
    ended_ns: int = 0
    completed: bool = False  # the final message arrived
    completion_tokens: int = 0  # as the final message counts them
    finish_reason: str = ""
    cancelled: bool = False  # cancelled by this client
    error_code: str = ""  # the status (or in-band error) the stream ended with, by name
    error_kind: str = ""  # the ApexError kind the server named, if any
    error_message: str = ""

    @property
    def ttft_ms(self) -> float | None:
        return (self.token_ns[0] - self.submitted_ns) / 1e6 if self.token_ns else None

    @property
    def tpot_ms(self) -> float | None:
        if len(self.token_ns) < 2:
            return None
        return (self.token_ns[-1] - self.token_ns[0]) / (len(self.token_ns) - 1) / 1e6


async def generate(stub: gateway_pb2_grpc.GatewayStub, prompt: str, sampling: SamplingParams, *,
                   cancel_after: int = 0, timeout_s: float | None = None,
                   on_tokens: Callable[[int], None] | None = None) -> StreamRecord:
    """One Generate stream read to its end. cancel_after > 0: cancelled once that many tokens arrived. on_tokens gets
    the count of every chunk's tokens as it arrives. An ending status is recorded, never raised."""
    record = StreamRecord(submitted_ns=time.perf_counter_ns())
    request = gateway_pb2.GenerateRequest(prompt=prompt, sampling=convert.sampling_to_pb(sampling))
    call = stub.Generate(request, timeout=timeout_s)
    try:
        async for msg in call:
            kind = msg.WhichOneof("response")
            if kind == "chunk":
                now = time.perf_counter_ns()
                record.token_ids.extend(msg.chunk.token_ids)
                record.token_ns.extend([now] * len(msg.chunk.token_ids))
                if on_tokens is not None:
                    on_tokens(len(msg.chunk.token_ids))
                if cancel_after and len(record.token_ids) >= cancel_after:
                    record.cancelled = True
                    call.cancel()
                    break
            elif kind == "complete":
                record.completed = True
                record.completion_tokens = msg.complete.usage.completion_tokens
                reason = convert.finish_reason_from_pb(msg.complete.finish_reason)
                record.finish_reason = reason.value if reason else ""
            elif kind == "error":
                record.error_code = status_code(msg.error.code).name
                record.error_message = msg.error.message
    except grpc.aio.AioRpcError as exc:
        record.error_code = exc.code().name
        record.error_kind = rpc.error_kind(exc)
        record.error_message = exc.details() or ""
    except asyncio.CancelledError:
        call.cancel()
        raise
    record.ended_ns = time.perf_counter_ns()
    return record


def kill(pid: int) -> int:
    """SIGKILL to pid; the perf_counter ns it was sent at."""
    sent = time.perf_counter_ns()
    os.kill(pid, signal.SIGKILL)
    logger.info("SIGKILL to pid %d", pid)
    return sent
