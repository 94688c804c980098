"""Side-by-side policy benchmark (issue 6): gpu-only, neo and apex on one stack, in one run, on the same workloads.

The stack: a random LLaMA (hidden 1024, 8 layers, GQA; --tiny: the small default model) served by a gpu_worker whose
device is the first core (torch on one thread, exclusive) and a cpu_attention_worker on the second core; the
profiler, every scheduler and this client share the second core. The device KV pool is --device-kv-fraction (10%)
of the workload's working set (the sum over its requests of prompt + output tokens, in blocks of 16, rounded up and
at least the largest request); the CPU pool holds the whole working set with room to spare. The pool differs per
workload, so each workload gets its own gpu_worker; the policies of a workload run one after the other against it.

Profiling runs once, before the workloads, against a profiling gpu_worker whose device pool holds a whole working set
(so the GPU-attention table covers the contexts the policies see), on a grid cut to the workloads' sizes. The profile
key (hardware, model, dtypes, block size, code version) does not include the pool sizes, so the schedulers of every
workload get that profile from the profiler.

Each (workload, policy): a scheduler process (`python -m scheduler_service --policy P`) is started, the whole
workload is submitted through its gRPC Submit streams (token ids, greedy, ignore_eos, max_tokens = the request's
output length), all at once or with Poisson arrivals (--arrival-rate, fixed seed), and the client records the arrival
time of every token. Then GetStats is read (every field the scheduler reports) and the scheduler is stopped (SIGTERM:
it drops whatever it still held from the gpu_worker, so the next policy finds the worker holding no request).

Measured per (workload, policy): output tokens/s = output tokens / (last token - first submit); TPOT of a request =
(last token - first token) / (output tokens - 1) and TTFT = first token - submit, p50/p99 over requests; that every
request got exactly its output length. Ratios in the same run: each policy's throughput over gpu-only's, apex over the
better of gpu-only and neo, p99 TPOT over gpu-only's; and the issue's targets when all three policies ran.
Only neo and apex get the profiler's address; apex gets --tpot-target-ms from --apex-tpot-target-ms, or
FACTOR x gpu-only's measured p99 TPOT on the same workload with --apex-tpot-from-gpu-only FACTOR (gpu-only runs first).
"""

import argparse
import asyncio
import logging
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import grpc
import numpy as np
from google.protobuf.descriptor import EnumDescriptor
from google.protobuf.message import Message

from apex_serve import convert, rpc
from apex_serve.bench.common import pinned, two_cores, write_result
from apex_serve.default_model import BENCH_SPEC, BOS_TOKEN_ID, DEFAULT_SPEC, RandomLlamaSpec, write_random_llama
from apex_serve.logs import configure_logging
from apex_serve.types import SamplingParams, WorkerInfo
from apex_serve.v1 import (
    gpu_worker_pb2,
    gpu_worker_pb2_grpc,
    profiler_pb2,
    profiler_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
)
from profiler_service.grid import Grid, default_grid

logger = logging.getLogger(__name__)
POLICIES = ("gpu-only", "neo", "apex")
BLOCK_SIZE = 16
CPU_POOL_HEADROOM = 1.5  # CPU KV pool over the working set
START_TIMEOUT_S = 300.0


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
class Flags:
    policies: tuple[str, ...]
    arrival_rate: float  # requests per second; 0: all at once
    seed: int
    device_kv_fraction: float
    apex_tpot_target_ms: float
    apex_tpot_from_gpu_only: float  # 0: unset


class Stack:
    """The run directory's processes: started pinned, stopped (SIGTERM, then SIGKILL) in reverse order."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.device_cpu, self.host_cpu = two_cores()
        self._processes: list[subprocess.Popen] = []

    def address(self, name: str) -> str:
        return rpc.unix_address(self.run_dir, name)

    def start(self, module: str, name: str, args: Sequence[str], on_device: bool = False,
              env: Mapping[str, str] | None = None) -> subprocess.Popen:
        """Start `python -m module --address <name's socket> args` (env: variables on top of ours) and wait until it
        is SERVING."""
        address = self.address(name)
        process = subprocess.Popen([sys.executable, "-m", module, "--address", address, *args],
                                   env={**os.environ, **env} if env else None,
                                   **pinned(self.device_cpu if on_device else self.host_cpu))
        self._processes.append(process)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                asyncio.run(rpc.wait_healthy(address, 2.0))
                return process
            except TimeoutError:
                if process.poll() is not None:
                    self._processes.remove(process)
                    raise RuntimeError(f"{module} exited with status {process.returncode} before serving") from None
                if time.monotonic() > deadline:
                    raise

    def stop(self, process: subprocess.Popen) -> None:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                logger.warning("pid %d ignored SIGTERM: killed", process.pid)
                process.kill()
                process.wait()
        self._processes.remove(process)

    def close(self) -> None:
        for process in reversed(list(self._processes)):
            self.stop(process)


def kv_bytes_per_token(spec: RandomLlamaSpec) -> int:
    return 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * 4  # K and V, fp32


def device_blocks(workload: Workload, fraction: float) -> int:
    """The device pool: fraction of the working set, at least the largest request (else gpu-only never ends)."""
    wanted = math.ceil(fraction * workload.working_set_tokens() / BLOCK_SIZE)
    return max(wanted, math.ceil(workload.largest_request_tokens() / BLOCK_SIZE))


def cpu_blocks(preset: Preset) -> int:
    return math.ceil(CPU_POOL_HEADROOM * max(w.working_set_tokens() for w in preset.workloads) / BLOCK_SIZE)


def start_gpu_worker(stack: Stack, model_dir: Path, num_kv_blocks: int, preset: Preset,
                     env: Mapping[str, str] | None = None) -> subprocess.Popen:
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
    return replace(
        grid, lin_tokens=cut(grid.lin_tokens, rows * longest_prompt), pref_tokens=cut(grid.pref_tokens, longest_prompt),
        gatt_rows=cut(grid.gatt_rows, rows), gatt_kv_tokens=cut(kv, (info.num_kv_blocks - rows) * info.block_size),
        catt_rows=cut(grid.catt_rows, cpu_rows),
        catt_kv_tokens=cut(kv, (info.num_cpu_kv_blocks - cpu_rows) * info.block_size),
        xfer_rows=cut(grid.xfer_rows, cpu_rows), step_requests=cut(grid.step_requests, rows),
    )


def profile(stack: Stack, model_dir: Path, preset: Preset) -> dict:
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
        stack.stop(worker)
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


def metrics(start_ns: int, results: list[dict], expected: list[int]) -> dict:
    received = [len(r["token_ns"]) for r in results]
    last = max(stamp for r in results for stamp in r["token_ns"])
    tpot = [(r["token_ns"][-1] - r["token_ns"][0]) / (len(r["token_ns"]) - 1) / 1e6
            for r in results if len(r["token_ns"]) > 1]
    ttft = [(r["token_ns"][0] - r["submit_ns"]) / 1e6 for r in results if r["token_ns"]]
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


def run_policy(stack: Stack, workload: Workload, policy: str, preset: Preset, flags: Flags,
               tpot_target_ms: float) -> dict:
    """One (workload, policy): a fresh scheduler, the whole workload, its stats; the worker left holding nothing."""
    address = stack.address("scheduler")
    args = ["--worker-address", stack.address("gpu"), "--policy", policy, "--max-num-seqs", str(preset.max_num_seqs)]
    if policy != "gpu-only":
        args += ["--profiler-address", stack.address("profiler")]
    if tpot_target_ms > 0:
        args += ["--tpot-target-ms", str(tpot_target_ms)]
    requests = workload.requests()
    run_id = f"{workload.name}-{policy}"
    scheduler = stack.start("scheduler_service", "scheduler", args)
    try:
        offsets = arrival_offsets(len(requests), flags.arrival_rate, flags.seed)
        start_ns, results = asyncio.run(submit_all(address, run_id, requests, offsets))
        stats = scheduler_stats(address)
        if stats.get("num_running") or stats.get("num_waiting"):
            logger.warning("%s: the scheduler still holds %s running and %s waiting requests after every stream "
                           "ended", run_id, stats.get("num_running"), stats.get("num_waiting"))
    finally:
        stack.stop(scheduler)  # on SIGTERM the scheduler drops whatever it still held from the worker
    row = metrics(start_ns, results, [n for _, n in requests])
    return {"policy": policy, "tpot_target_ms": tpot_target_ms, **row, "scheduler_stats": stats}


def compare(rows: dict[str, dict]) -> dict:
    """Ratios of one workload's policies (those that ran without error)."""
    ok = {p: r for p, r in rows.items() if "error" not in r}
    ratios: dict[str, float] = {}
    if "gpu-only" in ok:
        base = ok["gpu-only"]
        for policy, row in ok.items():
            if policy != "gpu-only":
                ratios[f"{policy}_over_gpu_only"] = row["tokens_per_s"] / base["tokens_per_s"]
                ratios[f"{policy}_p99_tpot_over_gpu_only"] = row["tpot_p99_ms"] / base["tpot_p99_ms"]
    others = [ok[p]["tokens_per_s"] for p in ("gpu-only", "neo") if p in ok]
    if "apex" in ok and others:
        ratios["apex_over_best_other"] = ok["apex"]["tokens_per_s"] / max(others)
    return ratios


def targets(workloads: dict[str, dict]) -> dict[str, bool] | None:
    """The issue's targets; None unless every workload has all three policies' results."""
    if not workloads or any(not {"apex_over_gpu_only", "neo_over_gpu_only"} <= set(w["ratios"])
                            for w in workloads.values()):
        return None
    heavy = workloads.get("decode-heavy")
    best = [w["ratios"]["apex_over_best_other"] for w in workloads.values()]
    return {
        "decode_heavy_apex_1_5x_gpu_only_at_no_worse_p99_tpot": heavy is not None
        and heavy["ratios"]["apex_over_gpu_only"] >= 1.5 and heavy["ratios"]["apex_p99_tpot_over_gpu_only"] <= 1.0,
        "apex_at_least_0_97x_best_other_everywhere": all(r >= 0.97 for r in best),
        "apex_ahead_of_both_somewhere": any(r > 1.0 for r in best),
    }


def report(result: dict) -> str:
    lines = [f"{'workload':<14}{'policy':<10}{'dev KV':>7}{'tokens':>8}{'tok/s':>8}{'vs gpu':>8}{'TPOT p50':>10}"
             f"{'p99':>8}{'TTFT p50':>10}{'p99':>8}{'len ok':>8}{'preempt':>9}{'swaps':>7}  iterations by mode"]
    for name, w in result["workloads"].items():
        base = w["policies"].get("gpu-only", {}).get("tokens_per_s")
        for policy, row in w["policies"].items():
            if "error" in row:
                lines.append(f"{name:<14}{policy:<10}  error: {row['error']}")
                continue
            vs = f"{row['tokens_per_s'] / base:.2f}" if base else "-"
            stats = row["scheduler_stats"]
            modes = ", ".join(f"{m} {n}" for m, n in sorted(stats.get("iterations_by_mode", {}).items()))
            lines.append(
                f"{name:<14}{policy:<10}{w['regime']['device_kv_blocks']:>7}{row['output_tokens']:>8}"
                f"{row['tokens_per_s']:>8.1f}{vs:>8}{row['tpot_p50_ms']:>10.1f}{row['tpot_p99_ms']:>8.1f}"
                f"{row['ttft_p50_ms']:>10.0f}{row['ttft_p99_ms']:>8.0f}{str(row['lengths_ok']):>8}"
                f"{stats.get('num_preemptions', '-'):>9}{stats.get('num_swaps', '-'):>7}  {modes}"
            )
        if w["ratios"]:
            lines.append(f"{'':<14}ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in w["ratios"].items()))
        target = w["policies"].get("apex", {}).get("tpot_target_ms")
        if target:
            lines.append(f"{'':<14}apex ran with --tpot-target-ms {target:.1f}")
    if result["targets"] is not None:
        lines.append("targets: " + ", ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in result["targets"].items()))
    return "\n".join(lines)


def run_workload(stack: Stack, model_dir: Path, workload: Workload, preset: Preset, flags: Flags) -> dict:
    blocks = device_blocks(workload, flags.device_kv_fraction)
    worker = start_gpu_worker(stack, model_dir, blocks, preset)
    rows: dict[str, dict] = {}
    try:
        info = worker_info(stack.address("gpu"))
        regime = {
            "requests": workload.num_requests, "prompt_len": workload.prompt_len, "output_len": workload.output_len,
            "working_set_tokens": workload.working_set_tokens(), "device_kv_blocks": info.num_kv_blocks,
            "device_kv_tokens": info.num_kv_blocks * info.block_size,
            "device_kv_fraction": info.num_kv_blocks * info.block_size / workload.working_set_tokens(),
            "cpu_kv_blocks": info.num_cpu_kv_blocks, "cpu_max_rows": info.cpu_max_rows,
        }
        ordered = sorted(flags.policies, key=POLICIES.index)  # gpu-only first: apex's target may come from it
        for policy in ordered:
            target = flags.apex_tpot_target_ms if policy == "apex" else 0.0
            if policy == "apex" and flags.apex_tpot_from_gpu_only and "tpot_p99_ms" in rows.get("gpu-only", {}):
                target = flags.apex_tpot_from_gpu_only * rows["gpu-only"]["tpot_p99_ms"]
            logger.info("%s: %s (device KV %d blocks)", workload.name, policy, info.num_kv_blocks)
            try:
                rows[policy] = run_policy(stack, workload, policy, preset, flags, target)
            except (grpc.RpcError, TimeoutError, RuntimeError) as exc:
                logger.exception("%s / %s failed", workload.name, policy)
                rows[policy] = {"policy": policy, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        stack.stop(worker)
    return {"regime": regime, "policies": rows, "ratios": compare(rows)}


def run(preset: Preset, flags: Flags, profile_dir: str | None) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix="apx-pol-", dir="/tmp"))
    stack = Stack(run_dir)
    affinity = os.sched_getaffinity(0)
    if stack.host_cpu is not None:  # this client shares the host core: the device core stays exclusive
        os.sched_setaffinity(0, {stack.host_cpu})
    workloads: dict[str, dict] = {}
    try:
        model_dir = write_random_llama(run_dir / preset.spec.name, preset.spec)
        cpu_budget = 2 * cpu_blocks(preset) * BLOCK_SIZE * kv_bytes_per_token(preset.spec)
        stack.start("cpu_attention_worker", "cpu", ["--num-threads", "1", "--kv-budget-bytes", str(cpu_budget)])
        stack.start("profiler_service", "profiler", [
            "--gpu-worker-address", stack.address("gpu"), "--cpu-worker-address", stack.address("cpu"),
            "--profile-dir", profile_dir or str(run_dir / "profiles"),
            "--warmup", str(preset.profile_warmup), "--repeats", str(preset.profile_repeats)])
        grid = profile(stack, model_dir, preset) if set(flags.policies) - {"gpu-only"} else None
        for workload in preset.workloads:
            workloads[workload.name] = run_workload(stack, model_dir, workload, preset, flags)
    finally:
        stack.close()
        shutil.rmtree(run_dir, ignore_errors=True)
        os.sched_setaffinity(0, affinity)
    return {
        "model": preset.spec.name, "device_cpu": stack.device_cpu, "host_cpu": stack.host_cpu,
        "max_num_seqs": preset.max_num_seqs, "flags": asdict(flags), "profile_grid": grid,
        "workloads": workloads, "targets": targets(workloads),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="apex-serve bench-policies", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smaller workloads (about 2 minutes)")
    size.add_argument("--tiny", action="store_true", help="the small model, a few requests: a smoke test")
    parser.add_argument("--policies", default=",".join(POLICIES), help="comma-separated, of " + ", ".join(POLICIES))
    parser.add_argument("--arrival-rate", type=float, default=0.0, help="Poisson arrivals per second; 0: all at once")
    parser.add_argument("--seed", type=int, default=0, help="seed of the arrivals")
    parser.add_argument("--device-kv-fraction", type=float, default=0.1, help="device KV pool over the working set")
    parser.add_argument("--apex-tpot-target-ms", type=float, default=0.0, help="apex's --tpot-target-ms; 0: none")
    parser.add_argument("--apex-tpot-from-gpu-only", type=float, default=0.0, metavar="FACTOR",
                        help="apex's TPOT target: FACTOR x gpu-only's p99 TPOT on the same workload (0: unset)")
    parser.add_argument("--profile-dir", default=None, help="reuse profiles stored here (default: a fresh one)")
    parser.add_argument("--out", default="bench_results/policies.json")
    args = parser.parse_args(argv)
    configure_logging("bench-policies")
    policies = tuple(p.strip() for p in args.policies.split(",") if p.strip())
    if not policies or set(policies) - set(POLICIES):
        parser.error(f"--policies: each must be one of {POLICIES}, got {args.policies!r}")
    if not 0 < args.device_kv_fraction <= 1:
        parser.error(f"--device-kv-fraction: must be in (0, 1], got {args.device_kv_fraction}")
    if min(args.arrival_rate, args.apex_tpot_target_ms, args.apex_tpot_from_gpu_only) < 0:
        parser.error("--arrival-rate, --apex-tpot-target-ms and --apex-tpot-from-gpu-only must be >= 0")
    if args.apex_tpot_from_gpu_only and (args.apex_tpot_target_ms or "gpu-only" not in policies):
        parser.error("--apex-tpot-from-gpu-only: needs gpu-only among --policies and no --apex-tpot-target-ms")
    flags = Flags(policies, args.arrival_rate, args.seed, args.device_kv_fraction, args.apex_tpot_target_ms,
                  args.apex_tpot_from_gpu_only)
    preset = PRESETS["quick" if args.quick else "tiny" if args.tiny else "full"]
    result = run(preset, flags, args.profile_dir)
    logger.info("policies side by side (tok/s over gpu-only; TPOT/TTFT in ms)\n%s", report(result))
    write_result(args.out, result)
    failed = [p for w in result["workloads"].values() for p, r in w["policies"].items() if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
