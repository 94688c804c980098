"""Poisson rate sweeps in the simulator, with bench-goodput's definitions (apex_tools.bench.goodput_report): the
objectives of a (setup, workload) are TTFT <= ttft_factor x and TPOT <= tpot_factor x gpu-only's p50 at the lowest
rate, the same for every policy (neo and apex are told them as their objectives); a rate is met when at least
MET_FRACTION of its requests meet both (a request that never finished misses); goodput is the highest rate met, a
lower bound where it is the highest rate its policy ran.

The rates are multiples of gpu-only's saturated request rate on the same draw (its steady-state requests/s with every
request arriving at once), so one list of multiples spans the same range of load on every setup; while some policy
meets the highest rate, the sweep doubles it, at most `extend` times. The grid's steps (a factor of sqrt(2) about the
saturated rate) are coarser than the policies' differences on an A10 (a few to 20%), so each policy's goodput is then
refined: `refine` times, that policy runs at the geometric midpoint of its highest met rate and the lowest rate above
it that it missed, which becomes the one or the other (3 bisections: a sqrt(2) step cut to 4.4%).
"""

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np

from apex_tools.bench import goodput_report as rep
from apex_tools.sim.engine import RunResult, Simulation
from apex_tools.sim.setups import Setup
from apex_tools.sim.workloads import SimRequest, WorkloadSpec, generate
from scheduler_service.config import SchedulerConfig

logger = logging.getLogger(__name__)
DEFAULT_MULTIPLES = (0.125, 0.25, 0.5, 0.71, 1.0, 1.41, 2.0, 2.83, 4.0)  # steps of 2, of sqrt(2) from 0.5 to 4


@dataclass(frozen=True)
class SweepSpec:
    multiples: tuple[float, ...] = DEFAULT_MULTIPLES
    ttft_factor: float = rep.TTFT_FACTOR
    tpot_factor: float = rep.TPOT_FACTOR
    extend: int = 2
    refine: int = 3

    def __post_init__(self) -> None:
        if not self.multiples or any(not m > 0 for m in self.multiples):
            raise ValueError(f"rate multiples: must be > 0, got {self.multiples}")
        if not (self.ttft_factor > 0 and self.tpot_factor > 0):
            raise ValueError(f"objective factors: must be > 0, got {self.ttft_factor} and {self.tpot_factor}")
        if self.extend < 0:
            raise ValueError(f"extend: must be >= 0, got {self.extend}")
        if self.refine < 0:
            raise ValueError(f"refine: must be >= 0, got {self.refine}")


def met_fraction(sim: Simulation, slo: dict[str, float]) -> float:
    """The share of the run's requests whose TTFT and TPOT are both within the objectives (ms); a request without a
    first token misses, one with a single token has no TPOT to miss."""
    ttft_ms, tpot = sim.ttft_s * 1e3, sim.tpot_ms  # [n] each
    ok = (ttft_ms <= slo["ttft_ms"]) & (np.isnan(tpot) | (tpot <= slo["tpot_ms"]))
    return float(ok.sum() / len(ok)) if len(ok) else 0.0


def saturated_req_s(result: RunResult) -> float:
    """gpu-only's request rate with every request at once: the steady state's, else the whole run's."""
    if not math.isnan(result.steady_req_s) and result.steady_req_s > 0:
        return float(result.steady_req_s)
    return result.finished / result.duration_s if result.duration_s > 0 else 0.0


def _row(result: RunResult, rate: float, multiple: float, met: float) -> dict:
    return {"rate_per_s": rate, "multiple": multiple, "load_tokens_per_s": rate * result.output_tokens
            / max(result.finished, 1), "met_fraction": met, "met": met >= rep.MET_FRACTION,
            "throughput_tok_s": result.throughput_tok_s, "ttft_p50_ms": result.ttft_p50_s * 1e3,
            "ttft_p99_ms": result.ttft_p99_s * 1e3, "tpot_p50_ms": result.tpot_p50_ms,
            "tpot_p99_ms": result.tpot_p99_ms, "mean_cpu_rows": result.mean_cpu_rows}


def _multiples(sweep: SweepSpec, rows: dict[str, list[dict]]) -> Iterator[float]:
    """The multiples to run, ascending; then, while some policy met the last (its row in rows, filled meanwhile),
    twice the last, at most sweep.extend times."""
    yield from sorted(sweep.multiples)
    multiple = max(sweep.multiples)
    for _ in range(sweep.extend):
        if not any(r and r[-1]["met"] for r in rows.values()):
            return
        multiple *= 2
        yield multiple


def bracket(rows: list[dict]) -> tuple[float, float] | None:
    """(highest multiple met, lowest multiple above it missed) of one policy's rows; None where it met none, or met
    the highest it ran (its goodput is then a lower bound: nothing to bisect)."""
    met = max((r["multiple"] for r in rows if r["met"]), default=None)
    if met is None:
        return None
    missed = [r["multiple"] for r in rows if not r["met"] and r["multiple"] > met]
    return (met, min(missed)) if missed else None


def at_rate(spec: WorkloadSpec, requests: list[SimRequest], rate: float) -> list[SimRequest]:
    """The requests (the draw of spec, as served: cut or not) at the Poisson arrivals of rate, from the same seed."""
    timed = generate(replace(spec, rate=rate))
    return [SimRequest(t.arrival_s, r.prompt_len, r.output_len) for t, r in zip(timed, requests, strict=True)]


def rate_sweep(setup: Setup, spec: WorkloadSpec, requests: list[SimRequest], policies: Sequence[str],
               config: SchedulerConfig, base_req_s: float, sweep: SweepSpec, neo_launch_ms: float) -> dict:
    """One (setup, workload draw, its requests as served): every policy at each rate (gpu-only first at the lowest:
    the objectives come from it), each policy's goodput then bisected sweep.refine times (the module docstring), as
    {objectives, base_req_s, policies: {policy: {rows (by rate), goodput}}, ratios}."""
    if "gpu-only" not in policies:
        raise ValueError("a rate sweep needs gpu-only: the objectives come from its lowest rate")
    ordered = ["gpu-only", *(p for p in policies if p != "gpu-only")]
    rows: dict[str, list[dict]] = {p: [] for p in ordered}
    slo: dict[str, float] = {}

    def run(policy: str, multiple: float) -> dict:
        rate = multiple * base_req_s
        objectives = {} if policy == "gpu-only" or not slo else {"tpot_slo_ms": slo["tpot_ms"],
                                                                  "ttft_slo_ms": slo["ttft_ms"]}
        sim = Simulation(setup, at_rate(spec, requests, rate), replace(config, **objectives), spec.kind, policy,
                         neo_launch_ms)
        result = sim.run()
        if not slo:
            slo.update(ttft_ms=sweep.ttft_factor * result.ttft_p50_s * 1e3,
                       tpot_ms=sweep.tpot_factor * result.tpot_p50_ms)
        row = _row(result, rate, multiple, met_fraction(sim, slo))
        rows[policy].append(row)
        logger.debug("%s/%s %s at %.2f req/s: %.0f%% met", setup.hardware, spec.kind, policy, rate,
                     100 * row["met_fraction"])
        return row

    for multiple in _multiples(sweep, rows):
        for policy in ordered:
            run(policy, multiple)
    for policy in ordered:
        bounds = bracket(rows[policy])
        if bounds:
            low, high = bounds
            for _ in range(sweep.refine):
                mid = math.sqrt(low * high)
                if run(policy, mid)["met"]:
                    low = mid
                else:
                    high = mid
        rows[policy].sort(key=lambda r: r["multiple"])
    out = {p: {"rows": r, "goodput": rep.goodput(r)} for p, r in rows.items()}
    return {"objectives": slo, "base_req_s": base_req_s, "policies": out, "ratios": goodput_ratios(out)}


def goodput_ratios(policies: dict[str, dict]) -> dict[str, float | None]:
    """apex's goodput over each other policy's (None where that one has none; 0 where apex has none)."""
    apex = policies.get("apex", {}).get("goodput")
    out: dict[str, float | None] = {}
    for other, entry in policies.items():
        if other == "apex" or "apex" not in policies:
            continue
        base = entry["goodput"]
        out[other] = None if not base else (apex["rate_per_s"] if apex else 0.0) / base["rate_per_s"]
    return out

