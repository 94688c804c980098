"""A grid of simulated runs: (setup, workload draw) pairs, each served as drawn (or cut to the accelerator's pool, or
refused), every policy on each; and, where asked, a Poisson rate sweep of each pair (apex_tools.sim.goodput)."""

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from tqdm import tqdm

from apex_tools.sim.engine import RunResult, Simulation
from apex_tools.sim.goodput import SweepSpec, rate_sweep, saturated_req_s
from apex_tools.sim.setups import Setup
from apex_tools.sim.workloads import SimRequest, WorkloadSpec, fit_to, generate, peak_kv_tokens
from scheduler_service.config import SchedulerConfig

logger = logging.getLogger(__name__)


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
