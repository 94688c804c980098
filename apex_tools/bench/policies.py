"""Side-by-side policy benchmark: gpu-only, neo and apex on one stack, in one run, on the same workloads.

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
better of gpu-only and neo, p99 TPOT over gpu-only's; and the targets when all three policies ran.
Only neo and apex get the profiler's address; apex gets --tpot-slo-ms from --apex-tpot-slo-ms, or FACTOR x
gpu-only's measured p99 TPOT on the same workload with --apex-tpot-slo-from-gpu-only FACTOR (gpu-only runs first).
The table reports, per policy, the iterations by execution mode and those with CPU rows by overlap layout (the
scheduler's iterations_by_layout).
"""

import argparse
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc

from apex_serve.logs import configure_logging
from apex_tools.bench.common import one_core, write_result
from apex_tools.bench.serving_stack import (
    PRESETS,
    BenchStack,
    Preset,
    Workload,
    arrival_offsets,
    device_blocks,
    layout_mix,
    metrics,
    profile,
    running_stack,
    serve,
    start_gpu_worker,
    worker_info,
)

logger = logging.getLogger(__name__)
POLICIES = ("gpu-only", "neo", "apex")


@dataclass(frozen=True)
class Flags:
    policies: tuple[str, ...]
    arrival_rate: float  # requests per second; 0: all at once
    seed: int
    device_kv_fraction: float
    apex_tpot_slo_ms: float
    apex_tpot_slo_from_gpu_only: float  # 0: unset


def run_policy(stack: BenchStack, workload: Workload, policy: str, preset: Preset, flags: Flags,
               tpot_slo_ms: float) -> dict:
    """One (workload, policy): a fresh scheduler, the whole workload, its stats; the worker left holding nothing."""
    requests = workload.requests()
    offsets = arrival_offsets(len(requests), flags.arrival_rate, flags.seed)
    start_ns, results, stats = serve(stack, preset, policy, f"{workload.name}-{policy}", requests, offsets,
                                     tpot_slo_ms=tpot_slo_ms)
    row = metrics(start_ns, results, [n for _, n in requests])
    return {"policy": policy, "tpot_slo_ms": tpot_slo_ms, **row, "scheduler_stats": stats}


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
    """The targets (apex 1.5x gpu-only on decode-heavy at no worse p99 TPOT, at least 0.97x the better other
    policy everywhere, ahead of both somewhere); None unless every workload has all three policies' results."""
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
    header = (f"{'workload':<14}{'policy':<10}{'dev KV':>7}{'tokens':>8}{'tok/s':>8}{'vs gpu':>8}{'TPOT p50':>10}"
              f"{'p99':>8}{'TTFT p50':>10}{'p99':>8}{'len ok':>8}{'preempt':>9}{'swaps':>7}"
              "  iterations by mode; layouts")
    lines = [header]
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
                f"{row['ttft_p50_ms']:>10.0f}{row['ttft_p99_ms']:>8.0f}{row['lengths_ok']!s:>8}"
                f"{stats.get('num_preemptions', '-'):>9}{stats.get('num_swaps', '-'):>7}  {modes}; layouts: "
                f"{layout_mix(stats)}"
            )
        if w["ratios"]:
            lines.append(f"{'':<14}ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in w["ratios"].items()))
        slo = w["policies"].get("apex", {}).get("tpot_slo_ms")
        if slo:
            lines.append(f"{'':<14}apex ran with --tpot-slo-ms {slo:.1f}")
    if result["targets"] is not None:
        lines.append("targets: " + ", ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in result["targets"].items()))
    return "\n".join(lines)


def run_workload(stack: BenchStack, model_dir: Path, workload: Workload, preset: Preset, flags: Flags) -> dict:
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
        ordered = sorted(flags.policies, key=POLICIES.index)  # gpu-only first: apex's objective may come from it
        for policy in ordered:
            slo = flags.apex_tpot_slo_ms if policy == "apex" else 0.0
            if policy == "apex" and flags.apex_tpot_slo_from_gpu_only and "tpot_p99_ms" in rows.get("gpu-only", {}):
                slo = flags.apex_tpot_slo_from_gpu_only * rows["gpu-only"]["tpot_p99_ms"]
            logger.info("%s: %s (device KV %d blocks)", workload.name, policy, info.num_kv_blocks)
            try:
                rows[policy] = run_policy(stack, workload, policy, preset, flags, slo)
            except (grpc.RpcError, TimeoutError, RuntimeError) as exc:
                logger.exception("%s / %s failed", workload.name, policy)
                rows[policy] = {"policy": policy, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        stack.services.stop(worker)
    return {"regime": regime, "policies": rows, "ratios": compare(rows)}


def run(preset: Preset, flags: Flags, profile_dir: str | None) -> dict:
    workloads: dict[str, dict] = {}
    with running_stack(preset, profile_dir, "apx-pol-") as (stack, model_dir):
        grid = profile(stack, model_dir, preset) if set(flags.policies) - {"gpu-only"} else None
        for workload in preset.workloads:
            workloads[workload.name] = run_workload(stack, model_dir, workload, preset, flags)
    return {
        "model": preset.spec.name, "device_cpu": one_core(stack.device_cpus), "host_cpu": one_core(stack.host_cpus),
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
    parser.add_argument("--apex-tpot-slo-ms", type=float, default=0.0, help="apex's --tpot-slo-ms; 0: none")
    parser.add_argument("--apex-tpot-slo-from-gpu-only", type=float, default=0.0, metavar="FACTOR",
                        help="apex's --tpot-slo-ms: FACTOR x gpu-only's p99 TPOT on the same workload (0: unset)")
    parser.add_argument("--profile-dir", default=None, help="reuse profiles stored here (default: a fresh one)")
    parser.add_argument("--out", default="bench_results/policies.json")
    args = parser.parse_args(argv)
    configure_logging("bench-policies")
    policies = tuple(p.strip() for p in args.policies.split(",") if p.strip())
    if not policies or set(policies) - set(POLICIES):
        parser.error(f"--policies: each must be one of {POLICIES}, got {args.policies!r}")
    if not 0 < args.device_kv_fraction <= 1:
        parser.error(f"--device-kv-fraction: must be in (0, 1], got {args.device_kv_fraction}")
    if min(args.arrival_rate, args.apex_tpot_slo_ms, args.apex_tpot_slo_from_gpu_only) < 0:
        parser.error("--arrival-rate, --apex-tpot-slo-ms and --apex-tpot-slo-from-gpu-only must be >= 0")
    if args.apex_tpot_slo_from_gpu_only and (args.apex_tpot_slo_ms or "gpu-only" not in policies):
        parser.error("--apex-tpot-slo-from-gpu-only: needs gpu-only among --policies and no --apex-tpot-slo-ms")
    flags = Flags(policies, args.arrival_rate, args.seed, args.device_kv_fraction, args.apex_tpot_slo_ms,
                  args.apex_tpot_slo_from_gpu_only)
    preset = PRESETS["quick" if args.quick else "tiny" if args.tiny else "full"]
    result = run(preset, flags, args.profile_dir)
    logger.info("policies side by side (tok/s over gpu-only; TPOT/TTFT in ms)\n%s", report(result))
    write_result(args.out, result)
    failed = [p for w in result["workloads"].values() for p, r in w["policies"].items() if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
