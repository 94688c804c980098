"""Protobuf of the scheduler's GetStats answer: its snapshot, its iterations (with their overlap and timeline) and
the engine loop's counters (the rest of the service edge is apex_serve.convert)."""

from apex_serve import engine_stats, overlap, types
from apex_serve.convert import layout_to_pb, mode_to_pb, subtask_to_pb
from apex_serve.v1 import scheduler_pb2


def overlap_to_pb(o: overlap.Overlap) -> scheduler_pb2.Overlap:
    return scheduler_pb2.Overlap(
        hidden_ratio=o.hidden_ratio, cpu_attention_ns=o.cpu_attention_ns, hidden_ns=o.hidden_ns,
        device_idle_ns=o.device_idle_ns, cpu_idle_ns=o.cpu_idle_ns,
    )


def iteration_to_pb(record: engine_stats.IterationRecord) -> scheduler_pb2.IterationStats:
    return scheduler_pb2.IterationStats(
        step_id=record.step_id, mode=mode_to_pb(record.mode), num_prefills=record.num_prefills,
        gpu_rows=record.gpu_rows, cpu_rows=record.cpu_rows, cpu_sat_out=record.cpu_sat_out,
        swaps_out=record.swaps_out, swaps_in=record.swaps_in, preemptions=record.preemptions,
        prefill_tokens=record.prefill_tokens, predicted_ns=record.predicted_ns or 0.0,
        measured_ns=record.measured_ns or 0.0,
        overlap=None if record.overlap is None else overlap_to_pb(record.overlap), layout=layout_to_pb(record.layout),
    )


def timeline_to_pb(t: engine_stats.IterationTimeline) -> scheduler_pb2.IterationTimeline:
    return scheduler_pb2.IterationTimeline(
        step_id=t.step_id, mode=mode_to_pb(t.mode), start_unix_ns=t.start_unix_ns, end_unix_ns=t.end_unix_ns,
        subtasks=[subtask_to_pb(s) for s in t.subtasks], overlap=overlap_to_pb(t.overlap),
    )


def scheduler_stats_to_pb(
    scheduler: engine_stats.SchedulerStats, serving: engine_stats.ServingStats
) -> scheduler_pb2.SchedulerStats:
    """The GetStats answer: the scheduler's snapshot and the engine loop's counters."""
    gpu, cpu = types.Placement.GPU, types.Placement.CPU
    last = scheduler.last_iteration
    return scheduler_pb2.SchedulerStats(
        num_running=scheduler.num_running,
        num_waiting=scheduler.num_waiting,
        num_free_blocks=scheduler.free_blocks[gpu],
        num_total_blocks=scheduler.total_blocks[gpu],
        num_steps=scheduler.num_steps,
        num_preemptions=scheduler.num_preemptions,
        policy=scheduler.policy,
        iterations_by_mode={mode.value: n for mode, n in scheduler.iterations_by_mode.items()},
        iterations_by_layout={layout.value: n for layout, n in scheduler.iterations_by_layout.items()},
        num_running_cpu=scheduler.num_running_cpu,
        num_free_cpu_blocks=scheduler.free_blocks[cpu],
        num_total_cpu_blocks=scheduler.total_blocks[cpu],
        num_swaps=scheduler.num_swaps,
        last_iteration=None if last is None else iteration_to_pb(last),
        cost_model_error=[
            scheduler_pb2.CostModelError(
                mode=mode_to_pb(mode), count=e.count, raw_mape=e.raw_mape, corrected_mape=e.corrected_mape,
                recent_corrected_mape=e.recent_corrected_mape,
            )
            for mode, e in scheduler.cost_model_error.items()
        ],
        recent_iterations=[iteration_to_pb(r) for r in scheduler.recent_iterations],
        latest_timeline=None if serving.latest_timeline is None else timeline_to_pb(serving.latest_timeline),
        tokens_per_s=serving.tokens_per_s,
        num_finished=serving.num_finished,
        prompt_tokens=serving.prompt_tokens,
        generation_tokens=serving.generation_tokens,
        cpu_pool_degraded=scheduler.cpu_pool_degraded,
        cpu_pool_losses=scheduler.cpu_pool_losses,
    )
