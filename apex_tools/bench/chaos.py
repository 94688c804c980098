"""Chaos benchmark: SIGKILL one service of a supervised stack with --streams greedy streams in flight (a third of
their tokens streamed), and time how the stack answers.

- gpu_worker, scheduler_service: every stream in flight must end with UNAVAILABLE. Measured: the time from the kill
  until the last of them ended, and until a new request (a probe of --probe-tokens tokens, sent every 50 ms) completes
  again, the restarted service serving it.
- cpu_attention_worker: no stream may fail. Measured: the time from the kill until every stream still running has
  received a token again (resumed), until every stream completed (each with exactly its max_tokens), and until the
  restarted worker's pool is attached again and the scheduler places on it (re-attached).
- After the last kill: the data-plane segments the cpu_attention_worker holds, against before the first (a data
  plane left behind by a killed gpu_worker or a lost pool shows as more).

The stack: the random model (--model tiny or bench) on `apex-serve up`'s five services under Stack.supervise, policy
apex, the accelerator's KV pool sized to hold about half of the streams at the kill (the others live on the CPU pool
then, reported as cpu_resident_at_kill). Anchors from the same run, before any fault: the latency of one probe
request and the time the undisturbed streams take. A stream still running 2 x --recovery-timeout-s after it started
ends DEADLINE_EXCEEDED (a hang, never an answer).

Each target is hit --repeats times; the table and the JSON's summary give medians, the JSON each trial too; the exit
code is 1 when a kill was not answered as above. The supervision doubles a service's restart delay for each exit
within a minute of its last start, so back-to-back kills of one target measure growing delays; --rest-s 60 measures
each kill from the first delay.
"""

import argparse
import asyncio
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import grpc

from apex_serve.logs import configure_logging
from apex_serve.types import SamplingParams
from apex_serve.v1 import gateway_pb2_grpc
from apex_tools.bench.common import write_result
from apex_tools.bench.faults import (
    CPU_WORKER,
    GPU_WORKER,
    MODELS,
    SCHEDULER,
    StreamRecord,
    bench_stack,
    cpu_pool_back,
    generate,
    gpu_worker_address,
    kill,
    request_blocks,
    scheduler_address,
    scheduler_stats,
    segments_of,
    worker_info,
)
from apex_tools.launcher import Stack, StackConfig

logger = logging.getLogger(__name__)
TARGETS = (GPU_WORKER, SCHEDULER, CPU_WORKER)
PROBE_EVERY_S = 0.05
KILL_AT_FRACTION = 1 / 3  # of the streams' tokens received
POLL_S = 0.01


@dataclass(frozen=True)
class ChaosConfig:
    streams: int
    max_tokens: int
    repeats: int
    targets: tuple[str, ...]
    model: str
    probe_tokens: int
    recovery_timeout_s: float
    rest_s: float
    profile_dir: str

    def prompts(self) -> list[str]:
        return [f"Chaos stream {i}: tell me a long story about the number {i}." for i in range(self.streams)]

    def device_blocks(self) -> int:
        """About half of the streams' KV at the kill, and at least one whole stream's: once the accelerator's pool is
        full, apex swaps streams out to the CPU pool as they grow, so about half of them live there at the kill."""
        at_kill = [request_blocks(p, int(KILL_AT_FRACTION * self.max_tokens)) for p in self.prompts()]
        return max(sum(at_kill) // 2, request_blocks(max(self.prompts(), key=len), self.max_tokens))


def _seconds(ns: int) -> float:
    return ns / 1e9


async def _probe_until_ok(stub: gateway_pb2_grpc.GatewayStub, tokens: int, deadline_s: float) -> int | None:
    """Sends a probe request every PROBE_EVERY_S until one completes with its tokens; the perf_counter ns it completed
    at, None past deadline_s (perf_counter seconds)."""
    sampling = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    while time.perf_counter() < deadline_s:
        record = await generate(stub, "probe", sampling, timeout_s=max(0.1, deadline_s - time.perf_counter()))
        if record.completed and len(record.token_ids) == tokens:
            return record.ended_ns
        await asyncio.sleep(PROBE_EVERY_S)
    return None


class _Burst:
    """The streams of one trial, running as tasks, with the tokens each received so far."""

    def __init__(self, stub: gateway_pb2_grpc.GatewayStub, config: ChaosConfig) -> None:
        sampling = SamplingParams(temperature=0.0, max_tokens=config.max_tokens, ignore_eos=True)
        self.received = [0] * config.streams
        self.tasks = [asyncio.create_task(generate(stub, prompt, sampling, timeout_s=2 * config.recovery_timeout_s,
                                                   on_tokens=self._counter(i)))
                      for i, prompt in enumerate(config.prompts())]

    def _counter(self, i: int) -> Callable[[int], None]:
        def add(count: int) -> None:
            self.received[i] += count
        return add

    async def at_kill_point(self, max_tokens: int) -> None:
        """Returns once every stream has received a token and all together KILL_AT_FRACTION of their tokens;
        RuntimeError if a stream ended before."""
        while not all(self.received) or sum(self.received) < KILL_AT_FRACTION * max_tokens * len(self.received):
            if any(t.done() for t in self.tasks):
                raise RuntimeError("a stream ended before the kill point")
            await asyncio.sleep(POLL_S)

    async def records(self) -> list[StreamRecord]:
        return list(await asyncio.gather(*self.tasks))


async def _kill_control_plane(stack: Stack, config: ChaosConfig, target: str) -> dict:
    """One trial against the gpu_worker or the scheduler."""
    async with grpc.aio.insecure_channel(stack.config.gateway_address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        burst = _Burst(stub, config)
        await burst.at_kill_point(config.max_tokens)
        old_pid = stack.pid(target)
        killed = kill(old_pid)
        records = await burst.records()
        recovered = await _probe_until_ok(stub, config.probe_tokens, time.perf_counter() + config.recovery_timeout_s)
    cut = [r for r in records if not r.completed]
    return {
        "in_flight": len(records),
        "ended_unavailable": sum(r.error_code == "UNAVAILABLE" for r in cut),
        "other_endings": sorted({r.error_code or "completed" for r in records if r.error_code != "UNAVAILABLE"}),
        "all_ended_s": _seconds(max(r.ended_ns for r in records) - killed),
        "new_request_ok_s": None if recovered is None else _seconds(recovered - killed),
        "restarted": stack.pid(target) != old_pid,
    }


async def _kill_cpu_worker(stack: Stack, config: ChaosConfig) -> dict:
    """One trial against the cpu_attention_worker."""
    async with grpc.aio.insecure_channel(stack.config.gateway_address) as channel, \
            grpc.aio.insecure_channel(scheduler_address(stack)) as scheduler, \
            grpc.aio.insecure_channel(gpu_worker_address(stack)) as worker:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        generation = (await worker_info(worker)).cpu_pool_generation
        burst = _Burst(stub, config)
        await burst.at_kill_point(config.max_tokens)
        cpu_resident = (await scheduler_stats(scheduler)).num_running_cpu
        old_pid = stack.pid(CPU_WORKER)
        killed = kill(old_pid)
        reattached = asyncio.create_task(_reattached_at(stack, generation, config.recovery_timeout_s))
        records = await burst.records()
        reattached_ns = await reattached
    running = [r for r in records if sum(t <= killed for t in r.token_ns) < config.max_tokens]  # at the kill
    resumed = [next((t for t in r.token_ns if t > killed), None) for r in running]
    completed = [r.completed and len(r.token_ids) == config.max_tokens for r in records]
    return {
        "in_flight": len(records),
        "cpu_resident_at_kill": cpu_resident,
        "resumed_s": None if None in resumed or not resumed else _seconds(max(resumed) - killed),
        "completed": sum(completed),
        "errors": sorted({r.error_code for r in records if r.error_code}),
        "all_completed_s": _seconds(max(r.ended_ns for r in records) - killed),
        "reattached_s": None if reattached_ns is None else _seconds(reattached_ns - killed),
    }


async def _reattached_at(stack: Stack, generation: int, timeout_s: float) -> int | None:
    """The perf_counter ns the CPU pool was seen back past `generation`; None after timeout_s."""
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        if await cpu_pool_back(stack, generation):
            return time.perf_counter_ns()
        await asyncio.sleep(POLL_S)
    return None


async def _anchors(stack: Stack, config: ChaosConfig) -> dict:
    """The undisturbed latency of a probe, and of the streams of a trial (which also warms the stack up)."""
    async with grpc.aio.insecure_channel(stack.config.gateway_address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        started = time.perf_counter_ns()
        records = await _Burst(stub, config).records()
        burst_s = _seconds(time.perf_counter_ns() - started)
        if not all(r.completed for r in records):
            raise RuntimeError(f"the undisturbed streams failed: {sorted({r.error_code for r in records})}")
        probes = []
        for _ in range(5):
            started = time.perf_counter_ns()
            ok = await _probe_until_ok(stub, config.probe_tokens, time.perf_counter() + config.recovery_timeout_s)
            if ok is None:
                raise RuntimeError("the undisturbed probe request did not complete")
            probes.append(_seconds(ok - started))
    return {"undisturbed_streams_s": burst_s, "probe_request_s": statistics.median(probes)}


async def _settled(stack: Stack, timeout_s: float) -> None:
    """Waits until the scheduler runs and queues nothing and the CPU pool is attached (the next trial starts clean)."""
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        if await cpu_pool_back(stack, 0):
            async with grpc.aio.insecure_channel(scheduler_address(stack)) as scheduler:
                stats = await scheduler_stats(scheduler)
            if stats.num_running == stats.num_waiting == 0:
                return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"the stack did not settle within {timeout_s:.0f} s")


async def _trials(stack: Stack, config: ChaosConfig) -> dict:
    result: dict = {"anchors": await _anchors(stack, config), "trials": {t: [] for t in config.targets}}
    segments_before = len(segments_of(stack.pid(CPU_WORKER)))
    for target in config.targets:
        for repeat in range(config.repeats):
            await _settled(stack, config.recovery_timeout_s)
            await asyncio.sleep(config.rest_s)
            if target == CPU_WORKER:
                trial = await _kill_cpu_worker(stack, config)
            else:
                trial = await _kill_control_plane(stack, config, target)
            logger.info("%s, repeat %d: %s", target, repeat + 1, trial)
            result["trials"][target].append(trial)
    await _settled(stack, config.recovery_timeout_s)
    result["cpu_worker_segments"] = {"before": segments_before, "after": len(segments_of(stack.pid(CPU_WORKER)))}
    return result


def _median(values: list[float | None]) -> float | None:
    """The median, None when any trial did not get there."""
    reached = [v for v in values if v is not None]
    return statistics.median(reached) if reached and len(reached) == len(values) else None


def summarise(trials: dict[str, list[dict]]) -> dict[str, dict]:
    summary = {}
    for target, runs in trials.items():
        times = ("resumed_s", "all_completed_s", "reattached_s") if target == CPU_WORKER else (
            "all_ended_s", "new_request_ok_s")
        row: dict = {k: _median([r[k] for r in runs]) for k in times}
        if target == CPU_WORKER:
            row["completed"] = f"{sum(r['completed'] for r in runs)}/{sum(r['in_flight'] for r in runs)}"
        else:
            cut = sum(r["ended_unavailable"] for r in runs)
            row["ended_unavailable"] = f"{cut}/{sum(r['in_flight'] for r in runs)}"
        summary[target] = row
    return summary


def run(config: ChaosConfig) -> dict:
    logger.info("chaos: %d streams of %d tokens, %d repeats per target, model %s", config.streams, config.max_tokens,
                config.repeats, config.model)
    with bench_stack(config.model, config.device_blocks(), max(config.streams, StackConfig.max_num_seqs),
                     config.profile_dir) as stack:
        result = asyncio.run(_trials(stack, config))
    result["config"] = asdict(config) | {"device_kv_blocks": config.device_blocks()}
    result["summary"] = summarise(result["trials"])
    return result


def report(result: dict) -> str:
    def cell(row: dict, column: str) -> str:
        if column not in row:
            return "n/a"
        value = row[column]
        if value is None:
            return "not reached"
        return f"{value:.2f}" if isinstance(value, float) else str(value)

    columns = ("ended_unavailable", "all_ended_s", "new_request_ok_s", "completed", "resumed_s", "all_completed_s",
               "reattached_s")
    lines = [f"{'killed':<22}" + "".join(f"{c:>19}" for c in columns), "-" * (22 + 19 * len(columns))]
    for target, row in result["summary"].items():
        lines.append(f"{target:<22}" + "".join(f"{cell(row, c):>19}" for c in columns))
    a, shm = result["anchors"], result["cpu_worker_segments"]
    lines.append(f"undisturbed: probe request {a['probe_request_s']:.2f} s, "
                 f"the streams {a['undisturbed_streams_s']:.2f} s")
    lines.append(f"the cpu_attention_worker's /dev/shm segments: {shm['before']} before the kills, {shm['after']} "
                 f"after")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="apex-serve bench-chaos", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=16, help="greedy streams in flight at each kill")
    parser.add_argument("--max-tokens", type=int, default=256, help="tokens of each stream (ignore_eos)")
    parser.add_argument("--repeats", type=int, default=3, help="kills per target")
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma-separated, of " + ", ".join(TARGETS))
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny", help="the random model served")
    parser.add_argument("--probe-tokens", type=int, default=4, help="tokens of a probe request")
    parser.add_argument("--recovery-timeout-s", type=float, default=120.0,
                        help="seconds a recovery may take before the trial counts it as not recovered")
    parser.add_argument("--rest-s", type=float, default=0.0,
                        help="seconds the settled stack rests before each kill; 60 or more lets the supervision's "
                        "restart delay fall back to its first (0.5 s)")
    parser.add_argument("--profile-dir", default=StackConfig.profile_dir, help="performance profiles, reused")
    parser.add_argument("--out", default="bench_results/chaos.json")
    args = parser.parse_args(argv)
    configure_logging("bench-chaos")
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    if not targets or set(targets) - set(TARGETS):
        parser.error(f"--targets: each must be one of {TARGETS}, got {args.targets!r}")
    if min(args.streams, args.max_tokens, args.repeats, args.probe_tokens) < 1 or args.recovery_timeout_s <= 0:
        parser.error("--streams, --max-tokens, --repeats, --probe-tokens and --recovery-timeout-s must be positive")
    if args.rest_s < 0:
        parser.error(f"--rest-s: must be >= 0, got {args.rest_s}")
    config = ChaosConfig(args.streams, args.max_tokens, args.repeats, targets, args.model, args.probe_tokens,
                         args.recovery_timeout_s, args.rest_s, args.profile_dir)
    result = run(config)
    logger.info("chaos: medians over %d kills per target (s from the kill)\n%s", config.repeats, report(result))
    write_result(args.out, result)
    return 0 if recovered(result) else 1


def recovered(result: dict) -> bool:
    """Every kill was answered as it should be: every time reached, the control plane's streams cut with UNAVAILABLE,
    the cpu_attention_worker's streams all completed; and the cpu_attention_worker holds no more data-plane segments
    at the end than before the kills."""
    if result["cpu_worker_segments"]["after"] > result["cpu_worker_segments"]["before"]:
        return False
    for target, runs in result["trials"].items():
        for r in runs:
            times = [v for k, v in r.items() if k.endswith("_s")]
            answered = r["completed"] == r["in_flight"] if target == CPU_WORKER else (
                r["ended_unavailable"] == r["in_flight"])
            if None in times or not answered:
                return False
    return True


if __name__ == "__main__":
    raise SystemExit(main())
