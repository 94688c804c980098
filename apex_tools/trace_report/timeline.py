"""The overlap timeline PNG: per sampled iteration an accelerator lane and a CPU lane, subtask bars coloured
by kind, in ms from the iteration's start."""

from collections.abc import Sequence
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from apex_tools.trace_report.iterations import CPU_LANE, DEVICE_LANE, SUBTASK_KINDS, Iteration

COLORS = {"device_linear": "#4c72b0", "device_attention": "#55a868", "staging": "#ccb974", "cpu_attention": "#c44e52"}
LANES = (DEVICE_LANE, CPU_LANE)  # top to bottom
LABEL_MIN_FRACTION = 0.025  # a bar narrower than this share of the axis gets no layer number: it would not fit


def _ratio_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def title(it: Iteration) -> str:
    exact = it.subtask_overlap
    ratio = exact.hidden_ratio if exact and exact.cpu_attention_ns else None
    step = it.step_overlap.hidden_ratio if it.step_overlap.cpu_attention_ns else None
    return (f"step {it.step_id} · {it.mode} · rows gpu {it.gpu_rows} cpu {it.cpu_rows} prefills {it.num_prefills}"
            f" · overlap {_ratio_text(ratio)} (step timings {_ratio_text(step)})")


def _draw(ax: Axes, it: Iteration) -> None:
    # The iteration span starts on the scheduler before the Step call; a worker's subtask can still start
    # a hair earlier on the shared clock, so the axis starts at the earlier of the two.
    first_ms = min(0.0, min((b.start_unix_ns - it.start_unix_ns) / 1e6 for b in it.subtasks))
    span_ms = max((b.end_unix_ns - it.start_unix_ns) / 1e6 for b in it.subtasks) - first_ms or 1.0
    for bar in it.subtasks:
        y = LANES.index(bar.lane) if bar.lane in LANES else 0
        # Staging runs beside the accelerator's compute (a copy stream), so it takes the lane's lower third
        # instead of covering the compute bars it overlaps.
        bottom, height = (y + 0.13, 0.27) if bar.kind == "staging" else (y - 0.4, 0.8)
        start = (bar.start_unix_ns - it.start_unix_ns) / 1e6
        width = (bar.end_unix_ns - bar.start_unix_ns) / 1e6
        ax.broken_barh([(start, width)], (bottom, height), facecolors=COLORS.get(bar.kind, "#8c8c8c"),
                       edgecolor="white", linewidth=0.4, hatch="//" if bar.sub_batch else None)
        if width >= LABEL_MIN_FRACTION * span_ms and bar.kind != "staging":
            ax.text(start + width / 2, y, str(bar.layer), ha="center", va="center", fontsize=8, color="white")
    ax.set_yticks(range(len(LANES)), LANES)
    ax.set_ylim(len(LANES) - 0.5, -0.5)
    ax.set_xlim(first_ms, first_ms + span_ms * 1.01)
    ax.set_title(title(it), fontsize=9, loc="left")
    ax.grid(axis="x", alpha=0.3)


def render(iterations: Sequence[Iteration], path: Path) -> Path:
    """One axes per iteration (each with its own time scale: iterations differ in length by orders of
    magnitude between prefill-heavy and decode-only steps)."""
    fig = Figure(figsize=(12, 0.6 + 1.5 * len(iterations)), layout="constrained")
    axes = fig.subplots(len(iterations), 1, squeeze=False)[:, 0]
    for ax, it in zip(axes, iterations):
        _draw(ax, it)
    axes[-1].set_xlabel("ms from the iteration's start (numbers: layer; hatched: sub-batch 1)")
    handles = [Patch(facecolor=COLORS[k], label=k) for k in SUBTASK_KINDS]
    fig.legend(handles=handles, loc="outside upper center", ncols=len(handles), fontsize=8)
    fig.savefig(path, dpi=110)
    return path
