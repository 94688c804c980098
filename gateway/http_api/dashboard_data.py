"""The dashboard's JSON: each replica's routing counters and its scheduler's GetStats, reduced to what the
page draws (mode mix, overlap, tokens/s, KV use per pool, queue lengths, the latest sampled timeline with the
causes of the accelerator's idle stretches)."""

from collections import Counter
from statistics import fmean
from typing import Any

from apex_serve import convert, overlap
from apex_serve.types import ExecutionMode
from apex_serve.v1 import gpu_worker_pb2, scheduler_pb2
from gateway.replicas import ReplicaSnapshot

_HYBRID_MODES = (ExecutionMode.ASYNC_OVERLAP, ExecutionMode.ASYM_PIPELINE)
_NS_PER_MS = 1e6


def replica_json(snapshot: ReplicaSnapshot) -> dict[str, Any]:
    return {
        "address": snapshot.address,
        "serving": snapshot.serving,
        "in_flight": snapshot.in_flight,
        "submitted": snapshot.submitted,
        "completed": snapshot.completed,
        "error": snapshot.error,
        "stats": None if snapshot.stats is None else stats_json(snapshot.stats),
    }


def stats_json(s: scheduler_pb2.SchedulerStats) -> dict[str, Any]:
    recent = list(s.recent_iterations)
    recent_modes = Counter(convert.mode_from_pb(it.mode) for it in recent)
    hybrid = [
        it.overlap.hidden_ratio for it in recent
        if convert.mode_from_pb(it.mode) in _HYBRID_MODES and it.overlap.cpu_attention_ns > 0
    ]
    timeline = timeline_json(s.latest_timeline) if s.latest_timeline.subtasks else None
    return {
        "policy": s.policy,
        "tokens_per_s": s.tokens_per_s,
        "num_running": s.num_running,
        "num_running_cpu": s.num_running_cpu,
        "num_waiting": s.num_waiting,
        "num_steps": s.num_steps,
        "num_finished": s.num_finished,
        "num_preemptions": s.num_preemptions,
        "num_swaps": s.num_swaps,
        "modes": [
            {"mode": m.value, "total": s.iterations_by_mode.get(m.value, 0), "recent": recent_modes[m]}
            for m in ExecutionMode
        ],
        "recent_iterations": len(recent),
        "overlap": {
            "recent_hidden_ratio": fmean(hybrid) if hybrid else None,
            "recent_hybrid_iterations": len(hybrid),
            "latest_hidden_ratio": None if timeline is None else timeline["hidden_ratio"],
        },
        "kv": {
            "accelerator": {"used": s.num_total_blocks - s.num_free_blocks, "total": s.num_total_blocks},
            "cpu": {"used": s.num_total_cpu_blocks - s.num_free_cpu_blocks, "total": s.num_total_cpu_blocks},
        },
        "cost_model_error": [
            {"mode": convert.mode_from_pb(e.mode).value, "count": e.count, "recent_mape": e.recent_corrected_mape}
            for e in s.cost_model_error
        ],
        "timeline": timeline,
    }


def timeline_json(t: scheduler_pb2.IterationTimeline) -> dict[str, Any]:
    """Subtask intervals in ms from the iteration's start, each on its lane (accelerator or cpu), and the
    accelerator's idle stretches over the step with their causes (apex_serve.overlap.accelerator_gaps)."""
    known = [convert.subtask_from_pb(st) for st in t.subtasks if st.kind != gpu_worker_pb2.SUBTASK_KIND_UNSPECIFIED]
    start = t.start_unix_ns or min((st.start_unix_ns for st in known), default=0)
    end = max(t.end_unix_ns, max((st.end_unix_ns for st in known), default=start))

    def ms(ns: int) -> float:
        return (ns - start) / _NS_PER_MS

    subtasks = [{
        "lane": "cpu" if st.kind.on_cpu else "accelerator",
        "kind": st.kind.value,
        "layer": st.layer,
        "sub_batch": st.sub_batch,
        "start_ms": ms(st.start_unix_ns),
        "end_ms": ms(st.end_unix_ns),
    } for st in known]
    gaps = overlap.subtask_gaps((start, end), known)
    o = t.overlap
    return {
        "step_id": t.step_id,
        "mode": convert.mode_from_pb(t.mode).value,
        "duration_ms": (end - start) / _NS_PER_MS,
        "hidden_ratio": o.hidden_ratio if o.cpu_attention_ns else None,
        "cpu_attention_ms": o.cpu_attention_ns / _NS_PER_MS,
        "hidden_ms": o.hidden_ns / _NS_PER_MS,
        "device_idle_ms": o.device_idle_ns / _NS_PER_MS,
        "cpu_idle_ms": o.cpu_idle_ns / _NS_PER_MS,
        "subtasks": subtasks,
        "gaps": [
            {"cause": g.cause.name.lower(), "label": g.cause.value, "start_ms": ms(g.start_ns), "end_ms": ms(g.end_ns)}
            for g in gaps
        ],
        "idle_by_cause": [
            {"cause": cause.name.lower(), "label": cause.value, "ms": ns / _NS_PER_MS}
            for cause, ns in sorted(overlap.gap_totals(gaps).items(), key=lambda item: -item[1]) if ns
        ],
    }
