"""Goodput under online arrivals: gpu-only, neo and apex on one stack, in one run, at a sweep of Poisson arrival
rates per workload.

The stack is bench-policies' (apex_tools.bench.serving_stack): a random LLaMA on a gpu_worker pinned to the first core,
the cpu_attention_worker, profiler, schedulers and this client on the second. The device KV pool is small, as in
bench-policies: --device-kv-requests (3) mean requests of the workload (prompt + output tokens, in blocks of 16, at
least the largest request); the CPU pool holds the whole workload with room to spare. Profiling runs once, before the
workloads.

The model (--model) decides the regime. default, the small default model (hidden 512, 4 layers, GQA): one core's step
time barely grows with the rows of a step, as a weight-streaming-bound GPU's does, so the rows that the CPU KV pool
admits cost the running requests little TPOT; that is the regime the goodput comparison is about. bench (hidden 1024,
8 layers): one core's step time grows nearly with the rows at small batches (about 50 ms at 1 row, 87 ms at 2), so a
TPOT objective of 1.5x the lightly loaded p50 leaves no policy room to batch more than a row or two.

Workloads (fixed seeds), token counts scaled to what one core of this machine serves in minutes: decode-heavy
(prompts 32-64, outputs 32-48), long-output (prompts 16-32, outputs 96-128), and chat, a mixed workload whose prompts
of 64-1024 tokens are scaled by 1/8 to 8-128 (outputs 16-48). The sweep is of offered load in output tokens per
second (--loads); a workload's request rate at a load is the load over its mean output length, so every workload is
swept over the same range of decode work. At each rate, lowest first, the policies one after the other (so that
whatever else loads the machine meanwhile falls on them alike) each serve --requests requests arriving as a Poisson
process (the same arrival times for every policy), a fresh scheduler per (policy, rate); a policy's sweep stops after
two rates in a row it does not sustain (--full-sweep: every rate).

Measured per (workload, policy, rate): output tokens/s, TTFT and TPOT p50/p99, the fraction of requests that met
both objectives, the iterations with CPU rows by overlap layout. The objectives are set once per workload from
gpu-only's own latency at the lowest rate: TTFT <= 5x and TPOT <= 1.5x gpu-only's p50 there. They are the same for
every policy and are passed to neo's and apex's schedulers as --tpot-slo-ms and --ttft-slo-ms (gpu-only runs first;
it has no objective to follow). A rate is sustained when at least 90% of its requests met both objectives; goodput is
the highest rate sustained. Writes JSON (--out), the table beside it (.txt) and one PNG per workload (p99 TPOT and
p99 TTFT against the rate, one line per policy).

A policy's goodput is measured only where a rate above it was not sustained: while some policy still sustains the
highest rate swept, the sweep goes on at twice that load, up to --extend more rates; a goodput that is still the
highest rate its policy ran is reported as a lower bound.

apex's p99 TPOT is held against gpu-only's at every rate gpu-only sustains. The p99 of a rate's requests moves from run
to run with this machine's speed, one policy against itself, so at each rate gpu-only sustained it runs once more,
last, on the same arrivals, bracketing the other policies: apex's p99 TPOT is at or under gpu-only's when it is at or
under the higher of gpu-only's two runs there, the spread one policy shows against itself in the same minute. That
is judged at the rates where apex ran CPU rows; at a rate where it ran none its plans are gpu-only's, plan for plan
(tests/unit/test_scheduler_objectives.py), so the two differ there only by the machine's noise: reported, not judged.
"""

import argparse
import logging
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import grpc

from apex_serve.logs import configure_logging
from apex_tools.bench import goodput_report as rep
from apex_tools.bench.common import one_core, write_result
from apex_tools.bench.serving_stack import (
    BLOCK_SIZE,
    BenchStack,
    Preset,
    Workload,
    arrival_offsets,
    layout_mix,
    metrics,
    profile,
    request_latencies,
    running_stack,
    serve,
    start_gpu_worker,
    worker_info,
)
from apex_tools.default_model import BENCH_SPEC, DEFAULT_SPEC

logger = logging.getLogger(__name__)
POLICIES = ("gpu-only", "neo", "apex")
PRESETS = {
    "full": Preset(DEFAULT_SPEC, (
        Workload("decode-heavy", 24, (32, 64), (32, 48), seed=1),
        Workload("long-output", 24, (16, 32), (96, 128), seed=2),
        Workload("chat", 24, (8, 128), (16, 48), seed=3),
    ), max_num_seqs=32),
    "tiny": Preset(DEFAULT_SPEC, (
        Workload("decode-heavy", 4, (8, 16), (8, 12), seed=1),
        Workload("long-output", 4, (8, 16), (16, 24), seed=2),
        Workload("chat", 4, (8, 32), (8, 12), seed=3),
    ), max_num_seqs=4, profile_warmup=0, profile_repeats=1),
}
MODELS = {"default": DEFAULT_SPEC, "bench": BENCH_SPEC}
DEFAULT_LOADS = {"default": (30.0, 60.0, 120.0, 240.0, 480.0, 960.0), "bench": (6.0, 12.0, 18.0, 27.0, 40.0),
                 "tiny": (40.0, 400.0)}


@dataclass(frozen=True)
class Flags:
    policies: tuple[str, ...]
    loads: tuple[float, ...]  # offered output tokens per second, ascending
    requests: int  # per rate; 0: the preset's
    seed: int
    device_kv_requests: float
    full_sweep: bool
    ttft_factor: float = rep.TTFT_FACTOR
    tpot_factor: float = rep.TPOT_FACTOR
    extend: int = 2  # more rates, each at twice the load, while some policy sustains the highest one swept


def device_blocks(workload: Workload, mean_requests: float) -> int:
    """mean_requests mean requests' tokens in blocks, at least the largest request (else gpu-only never ends)."""
    mean_tokens = workload.working_set_tokens() / workload.num_requests
    wanted = -(-int(mean_requests * mean_tokens) // BLOCK_SIZE)
    return max(wanted, -(-workload.largest_request_tokens() // BLOCK_SIZE))


def rate_of(workload: Workload, load: float) -> float:
    """Requests per second offering load output tokens per second: load over the workload's mean output length."""
    requests = workload.requests()
    return load * len(requests) / sum(n for _, n in requests)


def run_rate(stack: BenchStack, preset: Preset, workload: Workload, policy: str, load: float, flags: Flags,
             slo: dict[str, float]) -> dict:
    """One (workload, policy, rate): the requests at Poisson arrivals, their latency against the objectives."""
    requests = workload.requests()
    rate = rate_of(workload, load)
    if not slo and policy != "gpu-only":
        raise RuntimeError("no objectives: gpu-only did not run at the lowest rate")
    head = {"rate_per_s": rate, "load_tokens_per_s": load}
    offsets = arrival_offsets(len(requests), rate, flags.seed)
    start_ns, results, stats = serve(
        stack, preset, policy, f"{workload.name}-{policy}-{load:g}", requests, offsets,
        tpot_slo_ms=slo.get("tpot_ms", 0.0) if policy != "gpu-only" else 0.0,
        ttft_slo_ms=slo.get("ttft_ms", 0.0) if policy != "gpu-only" else 0.0)
    row = {**head, **metrics(start_ns, results, [n for _, n in requests])}
    if not slo:  # gpu-only at the lowest rate: the objectives come from this row
        slo.update(rep.objectives(row, flags.ttft_factor, flags.tpot_factor))
    row["requests"] = [dict(zip(("ttft_ms", "tpot_ms"), request_latencies(r), strict=True)) for r in results]
    row["met_fraction"] = rep.met_fraction(results, slo)
    row["met"] = row["met_fraction"] >= rep.MET_FRACTION and row["lengths_ok"]
    row["layouts"] = layout_mix(stats)
    row["iterations_by_mode"] = stats.get("iterations_by_mode", {})
    row["iterations_by_layout"] = stats.get("iterations_by_layout", {})
    return row


def run_one(stack: BenchStack, preset: Preset, workload: Workload, policy: str, load: float, flags: Flags,
            slo: dict[str, float]) -> dict:
    """run_rate, logged; a failed run is a row with its error."""
    try:
        r = run_rate(stack, preset, workload, policy, load, flags, slo)
    except (grpc.RpcError, TimeoutError, RuntimeError) as exc:
        logger.exception("%s / %s at %g failed", workload.name, policy, load)
        return {"rate_per_s": rate_of(workload, load), "load_tokens_per_s": load,
                "error": f"{type(exc).__name__}: {exc}"}
    logger.info("%s / %s at %.2f req/s: %.1f tok/s, TTFT p50 %.0f p99 %.0f ms, TPOT p50 %.1f p99 %.1f ms, %.0f%% "
                "within the objectives; layouts %s", workload.name, policy, r["rate_per_s"], r["tokens_per_s"],
                r["ttft_p50_ms"], r["ttft_p99_ms"], r["tpot_p50_ms"], r["tpot_p99_ms"], 100 * r["met_fraction"],
                r["layouts"])
    return r


def sweep(flags: Flags, rows: dict[str, list[dict]]) -> Iterator[float]:
    """The loads to run, ascending: --loads, then while some policy met the objectives at the last one (its row in
    rows, filled meanwhile), twice the last, at most flags.extend times."""
    yield from flags.loads
    load = flags.loads[-1]
    for _ in range(flags.extend):
        if not any(r and r[-1].get("met") for r in rows.values()):
            return
        load *= 2
        yield load


def run_workload(stack: BenchStack, model_dir: Path, workload: Workload, preset: Preset, flags: Flags) -> dict:
    """Rate by rate, the policies one after the other at each (gpu-only first: the objectives come from it), so that
    what else loads this machine meanwhile falls on the policies alike; gpu-only once more, last, at each rate it
    sustained (its row's "again")."""
    blocks = device_blocks(workload, flags.device_kv_requests)
    worker = start_gpu_worker(stack, model_dir, blocks, preset)
    slo: dict[str, float] = {}
    ordered = sorted(flags.policies, key=POLICIES.index)
    rows: dict[str, list[dict]] = {policy: [] for policy in ordered}
    try:
        info = worker_info(stack.address("gpu"))
        for load in sweep(flags, rows):
            for policy in ordered:
                done = rows[policy]
                if not flags.full_sweep and len(done) >= 2 and not (done[-1].get("met") or done[-2].get("met")):
                    done.append({"rate_per_s": rate_of(workload, load), "load_tokens_per_s": load,
                                 "skipped": "not run: two lower rates in a row were not sustained"})
                    continue
                logger.info("%s: %s at %g output tokens/s offered (device KV %d blocks)", workload.name, policy,
                            load, info.num_kv_blocks)
                done.append(run_one(stack, preset, workload, policy, load, flags, slo))
            first = rows["gpu-only"][-1]  # --policies always has it
            if first.get("met"):
                logger.info("%s: gpu-only again at %g output tokens/s offered, after the others", workload.name, load)
                first["again"] = rep.again(run_one(stack, preset, workload, "gpu-only", load, flags, slo))
    finally:
        stack.services.stop(worker)
    policies = {policy: {"rates": r, "goodput": rep.goodput(r)} for policy, r in rows.items()}
    regime = {"requests": workload.num_requests, "prompt_len": workload.prompt_len, "output_len": workload.output_len,
              "device_kv_blocks": info.num_kv_blocks, "device_kv_tokens": info.num_kv_blocks * info.block_size,
              "cpu_kv_blocks": info.num_cpu_kv_blocks}
    return {"regime": regime, "objectives": dict(slo), "policies": policies, "ratios": rep.ratios(policies),
            "tpot_p99": rep.tpot_p99_vs_gpu_only(policies)}


def run(preset: Preset, flags: Flags, profile_dir: str | None) -> dict:
    workloads: dict[str, dict] = {}
    with running_stack(preset, profile_dir, "apx-good-") as (stack, model_dir):
        grid = profile(stack, model_dir, preset) if set(flags.policies) - {"gpu-only"} else None
        for workload in preset.workloads:
            workloads[workload.name] = run_workload(stack, model_dir, workload, preset, flags)
    return {"model": preset.spec.name, "device_cpu": one_core(stack.device_cpus),
            "host_cpu": one_core(stack.host_cpus), "max_num_seqs": preset.max_num_seqs,
            "rule": rep.rule(flags.ttft_factor, flags.tpot_factor), "flags": asdict(flags), "profile_grid": grid,
            "workloads": workloads, "targets": rep.targets(workloads)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="apex-serve bench-goodput", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the small model, a few requests: a smoke test")
    parser.add_argument("--model", choices=tuple(MODELS), default="default",
                        help="default: the small default model (hidden 512, 4 layers), whose step time barely grows "
                        "with its rows; bench: hidden 1024, 8 layers, whose step time grows nearly with its rows")
    parser.add_argument("--workloads", default=None,
                        help="comma-separated, of decode-heavy, long-output, chat (default: all)")
    parser.add_argument("--policies", default=",".join(POLICIES), help="comma-separated, of " + ", ".join(POLICIES))
    parser.add_argument("--loads", default=None, help="offered output tokens/s, comma-separated (default: "
                        + "; ".join(f"{k} {','.join(f'{v:g}' for v in vs)}" for k, vs in DEFAULT_LOADS.items()) + ")")
    parser.add_argument("--requests", type=int, default=0, help="requests per rate (default: the preset's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the arrivals")
    parser.add_argument("--device-kv-requests", type=float, default=3.0,
                        help="device KV pool in mean requests of the workload")
    parser.add_argument("--full-sweep", action="store_true", help="run every rate, also past two missed in a row")
    parser.add_argument("--extend", type=int, default=2,
                        help="while some policy sustains the highest load swept, run at twice it, at most this many "
                        "more loads (0: only --loads)")
    parser.add_argument("--ttft-factor", type=float, default=rep.TTFT_FACTOR,
                        help="TTFT objective: this x gpu-only's p50 TTFT at the lowest rate")
    parser.add_argument("--tpot-factor", type=float, default=rep.TPOT_FACTOR,
                        help="TPOT objective: this x gpu-only's p50 TPOT at the lowest rate")
    parser.add_argument("--profile-dir", default=None, help="reuse profiles stored here (default: a fresh one)")
    parser.add_argument("--out", default="bench_results/goodput.json")
    args = parser.parse_args(argv)
    configure_logging("bench-goodput")
    name = "tiny" if args.tiny else args.model
    preset = PRESETS["tiny" if args.tiny else "full"]
    if not args.tiny:
        preset = replace(preset, spec=MODELS[args.model])
    policies = tuple(p.strip() for p in args.policies.split(",") if p.strip())
    if not policies or set(policies) - set(POLICIES) or "gpu-only" not in policies:
        parser.error(f"--policies: each of {POLICIES}, gpu-only among them (it sets the objectives); "
                     f"got {args.policies!r}")
    known = {w.name: w for w in preset.workloads}
    chosen = [w.strip() for w in (args.workloads or ",".join(known)).split(",") if w.strip()]
    if not chosen or set(chosen) - set(known):
        parser.error(f"--workloads: each must be one of {tuple(known)}, got {args.workloads!r}")
    try:
        loads = tuple(sorted(float(v) for v in args.loads.split(","))) if args.loads else DEFAULT_LOADS[name]
    except ValueError:
        parser.error(f"--loads: comma-separated numbers, got {args.loads!r}")
    if not loads or min(loads) <= 0 or args.requests < 0 or args.device_kv_requests <= 0 or args.extend < 0:
        parser.error("--loads and --device-kv-requests must be > 0, --requests and --extend >= 0")
    workloads = tuple(replace(known[w], num_requests=args.requests or known[w].num_requests) for w in chosen)
    preset = replace(preset, workloads=workloads)
    if min(args.ttft_factor, args.tpot_factor) <= 0:
        parser.error("--ttft-factor and --tpot-factor: must be > 0")
    flags = Flags(policies, loads, args.requests, args.seed, args.device_kv_requests, args.full_sweep,
                  args.ttft_factor, args.tpot_factor, args.extend)
    result = run(preset, flags, args.profile_dir)
    text = rep.table(result)
    logger.info("goodput (TTFT/TPOT in ms, load in offered output tokens/s)\n%s", text)
    out = write_result(args.out, result)
    out.with_suffix(".txt").write_text(text + "\n")
    for workload_name, w in result["workloads"].items():
        logger.info("wrote %s", rep.figure(workload_name, w, out.parent / f"{out.stem}-{workload_name}.png"))
    failed = [p for w in result["workloads"].values() for p, r in w["policies"].items()
              if any("error" in row for row in r["rates"])]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
