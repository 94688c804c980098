"""`apex-serve simulate -- --reproduce-paper`: the grid behind the claims of the APEX paper's abstract, and a table of
what the simulation gives beside each claim.

The claims: apex's throughput over vLLM (here gpu-only) is +84-96% on T4 and +11-89% on A10, and over the best
CPU-GPU hybrid (here the better of neo and neo-published) up to +49-72% on T4 and +37% on A10 with long outputs. The
grid (ROWS): T4 with LLaMA-2-7B (LLaMA-3.1-8B's 16.1 GB of weights do not fit its 16 GB) on the variants of chat,
long-output and summarization whose requests its 1,088-token accelerator pool can hold (short-chat, short-cot, osc);
A10 with both models on chat, cot and summarize. Every figure of the simulation's hardware has its source
(apex_tools.sim.hardware); none is tuned toward these claims.
"""

import math

from apex_tools.sim.grid import COMPARED, GridResult, apex_ratios

ROWS = {  # (hardware, model): the workloads of the paper's settings
    ("t4", "llama2-7b"): ("short-chat", "short-cot", "osc"),
    ("t4", "llama3.1-8b"): ("chat",),  # refused: the weights do not fit
    ("a10", "llama2-7b"): ("chat", "cot", "summarize"),
    ("a10", "llama3.1-8b"): ("chat", "cot", "summarize"),
}
LONG_OUTPUT = ("cot", "short-cot")  # the workloads the "long outputs" claim is about
# the abstract's ranges: (low, high) of apex's ratio; a single figure has low == high
OVER_GPU_ONLY = {"t4": (1.84, 1.96), "a10": (1.11, 1.89)}
OVER_HYBRID_LONG_OUTPUT = {"t4": (1.49, 1.72), "a10": (1.37, 1.37)}  # "up to"


def claims(hardware: str, workload: str) -> dict[str, tuple[float, float]]:
    """The paper's figures that apply to a row: over gpu-only always, over the best hybrid for long outputs."""
    out = {"gpu-only": OVER_GPU_ONLY[hardware]}
    if workload in LONG_OUTPUT:
        out["best hybrid"] = OVER_HYBRID_LONG_OUTPUT[hardware]
    return out


def rows(grid: GridResult) -> list[dict]:
    """Per (hardware, model, workload): apex's ratios against each baseline (grid.apex_ratios) and the paper's figures
    for the row."""
    return [{"hardware": hardware, "model": model, "workload": workload, "claims": claims(hardware, workload), **ratios}
            for (hardware, model, workload), ratios in apex_ratios(grid).items()]


def _cell(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}x"


def _verdict(value: float, claim: tuple[float, float]) -> str:
    low, high = claim
    if math.isnan(value):
        return "-"
    if value < low:
        return "below"
    return "within" if value <= high else "above"


def table(grid: GridResult) -> str:
    header = (f"{'setup/workload':<30}{'':>11}{'vs gpu-only':>13}{'vs neo':>9}{'vs neo-pub':>12}{'vs best hyb':>13}"
              f"  paper: vs gpu-only, vs best hybrid (long outputs)")
    lines = [header, "-" * len(header)]
    for row in rows(grid):
        group = f"{row['hardware']}/{row['model']}/{row['workload']}"
        claim = row["claims"]
        paper = "  " + ", ".join(f"{name} {low:.2f}-{high:.2f}x" if low != high else f"{name} up to {low:.2f}x"
                                 for name, (low, high) in claim.items())
        for metric in ("throughput", "goodput"):
            cells = [row[f"{metric}_over_{b}"] for b in COMPARED]
            verdicts = [f"{name}: {_verdict(cells[0 if name == 'gpu-only' else 3], c)}" for name, c in claim.items()]
            bound = ">=" if metric == "goodput" and row["goodput_lower_bound"] else ""
            lines.append(f"{group if metric == 'throughput' else '':<30}{metric + bound:>11}{_cell(cells[0]):>13}"
                         f"{_cell(cells[1]):>9}{_cell(cells[2]):>12}{_cell(cells[3]):>13}"
                         + (paper + " |" if metric == "throughput" else "  ") + " " + ", ".join(verdicts))
    lines.extend(f"refused: {message}" for message in grid.refused)
    lines.append("ratios: apex's over each baseline, medians over the draws; goodput>=: some policy met the highest "
                 "rate it ran (its goodput a lower bound); after the paper's figures, where each line's ratio falls "
                 "against them")
    return "\n".join(lines)
