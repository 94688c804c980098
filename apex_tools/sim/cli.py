"""`apex-serve simulate`: the scheduler's policies (gpu-only, neo, apex) driven by the cost model of published hardware
(T4, A10) or of this machine's profile, on LLaMA-2-7B / LLaMA-3.1-8B shapes and synthetic workloads. Prints a table
of throughput, TTFT and TPOT per policy, writes the JSON result and a PNG (see apex_tools/sim/setups.py for the
pool sizes and their sources). Workloads run as drawn: one with a request whose KV the accelerator's pool cannot hold
is refused on that setup (gpu-only could not serve it) unless --fit-to-accelerator cuts such requests."""

import argparse
import dataclasses
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from tqdm import tqdm

from apex_serve.logs import configure_logging
from apex_tools.bench.common import write_result
from apex_tools.sim import report
from apex_tools.sim.engine import RunResult, Simulation
from apex_tools.sim.setups import HARDWARE, MODELS, Setup, UnsupportedSetup, profiled_setup, published_setup
from apex_tools.sim.workloads import WORKLOADS, SimRequest, WorkloadSpec, fit_to, generate, peak_kv_tokens
from scheduler_service.config import POLICIES, SchedulerConfig

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
    parser.add_argument("--policies", type=_choices(POLICIES), action="append",
                        help=f"{', '.join(POLICIES)}; repeatable or comma-separated (default all)")
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
    parser.add_argument("--max-num-seqs", type=int, default=256, help="requests running at once (vLLM's default)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=4096,
                        help="tokens of one step; also sizes the activation reserve of the GPU memory")
    parser.add_argument("--profile", default="", help="this-machine: a profile JSON saved by profiler_service")
    parser.add_argument("--model-config", default="", help="this-machine: config.json of the profiled model")
    parser.add_argument("--device-kv-blocks", type=int, default=32, help="this-machine: the device's KV pool")
    parser.add_argument("--cpu-kv-blocks", type=int, default=1024, help="this-machine: the CPU worker's KV pool")
    parser.add_argument("--fit-to-accelerator", action=argparse.BooleanOptionalAction, default=False,
                        help="cut each request to what the accelerator's KV pool holds (the share cut is reported); "
                             "without it a workload with a request the pool cannot hold is refused on that setup, "
                             "since gpu-only could not serve it")
    parser.add_argument("--out-dir", default="bench_results/simulate", help="simulate.json and simulate.png go here")
    parser.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True, help="write the PNG")
    return parser


def _setups(args: argparse.Namespace, hardware: list[str], models: list[str]) -> tuple[list[Setup], list[str]]:
    """The setups to simulate and the messages of the refused (hardware, model) pairs."""
    setups, refused = [], []
    for name in hardware:
        if name == "this-machine":
            setups.append(profiled_setup(args.profile, args.model_config, args.device_kv_blocks, args.cpu_kv_blocks))
            continue
        for model in models:
            try:
                setups.append(published_setup(name, model, args.max_num_batched_tokens, args.max_num_seqs))
            except UnsupportedSetup as exc:
                logger.error("refused: %s", exc)
                refused.append(str(exc))
    return setups, refused


def _served(setup: Setup, spec: WorkloadSpec, requests: list[SimRequest], fit: bool
            ) -> tuple[list[SimRequest], float] | str:
    """What a setup serves of a workload's draw: (the requests, the share of them cut), all of them uncut where the
    accelerator's KV pool holds each one's peak; else, with fit, each cut to it (fit_to); else why it is refused."""
    pool = setup.worker.num_kv_blocks * setup.worker.block_size
    over = [peak for peak in map(peak_kv_tokens, requests) if peak > pool]
    if not over:
        return requests, 0.0
    if fit:
        return fit_to(requests, pool), len(over) / len(requests)
    return (f"{spec.kind} (seed {spec.seed}) on {setup.hardware}/{setup.model}: {len(over)} of {len(requests)} "
            f"requests ({len(over) / len(requests):.0%}) peak above the accelerator's KV pool of {pool:,} tokens "
            f"(the longest at {max(over):,}), which gpu-only could not serve; choose a workload that fits (short-cot, "
            f"osc) or cut them with --fit-to-accelerator")


def main(argv: Sequence[str] | None = None) -> int:
    configure_logging("simulate")
    parser = build_parser()
    args = parser.parse_args(argv)
    hardware = _flatten(args.hardware, ["t4", "a10"])
    models = _flatten(args.model, ["llama2-7b"])
    workloads = _flatten(args.workload, ["chat"])
    policies = _flatten(args.policies, list(POLICIES))
    if "this-machine" in hardware and not (args.profile and args.model_config):
        parser.error("--hardware this-machine needs --profile and --model-config")
    if args.seeds < 1:
        parser.error(f"--seeds: must be >= 1, got {args.seeds}")
    try:
        specs = [WorkloadSpec(kind, args.requests, args.rate, seed, args.grid_prompt_len, args.grid_output_len)
                 for kind in workloads for seed in range(args.seed, args.seed + args.seeds)]
        configs = {policy: SchedulerConfig(max_num_seqs=args.max_num_seqs,
                                           max_num_batched_tokens=args.max_num_batched_tokens, policy=policy,
                                           tpot_slo_ms=args.tpot_slo_ms, ttft_slo_ms=args.ttft_slo_ms)
                   for policy in policies}
        setups, refused = _setups(args, hardware, models)
    except (OSError, ValueError) as exc:
        parser.error(str(exc))
    if not setups:
        logger.error("nothing to simulate: every hardware/model pair was refused")
        return 1
    for setup in setups:
        logger.info("%s", setup.describe())
    requests = {spec: generate(spec) for spec in specs}
    served: list[tuple[Setup, WorkloadSpec, list[SimRequest], float]] = []
    for setup in setups:
        for spec in specs:
            work = _served(setup, spec, requests[spec], args.fit_to_accelerator)
            if isinstance(work, str):
                logger.error("refused: %s", work)
                refused.append(work)
            else:
                served.append((setup, spec, *work))
    if not served:
        logger.error("nothing to simulate: every setup refused every workload")
        return 1
    runs = [(*pair, policy) for pair in served for policy in policies]
    results: list[RunResult] = []
    for setup, spec, work, cut, policy in tqdm(runs, desc="simulating", unit="run"):
        result = Simulation(setup, work, configs[policy], spec.kind).run()
        results.append(dataclasses.replace(result, seed=spec.seed, cut_fraction=cut))
    logger.info("simulated %d requests per workload (rate %s)\n%s", args.requests,
                f"{args.rate:g} req/s" if args.rate else "all at once", report.table(results))
    if args.seeds > 1:
        logger.info("over %d draws of each workload\n%s", args.seeds, report.summary(results))
    out = Path(args.out_dir)
    write_result(str(out / "simulate.json"), {
        "args": vars(args),
        "setups": [{"hardware": s.hardware, "model": s.model, **dataclasses.asdict(s.worker)} for s in setups],
        "refused": refused,
        "runs": [dataclasses.asdict(r) for r in results],
    })
    if args.plot:
        logger.info("wrote %s", report.plot(results, out / "simulate.png"))
    return 0
