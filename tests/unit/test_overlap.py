"""The overlap arithmetic: hidden CPU attention and idle time from summed step timings and from subtask intervals; the
iteration record that carries it."""

from dataclasses import fields, replace

from apex_serve import overlap
from apex_serve.engine_stats import IterationRecord
from apex_serve.types import ExecutionMode, OverlapLayout, StepTimings, Subtask, SubtaskKind

MS = 1_000_000


def test_union_merges_overlapping_and_touching_intervals() -> None:
    assert overlap.union([(5, 9), (0, 3), (2, 4), (9, 10), (20, 21)]) == [(0, 4), (5, 10), (20, 21)]


def test_intersection_length_counts_time_covered_by_both() -> None:
    a = [(0, 10), (20, 30)]
    b = [(5, 25), (28, 40)]
    assert overlap.intersection_length(a, b) == 5 + 5 + 2


def test_from_intervals_cpu_attention_6_of_10_ms_under_device_work_is_0_6_hidden() -> None:
    device = [(0, 4 * MS), (4 * MS, 8 * MS)]  # busy 0-8 ms
    cpu = [(2 * MS, 12 * MS)]  # 10 ms, of which 2-8 (6 ms) under the device
    o = overlap.from_intervals(device, cpu)
    assert o.cpu_attention_ns == 10 * MS and o.hidden_ns == 6 * MS
    assert abs(o.hidden_ratio - 0.6) < 1e-12
    assert o.device_idle_ns == 4 * MS  # window 0-12 ms, device busy 8
    assert o.cpu_idle_ns == 2 * MS


def test_from_timings_exposes_the_wait_and_hides_the_rest() -> None:
    t = StepTimings(forward_ns=20 * MS, wait_ns=3 * MS, cpu_attention_ns=12 * MS)
    o = overlap.from_timings(t)
    assert o.hidden_ns == 9 * MS and abs(o.hidden_ratio - 0.75) < 1e-12
    assert o.device_idle_ns == 3 * MS and o.cpu_idle_ns == 8 * MS


def test_gpu_only_iteration_has_zero_ratio_not_a_division_error() -> None:
    assert overlap.from_timings(StepTimings(forward_ns=5 * MS)).hidden_ratio == 0.0
    assert overlap.from_intervals([(0, 5)], []).hidden_ratio == 0.0
    assert overlap.from_intervals([], []).cpu_attention_ns == 0


def test_from_subtasks_puts_cpu_attention_on_the_cpu_lane_and_the_rest_on_the_accelerator() -> None:
    subtasks = [
        Subtask(SubtaskKind.DEVICE_LINEAR, 0, 0, 0, 2 * MS),
        Subtask(SubtaskKind.STAGING, 0, 0, 2 * MS, 3 * MS),
        Subtask(SubtaskKind.CPU_ATTENTION, 0, 0, 3 * MS, 7 * MS),
        Subtask(SubtaskKind.DEVICE_ATTENTION, 0, 0, 3 * MS, 5 * MS),
    ]
    o = overlap.from_subtasks(subtasks)
    assert o.cpu_attention_ns == 4 * MS and o.hidden_ns == 2 * MS


WAIT, STAGING, HOST, OVERHEAD = (overlap.GapCause.WAITING_FOR_CPU, overlap.GapCause.STAGING,
                                 overlap.GapCause.HOST_WORK, overlap.GapCause.STEP_OVERHEAD)


def gaps(window: tuple[int, int], compute: list[tuple[int, int]], staging: list[tuple[int, int]],
         cpu: list[tuple[int, int]]) -> list[tuple[int, int, overlap.GapCause]]:
    return [(g.start_ns, g.end_ns, g.cause) for g in overlap.accelerator_gaps(window, compute, staging, cpu)]


def test_gaps_of_one_layer_each_get_their_cause() -> None:
    """Step 0-100: plan and embedding until 10; QKV 10-30; q/k/v out 30-35; the CPU attends 36-45 and the
    accelerator waits until it resumes at 50; O-proj and MLP 50-70; staging 70-72; host bookkeeping 72-80; the LM
    head 80-90; sampling until 100."""
    assert gaps((0, 100), [(10, 30), (50, 70), (80, 90)], [(30, 35), (70, 72)], [(36, 45)]) == [
        (0, 10, OVERHEAD), (30, 35, STAGING), (35, 50, WAIT), (70, 72, STAGING), (72, 80, HOST), (90, 100, OVERHEAD)]


def test_a_gap_waits_for_the_cpu_only_when_a_cpu_attention_ends_in_it() -> None:
    # the CPU runs through the gap 40-50 but ends at 55, after the accelerator resumed: not waited for
    assert gaps((0, 100), [(0, 40), (50, 100)], [], [(35, 55)]) == [(40, 50, HOST)]
    # the CPU started late (at 48) and ended at 49: the whole gap was spent waiting for it
    assert gaps((0, 100), [(0, 40), (50, 100)], [], [(48, 49)]) == [(40, 50, WAIT)]
    # fully hidden: it ended before the gap began
    assert gaps((0, 100), [(0, 40), (50, 100)], [], [(10, 20)]) == [(40, 50, HOST)]


def test_a_cpu_attention_that_ends_last_is_waited_for_not_step_overhead() -> None:
    """The accelerator's last compute ends at 10, the CPU's at 20 (the last subtask of any kind): 10-20 waits for
    it, 20-30 is the step's own overhead."""
    assert gaps((0, 30), [(0, 10)], [], [(5, 20)]) == [(10, 20, WAIT), (20, 30, OVERHEAD)]


def test_staging_over_compute_is_no_gap_and_touching_pieces_of_one_cause_merge() -> None:
    # staging 5-15 overlaps compute 0-10: only 10-15 is idle; staging 15-20 touches it and merges
    assert gaps((0, 30), [(0, 10), (20, 30)], [(5, 15), (15, 20)], []) == [(10, 20, STAGING)]


def test_a_step_without_subtasks_is_all_overhead_and_subtasks_outside_the_window_are_clipped() -> None:
    assert gaps((0, 50), [], [], []) == [(0, 50, OVERHEAD)]
    assert gaps((10, 50), [(5, 20), (30, 60)], [], []) == [(20, 30, HOST)]


def test_subtask_gaps_sort_subtasks_by_kind_and_gap_totals_sum_per_cause() -> None:
    subtasks = [
        Subtask(SubtaskKind.STAGING, 0, 0, 1 * MS, 2 * MS),
        Subtask(SubtaskKind.DEVICE_LINEAR, 0, 0, 2 * MS, 4 * MS),
        Subtask(SubtaskKind.CPU_ATTENTION, 0, 0, 4 * MS, 6 * MS),
        Subtask(SubtaskKind.DEVICE_ATTENTION, 0, 0, 4 * MS, 5 * MS),
        Subtask(SubtaskKind.DEVICE_LINEAR, 0, 0, 7 * MS, 8 * MS),
    ]
    found = overlap.subtask_gaps((0, 10 * MS), subtasks)
    assert [(g.start_ns, g.end_ns, g.cause) for g in found] == [
        (0, 1 * MS, OVERHEAD), (1 * MS, 2 * MS, STAGING), (5 * MS, 7 * MS, WAIT), (8 * MS, 10 * MS, OVERHEAD)]
    assert overlap.gap_totals(found) == {WAIT: 2 * MS, STAGING: 1 * MS, HOST: 0, OVERHEAD: 3 * MS}


def test_a_measured_iteration_record_keeps_every_field_its_plan_gave_it() -> None:
    planned = IterationRecord(step_id=7, mode=ExecutionMode.ASYNC_OVERLAP, num_prefills=2, gpu_rows=3, cpu_rows=4,
                              cpu_sat_out=5, swaps_out=6, swaps_in=8, preemptions=9, prefill_tokens=10,
                              layout=OverlapLayout.SPLIT)
    unset = [f.name for f in fields(IterationRecord) if getattr(planned, f.name) == f.default]
    assert unset == ["predicted_ns", "measured_ns", "overlap"], "a new field: give it a value here"
    o = overlap.from_timings(StepTimings(forward_ns=20 * MS, wait_ns=3 * MS, cpu_attention_ns=12 * MS))
    assert planned.measured(11.0, 12.0, o) == replace(planned, predicted_ns=11.0, measured_ns=12.0, overlap=o)
