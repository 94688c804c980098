"""Cost-model accuracy: profile a real gpu_worker + cpu_attention_worker pair through the profiler
service, then run a few hundred real iterations per mode over gRPC with random mixes of prefill, GPU decode and CPU
decode rows, and compare the TableCostModel's prediction of each iteration with the worker's measured total_ns.
Reported per mode: mean absolute percentage error of the raw table prediction (before online correction) and of
the corrected prediction handed out before each iteration (after), plus the corrected error over the second half.
Device worker on the first core, cpu_attention_worker on the second (DESIGN §6)."""

import argparse
import json
import logging
import random
import tempfile
from collections.abc import Sequence
from pathlib import Path

import grpc

from apex_serve import convert, rpc
from apex_serve.logs import configure_logging
from apex_serve.types import ExecutionMode, Placement, StepOutput, StepPlan, WorkerInfo
from apex_serve.v1 import gpu_worker_pb2, gpu_worker_pb2_grpc, profiler_pb2, profiler_pb2_grpc
from apex_tools.bench.common import write_result
from apex_tools.bench.scripted_scheduler import ScriptedScheduler
from apex_tools.default_model import DEFAULT_SPEC, write_random_llama
from apex_tools.processes import ServiceGroup, split_cores
from scheduler_service.cost.model import TableCostModel
from scheduler_service.cost.shape import IterationShape, SubBatchShape, model_shape_from_config
from scheduler_service.cost.tables import PerformanceTables

logger = logging.getLogger(__name__)
MAX_RUNNING = 24


class RemoteRunner:
    """A gpu_worker process behind gRPC, as the StepRunner of a ScriptedScheduler (info, execute)."""

    def __init__(self, address: str) -> None:
        self._channel = grpc.insecure_channel(address)
        self._stub = gpu_worker_pb2_grpc.GpuWorkerStub(self._channel)
        reply = self._stub.GetWorkerInfo(gpu_worker_pb2.GetWorkerInfoRequest())
        self.info: WorkerInfo = convert.worker_info_from_pb(reply)

    def execute(self, plan: StepPlan) -> StepOutput:
        return convert.step_output_from_pb(self._stub.Step(convert.plan_to_pb(plan)))

    def close(self) -> None:
        self._channel.close()


def iteration_shape(plan: StepPlan, scheduler: ScriptedScheduler) -> IterationShape:
    """What the plan runs, in the cost model's terms (before the step: the tracked token counts are current)."""
    count = 2 if plan.mode is ExecutionMode.ASYM_PIPELINE else 1
    prefill: list[list[int]] = [[] for _ in range(count)]
    rows = [{Placement.GPU: 0, Placement.CPU: 0} for _ in range(count)]
    kv = [{Placement.GPU: 0, Placement.CPU: 0} for _ in range(count)]
    for new in plan.new_requests:
        prefill[new.sub_batch].append(len(new.token_ids))
    longest = [0] * count  # the device's torch decode attention pads its rows to the longest context
    for cached in plan.cached_requests:
        request = scheduler.requests[cached.request_id]
        rows[cached.sub_batch][request.placement] += 1
        kv[cached.sub_batch][request.placement] += request.num_tokens
        if request.placement is Placement.GPU:
            longest[cached.sub_batch] = max(longest[cached.sub_batch], request.num_tokens)
    for s in range(count):
        kv[s][Placement.GPU] = rows[s][Placement.GPU] * longest[s]
    sub_batches = tuple(
        SubBatchShape(tuple(prefill[s]), rows[s][Placement.GPU], kv[s][Placement.GPU], rows[s][Placement.CPU],
                      kv[s][Placement.CPU])
        for s in range(count) if prefill[s] or rows[s][Placement.GPU] or rows[s][Placement.CPU]
    )
    return IterationShape(plan.mode, sub_batches)


def run_mode(
    runner: RemoteRunner, model: TableCostModel, mode: ExecutionMode, iterations: int, seed: int
) -> tuple[list[float], list[float]]:
    """Random arrivals (prompts of 8-256 tokens), random placements and sub-batches, outputs of 4-64 tokens.
    Returns the relative errors of the raw and of the corrected prediction, one per iteration."""
    raw_errors: list[float] = []
    corrected_errors: list[float] = []
    rng = random.Random(seed)
    scheduler = ScriptedScheduler(runner, seed=seed)
    targets: dict[str, int] = {}
    hybrid = mode is not ExecutionMode.GPU_ONLY
    for step in range(iterations):
        for rid in [r for r, t in scheduler.requests.items() if len(t.outputs) >= targets[r]]:
            scheduler.finish(rid)
        arrivals = rng.choice((0, 0, 0, 1, 1, 2)) if len(scheduler.requests) < MAX_RUNNING else 0
        for i in range(arrivals):
            rid = f"{mode.value}-{step}-{i}"
            placement = rng.choice((Placement.GPU, Placement.CPU)) if hybrid else Placement.GPU
            sub_batch = rng.randrange(2) if mode is ExecutionMode.ASYM_PIPELINE else 0
            scheduler.add(rid, [256] + [rng.randrange(256) for _ in range(rng.randint(7, 255))], placement, sub_batch)
            targets[rid] = rng.randint(4, 64)
        if not scheduler.requests:
            continue
        plan = scheduler.plan(mode)
        shape = iteration_shape(plan, scheduler)
        raw, predicted = model.predict_raw(shape), model.predict(shape)
        output = scheduler.run(plan)
        measured = output.timings.total_ns
        raw_errors.append((raw.total_ns - measured) / measured)
        corrected_errors.append((predicted.total_ns - measured) / measured)
        model.observe(shape, predicted, output.timings)
    for rid in list(scheduler.requests):
        scheduler.finish(rid)
    scheduler.run(scheduler.plan(mode))  # frees the rest on the worker
    return raw_errors, corrected_errors


def report(stats: dict) -> str:
    lines = [f"{'mode':<15}{'iterations':>11}{'MAPE before':>13}{'MAPE after':>12}{'after, 2nd half':>17}"]
    for mode, row in stats.items():
        lines.append(f"{mode:<15}{row['count']:>11}{row['raw_mape']:>13.1%}{row['corrected_mape']:>12.1%}"
                     f"{row['corrected_mape_second_half']:>17.1%}")
    return "\n".join(lines)


def _mape(errors: list[float]) -> float:
    return sum(abs(e) for e in errors) / max(len(errors), 1)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="apex-serve bench-cost-model", description=__doc__)
    parser.add_argument("--iterations", type=int, default=300, help="iterations per mode")
    parser.add_argument("--full-profile", action="store_true", help="the full grid (default: the quick one)")
    parser.add_argument("--out", default="bench_results/cost_model.json")
    args = parser.parse_args(argv)
    configure_logging("bench-cost-model")
    device_cpus, worker_cpus = split_cores(device=1, host=1)
    with (tempfile.TemporaryDirectory(prefix="apx-cm-", dir="/tmp") as tmp,
          ServiceGroup(stop_timeout_s=30.0) as services):
        run_dir = Path(tmp)
        model_dir = write_random_llama(run_dir / DEFAULT_SPEC.name, DEFAULT_SPEC)
        cpu, gpu, prof = (rpc.unix_address(run_dir, name) for name in ("cpu", "gpu", "profiler"))
        cpu_args = ["--address", cpu, "--num-threads", "1", "--kv-budget-bytes", str(256 * 2**20)]
        gpu_args = ["--model-dir", str(model_dir), "--address", gpu, "--device", "cpu", "--num-threads", "1",
                    "--cpu-worker-address", cpu]
        prof_args = ["--address", prof, "--gpu-worker-address", gpu, "--cpu-worker-address", cpu,
                     "--profile-dir", str(run_dir / "profiles")]
        started = [services.spawn("cpu_attention_worker", cpu, cpu_args, worker_cpus),
                   services.spawn("gpu_worker", gpu, gpu_args, device_cpus),
                   services.spawn("profiler_service", prof, prof_args)]
        for service in started:
            services.wait_serving(service, 120.0)
        with grpc.insecure_channel(prof) as channel:
            stub = profiler_pb2_grpc.ProfilerStub(channel)
            for progress in stub.Profile(profiler_pb2.ProfileRequest(quick=not args.full_profile)):
                if progress.stage == "done":
                    logger.info("profiled %d points", progress.total)
            profile = json.loads(stub.GetPerformanceModel(profiler_pb2.GetPerformanceModelRequest()).tables_json)
        config = json.loads((model_dir / "config.json").read_text())
        runner = RemoteRunner(gpu)
        cost_model = TableCostModel(PerformanceTables.from_json(profile), model_shape_from_config(config))
        stats = {}
        for seed, mode in enumerate(ExecutionMode):
            raw, corrected = run_mode(runner, cost_model, mode, args.iterations, seed)
            stats[mode.value] = {
                "count": len(raw), "raw_mape": _mape(raw), "corrected_mape": _mape(corrected),
                "corrected_mape_second_half": _mape(corrected[len(corrected) // 2 :]),
            }
        runner.close()
    result = {"iterations_per_mode": args.iterations, "profile_grid": profile["grid"], "modes": stats}
    logger.info("cost model: predicted against measured iteration time\n%s", report(stats))
    write_result(args.out, result)
    return 0
