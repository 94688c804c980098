"""`apex-serve simulate -- --sweep NAME=v1,v2,...`: the grid at each value of one hardware figure, and apex's
throughput (and, with --goodput, goodput) ratios over each baseline against it, as a table and a PNG."""

import math
from pathlib import Path

from apex_tools.bench.common import save_figure
from apex_tools.sim.grid import GridResult, apex_ratios
from apex_tools.sim.report import BASELINES

UNITS = {"host-bw": "host read bandwidth (GB/s)", "cpu-efficiency": "CPU kernel efficiency",
         "gpu-bw-efficiency": "GPU bandwidth efficiency", "pcie-bw": "PCIe bandwidth (GB/s)",
         "launch-us": "GPU launch overhead per layer subtask (us)"}


def ratios(grid: GridResult, metric: str = "throughput") -> dict[str, dict[str, float]]:
    """Per hardware/model/workload, apex's median throughput (or goodput) ratio over each of BASELINES (NaN where it
    did not run beside it)."""
    return {"/".join(key): {b: entry[f"{metric}_over_{b}"] for b in BASELINES}
            for key, entry in apex_ratios(grid).items()}


def table(name: str, by_value: dict[float, GridResult]) -> str:
    baselines = list(BASELINES)
    header = (f"{'setup/workload':<32}{name:>10}" + "".join(f"{'tok/s vs ' + BASELINES[b]:>17}" for b in baselines)
              + "".join(f"{'goodput vs ' + BASELINES[b]:>19}" for b in baselines))
    lines = [header, "-" * len(header)]
    for value, grid in by_value.items():
        tok, good = ratios(grid), ratios(grid, "goodput")
        for group in tok:
            cells = [tok[group].get(b, math.nan) for b in baselines] + [good.get(group, {}).get(b, math.nan)
                                                                         for b in baselines]
            lines.append(f"{group:<32}{value:>10g}" + "".join(f"{c:>16.2f}x" if not math.isnan(c) else f"{'-':>17}"
                                                              for c in cells[:3])
                         + "".join(f"{c:>18.2f}x" if not math.isnan(c) else f"{'-':>19}" for c in cells[3:]))
    refused = dict.fromkeys(message for grid in by_value.values() for message in grid.refused)
    lines.extend(f"refused: {message}" for message in refused)
    return "\n".join(lines)


def plot(name: str, by_value: dict[float, GridResult], path: Path) -> Path:
    """One panel per setup/workload: apex's throughput ratio over each baseline against the swept figure, 1.0
    dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = sorted(by_value)
    per_value = {v: ratios(by_value[v]) for v in values}
    groups = list(dict.fromkeys(g for v in values for g in per_value[v]))
    cols = min(3, max(1, len(groups)))
    rows = -(-len(groups) // cols) if groups else 1
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, group in zip(axes.flat, groups):
        for j, (baseline, short) in enumerate(BASELINES.items()):
            ys = [per_value[v].get(group, {}).get(baseline, math.nan) for v in values]
            if not all(math.isnan(y) for y in ys):
                ax.plot(values, ys, marker="o", color=f"C{j}", label=f"apex / {short}")
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=0.8)
        ax.set_title(group, fontsize=9)
        ax.set_xlabel(UNITS.get(name, name), fontsize=8)
        ax.set_ylabel("throughput ratio", fontsize=8)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(groups):]:
        ax.set_visible(False)
    fig.suptitle(f"simulated: apex's throughput over each baseline against {UNITS.get(name, name)}", fontsize=10)
    return save_figure(fig, path)
