"""`apex-serve simulate`: the scheduler's policies (gpu-only, neo, neo-published, apex; apex_tools.sim.variants) driven
by the cost model of published hardware (T4, A10 in their AWS hosts; apex_tools.sim.hardware, every figure with its
source) or of this machine's profile, on LLaMA-2-7B / LLaMA-3.1-8B shapes and synthetic workloads. Prints a table of
throughput (whole run and steady state), TTFT and TPOT per policy, writes the JSON result and a PNG. With --goodput,
a Poisson rate sweep of each setup and workload gives each policy's goodput under latency objectives
(apex_tools.sim.goodput); --sweep runs the grid at each value of one hardware figure and plots apex's ratios against
it; --reproduce-paper runs the grid behind the paper's claims (apex_tools.sim.paper). Workloads run as drawn: one with
a request whose KV the accelerator's pool cannot hold is refused on that setup (gpu-only could not serve it) unless
--fit-to-accelerator cuts such requests."""

import argparse
import dataclasses
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from apex_serve.logs import configure_logging
from apex_tools.bench.common import write_result
from apex_tools.sim import paper, report, sweep
from apex_tools.sim.goodput import DEFAULT_MULTIPLES, SweepSpec
from apex_tools.sim.grid import GridResult, run_grid
from apex_tools.sim.hardware import DECODE_ATTENTION, GPUS, HOSTS, SWEEPABLE, Knobs, with_value
from apex_tools.sim.setups import HARDWARE, MODELS, Setup, UnsupportedSetup, profiled_setup, published_setup
from apex_tools.sim.variants import NEO_LAUNCH_MS, VARIANTS
from apex_tools.sim.workloads import WORKLOADS, WorkloadSpec
from scheduler_service.config import SchedulerConfig

logger = logging.getLogger(__name__)


def _choices(allowed: Sequence[str]) -> Callable[[str], list[str]]:
    """An argparse type: a comma-separated list of names from allowed."""
    def parse(text: str) -> list[str]:
        names = [name.strip() for name in text.split(",") if name.strip()]
        unknown = [name for name in names if name not in allowed]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(allowed)} (comma-separated)")
        return names

    return parse


def _floats(text: str) -> tuple[float, ...]:
    """An argparse type: comma-separated numbers."""
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated numbers") from exc
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r}: at least one number")
    return values


def _sweep(text: str) -> tuple[str, tuple[float, ...]]:
    """An argparse type: NAME=v1,v2,... with NAME of hardware.SWEEPABLE."""
    name, _, values = text.partition("=")
    if name not in SWEEPABLE:
        raise argparse.ArgumentTypeError(f"{text!r}: NAME=v1,v2,... with NAME one of {', '.join(SWEEPABLE)}")
    return name, _floats(values)


def _flatten(values: list[list[str]] | None, default: list[str]) -> list[str]:
    return list(dict.fromkeys(name for names in values or [default] for name in names))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="apex-serve simulate", description=__doc__)
    parser.add_argument("--hardware", type=_choices(HARDWARE), action="append",
                        help=f"{', '.join(HARDWARE)}; repeatable or comma-separated (default t4,a10)")
    parser.add_argument("--model", type=_choices(tuple(MODELS)), action="append",
                        help=f"{', '.join(MODELS)}; repeatable or comma-separated (default llama2-7b); "
                             "this-machine simulates the model of --model-config instead")
    parser.add_argument("--workload", type=_choices(WORKLOADS), action="append",
                        help=f"{', '.join(WORKLOADS)}; repeatable or comma-separated (default chat)")
    parser.add_argument("--policies", type=_choices(VARIANTS), action="append",
                        help=f"{', '.join(VARIANTS)}; repeatable or comma-separated (default all)")
    parser.add_argument("--requests", type=int, default=1000, help="requests per workload")
    parser.add_argument("--rate", type=float, default=0.0, help="Poisson arrivals in requests/s; 0: all at once")
    parser.add_argument("--seed", type=int, default=0, help="the workload's draw")
    parser.add_argument("--seeds", type=int, default=1,
                        help="draws of each workload, seeds --seed, --seed + 1, ...; with more than one, a summary "
                             "gives each policy's median throughput and its median and lowest ratio over the draws")
    parser.add_argument("--grid-prompt-len", type=int, default=512, help="prompt tokens of the grid workload")
    parser.add_argument("--grid-output-len", type=int, default=512, help="output tokens of the grid workload")
    parser.add_argument("--tpot-slo-ms", type=float, default=0.0, help="apex's and neo's TPOT objective; 0: none")
    parser.add_argument("--ttft-slo-ms", type=float, default=0.0, help="apex's and neo's TTFT objective; 0: none")
    parser.add_argument("--max-sit-out", type=int, default=SchedulerConfig.max_sit_out,
                        help="apex: iterations a CPU request may sit out before it is forced in (the real stack's "
                             "default; neo and neo-published have no such bound)")
    parser.add_argument("--max-num-seqs", type=int, default=256, help="requests running at once (vLLM's default)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=4096,
                        help="tokens of one step; also sizes the activation reserve of the GPU memory")
    hw = parser.add_argument_group("hardware figures (apex_tools/sim/hardware.py gives each default's source)")
    hw.add_argument("--host", choices=tuple(HOSTS),
                    help="the host instance; default: the GPU's (" + ", ".join(
                        f"{name}: {gpu.default_host}" for name, gpu in GPUS.items()) + ")")
    hw.add_argument("--host-bw", type=float, help="the host's read bandwidth, GB/s (default: the host's cores x "
                                                 "per-core read bandwidth, capped by its DDR channels)")
    hw.add_argument("--cpu-efficiency", type=float, default=Knobs.cpu_kernel_efficiency,
                    help="share of the host's read bandwidth the CPU attention kernel reaches (bench-kernel's ratio)")
    hw.add_argument("--gpu-bw-efficiency", type=float, default=1.0, help="share of the GPU's data-sheet bandwidth")
    hw.add_argument("--gpu-flops-efficiency", type=float, default=1.0, help="share of the GPU's data-sheet fp16 flops")
    hw.add_argument("--pcie-bw", type=float, help="host link GB/s per direction (default: the board's PCIe rate)")
    hw.add_argument("--pcie-latency-us", type=float, default=0.0, help="per copy over the host link, us")
    hw.add_argument("--launch-us", type=float, default=10.0, help="GPU launch overhead per layer subtask, us")
    hw.add_argument("--decode-attention", choices=DECODE_ATTENTION, default=Knobs.decode_attention,
                    help="the GPU worker's decode kernel: sdpa pads the rows to the longest context (the default "
                         "install's), flashinfer reads each row's own (paged, as vLLM)")
    hw.add_argument("--neo-launch-ms", type=float, default=NEO_LAUNCH_MS,
                    help="neo-published: NEO's launch cost per sub-batch with CPU rows per layer, ms (its lnch_T)")
    hw.add_argument("--sweep", type=_sweep, metavar="NAME=V1,V2,...",
                    help=f"run the grid at each value of one figure ({', '.join(SWEEPABLE)}) and plot apex's "
                         "throughput ratios against it (e.g. host-bw=20,40,80,120,160)")
    rates = parser.add_argument_group("goodput: Poisson rate sweeps with bench-goodput's objectives")
    rates.add_argument("--goodput", action="store_true",
                       help="sweep Poisson rates for every setup and workload and report each policy's goodput")
    rates.add_argument("--rate-multiples", type=_floats, default=DEFAULT_MULTIPLES,
                       help="rates as multiples of gpu-only's saturated request rate on the same draw")
    rates.add_argument("--ttft-factor", type=float, default=SweepSpec.ttft_factor,
                       help="TTFT objective: this x gpu-only's p50 at the lowest rate")
    rates.add_argument("--tpot-factor", type=float, default=SweepSpec.tpot_factor,
                       help="TPOT objective: this x gpu-only's p50 at the lowest rate")
    rates.add_argument("--extend", type=int, default=SweepSpec.extend,
                       help="more rates, each twice the last, while some policy meets the highest")
    rates.add_argument("--refine", type=int, default=SweepSpec.refine,
                       help="bisections of each policy's goodput between its highest met rate and the lowest rate "
                            "above it that it missed; 0: the rates of the grid alone")
    parser.add_argument("--reproduce-paper", action="store_true",
                        help="the grid behind the paper's claims, with goodput, beside the paper's figures "
                             "(--hardware, --model, --workload and --goodput are set by it)")
    parser.add_argument("--profile", default="", help="this-machine: a profile JSON saved by profiler_service")
    parser.add_argument("--model-config", default="", help="this-machine: config.json of the profiled model")
    parser.add_argument("--device-kv-blocks", type=int, default=32, help="this-machine: the device's KV pool")
    parser.add_argument("--cpu-kv-blocks", type=int, default=1024, help="this-machine: the CPU worker's KV pool")
    parser.add_argument("--fit-to-accelerator", action=argparse.BooleanOptionalAction, default=False,
                        help="cut each request to what the accelerator's KV pool holds (the share cut is reported); "
                             "without it a workload with a request the pool cannot hold is refused on that setup, "
                             "since gpu-only could not serve it")
    parser.add_argument("--out-dir", default="bench_results/simulate", help="simulate.json and the PNGs go here")
    parser.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True, help="write the PNGs")
    return parser


def knobs_of(args: argparse.Namespace) -> Knobs:
    return Knobs(host=args.host, host_bw_gbs=args.host_bw, cpu_kernel_efficiency=args.cpu_efficiency,
                 gpu_bw_efficiency=args.gpu_bw_efficiency, gpu_flops_efficiency=args.gpu_flops_efficiency,
                 pcie_gbs=args.pcie_bw, pcie_latency_us=args.pcie_latency_us, launch_us=args.launch_us,
                 decode_attention=args.decode_attention)


def make_setups(args: argparse.Namespace, hardware: list[str], models: list[str], knobs: Knobs
                ) -> tuple[list[Setup], list[str]]:
    """The setups to simulate and the messages of the refused (hardware, model) pairs."""
    setups, refused = [], []
    for name in hardware:
        if name == "this-machine":
            setups.append(profiled_setup(args.profile, args.model_config, args.device_kv_blocks, args.cpu_kv_blocks,
                                         knobs.decode_attention))
            continue
        for model in models:
            try:
                setups.append(published_setup(name, model, args.max_num_batched_tokens, args.max_num_seqs, knobs))
            except UnsupportedSetup as exc:
                logger.error("refused: %s", exc)
                refused.append(str(exc))
    return setups, refused


def simulate(args: argparse.Namespace, knobs: Knobs, hardware: list[str], models: list[str], workloads: list[str],
             policies: list[str], sweep_spec: SweepSpec | None) -> GridResult:
    """The grid of the arguments on the knobs' hardware."""
    specs = [WorkloadSpec(kind, args.requests, args.rate, seed, args.grid_prompt_len, args.grid_output_len)
             for kind in workloads for seed in range(args.seed, args.seed + args.seeds)]
    config = SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                             tpot_slo_ms=args.tpot_slo_ms, ttft_slo_ms=args.ttft_slo_ms, max_sit_out=args.max_sit_out)
    setups, refused = make_setups(args, hardware, models, knobs)
    for setup in setups:
        logger.info("%s", setup.describe())
    result = run_grid(setups, specs, policies, config, args.fit_to_accelerator, args.neo_launch_ms, sweep_spec)
    result.refused[:0] = refused
    return result


def run(args: argparse.Namespace, knobs: Knobs, hardware: list[str], models: list[str], workloads: list[str],
        policies: list[str], sweep_spec: SweepSpec | None) -> GridResult:
    """simulate(), or with --reproduce-paper the paper's rows (paper.ROWS), each (hardware, model) on its workloads."""
    if not args.reproduce_paper:
        return simulate(args, knobs, hardware, models, workloads, policies, sweep_spec)
    merged = GridResult([], [], [])
    for (gpu, model), kinds in paper.ROWS.items():
        part = simulate(args, knobs, [gpu], [model], list(kinds), policies, sweep_spec)
        merged.runs += part.runs
        merged.refused += part.refused
        merged.goodput += part.goodput
    return merged


def main(argv: Sequence[str] | None = None) -> int:
    configure_logging("simulate")
    parser = build_parser()
    args = parser.parse_args(argv)
    args.goodput = args.goodput or args.reproduce_paper
    hardware = _flatten(args.hardware, ["t4", "a10"])
    models = _flatten(args.model, ["llama2-7b"])
    workloads = _flatten(args.workload, ["chat"])
    policies = _flatten(args.policies, list(VARIANTS))
    if "this-machine" in hardware and not (args.profile and args.model_config):
        parser.error("--hardware this-machine needs --profile and --model-config")
    if args.seeds < 1:
        parser.error(f"--seeds: must be >= 1, got {args.seeds}")
    if args.goodput and ("gpu-only" not in policies or args.rate):
        parser.error("--goodput: needs gpu-only among --policies (the objectives and rates come from it) and no --rate")
    try:
        knobs = knobs_of(args)
        sweep_spec = SweepSpec(args.rate_multiples, args.ttft_factor, args.tpot_factor, args.extend, args.refine
                               ) if args.goodput else None
        # --requests, --rate and the grid lengths, checked before any run
        WorkloadSpec("grid", args.requests, args.rate, args.seed, args.grid_prompt_len, args.grid_output_len)
    except ValueError as exc:
        parser.error(str(exc))
    out = Path(args.out_dir)
    if args.sweep:
        name, values = args.sweep
        try:
            by_value = {v: run(args, with_value(knobs, name, v), hardware, models, workloads, policies, sweep_spec)
                        for v in values}
        except (OSError, ValueError) as exc:
            parser.error(str(exc))
        logger.info("%s", sweep.table(name, by_value))
        write_result(str(out / f"simulate-sweep-{name}.json"), {
            "args": vars(args), "sweep": name,
            "values": [{"value": v, "runs": [dataclasses.asdict(r) for r in g.runs], "goodput": g.goodput,
                        "refused": g.refused} for v, g in by_value.items()]})
        if args.plot:
            logger.info("wrote %s", sweep.plot(name, by_value, out / f"simulate-sweep-{name}.png"))
        return 0 if any(g.runs for g in by_value.values()) else 1
    try:
        grid = run(args, knobs, hardware, models, workloads, policies, sweep_spec)
    except (OSError, ValueError) as exc:
        parser.error(str(exc))
    if not grid.runs:
        logger.error("nothing to simulate: every setup was refused, or refused every workload")
        return 1
    logger.info("simulated %d requests per workload (rate %s)\n%s", args.requests,
                f"{args.rate:g} req/s" if args.rate else "all at once", report.table(grid.runs))
    if args.seeds > 1:
        logger.info("over %d draws of each workload\n%s", args.seeds, report.summary(grid.runs))
    if grid.goodput:
        logger.info("goodput (%s)\n%s", report.goodput_rule(sweep_spec), report.goodput_table(grid.goodput))
    if args.reproduce_paper:
        logger.info("the paper's claims against the simulation\n%s", paper.table(grid))
    write_result(str(out / "simulate.json"), {
        "args": vars(args),
        "knobs": dataclasses.asdict(knobs),
        "refused": grid.refused,
        "runs": [dataclasses.asdict(r) for r in grid.runs],
        "goodput": grid.goodput,
        **({"paper": paper.rows(grid)} if args.reproduce_paper else {}),
    })
    if args.plot:
        logger.info("wrote %s", report.plot(grid.runs, out / "simulate.png"))
    return 0
