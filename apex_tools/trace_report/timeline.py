"""The overlap timeline PNG: per chosen iteration an accelerator lane and a CPU lane, subtask bars coloured by
kind, the accelerator's idle stretches shaded and labelled by cause, all panels on one time axis in ms from each
iteration's start."""

from collections.abc import Sequence
from pathlib import Path
from textwrap import fill

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from apex_serve.overlap import Gap, GapCause
from apex_tools.trace_report.iterations import CPU_LANE, DEVICE_LANE, SUBTASK_KINDS, Iteration
from apex_tools.trace_report.panels import Panel, Selection, gaps_note, measures_note

COLORS = {"device_linear": "#4c72b0", "device_attention": "#55a868", "staging": "#ccb974", "cpu_attention": "#c44e52"}
GAP_COLORS = {GapCause.WAITING_FOR_CPU: "#f2b8b5", GapCause.STAGING: "#eee3b0", GapCause.HOST_WORK: "#d9d9d9",
              GapCause.STEP_OVERHEAD: "#c9d7ea"}
LANES = (DEVICE_LANE, CPU_LANE)  # top to bottom
CALLOUT_ROWS = (-0.68, -0.93, -1.18)  # above the accelerator lane: names of gap causes too narrow to label inline
CHAR_FRACTION = 0.0055  # the share of the axis' width one callout character takes (7 pt text, 13 in figure)
THIN_FRACTION = 0.003  # a bar narrower than this share of the axis gets no white edge: it would be all edge
LABEL_MIN_FRACTION = 0.025  # a bar narrower than this share of the axis gets no layer number: it would not fit
GAP_LABEL_MIN_FRACTION = 0.09  # a gap this wide carries its cause inside it


def _ratio_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def title(it: Iteration) -> str:
    exact = it.subtask_overlap
    ratio = exact.hidden_ratio if exact and exact.cpu_attention_ns else None
    step = it.step_overlap.hidden_ratio if it.step_overlap.cpu_attention_ns else None
    return (f"step {it.step_id} · {it.mode} · {(it.end_unix_ns - it.start_unix_ns) / 1e6:.1f} ms · rows gpu "
            f"{it.gpu_rows} cpu {it.cpu_rows} prefills {it.num_prefills} · overlap {_ratio_text(ratio)} "
            f"(step timings {_ratio_text(step)})")


def _ms(it: Iteration, ns: int) -> float:
    return (ns - it.start_unix_ns) / 1e6


def _draw_gaps(ax: Axes, it: Iteration, axis_ms: float) -> int:
    """Shades every idle stretch of the accelerator lane by cause and names each cause once, over its longest
    stretch: inside it when it fits, else in a callout above the lane; the number of callout rows used."""
    longest: dict[GapCause, Gap] = {}
    for gap in it.gaps:
        start, end = _ms(it, gap.start_ns), _ms(it, gap.end_ns)
        ax.broken_barh([(start, end - start)], (-0.45, 0.9), facecolors=GAP_COLORS[gap.cause], zorder=0)
        best = longest.get(gap.cause)
        if best is None or gap.end_ns - gap.start_ns > best.end_ns - best.start_ns:
            longest[gap.cause] = gap
    callouts = []
    for cause, gap in longest.items():
        start, end = _ms(it, gap.start_ns), _ms(it, gap.end_ns)
        if end - start >= GAP_LABEL_MIN_FRACTION * axis_ms:
            ax.text((start + end) / 2, -0.22, cause.value, ha="center", va="center", fontsize=7, color="#333")
        else:
            callouts.append(((start + end) / 2, cause))
    row_ends = [float("-inf")] * len(CALLOUT_ROWS)  # right edge (ms) of the last callout on each row
    for middle, cause in sorted(callouts, key=lambda c: c[0]):
        half = len(cause.value) * CHAR_FRACTION * axis_ms / 2
        row = next((r for r, end in enumerate(row_ends) if end < middle - half), row_ends.index(min(row_ends)))
        row_ends[row] = middle + half
        ax.annotate(cause.value, xy=(middle, -0.45), xytext=(middle, CALLOUT_ROWS[row]), ha="center", va="center",
                    fontsize=7, color="#333", arrowprops={"arrowstyle": "-", "color": "#777", "lw": 0.6})
    return sum(end > float("-inf") for end in row_ends)


def _draw(ax: Axes, panel: Panel, axis_ms: float) -> None:
    it = panel.iteration
    rows = _draw_gaps(ax, it, axis_ms)
    for bar in it.subtasks:
        y = LANES.index(bar.lane) if bar.lane in LANES else 0
        # Staging runs beside the accelerator's compute (a copy stream), so it takes the lane's lower third
        # instead of covering the compute bars it overlaps.
        bottom, height = (y + 0.13, 0.27) if bar.kind == "staging" else (y - 0.4, 0.8)
        start, width = _ms(it, bar.start_unix_ns), (bar.end_unix_ns - bar.start_unix_ns) / 1e6
        color = COLORS.get(bar.kind, "#8c8c8c")
        edge = "white" if width >= THIN_FRACTION * axis_ms else color
        ax.broken_barh([(start, width)], (bottom, height), facecolors=color, edgecolor=edge, linewidth=0.4,
                       hatch="//" if bar.sub_batch else None, zorder=2)
        if width >= LABEL_MIN_FRACTION * axis_ms and bar.kind != "staging":
            ax.text(start + width / 2, y, str(bar.layer), ha="center", va="center", fontsize=8, color="white",
                    zorder=3)
    ax.set_yticks(range(len(LANES)), LANES)
    ax.set_ylim(len(LANES) - 0.5, CALLOUT_ROWS[rows - 1] - 0.2 if rows else -0.5)
    ax.grid(axis="x", alpha=0.3)
    heading = f"{panel.role} ({panel.why}): {title(it)}"
    ax.set_title("\n".join([heading, fill(measures_note(it), 190), gaps_note(it)]), fontsize=8, loc="left")


def axis_span_ms(iterations: Sequence[Iteration]) -> tuple[float, float]:
    """One time axis for every panel: from the earliest start (a worker's subtask can begin a hair before the
    scheduler's iteration span on the shared clock) to the latest end, in ms from each iteration's start."""
    first = min(0.0, *(_ms(it, b.start_unix_ns) for it in iterations for b in it.subtasks))
    last = max(max(_ms(it, it.end_unix_ns), *(_ms(it, b.end_unix_ns) for b in it.subtasks)) for it in iterations)
    return first, max(last, first + 1e-3)


def render(selection: Selection, path: Path) -> Path:
    panels = selection.panels
    first, last = axis_span_ms([p.iteration for p in panels])
    fig = Figure(figsize=(13, 1.0 + 2.5 * len(panels)), layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False, sharex=True)[:, 0]
    for ax, panel in zip(axes, panels, strict=True):
        _draw(ax, panel, last - first)
    axes[-1].set_xlim(first, first + (last - first) * 1.01)
    axes[-1].set_xlabel("ms from each iteration's start, one scale for all panels (numbers: layer; hatched: "
                        "sub-batch 1; shaded: accelerator idle, by cause)")
    handles = [Patch(facecolor=COLORS[k], label=k) for k in SUBTASK_KINDS]
    handles += [Patch(facecolor=GAP_COLORS[c], label=f"idle: {c.value}") for c in GapCause]
    fig.legend(handles=handles, loc="outside upper center", ncols=4, fontsize=8)
    if selection.note:
        fig.suptitle(selection.note, fontsize=8, x=0.01, ha="left")
    fig.savefig(path, dpi=110)
    return path
