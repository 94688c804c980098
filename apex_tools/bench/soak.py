"""Soak benchmark: a supervised stack under open-loop load for --duration-s, with random cancels and a SIGKILL of the
cpu_attention_worker every --kill-every-s, checked for what a long run wears down.

The stack: the random model (--model tiny or bench) on `apex-serve up`'s five services under Stack.supervise, policy
apex, the accelerator's KV pool holding about an eighth of --max-num-seqs requests halfway through their output (so
that, under load, many requests live on the CPU pool; --device-kv-blocks overrides). Requests: greedy, ignore_eos, a
random prompt of --prompt-bytes and a max_tokens drawn from --output-tokens (fixed seed), through the gateway's gRPC
Generate stream.

1. Capacity: a closed loop of --max-num-seqs clients, each sending its next request when the last one ends, for
   --capacity-s; capacity = requests completed per second (it also warms the stack up).
2. Load: Poisson arrivals at --load-fraction x capacity requests/s for --duration-s. A --cancel-fraction of the
   requests is cancelled by the client after a random number of tokens (1 .. max_tokens - 1). The
   cpu_attention_worker is killed (SIGKILL) at --first-kill-s and every --kill-every-s after, while the load runs,
   each kill waiting up to 5 s for a moment when requests live on the CPU pool; a kill has recovered once the
   supervision restarted the worker, the gpu_worker attached its pool again and the scheduler places on it again.
3. Drain: the requests still running get up to --request-timeout-s to end; then, once the CPU pool is back and the
   scheduler holds nothing, both KV pools must be free again (GetStats).

Every request ends as exactly one of: completed (its final message, with exactly max_tokens tokens), cancelled (by
this client), failed (a status the stack named: UNAVAILABLE, RESOURCE_EXHAUSTED, ...) or lost (anything else: a
stream that ended without its final message or with fewer tokens, one still running past its deadline or at the end,
an UNKNOWN status). The goal is lost == 0, and no failure caused by the kills.

Reported: requests sent / completed / cancelled / failed / lost; TTFT and TPOT p50/p99 of the completed requests with
the load they ran at (offered and achieved requests/s, mean running requests, of them on the CPU pool); the resident
memory (VmRSS) of every service sampled every --rss-every-s and its growth after warm-up (the first 10% of the load)
in %, in all and without shared memory (the CPU KV pool's pages count in VmRSS once touched), over each service's
current process: a restarted service's series starts again, and the report says so; the kills and their recoveries;
both pools' free blocks against their totals at the end. Table and JSON (--out); the exit code is 1 when a request
was lost, a kill did not recover or a block was not freed.
"""

import argparse
import asyncio
import logging
import math
import random
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import grpc
import numpy as np

from apex_serve.logs import configure_logging
from apex_serve.v1 import gateway_pb2_grpc
from apex_tools.bench.common import write_result
from apex_tools.bench.faults import (
    CPU_WORKER,
    MODELS,
    SERVICES,
    StreamRecord,
    bench_stack,
    cpu_pool_back,
    generate,
    gpu_worker_address,
    kill,
    memory_kib,
    request_blocks,
    scheduler_address,
    scheduler_stats,
    worker_info,
)
from apex_tools.bench.soak_report import passed, report, rss_growth
from apex_tools.bench.soak_workload import Request, Workload, outcome
from apex_tools.launcher import Stack, StackConfig

logger = logging.getLogger(__name__)
WARMUP_FRACTION = 0.1  # of the load phase, left out of the RSS growth
STATS_EVERY_S = 1.0
PROGRESS_EVERY_S = 10.0
RECOVERY_POLL_S = 0.1
KILL_AIM_S = 5.0  # a kill waits up to this long for requests on the CPU pool
KILL_AIM_POLL_S = 0.05


@dataclass(frozen=True)
class SoakConfig:
    duration_s: float = 1200.0
    load_fraction: float = 0.8
    cancel_fraction: float = 0.1
    kill_every_s: float = 300.0
    first_kill_s: float = 300.0
    capacity_s: float = 30.0
    rss_every_s: float = 10.0
    model: str = "tiny"
    max_num_seqs: int = 32
    device_kv_blocks: int = 0  # the accelerator's KV pool; 0: device_blocks() sizes it
    prompt_bytes: tuple[int, int] = (16, 64)
    output_tokens: tuple[int, int] = (16, 128)
    request_timeout_s: float = 120.0
    recovery_timeout_s: float = 120.0
    seed: int = 0
    profile_dir: str = StackConfig.profile_dir

    def __post_init__(self) -> None:
        if self.load_fraction <= 0:
            raise ValueError(f"load_fraction: must be > 0, got {self.load_fraction}")
        if not 0 <= self.cancel_fraction <= 1:
            raise ValueError(f"cancel_fraction: must be in [0, 1], got {self.cancel_fraction}")
        for name in ("duration_s", "kill_every_s", "first_kill_s", "capacity_s", "rss_every_s", "request_timeout_s",
                     "recovery_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        for name in ("prompt_bytes", "output_tokens"):
            low, high = getattr(self, name)
            if not 1 <= low <= high:
                raise ValueError(f"{name}: need 1 <= low <= high, got {low}..{high}")
        if self.max_num_seqs < 1 or self.device_kv_blocks < 0:
            raise ValueError(f"max_num_seqs must be >= 1 and device_kv_blocks >= 0, got {self.max_num_seqs} and "
                             f"{self.device_kv_blocks}")
        if self.output_tokens[0] < 2 and self.cancel_fraction > 0:
            raise ValueError("output_tokens: cancels need requests of at least 2 tokens")

    def kill_times_s(self) -> list[float]:
        """Offsets into the load phase at which the cpu_attention_worker is killed."""
        count = max(0, math.ceil((self.duration_s - self.first_kill_s) / self.kill_every_s))
        return [self.first_kill_s + k * self.kill_every_s for k in range(count)]

    def device_blocks(self) -> int:
        """device_kv_blocks, or (0) an eighth of max_num_seqs requests of the mean size halfway through their output,
        at least the largest request. Below capacity far fewer than max_num_seqs requests run (batching makes each
        step cheaper per row the fuller it is), so a pool for half of them would leave the CPU pool unused."""
        if self.device_kv_blocks:
            return self.device_kv_blocks
        prompt = "x" * ((self.prompt_bytes[0] + self.prompt_bytes[1]) // 2)
        halfway = request_blocks(prompt, (self.output_tokens[0] + self.output_tokens[1]) // 4)
        largest = request_blocks("x" * self.prompt_bytes[1], self.output_tokens[1])
        return max(self.max_num_seqs * halfway // 8, largest)


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


async def measure_capacity(stack: Stack, config: SoakConfig) -> dict:
    """Closed loop: max_num_seqs clients, back to back, for capacity_s; requests and tokens completed per second."""
    workload = Workload(config.prompt_bytes, config.output_tokens, config.seed + 1, 0.0)
    records: list[tuple[Request, StreamRecord]] = []
    async with grpc.aio.insecure_channel(stack.config.gateway_address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        started = time.perf_counter()

        async def client() -> None:
            while time.perf_counter() - started < config.capacity_s:
                request = workload.next()
                records.append((request, await generate(stub, request.prompt, request.sampling(),
                                                        timeout_s=config.request_timeout_s)))

        await asyncio.gather(*(client() for _ in range(config.max_num_seqs)))
        elapsed = time.perf_counter() - started
    completed = [r for q, r in records if outcome(q, r)[0] == "completed"]
    if not completed:
        endings = Counter(r.error_code for _, r in records)
        raise RuntimeError(f"no request completed while measuring capacity: {dict(endings)}")
    return {
        "requests_per_s": len(completed) / elapsed,
        "tokens_per_s": sum(len(r.token_ids) for r in completed) / elapsed,
        "concurrency": config.max_num_seqs,
        "seconds": elapsed,
        "not_completed": len(records) - len(completed),
    }


class Soak:
    """The load phase and what is sampled while it runs."""

    def __init__(self, stack: Stack, config: SoakConfig, rate: float) -> None:
        self.stack = stack
        self.config = config
        self.rate = rate
        self.requests: list[tuple[Request, asyncio.Task[StreamRecord]]] = []
        self.kills: list[dict] = []
        self.rss: dict[str, list[dict]] = {m: [] for m in SERVICES}
        self.stats_samples: list[dict] = []
        self.started = 0.0

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    async def run(self) -> None:
        self.started = time.perf_counter()
        async with grpc.aio.insecure_channel(self.stack.config.gateway_address) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            samplers = [asyncio.create_task(c) for c in (self._sample_rss(), self._sample_stats(), self._progress())]
            kills = [asyncio.create_task(self._kill_at(t)) for t in self.config.kill_times_s()]
            await self._arrivals(stub)
            tasks = [task for _, task in self.requests]
            if tasks:
                await asyncio.wait(tasks, timeout=self.config.request_timeout_s)
            for task in tasks:
                task.cancel()  # those still running are lost
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.gather(*kills)
            for sampler in samplers:
                sampler.cancel()
            await asyncio.gather(*samplers, return_exceptions=True)

    async def _arrivals(self, stub: gateway_pb2_grpc.GatewayStub) -> None:
        """Poisson arrivals at rate until duration_s."""
        workload = Workload(self.config.prompt_bytes, self.config.output_tokens, self.config.seed,
                            self.config.cancel_fraction)
        arrivals = random.Random(self.config.seed + 2)
        at = 0.0
        while True:
            at += arrivals.expovariate(self.rate)
            if at >= self.config.duration_s:
                return
            await asyncio.sleep(max(0.0, at - self.elapsed()))
            request = workload.next()
            task = asyncio.create_task(generate(stub, request.prompt, request.sampling(),
                                                cancel_after=request.cancel_after,
                                                timeout_s=self.config.request_timeout_s))
            self.requests.append((request, task))

    async def _kill_at(self, at_s: float) -> None:
        """SIGKILL to the cpu_attention_worker at at_s, or up to KILL_AIM_S later once requests live on the CPU pool;
        then waits for its recovery."""
        await asyncio.sleep(max(0.0, at_s - self.elapsed()))
        async with grpc.aio.insecure_channel(gpu_worker_address(self.stack)) as worker, \
                grpc.aio.insecure_channel(scheduler_address(self.stack)) as scheduler:
            generation = (await worker_info(worker)).cpu_pool_generation
            aim_until = time.perf_counter() + KILL_AIM_S
            while (running_cpu := (await scheduler_stats(scheduler)).num_running_cpu) == 0 \
                    and time.perf_counter() < aim_until:
                await asyncio.sleep(KILL_AIM_POLL_S)
        old_pid = self.stack.pid(CPU_WORKER)
        killed = kill(old_pid)
        kill_record = {"at_s": self.elapsed(), "old_pid": old_pid, "new_pid": None, "recovered": False,
                       "recovery_s": None, "running_cpu_at_kill": running_cpu}
        self.kills.append(kill_record)
        deadline = time.perf_counter() + self.config.recovery_timeout_s
        while time.perf_counter() < deadline:
            if self.stack.pid(CPU_WORKER) != old_pid and await cpu_pool_back(self.stack, generation):
                kill_record |= {"new_pid": self.stack.pid(CPU_WORKER), "recovered": True,
                                "recovery_s": (time.perf_counter_ns() - killed) / 1e9}
                logger.info("cpu_attention_worker back after %.2f s (pid %d)", kill_record["recovery_s"],
                            kill_record["new_pid"])
                return
            await asyncio.sleep(RECOVERY_POLL_S)
        logger.error("the cpu_attention_worker killed at %.0f s did not recover in %.0f s", kill_record["at_s"],
                     self.config.recovery_timeout_s)

    async def _sample_rss(self) -> None:
        while True:
            at = self.elapsed()
            for module in SERVICES:
                pid = self.stack.pid(module)
                if (kib := memory_kib(pid)) is not None:
                    self.rss[module].append({"t_s": at, "pid": pid, "rss_kib": kib[0], "shmem_kib": kib[1]})
            await asyncio.sleep(self.config.rss_every_s)

    async def _sample_stats(self) -> None:
        async with grpc.aio.insecure_channel(scheduler_address(self.stack)) as scheduler:
            while True:
                try:
                    stats = await scheduler_stats(scheduler)
                    self.stats_samples.append({"t_s": self.elapsed(), "running": stats.num_running,
                                               "running_cpu": stats.num_running_cpu, "waiting": stats.num_waiting,
                                               "degraded": stats.cpu_pool_degraded})
                except grpc.aio.AioRpcError as exc:
                    logger.warning("GetStats: %s", exc.code().name)
                await asyncio.sleep(STATS_EVERY_S)

    async def _progress(self) -> None:
        while True:
            await asyncio.sleep(PROGRESS_EVERY_S)
            ended = Counter(outcome(q, t.result())[0] for q, t in self.requests if t.done() and not t.cancelled())
            logger.info("%4.0f s: %d sent, %d running, %s; %d kills", self.elapsed(), len(self.requests),
                        len(self.requests) - sum(ended.values()), dict(ended), len(self.kills))


async def _final_stats(stack: Stack, timeout_s: float) -> dict:
    """The stack at the end: once the CPU pool is back and the scheduler runs and queues nothing (settled), or after
    timeout_s, both pools' free and total blocks and the scheduler's counters of the run, from GetStats."""
    deadline = time.perf_counter() + timeout_s
    async with grpc.aio.insecure_channel(scheduler_address(stack)) as scheduler:
        while True:
            stats = await scheduler_stats(scheduler)
            settled = stats.num_running == stats.num_waiting == 0 and await cpu_pool_back(stack, 0)
            if settled or time.perf_counter() > deadline:
                break
            await asyncio.sleep(RECOVERY_POLL_S)
    return {
        "settled": settled,
        "free": stats.num_free_blocks, "total": stats.num_total_blocks,
        "free_cpu": stats.num_free_cpu_blocks, "total_cpu": stats.num_total_cpu_blocks,
        "back_to_total": (stats.num_free_blocks == stats.num_total_blocks
                          and stats.num_free_cpu_blocks == stats.num_total_cpu_blocks > 0),
        "cpu_pool_degraded": stats.cpu_pool_degraded, "cpu_pool_losses": stats.cpu_pool_losses,
        "num_preemptions": stats.num_preemptions, "num_swaps": stats.num_swaps,
        "iterations_by_mode": dict(stats.iterations_by_mode),
    }


def summarise(config: SoakConfig, capacity: dict, soak: Soak, final: dict) -> dict:
    outcomes = [(q, t.result() if t.done() and not t.cancelled() else None) for q, t in soak.requests]
    kinds = [outcome(q, r) for q, r in outcomes]
    counts = Counter(kind for kind, _ in kinds)
    completed = [r for (_, r), (kind, _) in zip(outcomes, kinds, strict=True) if kind == "completed"]
    ttft = [r.ttft_ms for r in completed if r.ttft_ms is not None]
    tpot = [r.tpot_ms for r in completed if r.tpot_ms is not None]
    under_load = [s for s in soak.stats_samples if s["t_s"] < config.duration_s]
    running = [s["running"] for s in under_load]
    running_cpu = [s["running_cpu"] for s in under_load]
    return {
        "config": asdict(config) | {"device_kv_blocks": config.device_blocks()},
        "capacity": capacity,
        "load": {
            "load_fraction": config.load_fraction,
            "offered_requests_per_s": soak.rate,
            "achieved_requests_per_s": counts["completed"] / config.duration_s,
            "mean_running": statistics.fmean(running) if running else None,
            "mean_running_cpu": statistics.fmean(running_cpu) if running_cpu else None,
            "max_running_cpu": max(running_cpu, default=None),
        },
        "requests": {
            "sent": len(outcomes), "completed": counts["completed"], "cancelled": counts["cancelled"],
            "failed": counts["failed"], "lost": counts["lost"],
            "failed_by_error": dict(Counter(why for kind, why in kinds if kind == "failed")),
            "lost_by_reason": dict(Counter(why for kind, why in kinds if kind == "lost")),
        },
        "latency": {
            "ttft_p50_ms": _percentile(ttft, 50), "ttft_p99_ms": _percentile(ttft, 99),
            "tpot_p50_ms": _percentile(tpot, 50), "tpot_p99_ms": _percentile(tpot, 99),
            "requests": len(completed),
        },
        "kills": soak.kills,
        "num_kills": len(soak.kills),
        "num_recoveries": sum(k["recovered"] for k in soak.kills),
        "rss": {m: rss_growth(s, WARMUP_FRACTION * config.duration_s) for m, s in soak.rss.items()},
        "end": final,
    }


async def _soak(stack: Stack, config: SoakConfig) -> dict:
    capacity = await measure_capacity(stack, config)
    rate = config.load_fraction * capacity["requests_per_s"]
    logger.info("capacity %.2f requests/s (%.0f tokens/s) with %d clients; load %.2f requests/s for %.0f s, "
                "kills at %s", capacity["requests_per_s"], capacity["tokens_per_s"], config.max_num_seqs, rate,
                config.duration_s, ", ".join(f"{t:.0f} s" for t in config.kill_times_s()) or "none")
    soak = Soak(stack, config, rate)
    await soak.run()
    final = await _final_stats(stack, config.recovery_timeout_s)
    return summarise(config, capacity, soak, final)


def run(config: SoakConfig) -> dict:
    with bench_stack(config.model, config.device_blocks(), config.max_num_seqs, config.profile_dir) as stack:
        return asyncio.run(_soak(stack, config))


def _range(text: str) -> tuple[int, int]:
    low, _, high = text.partition("..")
    return int(low), int(high or low)


def main(argv: Sequence[str] | None = None) -> int:
    defaults = SoakConfig()
    parser = argparse.ArgumentParser(prog="apex-serve bench-soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration-s", type=float, default=defaults.duration_s, help="seconds of load")
    parser.add_argument("--load-fraction", type=float, default=defaults.load_fraction,
                        help="arrival rate over the measured capacity")
    parser.add_argument("--cancel-fraction", type=float, default=defaults.cancel_fraction,
                        help="requests the client cancels at a random token")
    parser.add_argument("--kill-every-s", type=float, default=defaults.kill_every_s,
                        help="seconds between SIGKILLs of the cpu_attention_worker")
    parser.add_argument("--first-kill-s", type=float, default=None,
                        help="the first kill (default: --kill-every-s); at or past --duration-s: no kill")
    parser.add_argument("--capacity-s", type=float, default=defaults.capacity_s,
                        help="seconds of the closed-loop capacity run")
    parser.add_argument("--rss-every-s", type=float, default=defaults.rss_every_s, help="seconds between RSS samples")
    parser.add_argument("--model", choices=sorted(MODELS), default=defaults.model, help="the random model served")
    parser.add_argument("--max-num-seqs", type=int, default=defaults.max_num_seqs,
                        help="requests the scheduler runs at once, and the clients of the capacity run")
    parser.add_argument("--device-kv-blocks", type=int, default=defaults.device_kv_blocks,
                        help="blocks of the accelerator's KV pool; 0: an eighth of --max-num-seqs requests halfway "
                        "through their output (most requests then live on the CPU pool)")
    parser.add_argument("--prompt-bytes", type=_range, default=defaults.prompt_bytes, metavar="LOW..HIGH")
    parser.add_argument("--output-tokens", type=_range, default=defaults.output_tokens, metavar="LOW..HIGH")
    parser.add_argument("--request-timeout-s", type=float, default=defaults.request_timeout_s,
                        help="a request still running after this long is lost (hung)")
    parser.add_argument("--recovery-timeout-s", type=float, default=defaults.recovery_timeout_s,
                        help="seconds a kill may take to recover")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--profile-dir", default=defaults.profile_dir, help="performance profiles, reused")
    parser.add_argument("--out", default="bench_results/soak.json")
    args = parser.parse_args(argv)
    configure_logging("bench-soak")
    try:
        config = SoakConfig(
            duration_s=args.duration_s, load_fraction=args.load_fraction, cancel_fraction=args.cancel_fraction,
            kill_every_s=args.kill_every_s,
            first_kill_s=args.kill_every_s if args.first_kill_s is None else args.first_kill_s,
            capacity_s=args.capacity_s, rss_every_s=args.rss_every_s, model=args.model,
            max_num_seqs=args.max_num_seqs, device_kv_blocks=args.device_kv_blocks, prompt_bytes=args.prompt_bytes,
            output_tokens=args.output_tokens,
            request_timeout_s=args.request_timeout_s, recovery_timeout_s=args.recovery_timeout_s, seed=args.seed,
            profile_dir=args.profile_dir,
        )
    except ValueError as exc:
        parser.error(str(exc))
    result = run(config)
    logger.info("soak: %.0f s at %.2f of capacity\n%s", config.duration_s, config.load_fraction, report(result))
    write_result(args.out, result)
    return 0 if passed(result) else 1


if __name__ == "__main__":
    raise SystemExit(main())
