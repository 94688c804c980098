"""Decision overhead of the scheduler core: schedule() and update_from_output() wall time per iteration,
p50/p99, for each policy with 256 running requests. The cost model is the analytic one of a T4 with LLaMA-2-7B
shapes whose host reads 40x faster than a real one: every CPU row then pays for itself, so the hybrid policies admit
all 256 requests, half of them on the CPU (the pools are sized so; gpu-only gets an accelerator pool for all 256), and
the CPU candidates exceed what one iteration stages, so rotation, row sizing and the eq. 6 gate all run. Fabricated
step results: every scheduled request gets one token; requests run long enough that none finishes during the
measurement, so each iteration sees the same 256 running (block growth, new-block deltas, evictions and rotation
still happen). Each iteration runs as the engine loop runs it: schedule(), update_from_output() with the cost
model's fit left for later (it includes the corrected prediction of the step, made off the decision path), and
refine(), which the engine loop calls once the next step is sent: the fit, in its own column."""

import argparse
import logging
import time
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from apex_serve.logs import configure_logging
from apex_serve.types import SamplingParams, StepOutput, StepTimings, WorkerInfo
from apex_tools.bench.common import write_result
from apex_tools.sim.hardware import T4
from scheduler_service.config import POLICIES, SchedulerConfig
from scheduler_service.cost.analytic import AnalyticCostModel
from scheduler_service.cost.shape import ModelShape
from scheduler_service.scheduler import Scheduler

logger = logging.getLogger(__name__)
LLAMA2_7B = ModelShape(num_layers=32, hidden_size=4096, intermediate_size=11008, num_q_heads=32, num_kv_heads=32,
                       head_dim=128, vocab_size=32000)
BLOCK_SIZE = 16
FAST_HOST_T4 = replace(T4, name="T4, 40x host bandwidth", host_dram_bytes_per_s=40 * T4.host_dram_bytes_per_s)


def measure(policy: str, running: int, prompt_len: int, iterations: int, warmup: int) -> dict:
    blocks_per_request = -(-(prompt_len + warmup + iterations + 2) // BLOCK_SIZE)
    on_gpu = running if policy == "gpu-only" else running // 2  # gpu-only runs them all from the accelerator pool
    info = WorkerInfo(
        model_name="llama-2-7b", num_layers=32, vocab_size=32000, max_model_len=4096, eos_token_ids=(2,),
        block_size=BLOCK_SIZE, num_kv_blocks=on_gpu * blocks_per_request + 1, device="sim", dtype="float16",
        num_cpu_kv_blocks=running * blocks_per_request, cpu_max_rows=running // 2,
    )
    cost_model = None if policy == "gpu-only" else AnalyticCostModel(FAST_HOST_T4, LLAMA2_7B)
    config = SchedulerConfig(policy=policy, max_num_seqs=running, max_num_batched_tokens=running * prompt_len,
                             max_sit_out=8)
    scheduler = Scheduler(config, info, cost_model)
    sampling = SamplingParams(temperature=0.0, max_tokens=warmup + iterations + 1, ignore_eos=True)
    for i in range(running):
        scheduler.add_request(f"r{i}", [7] * prompt_len, sampling)
    schedule_ns, update_ns, fit_ns = [], [], []
    for step in range(warmup + iterations):
        t0 = time.perf_counter_ns()
        plan = scheduler.schedule()
        t1 = time.perf_counter_ns()
        sampled = {r.request_id: 7 for r in scheduler.in_flight.sampling()}
        t2 = time.perf_counter_ns()
        output = StepOutput(plan.step_id, sampled, StepTimings(total_ns=50_000_000))
        scheduler.update_from_output(plan, output, fit_later=True)
        t3 = time.perf_counter_ns()
        scheduler.refine()
        t4 = time.perf_counter_ns()
        if step >= warmup:
            schedule_ns.append(t1 - t0)
            update_ns.append(t3 - t2)
            fit_ns.append(t4 - t3)
    stats = scheduler.stats()
    if stats.num_running != running:
        raise RuntimeError(f"{policy}: {stats.num_running} running at the end, expected {running}")
    modes = {mode.value: n for mode, n in stats.iterations_by_mode.items()}
    last = stats.last_iteration
    return {
        "schedule_us_p50": float(np.percentile(schedule_ns, 50)) / 1e3,
        "schedule_us_p99": float(np.percentile(schedule_ns, 99)) / 1e3,
        "update_us_p50": float(np.percentile(update_ns, 50)) / 1e3,
        "update_us_p99": float(np.percentile(update_ns, 99)) / 1e3,
        "fit_us_p50": float(np.percentile(fit_ns, 50)) / 1e3,
        "modes": modes,
        "last_iteration_rows": {"gpu": last.gpu_rows, "cpu": last.cpu_rows},
    }


def report(result: dict) -> str:
    lines = [f"{'policy':<10}{'schedule p50 us':>16}{'p99':>8}{'update p50 us':>15}{'p99':>8}{'fit p50 us':>12}"
             "  rows gpu+cpu  modes"]
    for policy, row in result["policies"].items():
        rows = row["last_iteration_rows"]
        lines.append(f"{policy:<10}{row['schedule_us_p50']:>16.1f}{row['schedule_us_p99']:>8.1f}"
                     f"{row['update_us_p50']:>15.1f}{row['update_us_p99']:>8.1f}{row['fit_us_p50']:>12.1f}"
                     f"  {rows['gpu']:>4}+{rows['cpu']:<8}{row['modes']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="apex-serve bench-scheduler", description=__doc__)
    parser.add_argument("--running", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=500)
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--out", default="bench_results/scheduler_overhead.json")
    args = parser.parse_args(argv)
    configure_logging("bench-scheduler")
    result = {"running": args.running, "prompt_len": args.prompt_len, "iterations": args.iterations,
              "policies": {p: measure(p, args.running, args.prompt_len, args.iterations, args.warmup)
                           for p in POLICIES}}
    logger.info("scheduler decision overhead, %d running requests\n%s", args.running, report(result))
    write_result(args.out, result)
    return 0
