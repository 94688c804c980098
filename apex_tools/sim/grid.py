"""A grid of simulated runs: (setup, workload draw) pairs, each served as drawn (or cut to the accelerator's pool, or
refused), every policy on each; and, where asked, a Poisson rate sweep of each pair (apex_tools.sim.goodput); and what
the grid gives of apex against each baseline (apex_ratios)."""

import dataclasses
import logging
import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from tqdm import tqdm

from apex_tools.sim.engine import RunResult, Simulation
from apex_tools.sim.goodput import SweepSpec, rate_sweep, saturated_req_s
from apex_tools.sim.setups import Setup
from apex_tools.sim.workloads import SimRequest, WorkloadSpec, fit_to, generate, peak_kv_tokens
from scheduler_service.config import SchedulerConfig

logger = logging.getLogger(__name__)
COMPARED = ("gpu-only", "neo", "neo-published", "best hybrid")  # best hybrid: the better of the two neos on a draw


@dataclass(frozen=True)
class Served:
    """What one setup serves of one workload draw."""

    setup: Setup
    spec: WorkloadSpec
    requests: list[SimRequest]
    cut_fraction: float  # of the requests, cut to the accelerator's KV pool


@dataclass
class GridResult:
    runs: list[RunResult]
    refused: list[str]
    goodput: list[dict]  # per served pair with a rate sweep: {hardware, model, workload, seed, **rate_sweep}


def served(setup: Setup, spec: WorkloadSpec, requests: list[SimRequest], fit: bool) -> Served | str:
    """What a setup serves of a workload's draw: all of it uncut where the accelerator's KV pool holds each request's
    peak; else, with fit, each request cut to it (fit_to); else why it is refused."""
    pool = setup.worker.num_kv_blocks * setup.worker.block_size
    over = [peak for peak in map(peak_kv_tokens, requests) if peak > pool]
    if not over:
        return Served(setup, spec, requests, 0.0)
    if fit:
        return Served(setup, spec, fit_to(requests, pool), len(over) / len(requests))
    return (f"{spec.kind} (seed {spec.seed}) on {setup.hardware}/{setup.model}: {len(over)} of {len(requests)} "
            f"requests ({len(over) / len(requests):.0%}) peak above the accelerator's KV pool of {pool:,} tokens "
            f"(the longest at {max(over):,}), which gpu-only could not serve; choose a workload that fits (short-cot, "
            f"osc) or cut them with --fit-to-accelerator")


def run_grid(setups: Sequence[Setup], specs: Sequence[WorkloadSpec], policies: Sequence[str], config: SchedulerConfig,
             fit: bool, neo_launch_ms: float, sweep: SweepSpec | None = None) -> GridResult:
    """Every policy on every (setup, workload draw) the setup serves, with every request at its arrival; with sweep,
    a rate sweep of each pair as well, its rates multiples of gpu-only's saturated request rate there."""
    drawn = {spec: generate(spec) for spec in specs}
    pairs, refused = [], []
    for setup in setups:
        for spec in specs:
            work = served(setup, spec, drawn[spec], fit)
            if isinstance(work, str):
                logger.error("refused: %s", work)
                refused.append(work)
            else:
                pairs.append(work)
    runs: list[RunResult] = []
    for pair, policy in tqdm([(p, q) for p in pairs for q in policies], desc="simulating", unit="run"):
        result = Simulation(pair.setup, pair.requests, config, pair.spec.kind, policy, neo_launch_ms).run()
        runs.append(dataclasses.replace(result, seed=pair.spec.seed, cut_fraction=pair.cut_fraction))
    goodput: list[dict] = []
    if sweep is None:
        return GridResult(runs, refused, goodput)
    for pair in tqdm(pairs, desc="rate sweeps", unit="pair"):
        base = next(r for r in runs if r.policy == "gpu-only" and r.seed == pair.spec.seed
                    and (r.hardware, r.model, r.workload) == (pair.setup.hardware, pair.setup.model, pair.spec.kind))
        swept = rate_sweep(pair.setup, pair.spec, pair.requests, policies, config, saturated_req_s(base), sweep,
                           neo_launch_ms)
        goodput.append({"hardware": pair.setup.hardware, "model": pair.setup.model, "workload": pair.spec.kind,
                        "seed": pair.spec.seed, **swept})
    return GridResult(runs, refused, goodput)


def apex_ratios(grid: GridResult) -> dict[tuple[str, str, str], dict]:
    """Per (hardware, model, workload): the draws, apex's throughput and goodput ratios over each of COMPARED (medians
    over the draws where both ran; NaN where none did), as "throughput_over_<baseline>" and "goodput_over_<baseline>",
    and whether some goodput of it was a lower bound."""
    tok: dict[tuple[str, str, str], dict[int, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in grid.runs:
        tok[r.hardware, r.model, r.workload][r.seed][r.policy] = r.throughput_tok_s
    good: dict[tuple[str, str, str], dict[int, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    bounded: dict[tuple[str, str, str], bool] = defaultdict(bool)
    for s in grid.goodput:
        key = (s["hardware"], s["model"], s["workload"])
        for policy, entry in s["policies"].items():
            g = entry["goodput"]
            good[key][s["seed"]][policy] = g["rate_per_s"] if g else 0.0
            bounded[key] |= bool(g and g["lower_bound"])
    out = {}
    for key, draws in tok.items():
        entry: dict = {"draws": len(draws), "goodput_lower_bound": bounded[key]}
        for metric, source in (("throughput", draws), ("goodput", good.get(key, {}))):
            for baseline in COMPARED:
                ratios = []
                for values in source.values():
                    base = (max(values.get("neo", 0.0), values.get("neo-published", 0.0)) if baseline == "best hybrid"
                            else values.get(baseline, 0.0))
                    if "apex" in values and base > 0:
                        ratios.append(values["apex"] / base)
                entry[f"{metric}_over_{baseline}"] = statistics.median(ratios) if ratios else math.nan
        out[key] = entry
    return out
