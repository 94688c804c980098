"""The simulator's outputs: a text table per run (throughput over the whole run and in the steady state against gpu-only
and neo in the same setup, workload and draw, latency percentiles, modes, the overlap layouts of the iterations with
CPU rows), over several draws of each workload a summary of the medians, a PNG of throughput and TPOT p99 per policy,
and the JSON result."""

import math
import statistics
from collections import defaultdict
from pathlib import Path

from apex_tools.bench import goodput_report as rep
from apex_tools.bench.common import save_figure
from apex_tools.sim.engine import RunResult
from apex_tools.sim.goodput import SweepSpec

BASELINES = {"gpu-only": "gpu", "neo": "neo", "neo-published": "neo-pub"}  # apex's ratios: policy, column name
_MODE_LETTERS = {"gpu_only": "G", "async_overlap": "O", "asym_pipeline": "P"}
_LAYOUT_LETTERS = {"fused": "F", "split": "S"}


def _group(result: RunResult) -> str:
    return f"{result.hardware}/{result.model}/{result.workload}"


def _draw(result: RunResult, seeds: set[int]) -> str:
    """The run's group, with its workload seed where the results hold more than one draw."""
    return _group(result) + (f"#{result.seed}" if len(seeds) > 1 else "")


def _ratio(result: RunResult, baseline: RunResult | None, steady: bool = False) -> str:
    """Throughput ratio (whole run, or steady state); starred where the two runs served different requests (one
    refused some)."""
    if baseline is None:
        return "-"
    mine, theirs = ((result.steady_throughput_tok_s, baseline.steady_throughput_tok_s) if steady
                    else (result.throughput_tok_s, baseline.throughput_tok_s))
    if not theirs > 0 or math.isnan(mine):
        return "-"
    star = "*" if baseline.finished != result.finished else ""
    return f"{mine / theirs:.2f}x{star}"


def _num(value: float, fmt: str) -> str:
    return "-" if math.isnan(value) else format(value, fmt)


def mode_mix(result: RunResult) -> str:
    """e.g. 'G10 O63 P27': percent of iterations in GPU_ONLY, ASYNC_OVERLAP, ASYM_PIPELINE."""
    return " ".join(f"{letter}{result.mode_mix[mode] * 100:.0f}" for mode, letter in _MODE_LETTERS.items()
                    if mode in result.mode_mix)


def layout_mix(result: RunResult) -> str:
    """e.g. 'F80 S20': percent of the iterations with CPU rows in the fused and the split layout; '-' without any."""
    if not result.layout_mix:
        return "-"
    return " ".join(f"{letter}{result.layout_mix.get(layout, 0.0) * 100:.0f}"
                    for layout, letter in _LAYOUT_LETTERS.items())


def table(results: list[RunResult]) -> str:
    """One line per run, grouped by hardware/model/workload, ratios against that group's runs of BASELINES."""
    by_group: dict[str, dict[str, RunResult]] = defaultdict(dict)
    seeds = {r.seed for r in results}
    for r in results:
        by_group[_draw(r, seeds)][r.policy] = r
    width = max(len("setup/workload"), *(len(group) for group in by_group)) + 2
    ratios = "".join(f"{'vs ' + short:>11}" for short in BASELINES.values())
    header = (f"{'setup/workload':<{width}}{'policy':<14}{'served':>11}{'tok/s':>9}{ratios}{'steady':>9}{ratios}"
              f"{'TTFT p50 s':>11}{'p99 s':>9}{'TPOT p50 ms':>12}{'p99 ms':>9}{'cpu rows':>9}{'prefill':>8}"
              f"{'preempt':>8}  modes (G/O/P %)  layouts (F/S % of hybrid)")
    lines = [header, "-" * len(header)]
    for group, runs in by_group.items():
        for r in runs.values():
            bases = [runs.get(b) for b in BASELINES]
            whole = "".join(f"{_ratio(r, b):>11}" for b in bases)
            steady = "".join(f"{_ratio(r, b, steady=True):>11}" for b in bases)
            lines.append(
                f"{group:<{width}}{r.policy:<14}{f'{r.finished}/{r.num_requests}':>11}{r.throughput_tok_s:>9.1f}"
                f"{whole}{_num(r.steady_throughput_tok_s, '.1f'):>9}{steady}"
                f"{_num(r.ttft_p50_s, '.1f'):>11}{_num(r.ttft_p99_s, '.1f'):>9}"
                f"{_num(r.tpot_p50_ms, '.1f'):>12}{_num(r.tpot_p99_ms, '.1f'):>9}{r.mean_cpu_rows:>9.1f}"
                f"{r.prefill_time_share:>8.0%}{r.preemptions:>8}  {mode_mix(r):<16} {layout_mix(r)}"
            )
        cut = next(iter(runs.values())).cut_fraction
        if cut:
            lines.append(f"{'':<{width}}{cut:.0%} of the requests cut to the accelerator's KV pool "
                         "(--fit-to-accelerator)")
    lines.append("steady: output tokens/s over the middle 40% of the completions, as NEO measures throughput; prefill: "
                 "the share of the stepping time in steps that compute a prefill chunk")
    if any("*" in line for line in lines[2:]):
        lines.append("* the two runs served different requests: one refused those longer than any KV pool it uses")
    return "\n".join(lines)


def summary(results: list[RunResult]) -> str:
    """Per hardware/model/workload and policy, over the workload's draws: the median throughput and TPOT p99, the
    median and lowest of the per-draw throughput ratios against each of BASELINES, and the median of the steady-state
    ratios."""
    runs = {(_group(r), r.seed, r.policy): r for r in results}
    groups = list(dict.fromkeys(_group(r) for r in results))
    policies = list(dict.fromkeys(r.policy for r in results))
    seeds = sorted({r.seed for r in results})
    width = max(len("setup/workload"), *(len(group) for group in groups)) + 2
    medians = "".join(f"{'vs ' + short + ' med':>15}{'min':>7}" for short in BASELINES.values())
    steadies = "".join(f"{'steady vs ' + short:>18}" for short in BASELINES.values())
    header = f"{'setup/workload':<{width}}{'policy':<14}{'draws':>6}{'tok/s':>9}{'TPOT p99 ms':>12}{medians}{steadies}"
    lines = [header, "-" * len(header)]
    for group in groups:
        for policy in policies:
            mine = [runs[group, seed, policy] for seed in seeds if (group, seed, policy) in runs]
            if not mine:
                continue
            cells, steady = [], []
            for baseline in BASELINES:
                pairs = [(r, b) for r in mine if (b := runs.get((group, r.seed, baseline))) is not None]
                ratios = [r.throughput_tok_s / b.throughput_tok_s for r, b in pairs if b.throughput_tok_s > 0]
                cells += ([f"{statistics.median(ratios):.3f}x", f"{min(ratios):.3f}x"] if ratios else ["-", "-"])
                ratios = [r.steady_throughput_tok_s / b.steady_throughput_tok_s for r, b in pairs
                          if b.steady_throughput_tok_s > 0 and not math.isnan(r.steady_throughput_tok_s)]
                steady.append(f"{statistics.median(ratios):.3f}x" if ratios else "-")
            tpot = [r.tpot_p99_ms for r in mine if not math.isnan(r.tpot_p99_ms)]
            lines.append(
                f"{group:<{width}}{policy:<14}{len(mine):>6}{statistics.median(r.throughput_tok_s for r in mine):>9.1f}"
                f"{_num(statistics.median(tpot) if tpot else math.nan, '.1f'):>12}"
                + "".join(f"{cells[2 * i]:>15}{cells[2 * i + 1]:>7}" for i in range(len(BASELINES)))
                + "".join(f"{cell:>18}" for cell in steady))
    return "\n".join(lines)


def plot(results: list[RunResult], path: Path) -> Path:
    """Bars per policy for each hardware/model/workload: throughput (top) and TPOT p99 (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = {r.seed for r in results}
    groups = list(dict.fromkeys(_draw(r, seeds) for r in results))
    policies = list(dict.fromkeys(r.policy for r in results))
    value = {(_draw(r, seeds), r.policy): r for r in results}
    width = 0.8 / len(policies)
    fig, axes = plt.subplots(2, 1, figsize=(max(6.0, 1.8 * len(groups) + 2), 7), sharex=True)
    for p, policy in enumerate(policies):
        xs = [g + (p - (len(policies) - 1) / 2) * width for g in range(len(groups))]
        runs = [value.get((group, policy)) for group in groups]
        axes[0].bar(xs, [r.throughput_tok_s if r else 0.0 for r in runs], width, label=policy)
        axes[1].bar(xs, [r.tpot_p99_ms if r and not math.isnan(r.tpot_p99_ms) else 0.0 for r in runs], width,
                    label=policy)
    axes[0].set_ylabel("output tokens/s")
    axes[0].set_title("simulated throughput", fontsize=10)
    axes[0].legend()
    axes[1].set_ylabel("TPOT p99 (ms)")
    axes[1].set_title("time per output token, p99", fontsize=10)
    axes[1].set_xticks(range(len(groups)), groups, rotation=20, ha="right", fontsize=8)
    for ax in axes:
        ax.grid(True, axis="y", alpha=0.3)
    return save_figure(fig, path)


def goodput_rule(sweep: SweepSpec | None) -> str:
    if sweep is None:
        return ""
    refined = f", each policy's goodput bisected {sweep.refine} times between them" if sweep.refine else ""
    return (f"rates {', '.join(f'{m:g}' for m in sweep.multiples)} x gpu-only's saturated request rate{refined}; "
            + rep.rule(sweep.ttft_factor, sweep.tpot_factor))


def _goodput_cell(entry: dict) -> str:
    g = entry["goodput"]
    if g is None:
        return "none"
    return f"{'>=' if g['lower_bound'] else ''}{g['rate_per_s']:.2f}"


def goodput_table(sweeps: list[dict]) -> str:
    """Per (setup, workload, draw): the objectives, each policy's goodput in req/s (>=: the highest rate it ran), apex's
    ratio over each other policy, and apex's latency at its goodput rate."""
    policies = list(dict.fromkeys(p for s in sweeps for p in s["policies"]))
    others = [p for p in policies if p != "apex"]
    width = max(len("setup/workload"), *(len(f"{s['hardware']}/{s['model']}/{s['workload']}#{s['seed']}")
                                         for s in sweeps)) + 2
    header = (f"{'setup/workload':<{width}}{'TTFT obj ms':>12}{'TPOT obj ms':>12}"
              + "".join(f"{p:>15}" for p in policies) + "".join(f"{'apex/' + p:>20}" for p in others)
              + "  apex at its goodput: TTFT p99 ms, TPOT p50/p99 ms")
    lines = [header, "-" * len(header)]
    for s in sweeps:
        name = f"{s['hardware']}/{s['model']}/{s['workload']}#{s['seed']}"
        ratios = "".join(f"{_num(v, '.2f') + 'x' if v is not None else '-':>20}"
                         for v in (s["ratios"].get(p) for p in others))
        apex = s["policies"].get("apex", {})
        at = next((r for r in apex.get("rows", []) if apex["goodput"] and r["rate_per_s"] == apex["goodput"]
                   ["rate_per_s"]), None)
        latency = (f"  {at['ttft_p99_ms']:.0f}, {at['tpot_p50_ms']:.1f}/{at['tpot_p99_ms']:.1f}" if at else "")
        lines.append(f"{name:<{width}}{s['objectives']['ttft_ms']:>12.0f}{s['objectives']['tpot_ms']:>12.1f}"
                     + "".join(f"{_goodput_cell(s['policies'][p]):>15}" for p in policies) + ratios + latency)
    lines.append("goodput in requests/s; >= where the policy met the highest rate it ran (a lower bound), and a ratio "
                 "over a lower bound is itself bounded")
    return "\n".join(lines)
