"""Tracing overhead and the overlap report from a real run.

The stack of `bench-policies` (the bench model on a gpu_worker pinned to the first core, the cpu_attention_worker on
the second, apex's scheduler, a device KV pool of 10% of the decode-heavy working set so that most rows run on the
CPU) serves the decode-heavy workload several times, alternating tracing off and on in ABBA order (off, on, on, off,
...) so that a drift of the shared machine weighs on both alike:

- off: no OTEL_* variable (OTEL_SDK_DISABLED=true), --sample-layers-every 0: no interceptor, no span, no per-layer
  timing;
- on: OTLP export of every service to a receiver in this process, --sample-layers-every 16.

Measured per run: output tokens/s (all tokens / first submit to last token, the workload is decode-bound). Reported:
the median of each side and their ratio (target >= 0.97). Then the traced runs' spans are written as OTLP JSON and
`apex-serve trace-report` renders them; per sampled iteration with CPU rows, the overlap computed from the subtask
intervals is compared with the one the Step timings give for the same iteration.

Beside it, without the stack and free of the machine's noise: the scheduler's CPU time per iteration for its spans
(apex_tools/bench/span_cost.py), to set against the measured iteration time.
"""

import argparse
import asyncio
import logging
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

from apex_serve.logs import configure_logging
from apex_tools.bench import serving_stack as bench
from apex_tools.bench import span_cost
from apex_tools.bench.common import write_result
from apex_tools.otlp_receiver import OtlpReceiver
from apex_tools.trace_report import cli as trace_report
from apex_tools.trace_report.iterations import build_iterations
from apex_tools.trace_report.otlp import read_otlp_json

logger = logging.getLogger(__name__)
SAMPLE_EVERY = 16
OFF_ENV = {"OTEL_SDK_DISABLED": "true"}


def _on_env(receiver: OtlpReceiver) -> dict[str, str]:
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{receiver.address}", "OTEL_EXPORTER_OTLP_INSECURE": "true"}


def run_once(stack: bench.BenchStack, model_dir: Path, preset: bench.Preset, traced: bool, env: dict[str, str],
             index: int) -> dict:
    workload = preset.workloads[0]
    worker = bench.start_gpu_worker(stack, model_dir, bench.device_blocks(workload, 0.1), preset, env)
    try:
        scheduler = stack.start("scheduler_service", "scheduler", [
            "--worker-address", stack.address("gpu"), "--policy", "apex", "--max-num-seqs", str(preset.max_num_seqs),
            "--profiler-address", stack.address("profiler"),
            "--sample-layers-every", str(SAMPLE_EVERY if traced else 0),
        ], env=env)
        try:
            requests = workload.requests()
            start_ns, results = asyncio.run(bench.submit_all(
                stack.address("scheduler"), f"run{index}", requests, [0.0] * len(requests)))
            stats = bench.scheduler_stats(stack.address("scheduler"))
        finally:
            stack.services.stop(scheduler)
    finally:
        stack.services.stop(worker)
    row = bench.metrics(start_ns, results, [n for _, n in requests])
    logger.info("run %d, tracing %s: %.1f tok/s, p50 TPOT %.1f ms", index, "on" if traced else "off",
                row["tokens_per_s"], row["tpot_p50_ms"])
    return {"tracing": traced, "iterations_by_mode": stats.get("iterations_by_mode"), **row}


def _settled(receiver: OtlpReceiver, quiet_s: float = 2.0, timeout_s: float = 30.0) -> int:
    """Waits until no span arrived for quiet_s (the services flush on stop); the span count."""
    deadline = time.monotonic() + timeout_s
    count = -1
    while time.monotonic() < deadline:
        seen = len(receiver.spans)
        if seen == count:
            break
        count = seen
        time.sleep(quiet_s)
    return count


def agreement(trace_path: Path) -> dict:
    """Per sampled iteration with CPU attention: the hidden ratio from the subtask intervals against the Step
    timings' for the same iteration."""
    diffs = []
    for it in build_iterations(read_otlp_json(trace_path)):
        exact = it.subtask_overlap
        if exact is not None and exact.cpu_attention_ns and it.step_overlap.cpu_attention_ns:
            diffs.append(abs(exact.hidden_ratio - it.step_overlap.hidden_ratio))
    if not diffs:
        return {"iterations": 0}
    return {"iterations": len(diffs), "median_abs_diff": statistics.median(diffs), "max_abs_diff": max(diffs)}


def run(preset: bench.Preset, rounds: int, out: Path, profile_dir: str | None) -> dict:
    spans_cpu = span_cost.measure(rows=preset.max_num_seqs, layers=preset.spec.num_layers, every=SAMPLE_EVERY)
    runs: list[dict] = []
    with bench.running_stack(preset, profile_dir, "apx-trc-") as (stack, model_dir):
        bench.profile(stack, model_dir, preset)
        with OtlpReceiver("127.0.0.1:0") as receiver:
            for i, traced in enumerate([False, True, True, False] * rounds):
                runs.append(run_once(stack, model_dir, preset, traced, _on_env(receiver) if traced else OFF_ENV, i))
            spans = _settled(receiver)
            trace_path = receiver.write_json(out / "trace.jsonl")
    report_code = trace_report.main([str(trace_path), "--out", str(out / "report")])
    on = [r["tokens_per_s"] for r in runs if r["tracing"]]
    off = [r["tokens_per_s"] for r in runs if not r["tracing"]]
    ratio = statistics.median(on) / statistics.median(off)
    return {
        "model": preset.spec.name, "workload": preset.workloads[0].name, "sample_layers_every": SAMPLE_EVERY,
        "runs": runs, "tokens_per_s_off_median": statistics.median(off),
        "tokens_per_s_on_median": statistics.median(on),
        "on_over_off": ratio, "target_met": ratio >= 0.97, "spans": spans, "trace": str(trace_path),
        "report": str(out / "report"), "report_exit_code": report_code, "overlap_agreement": agreement(trace_path),
        "lengths_ok": all(r["lengths_ok"] for r in runs), "scheduler_span_cpu": spans_cpu,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="apex-serve bench-tracing", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(bench.PRESETS), default="full",
                        help="bench-policies' preset; its first workload is served (full: 32 requests, ~4 minutes)")
    parser.add_argument("--rounds", type=int, default=1, help="ABBA rounds (4 runs each)")
    parser.add_argument("--profile-dir", default=None, help="reuse profiles stored here (default: a fresh one)")
    parser.add_argument("--out", default="bench_results/tracing", help="folder for the trace, report and JSON")
    args = parser.parse_args(argv)
    configure_logging("bench-tracing")
    if args.rounds < 1:
        parser.error(f"--rounds: must be >= 1, got {args.rounds}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = run(bench.PRESETS[args.preset], args.rounds, out, args.profile_dir)
    logger.info("tracing on/off: %.1f / %.1f tok/s (medians) = %.3f (target >= 0.97); overlap agreement %s; "
                "the scheduler's spans: %.0f us of CPU per iteration", result["tokens_per_s_on_median"],
                result["tokens_per_s_off_median"], result["on_over_off"], result["overlap_agreement"],
                result["scheduler_span_cpu"]["added_us_per_iteration"])
    write_result(str(out / "tracing.json"), result)
    return 0 if result["lengths_ok"] and result["report_exit_code"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
