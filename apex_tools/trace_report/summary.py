"""The summary table, per mode and overall: iteration counts and mode mix, the overlap ratio (hidden CPU
attention / CPU attention, time-weighted over iterations) from the step timings of every iteration and, for
sampled iterations, from their subtask spans next to the step timings of those same iterations."""

import csv
import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apex_serve.overlap import Overlap
from apex_tools.trace_report.iterations import MODES, Iteration

OVERALL = "overall"


@dataclass(frozen=True)
class SummaryRow:
    mode: str
    iterations: int
    mix_pct: float
    overlap_steps: float | None  # None: no CPU attention ran
    sampled: int
    overlap_sampled_steps: float | None  # step timings of the sampled iterations only
    overlap_sampled_subtasks: float | None  # their subtask intervals: should agree with the column before
    cpu_attention_ms: float  # means per iteration, step timings
    device_idle_ms: float
    cpu_idle_ms: float
    device_idle_ms_subtasks: float | None  # means per sampled iteration, subtask intervals
    cpu_idle_ms_subtasks: float | None


def _ratio(overlaps: Sequence[Overlap]) -> float | None:
    cpu = sum(o.cpu_attention_ns for o in overlaps)
    return sum(o.hidden_ns for o in overlaps) / cpu if cpu else None


def _mean_ms(values: Sequence[int]) -> float | None:
    return sum(values) / len(values) / 1e6 if values else None


def _row(mode: str, its: Sequence[Iteration], total: int) -> SummaryRow:
    steps = [it.step_overlap for it in its]
    sampled = [it for it in its if it.subtasks]
    exact = [o for it in sampled if (o := it.subtask_overlap) is not None]
    return SummaryRow(
        mode=mode, iterations=len(its), mix_pct=100.0 * len(its) / total,
        overlap_steps=_ratio(steps), sampled=len(sampled),
        overlap_sampled_steps=_ratio([it.step_overlap for it in sampled]),
        overlap_sampled_subtasks=_ratio(exact),
        cpu_attention_ms=_mean_ms([o.cpu_attention_ns for o in steps]) or 0.0,
        device_idle_ms=_mean_ms([o.device_idle_ns for o in steps]) or 0.0,
        cpu_idle_ms=_mean_ms([o.cpu_idle_ns for o in steps]) or 0.0,
        device_idle_ms_subtasks=_mean_ms([o.device_idle_ns for o in exact]),
        cpu_idle_ms_subtasks=_mean_ms([o.cpu_idle_ns for o in exact]),
    )


def summarize(iterations: Sequence[Iteration]) -> list[SummaryRow]:
    """One row per mode seen (known modes first, in a fixed order), then the overall row."""
    seen = {it.mode for it in iterations}
    modes = [m for m in MODES if m in seen] + sorted(seen - set(MODES))
    rows = [_row(m, [it for it in iterations if it.mode == m], len(iterations)) for m in modes]
    return rows + [_row(OVERALL, iterations, len(iterations))]


def _cell(value: Any, digits: int) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


TABLE_COLUMNS = (  # (header, field, digits)
    ("mode", "mode", 0), ("iters", "iterations", 0), ("mix %", "mix_pct", 1), ("overlap", "overlap_steps", 3),
    ("sampled", "sampled", 0), ("sampled overlap: steps", "overlap_sampled_steps", 3),
    ("subtasks", "overlap_sampled_subtasks", 3), ("cpu attn ms/it", "cpu_attention_ms", 3),
    ("accel idle ms/it", "device_idle_ms", 3), ("cpu idle ms/it", "cpu_idle_ms", 3),
)


def table_cells(rows: Sequence[SummaryRow]) -> tuple[list[str], list[list[str]]]:
    headers = [h for h, _, _ in TABLE_COLUMNS]
    return headers, [[_cell(getattr(r, f), d) for _, f, d in TABLE_COLUMNS] for r in rows]


def format_table(rows: Sequence[SummaryRow]) -> str:
    headers, body = table_cells(rows)
    widths = [max(len(line[i]) for line in [headers, *body]) for i in range(len(headers))]
    lines = [headers, ["-" * w for w in widths], *body]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths)))
                     for line in lines)


def iteration_record(it: Iteration) -> dict[str, Any]:
    exact = it.subtask_overlap
    return {
        "step_id": it.step_id, "mode": it.mode, "num_prefills": it.num_prefills, "gpu_rows": it.gpu_rows,
        "cpu_rows": it.cpu_rows, "cpu_sat_out": it.cpu_sat_out, "sampled": bool(it.subtasks),
        "duration_ms": (it.end_unix_ns - it.start_unix_ns) / 1e6,
        "overlap_steps": it.step_overlap.hidden_ratio if it.step_overlap.cpu_attention_ns else None,
        "overlap_subtasks": exact.hidden_ratio if exact and exact.cpu_attention_ns else None,
        "cpu_attention_ms_steps": it.step_overlap.cpu_attention_ns / 1e6,
        "cpu_attention_ms_subtasks": exact.cpu_attention_ns / 1e6 if exact else None,
    }


def write_summary(rows: Sequence[SummaryRow], iterations: Sequence[Iteration], out_dir: Path) -> list[Path]:
    """summary.json (the rows and every iteration), summary.csv (the rows), iterations.csv."""
    records = [iteration_record(it) for it in iterations]
    summary_json, summary_csv, iterations_csv = (out_dir / n for n in ("summary.json", "summary.csv", "iterations.csv"))
    summary_json.write_text(json.dumps(
        {"rows": [dataclasses.asdict(r) for r in rows], "iterations": records}, indent=2) + "\n")
    for path, dicts in ((summary_csv, [dataclasses.asdict(r) for r in rows]), (iterations_csv, records)):
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(dicts[0]))
            writer.writeheader()
            writer.writerows(dicts)
    return [summary_json, summary_csv, iterations_csv]
