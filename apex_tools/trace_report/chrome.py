"""Chrome/Perfetto trace events (ui.perfetto.dev, chrome://tracing): one process per sampled iteration with a
thread per lane, the iteration itself on a thread of its own with its attributes as args."""

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from apex_serve.span_attributes import ITERATION_SPAN
from apex_tools.trace_report.iterations import CPU_LANE, DEVICE_LANE, Iteration
from apex_tools.trace_report.summary import iteration_record

TIDS = {"iteration": 0, DEVICE_LANE: 1, CPU_LANE: 2}


def _meta(name: str, pid: int, tid: int, value: str) -> dict[str, Any]:
    return {"name": name, "ph": "M", "pid": pid, "tid": tid, "args": {"name": value}}


def trace_events(iterations: Sequence[Iteration]) -> list[dict[str, Any]]:
    """Times in µs from the first iteration's start, so the viewer's clock starts near zero."""
    if not iterations:
        return []
    origin = min(it.start_unix_ns for it in iterations)

    def us(ns: int) -> float:
        return (ns - origin) / 1e3

    events: list[dict[str, Any]] = []
    for pid, it in enumerate(iterations, start=1):
        events.append(_meta("process_name", pid, 0, f"step {it.step_id} ({it.mode})"))
        events.append({"name": "process_sort_index", "ph": "M", "pid": pid, "tid": 0, "args": {"sort_index": pid}})
        events += [_meta("thread_name", pid, tid, lane) for lane, tid in TIDS.items()]
        events.append({"name": ITERATION_SPAN, "cat": it.mode, "ph": "X", "ts": us(it.start_unix_ns),
                       "dur": (it.end_unix_ns - it.start_unix_ns) / 1e3, "pid": pid, "tid": TIDS["iteration"],
                       "args": iteration_record(it) | {"overlap_step_timings": dataclasses.asdict(it.step_overlap)}})
        for bar in it.subtasks:
            events.append({"name": bar.kind, "cat": bar.lane, "ph": "X", "ts": us(bar.start_unix_ns),
                           "dur": (bar.end_unix_ns - bar.start_unix_ns) / 1e3, "pid": pid,
                           "tid": TIDS.get(bar.lane, TIDS[DEVICE_LANE]),
                           "args": {"layer": bar.layer, "sub_batch": bar.sub_batch}})
    return events


def write_chrome_trace(iterations: Sequence[Iteration], path: Path) -> Path:
    path.write_text(json.dumps({"traceEvents": trace_events(iterations), "displayTimeUnit": "ms"}))
    return path
