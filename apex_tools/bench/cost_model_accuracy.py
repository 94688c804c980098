"""Cost-model accuracy: profile a real gpu_worker + cpu_attention_worker pair through the profiler
service, then run a few hundred real iterations per mode over gRPC with random mixes of prefill, GPU decode and CPU
decode rows, the steps of ASYNC_OVERLAP and ASYM_PIPELINE alternating between the fused and the split layout (the
plan naming it), so both layouts see the same requests and the same load of the machine; compare the
TableCostModel's prediction of each iteration with the worker's measured total_ns. Reported per mode and layout:
mean absolute percentage error of the raw table prediction (before online correction) and of the corrected
prediction handed out before each iteration (after), the corrected error over the second half, the measured time
over the raw prediction of the same shapes run fused (split against fused on one yardstick), and per subtask the
measured time over the raw prediction (summed over the steps), which names the subtask a raw error comes from.
Device worker on the first core, cpu_attention_worker on the second (DESIGN §6)."""

import argparse
import dataclasses
import json
import logging
import random
import tempfile
from collections.abc import Sequence
from pathlib import Path

import grpc

from apex_serve import convert, rpc
from apex_serve.logs import configure_logging
from apex_serve.types import ExecutionMode, OverlapLayout, Placement, StepOutput, StepPlan, StepTimings, WorkerInfo
from apex_serve.v1 import gpu_worker_pb2, gpu_worker_pb2_grpc, profiler_pb2, profiler_pb2_grpc
from apex_tools.bench.common import write_result
from apex_tools.bench.scripted_scheduler import ScriptedScheduler
from apex_tools.default_model import DEFAULT_SPEC, write_random_llama
from apex_tools.processes import ServiceGroup, split_cores
from scheduler_service.cost.model import Prediction, TableCostModel
from scheduler_service.cost.shape import IterationShape, SubBatchShape, model_shape_from_config
from scheduler_service.cost.tables import PerformanceTables
from scheduler_service.decision import device_kv_tokens

logger = logging.getLogger(__name__)
MAX_RUNNING = 24
LAYOUTS = {  # per mode, the layouts its steps alternate between; GPU_ONLY has no CPU rows, so no layout to tell apart
    ExecutionMode.GPU_ONLY: (OverlapLayout.FUSED,),
    ExecutionMode.ASYNC_OVERLAP: (OverlapLayout.FUSED, OverlapLayout.SPLIT),
    ExecutionMode.ASYM_PIPELINE: (OverlapLayout.FUSED, OverlapLayout.SPLIT),
}
SUBTASKS = ("linear", "device_attention", "staging", "cpu_attention", "wait", "step")


def case_name(mode: ExecutionMode, layout: OverlapLayout) -> str:
    return mode.value if mode is ExecutionMode.GPU_ONLY else f"{mode.value}/{layout.value}"


def subtask_pairs(raw: Prediction, timings: StepTimings, layers_linear_share: float) -> dict[str, tuple[float, float]]:
    """Per subtask (measured, raw prediction) in ns over the step: the layers' linear work, accelerator attention,
    staging, CPU attention, the accelerator's wait for the CPU (against the predicted exposed wait), and the step's
    time outside the layers' timed subtasks (preparation, sampling, final norm and lm head, the code between the
    subtasks; against t_step)."""
    layers = timings.device_linear_ns * layers_linear_share
    timed = layers + timings.device_attention_ns + timings.staging_ns + timings.wait_ns
    return {
        "linear": (layers, raw.linear_ns),
        "device_attention": (timings.device_attention_ns, raw.device_attention_ns),
        "staging": (timings.staging_ns, raw.staging_ns),
        "cpu_attention": (timings.cpu_attention_ns, raw.cpu_attention_ns),
        "wait": (timings.wait_ns, raw.exposed_wait_ns),
        "step": (timings.total_ns - timed, raw.step_overhead_ns),
    }


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
    gpu_contexts: list[list[int]] = [[] for _ in range(count)]
    for cached in plan.cached_requests:
        request = scheduler.requests[cached.request_id]
        rows[cached.sub_batch][request.placement] += 1
        kv[cached.sub_batch][request.placement] += request.num_tokens
        if request.placement is Placement.GPU:
            gpu_contexts[cached.sub_batch].append(request.num_tokens)
    for s in range(count):  # what the worker's decode kernel reads: each row's own context, or padded to the longest
        kv[s][Placement.GPU] = device_kv_tokens(gpu_contexts[s], scheduler.runner.info.paged_decode)
    sub_batches = tuple(
        SubBatchShape(tuple(prefill[s]), rows[s][Placement.GPU], kv[s][Placement.GPU], rows[s][Placement.CPU],
                      kv[s][Placement.CPU])
        for s in range(count) if prefill[s] or rows[s][Placement.GPU] or rows[s][Placement.CPU]
    )
    return IterationShape(plan.mode, sub_batches, plan.layout)


@dataclasses.dataclass
class CaseResult:
    """The steps of one (mode, layout): relative errors per iteration, per-subtask sums, and the measured total against
    the raw prediction of the same shapes run FUSED (a yardstick common to both layouts of a mode)."""

    raw_errors: list[float] = dataclasses.field(default_factory=list)
    corrected_errors: list[float] = dataclasses.field(default_factory=list)
    measured: dict[str, float] = dataclasses.field(default_factory=lambda: dict.fromkeys(SUBTASKS, 0.0))
    predicted: dict[str, float] = dataclasses.field(default_factory=lambda: dict.fromkeys(SUBTASKS, 0.0))
    measured_total_ns: float = 0.0
    fused_priced_ns: float = 0.0

    def summary(self) -> dict:
        errors = self.corrected_errors
        return {
            "count": len(self.raw_errors), "raw_mape": _mape(self.raw_errors), "corrected_mape": _mape(errors),
            "corrected_mape_second_half": _mape(errors[len(errors) // 2 :]),
            "raw_mean_error": sum(self.raw_errors) / max(len(self.raw_errors), 1),
            "measured_over_fused_priced": self.measured_total_ns / max(self.fused_priced_ns, 1.0),
            "subtasks_ns": {name: {"measured": self.measured[name], "raw_predicted": self.predicted[name]}
                            for name in SUBTASKS},
        }


def run_mode(runner: RemoteRunner, model: TableCostModel, mode: ExecutionMode, iterations: int, seed: int
             ) -> dict[OverlapLayout, CaseResult]:
    """Random arrivals (prompts of 8-256 tokens), random placements and sub-batches, outputs of 4-64 tokens; the
    executed steps alternate between the mode's layouts, so each layout sees the same requests and the same load of
    the machine."""
    layouts = LAYOUTS[mode]
    results = {layout: CaseResult() for layout in layouts}
    rng = random.Random(seed)
    scheduler = ScriptedScheduler(runner, seed=seed)
    targets: dict[str, int] = {}
    hybrid = mode is not ExecutionMode.GPU_ONLY
    share = model.model.layers_linear_share
    executed = 0
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
        layout = layouts[executed % len(layouts)]
        executed += 1
        plan = dataclasses.replace(scheduler.plan(mode), layout=layout)
        shape = iteration_shape(plan, scheduler)
        raw, predicted = model.predict_raw(shape), model.predict(shape)
        fused = model.predict_raw(dataclasses.replace(shape, layout=OverlapLayout.FUSED))
        output = scheduler.run(plan)
        measured = output.timings.total_ns
        result = results[layout]
        result.raw_errors.append((raw.total_ns - measured) / measured)
        result.corrected_errors.append((predicted.total_ns - measured) / measured)
        result.measured_total_ns += measured
        result.fused_priced_ns += fused.total_ns
        for name, (got, want) in subtask_pairs(raw, output.timings, share).items():
            result.measured[name] += got
            result.predicted[name] += want
        model.observe(shape, predicted, output.timings)
    for rid in list(scheduler.requests):
        scheduler.finish(rid)
    scheduler.run(scheduler.plan(mode))  # frees the rest on the worker
    return results


def report(stats: dict) -> str:
    """The error table, then per subtask the measured time over the raw prediction (summed over each run)."""
    header = (f"{'mode/layout':<22}{'iterations':>11}{'MAPE before':>13}{'MAPE after':>12}{'after, 2nd half':>17}"
              f"{'mean before':>13}{'measured / fused-priced':>25}")
    lines = [header]
    for name, row in stats.items():
        lines.append(f"{name:<22}{row['count']:>11}{row['raw_mape']:>13.1%}{row['corrected_mape']:>12.1%}"
                     f"{row['corrected_mape_second_half']:>17.1%}{row['raw_mean_error']:>+13.1%}"
                     f"{row['measured_over_fused_priced']:>25.3f}")
    lines.append("")
    lines.append(f"{'measured / raw prediction':<26}" + "".join(f"{name:>17}" for name in SUBTASKS))
    for name, row in stats.items():
        cells = []
        for subtask in SUBTASKS:
            ns = row["subtasks_ns"][subtask]
            ratio = ns["measured"] / ns["raw_predicted"] if ns["raw_predicted"] > 0 else None
            ms = f"{ns['measured'] / 1e6:.0f}/{ns['raw_predicted'] / 1e6:.0f}ms"
            cells.append(f"{'-' if ratio is None else f'{ratio:.2f}'} {ms}".rjust(17))
        lines.append(f"{name:<26}" + "".join(cells))
    return "\n".join(lines)


def _mape(errors: list[float]) -> float:
    return sum(abs(e) for e in errors) / max(len(errors), 1)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="apex-serve bench-cost-model", description=__doc__)
    parser.add_argument("--iterations", type=int, default=300,
                        help="iterations per mode (a hybrid mode's steps alternate fused and split)")
    parser.add_argument("--full-profile", action="store_true", help="the full grid (default: the quick one)")
    parser.add_argument("--profile-dir", default=None, help="reuse profiles stored here (default: a fresh one)")
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
                     "--profile-dir", args.profile_dir or str(run_dir / "profiles")]
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
        for seed, mode in enumerate(LAYOUTS):
            for layout, case in run_mode(runner, cost_model, mode, args.iterations, seed).items():
                stats[case_name(mode, layout)] = case.summary()
        runner.close()
    result = {"iterations_per_mode": args.iterations, "profile": profile, "runs": stats}
    logger.info("cost model: predicted against measured iteration time\n%s", report(stats))
    write_result(args.out, result)
    return 0
