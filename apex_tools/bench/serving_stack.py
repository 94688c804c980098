"""The serving stack the bench-policies, bench-goodput and bench-tracing benchmarks run: a random LLaMA on a gpu_worker
pinned to the first core (torch on one thread, exclusive), the cpu_attention_worker, the profiler, the schedulers and
the client on the second; its workloads and presets, where its services run, the profile cut to the workloads, Submit
streams with per-token arrival times, a scheduler serving them, and the latency and throughput of a run."""

import asyncio
import logging
import math
import random
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import grpc
import numpy as np
from google.protobuf.descriptor import EnumDescriptor
from google.protobuf.message import Message

from apex_serve import convert, rpc
from apex_serve.types import SamplingParams, WorkerInfo
from apex_serve.v1 import (
    gpu_worker_pb2,
    gpu_worker_pb2_grpc,
    profiler_pb2,
    profiler_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
)
from apex_tools.default_model import BENCH_SPEC, BOS_TOKEN_ID, DEFAULT_SPEC, RandomLlamaSpec, write_random_llama
from apex_tools.processes import Service, ServiceGroup, pinned, split_cores
from profiler_service.grid import Grid, default_grid

logger = logging.getLogger(__name__)
BLOCK_SIZE = 16
CPU_POOL_HEADROOM = 1.5  # CPU KV pool over the working set
START_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Workload:
    """num_requests requests with prompt and output lengths drawn uniformly from the closed ranges (fixed seed)."""

    name: str
    num_requests: int
    prompt_len: tuple[int, int]
    output_len: tuple[int, int]
    seed: int

    def requests(self) -> list[tuple[list[int], int]]:
        """(prompt token ids starting with <s>, output length) of every request."""
        rng = random.Random(self.seed)
        out = []
        for _ in range(self.num_requests):
            prompt = [BOS_TOKEN_ID] + [rng.randrange(256) for _ in range(rng.randint(*self.prompt_len) - 1)]
            out.append((prompt, rng.randint(*self.output_len)))
        return out

    def working_set_tokens(self) -> int:
        return sum(len(prompt) + output for prompt, output in self.requests())

    def largest_request_tokens(self) -> int:
        return max(len(prompt) + output for prompt, output in self.requests())


@dataclass(frozen=True)
class Preset:
    spec: RandomLlamaSpec
    workloads: tuple[Workload, ...]
    max_num_seqs: int
    profile_warmup: int = 1
    profile_repeats: int = 3


PRESETS = {
    "full": Preset(BENCH_SPEC, (
        Workload("decode-heavy", 32, (32, 64), (96, 144), seed=1),
        Workload("long-output", 16, (32, 64), (288, 384), seed=2),
    ), max_num_seqs=32),
    "quick": Preset(BENCH_SPEC, (
        Workload("decode-heavy", 16, (16, 32), (32, 48), seed=1),
        Workload("long-output", 10, (16, 32), (64, 96), seed=2),
    ), max_num_seqs=16),
    "tiny": Preset(DEFAULT_SPEC, (
        Workload("decode-heavy", 4, (8, 16), (8, 12), seed=1),
        Workload("long-output", 2, (8, 16), (16, 24), seed=2),
    ), max_num_seqs=4, profile_warmup=0, profile_repeats=1),
}


@dataclass(frozen=True)
class BenchStack:
    """Where the benchmark's services run: their sockets in run_dir, the gpu_worker on the device core, the others
    on the host core (None: not pinned), started and stopped by services."""

    services: ServiceGroup
    run_dir: Path
    device_cpus: set[int] | None
    host_cpus: set[int] | None

    def address(self, name: str) -> str:
        return rpc.unix_address(self.run_dir, name)

    def start(self, module: str, name: str, args: Sequence[str], on_device: bool = False,
              env: Mapping[str, str] | None = None) -> Service:
        """`python -m module --address <name's socket> args` (env: variables on top of ours), SERVING."""
        address = self.address(name)
        cpus = self.device_cpus if on_device else self.host_cpus
        return self.services.start(module, address, ["--address", address, *args], cpus, env)


def kv_bytes_per_token(spec: RandomLlamaSpec) -> int:
    return 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * 4  # K and V, fp32


def device_blocks(workload: Workload, fraction: float) -> int:
    """The device pool: fraction of the working set, at least the largest request (else gpu-only never ends)."""
    wanted = math.ceil(fraction * workload.working_set_tokens() / BLOCK_SIZE)
    return max(wanted, math.ceil(workload.largest_request_tokens() / BLOCK_SIZE))


def cpu_blocks(preset: Preset) -> int:
    return math.ceil(CPU_POOL_HEADROOM * max(w.working_set_tokens() for w in preset.workloads) / BLOCK_SIZE)


def start_gpu_worker(stack: BenchStack, model_dir: Path, num_kv_blocks: int, preset: Preset,
                     env: Mapping[str, str] | None = None) -> Service:
    return stack.start("gpu_worker", "gpu", [
        "--model-dir", str(model_dir), "--device", "cpu", "--num-threads", "1",
        "--block-size", str(BLOCK_SIZE), "--num-kv-blocks", str(num_kv_blocks),
        "--cpu-worker-address", stack.address("cpu"), "--cpu-num-kv-blocks", str(cpu_blocks(preset)),
        "--cpu-max-rows", str(preset.max_num_seqs),
    ], on_device=True, env=env)


def worker_info(address: str) -> WorkerInfo:
    with grpc.insecure_channel(address) as channel:
        stub = gpu_worker_pb2_grpc.GpuWorkerStub(channel)
        return convert.worker_info_from_pb(stub.GetWorkerInfo(gpu_worker_pb2.GetWorkerInfoRequest()))


def profile_grid(info: WorkerInfo, preset: Preset) -> Grid:
    """The quick grid cut to what the workloads run: steps of up to max_num_seqs prompts, up to max_num_seqs rows,
    KV contexts up to what the pools hold with one partial block per row."""
    grid = default_grid(info, quick=True)
    longest_prompt = max(w.prompt_len[1] for w in preset.workloads)
    rows = preset.max_num_seqs
    cpu_rows = min(rows, info.cpu_max_rows)

    def cut(values: tuple[int, ...], cap: int) -> tuple[int, ...]:
        return tuple(sorted({v for v in values if v < cap} | {cap}))

    kv = (64, 256, 1024, 4096, 16384)
    pref_tokens = cut(grid.pref_tokens, min(longest_prompt, info.max_model_len))
    return replace(
        grid, lin_tokens=cut(grid.lin_tokens, rows * longest_prompt), pref_tokens=pref_tokens,
        pref_context=cut(grid.pref_context, info.max_model_len - pref_tokens[-1]),
        gatt_rows=cut(grid.gatt_rows, rows), gatt_kv_tokens=cut(kv, (info.num_kv_blocks - rows) * info.block_size),
        catt_rows=cut(grid.catt_rows, cpu_rows),
        catt_kv_tokens=cut(kv, (info.num_cpu_kv_blocks - cpu_rows) * info.block_size),
        xfer_rows=cut(grid.xfer_rows, cpu_rows), step_requests=cut(grid.step_requests, rows),
    )


def profile(stack: BenchStack, model_dir: Path, preset: Preset) -> dict:
    """Profile once against a gpu_worker whose device pool holds a whole working set; returns the grid used."""
    largest = max(w.working_set_tokens() for w in preset.workloads)
    worker = start_gpu_worker(stack, model_dir, math.ceil(largest / BLOCK_SIZE) + preset.max_num_seqs, preset)
    try:
        grid = profile_grid(worker_info(stack.address("gpu")), preset)
        with grpc.insecure_channel(stack.address("profiler")) as channel:
            stub = profiler_pb2_grpc.ProfilerStub(channel)
            started = time.perf_counter()
            for progress in stub.Profile(profiler_pb2.ProfileRequest(grid=profiler_pb2.ProfileGrid(**asdict(grid)))):
                if progress.stage in ("done", "reused"):
                    logger.info("profile %s (%s) in %.0f s: %s", progress.key_hash, progress.stage,
                                time.perf_counter() - started, progress.path)
    finally:
        stack.services.stop(worker)
    return asdict(grid)


async def submit_all(address: str, run_id: str, requests: list[tuple[list[int], int]],
                     offsets_s: list[float]) -> tuple[int, list[dict]]:
    """Submit every request at its offset; (first submit ns, per request: submit ns, token ns, finish reason)."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        start = time.perf_counter_ns()

        async def one(i: int, prompt: list[int], output_len: int) -> dict:
            await asyncio.sleep(max(0.0, start / 1e9 + offsets_s[i] - time.perf_counter_ns() / 1e9))
            sampling = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
            request = scheduler_pb2.SubmitRequest(request_id=f"{run_id}-{i}", prompt_token_ids=prompt,
                                                  sampling=convert.sampling_to_pb(sampling))
            submitted, stamps, reason = time.perf_counter_ns(), [], None
            async for msg in stub.Submit(request):
                now = time.perf_counter_ns()
                stamps += [now] * len(msg.token_ids)
                if msg.finished:
                    reason = convert.finish_reason_from_pb(msg.finish_reason)
            return {"submit_ns": submitted, "token_ns": stamps,
                    "finish_reason": None if reason is None else reason.value}

        results = await asyncio.gather(*(one(i, p, n) for i, (p, n) in enumerate(requests)))
        return start, list(results)


def plain(value: object, enum: EnumDescriptor | None = None) -> object:
    """A protobuf message as JSON-ready builtins: every field, enums by name, 64-bit integers as numbers."""
    if isinstance(value, Message):
        return {f.name: plain(getattr(value, f.name), f.enum_type) for f in value.DESCRIPTOR.fields}
    if isinstance(value, Mapping):
        return {str(k): plain(v, enum) for k, v in value.items()}
    if isinstance(value, Iterable) and not isinstance(value, (str, bytes)):
        return [plain(v, enum) for v in value]
    if enum is not None and value in enum.values_by_number:
        return enum.values_by_number[value].name
    return value


def scheduler_stats(address: str) -> dict:
    """Every field the scheduler's GetStats reports; a list of recent iterations is summarised (count, modes, means)."""
    with grpc.insecure_channel(address) as channel:
        stats = plain(scheduler_pb2_grpc.SchedulerStub(channel).GetStats(scheduler_pb2.GetStatsRequest()))
    recent = stats.get("recent_iterations")
    if recent:
        numeric = [k for k, v in recent[0].items() if isinstance(v, (int, float)) and k != "step_id"]
        stats["recent_iterations"] = {
            "count": len(recent), "modes": dict(Counter(str(it.get("mode")) for it in recent)),
            "mean": {k: float(np.mean([it[k] for it in recent])) for k in numeric},
        }
    return stats


def arrival_offsets(count: int, rate: float, seed: int) -> list[float]:
    """Poisson arrivals at rate requests/s (0: all at time 0), the first at 0."""
    if rate <= 0:
        return [0.0] * count
    rng = random.Random(seed)
    offsets, t = [], 0.0
    for _ in range(count):
        offsets.append(t)
        t += rng.expovariate(rate)
    return offsets


def request_latencies(result: dict) -> tuple[float | None, float | None]:
    """(TTFT ms, TPOT ms) of one request's record: TTFT = first token - submit, TPOT = (last token - first token) /
    (tokens - 1); None where the request got too few tokens to have it."""
    stamps = result["token_ns"]
    ttft = (stamps[0] - result["submit_ns"]) / 1e6 if stamps else None
    tpot = (stamps[-1] - stamps[0]) / (len(stamps) - 1) / 1e6 if len(stamps) > 1 else None
    return ttft, tpot


def metrics(start_ns: int, results: list[dict], expected: list[int]) -> dict:
    received = [len(r["token_ns"]) for r in results]
    last = max(stamp for r in results for stamp in r["token_ns"])
    latencies = [request_latencies(r) for r in results]
    ttft = [t for t, _ in latencies if t is not None]
    tpot = [t for _, t in latencies if t is not None]
    return {
        "output_tokens": sum(received),
        "elapsed_s": (last - start_ns) / 1e9,
        "tokens_per_s": sum(received) / ((last - start_ns) / 1e9),
        "tpot_p50_ms": float(np.percentile(tpot, 50)), "tpot_p99_ms": float(np.percentile(tpot, 99)),
        "ttft_p50_ms": float(np.percentile(ttft, 50)), "ttft_p99_ms": float(np.percentile(ttft, 99)),
        "expected_tokens": expected, "received_tokens": received,
        "finish_reasons": sorted({str(r["finish_reason"]) for r in results}),
        "lengths_ok": received == expected,
    }


def serve(stack: BenchStack, preset: Preset, policy: str, run_id: str, requests: list[tuple[list[int], int]],
          offsets_s: list[float], tpot_slo_ms: float = 0.0, ttft_slo_ms: float = 0.0) -> tuple[int, list[dict], dict]:
    """A fresh scheduler under policy against the stack's gpu_worker (only neo and apex get the profiler's address;
    an objective of 0 is not passed), every request submitted at its offset, then its GetStats; the scheduler is
    stopped (SIGTERM: it drops whatever it still held from the gpu_worker, so the next run finds the worker holding
    no request). (first submit ns, per-request records as submit_all returns them, stats)."""
    address = stack.address("scheduler")
    args = ["--worker-address", stack.address("gpu"), "--policy", policy, "--max-num-seqs", str(preset.max_num_seqs)]
    if policy != "gpu-only":
        args += ["--profiler-address", stack.address("profiler")]
    if tpot_slo_ms > 0:
        args += ["--tpot-slo-ms", str(tpot_slo_ms)]
    if ttft_slo_ms > 0:
        args += ["--ttft-slo-ms", str(ttft_slo_ms)]
    scheduler = stack.start("scheduler_service", "scheduler", args)
    try:
        start_ns, results = asyncio.run(submit_all(address, run_id, requests, offsets_s))
        stats = scheduler_stats(address)
        if stats.get("num_running") or stats.get("num_waiting"):
            logger.warning("%s: the scheduler still holds %s running and %s waiting requests after every stream "
                           "ended", run_id, stats.get("num_running"), stats.get("num_waiting"))
    finally:
        stack.services.stop(scheduler)
    return start_ns, results, stats


def layout_mix(stats: dict) -> str:
    """Iterations with CPU rows by overlap layout, as "fused 12, split 3" ("-" when none ran)."""
    by_layout = stats.get("iterations_by_layout") or {}
    return ", ".join(f"{k} {n}" for k, n in sorted(by_layout.items()) if n) or "-"


@contextmanager
def running_stack(preset: Preset, profile_dir: str | None, prefix: str) -> Iterator[tuple[BenchStack, Path]]:
    """The cpu_attention_worker (a pool for the presets' largest working set, twice over) and the profiler started in
    a fresh run directory with the preset's model written to it, this process pinned to the host core (the device
    core stays the gpu_worker's alone); (stack, model directory). Everything is stopped and removed on exit, and this
    process's affinity restored."""
    run_dir = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    device_cpus, host_cpus = split_cores(device=1, host=1)
    try:
        with pinned(host_cpus), ServiceGroup(START_TIMEOUT_S, STOP_TIMEOUT_S) as services:
            stack = BenchStack(services, run_dir, device_cpus, host_cpus)
            model_dir = write_random_llama(run_dir / preset.spec.name, preset.spec)
            cpu_budget = 2 * cpu_blocks(preset) * BLOCK_SIZE * kv_bytes_per_token(preset.spec)
            stack.start("cpu_attention_worker", "cpu", ["--num-threads", "1", "--kv-budget-bytes", str(cpu_budget)])
            stack.start("profiler_service", "profiler", [
                "--gpu-worker-address", stack.address("gpu"), "--cpu-worker-address", stack.address("cpu"),
                "--profile-dir", profile_dir or str(run_dir / "profiles"),
                "--warmup", str(preset.profile_warmup), "--repeats", str(preset.profile_repeats)])
            yield stack, model_dir
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
